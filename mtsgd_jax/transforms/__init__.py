"""Optax gradient transformations: MT-SGD, SVGD and the multi-objective baselines.

Every multi-target transformation here takes per-target LOSS gradients with
leaves (K, M, ...) (SVGD: (M, ...)) and the particles as ``params`` (leaves
(M, ...)), and returns a direction shaped like the particles that a first-order
optimiser later in the same ``optax.chain`` descends:

* :func:`mtsgd` -- one Stein direction per target, ONE simplex QP per step;
* :func:`svgd` -- MT-SGD with K = 1;
* :func:`moo_svgd` -- one MGDA QP per particle, then SVGD smoothing and repulsion;
* :func:`mgda` -- every particle's own min-norm common descent direction;
* :func:`linear_scalarization` -- fixed (per-particle) weights;
* :func:`pareto_mtl` -- Pareto MTL: one preference region per particle (needs ``losses=``);
* :func:`project_box` -- last in a chain: keeps the particles in a box;
* :func:`normalize_target_grads` -- first in a chain: unit-norm per-particle, per-target gradients.

The multi-target ones are also registered by name (:data:`TRANSFORMS`):
:func:`make_transform` builds one from a spec such as
``"mtsgd:weighting=score,solver=enumerate"`` (:func:`parse_spec` reads specs,
:func:`format_spec` writes them, :func:`transform_options` lists a method's options).
"""

from mtsgd_jax.transforms._constraints import clip_to_box, project_box
from mtsgd_jax.transforms._mgda import MGDAState, mgda
from mtsgd_jax.transforms._moo_svgd import MOOSVGDState, moo_svgd
from mtsgd_jax.transforms._pareto_mtl import ParetoMTLState, pareto_mtl, pareto_mtl_preferences
from mtsgd_jax.transforms._registry import TRANSFORMS, TransformSpec, format_spec, make_transform, parse_spec, transform_options
from mtsgd_jax.transforms._mtsgd import WEIGHTINGS, MTSGDState, SVGDState, mtsgd, svgd
from mtsgd_jax.transforms._normalize import normalize_target_grads
from mtsgd_jax.transforms._scalarization import linear_scalarization, preference_vectors

__all__ = [
    "MGDAState",
    "MOOSVGDState",
    "MTSGDState",
    "ParetoMTLState",
    "SVGDState",
    "TRANSFORMS",
    "TransformSpec",
    "WEIGHTINGS",
    "clip_to_box",
    "format_spec",
    "linear_scalarization",
    "make_transform",
    "mgda",
    "moo_svgd",
    "mtsgd",
    "normalize_target_grads",
    "parse_spec",
    "pareto_mtl",
    "pareto_mtl_preferences",
    "preference_vectors",
    "project_box",
    "svgd",
    "transform_options",
]
