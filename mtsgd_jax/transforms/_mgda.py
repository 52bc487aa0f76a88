"""MGDA (Sener & Koltun, 2018) applied to every particle independently."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtsgd_jax._validation import check_init_inputs, check_target_grads, check_update_inputs, num_particles
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles
from mtsgd_jax.transforms._common import _check_num_targets, _float_dtype, _make_solver, _per_particle_min_norm

Array = jax.Array

__all__ = ["MGDAState", "mgda"]


class MGDAState(NamedTuple):
    """State of :func:`mgda`.

    Attributes:
      weights: (M, K) each particle's min-norm weights at the last step
        (uniform before the first); they warm-start the next QPs.
      count: () int32 number of updates performed.
    """

    weights: Array
    count: Array


def mgda(
    num_targets: int,
    *,
    solver: str | Callable = "auto",
    solver_options: dict | None = None,
    normalize_grads: bool = False,
    warm_start: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Multiple-gradient descent: each particle follows its own min-norm common descent direction.

    For every particle m, ``w_m = argmin_{w in simplex} ||sum_k w_k g_km||^2``
    over its own K loss gradients, and the update is ``d_m = sum_k w_mk g_km``
    (a "gradient": chain with a first-order optimiser to descend it). The M
    small QPs are solved together (vmapped), not in a Python loop. Particles
    do not interact.

    Args:
      num_targets: K.
      solver: QP backend for :func:`~mtsgd_jax.qp.min_norm_weights`; ``"auto"``
        (default) is exact for K <= 6 (``"closed_form"`` / ``"enumerate"``),
        projected gradient above.
      solver_options: ``{"maxiter": int >= 0, "tol": float >= 0, "polish": bool}``
        (any subset) passed to the backend; anything else raises ValueError.
      normalize_grads: scale each task gradient to unit norm first (the
        common MGDA-UB normalisation; the published MOO-SVGD code does this).
      warm_start: start each particle's QP at its previous weights.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(grads, state, params)`` takes loss gradients with leaves
      (K, M, ...) and the particles (leaves (M, ...)) and returns directions
      shaped like the particles, with :class:`MGDAState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtsgd_jax import mgda
      >>> x = jnp.zeros((4, 2))
      >>> grads = jnp.stack([x + jnp.array([1.0, 0.0]), x + jnp.array([0.0, 1.0])])
      >>> d, _ = mgda(2).update(grads, mgda(2).init(x), x)
      >>> d[0].tolist()                       # the min-norm point of the segment
      [0.5, 0.5]
    """
    _check_num_targets("mgda", num_targets)
    solve = _make_solver(solver, solver_options, num_targets)

    def init_fn(params):
        check_init_inputs(params, "mgda.init", normalize_grads=normalize_grads, warm_start=warm_start)
        m = num_particles(params, "params")
        dtype = _float_dtype(params)
        return MGDAState(jnp.full((m, num_targets), 1.0 / num_targets, dtype), jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, MGDAState, "mgda.update")
        del extra_args
        check_target_grads(grads, params, num_targets)
        x, spec = flatten_particles(params, dtype=_float_dtype(params))
        g = flatten_target_grads(grads, dtype=x.dtype)
        init = state.weights.astype(x.dtype) if warm_start else None
        weights, direction = _per_particle_min_norm(g, solve, init, normalize_grads)
        new_state = MGDAState(weights.astype(state.weights.dtype), optax.safe_int32_increment(state.count))
        return unflatten_particles(direction, spec), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
