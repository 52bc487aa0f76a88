"""Optax gradient transformations: MT-SGD, SVGD and the multi-objective baselines.

Every transformation here takes per-target LOSS gradients with leaves
(K, M, ...) (SVGD: (M, ...)) and the particles as ``params`` (leaves (M, ...)),
and returns a direction shaped like the particles that a first-order optimiser
in the same ``optax.chain`` descends.
"""

from mtsgd_jax.transforms._mtsgd import WEIGHTINGS, MTSGDState, SVGDState, mtsgd, svgd

__all__ = ["MTSGDState", "SVGDState", "WEIGHTINGS", "mtsgd", "svgd"]
