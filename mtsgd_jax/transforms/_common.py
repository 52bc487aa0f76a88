"""Pieces shared by the transformations: dtypes, the QP solver closure, safe norms, feature maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtsgd_jax import qp as _qp
from mtsgd_jax.particles import flatten_particles


def _float_dtype(params):
    """Compute dtype of the Stein algebra: the particles' float dtype, at least float32.

    Half-precision particles (bfloat16, float16) are processed in float32 (kernel,
    U, QP and the combined direction accumulate in float32); the update is cast
    back to each leaf's dtype.
    """
    leaves = jax.tree_util.tree_leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.result_type(float)
    return jnp.promote_types(dtype, jnp.float32)


def _safe_norms(sq):
    floor = jnp.maximum(1e-12 * jnp.max(sq), jnp.finfo(sq.dtype).tiny)
    return jnp.sqrt(jnp.maximum(sq, floor))


def _resolve_solver(solver, num_targets):
    """``"auto"`` -> the backend :func:`mtsgd_jax.qp._auto_method` picks for K = ``num_targets``."""
    if isinstance(solver, str) and solver == "auto":
        return _qp._auto_method(num_targets)
    return solver


def _make_solver(solver, solver_options, num_targets=None):
    """``(gram (K, K), init (K,) or None) -> weights (K,)``, with ``solver_options`` validated now.

    Raises:
      ValueError: for an unknown solver, or ``solver_options`` that is not a
        dict of ``maxiter`` (int >= 0), ``tol`` (finite, >= 0) and ``polish``
        (bool), naming the offending key and value.
    """
    if num_targets is not None:
        solver = _resolve_solver(solver, num_targets)
    options = _qp._check_solver_options(solver_options, where="solver_options")
    if not callable(solver) and solver not in _qp.SOLVERS:
        raise ValueError(f"solver must be 'auto', one of {_qp.SOLVERS} or a callable, got {solver!r}.")

    def solve(gram, init):
        return _qp.min_norm_weights(gram, method=solver, init=init, **options)

    return solve


def _check_num_targets(name, num_targets):
    """``num_targets`` must be a positive Python or numpy integer (K); not a bool, float or array."""
    if isinstance(num_targets, bool) or not isinstance(num_targets, (int, np.integer)):
        raise TypeError(
            f"{name}: num_targets must be a positive int (K, the number of targets), "
            f"got {num_targets!r} of type {type(num_targets).__name__}."
        )
    if num_targets < 1:
        raise ValueError(f"{name}: num_targets must be a positive int (K), got {num_targets!r}.")


def _is_real_number(value) -> bool:
    """A Python or numpy real scalar (bools pass here; the init-time option check names them)."""
    return isinstance(value, (int, float, np.integer, np.floating))


def _per_particle_min_norm(grads, solve, init=None, normalize_grads=False):
    """MGDA on every particle at once: (K, M, d) gradients -> (M, K) weights and (M, d) directions.

    Solves ``min_{w in simplex} ||sum_k w_k g_km||^2`` for each particle m (the
    M small QPs are vmapped, not looped). Each particle's gradients are first
    multiplied by the power of two that puts their largest entry in [1, 2)
    (exact, and the weights are scale invariant), so its (K, K) Gram can
    neither overflow nor flush to zero whatever the gradients' magnitude; the
    direction combines the gradients as given. With ``normalize_grads`` the
    gradients are scaled to unit norm first, and the direction combines the
    scaled ones.
    """
    amax = jnp.max(jnp.abs(grads), axis=(0, 2), keepdims=True)  # (1, M, 1)
    scaled = _qp._scale_by_power_of_two(grads, amax)
    if normalize_grads:
        sq = jnp.sum(scaled * scaled, axis=-1, keepdims=True)
        tiny = jnp.finfo(grads.dtype).tiny
        grads = scaled = scaled / jnp.sqrt(jnp.maximum(sq, tiny))
    gram = jnp.einsum("kmd,lmd->mkl", scaled, scaled)  # (M, K, K)
    if init is None:
        weights = jax.vmap(lambda g: solve(g, None))(gram)
    else:
        weights = jax.vmap(solve)(gram, init)
    direction = jnp.einsum("mk,kmd->md", weights.astype(grads.dtype), grads)
    return weights, direction


def _feature_map(features, params, extra_args, x, where):
    """``(z, pullback)`` for a kernel on features: ``z = features(params, **extra_args)`` (M, p), gradient stopped.

    ``pullback`` maps a cotangent (M, p) on the features to the flat (M, d)
    one on the particles (one VJP of the feature map, in ``x``'s dtype);
    ``x`` (M, d) are the flat particles. Raises a ValueError naming ``where``
    unless ``features`` returns an (M, p) array.
    """
    m = x.shape[0]
    feats, vjp = jax.vjp(lambda p: features(p, **(extra_args or {})), params)
    if getattr(feats, "ndim", None) != 2 or feats.shape[0] != m:
        raise ValueError(
            f"{where}: features(params) must return an (M, p) array with M={m}, got shape "
            f"{getattr(feats, 'shape', type(feats))}; e.g. features=lambda params: jax.vmap(net)(params) "
            "stacking one feature vector per particle."
        )

    def pullback(cotangent):
        (tree,) = vjp(cotangent.astype(feats.dtype))
        return flatten_particles(tree, dtype=x.dtype)[0]

    return jax.lax.stop_gradient(feats), pullback
