"""Pieces shared by the transformations: dtypes, the QP solver closure, safe norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtsgd_jax import qp as _qp


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
    """``"auto"``: exact ``closed_form`` for K <= 2, exact ``enumerate`` for K <= 6, projected gradient above."""
    if isinstance(solver, str) and solver == "auto":
        if num_targets <= 2:
            return "closed_form"
        return "enumerate" if num_targets <= 6 else "projected_gradient"
    return solver


def _make_solver(solver, solver_options, num_targets=None):
    if num_targets is not None:
        solver = _resolve_solver(solver, num_targets)
    options = dict(solver_options or {})
    unknown = set(options) - {"maxiter", "tol", "polish"}
    if unknown:
        raise ValueError(f"solver_options accepts 'maxiter', 'tol' and 'polish', got unexpected {sorted(unknown)}.")
    if not callable(solver) and solver not in _qp.SOLVERS:
        raise ValueError(f"solver must be 'auto', one of {_qp.SOLVERS} or a callable, got {solver!r}.")

    def solve(gram, init):
        return _qp.min_norm_weights(gram, method=solver, init=init, **options)

    return solve


def _check_num_targets(name, num_targets):
    if isinstance(num_targets, bool) or not isinstance(num_targets, int) or num_targets < 1:
        raise ValueError(f"{name}: num_targets must be a positive int (K), got {num_targets!r}.")


def _per_particle_min_norm(grads, solve, init=None, normalize=False):
    """MGDA on every particle at once: (K, M, d) gradients -> (M, K) weights and (M, d) directions.

    Solves ``min_{w in simplex} ||sum_k w_k g_km||^2`` for each particle m (the
    M small QPs are vmapped, not looped). With ``normalize`` the gradients are
    first scaled to unit norm, and the direction combines the scaled ones.
    """
    if normalize:
        sq = jnp.sum(grads * grads, axis=-1, keepdims=True)
        tiny = jnp.finfo(grads.dtype).tiny
        grads = grads / jnp.sqrt(jnp.maximum(sq, tiny))
    gram = jnp.einsum("kmd,lmd->mkl", grads, grads)  # (M, K, K)
    if init is None:
        weights = jax.vmap(lambda g: solve(g, None))(gram)
    else:
        weights = jax.vmap(solve)(gram, init)
    direction = jnp.einsum("mk,kmd->md", weights.astype(grads.dtype), grads)
    return weights, direction
