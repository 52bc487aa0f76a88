"""The min-norm quadratic programme on the simplex: ``min_{w in Delta_K} w^T U w``.

MT-SGD solves ONE such (K, K) problem per step; MOO-SVGD and MGDA solve one per
particle (vmap :func:`min_norm_weights`). Backends:

``"projected_gradient"`` (default)
    accelerated projected gradient with Euclidean projection onto the simplex
    (jaxopt ``ProjectedGradient`` + ``projection_simplex``).
``"osqp"``
    jaxopt's OSQP.
``"frank_wolfe"``
    the MGDA min-norm solver of Sener & Koltun (2018): start from the best
    pair of vertices, then Frank-Wolfe steps with exact line search.
``"closed_form"``
    exact solution for K <= 2: ``w_1 = clip((U22 - U12) / (U11 + U22 - 2 U12), 0, 1)``.

Whatever the backend, U is first symmetrised and scaled to unit maximum
diagonal (the minimiser is scale invariant, and this makes tolerances
relative), and the result is projected onto the simplex, so the returned
weights are always non-negative and sum to one. A U with non-finite entries
gives uniform weights, and a backend whose output is non-finite or far off the
simplex falls back to the initial point. All backends are jit- and vmap-compatible.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mtsgd_jax import _jaxopt_backend

Array = jax.Array

__all__ = ["min_norm_weights", "projection_simplex", "SOLVERS"]

SOLVERS = ("projected_gradient", "osqp", "frank_wolfe", "closed_form")


def projection_simplex(v: Array) -> Array:
    """Euclidean projection of ``v`` (K,) onto the probability simplex (sort-based)."""
    k = v.shape[-1]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    ind = jnp.arange(1, k + 1, dtype=v.dtype)
    cond = u - css / ind > 0
    rho = jnp.max(jnp.where(cond, jnp.arange(k), 0))
    theta = css[rho] / (rho + 1).astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _pair_weight(uaa, ubb, uab):
    """Weight on ``a`` minimising ||t a + (1 - t) b||^2 for t in [0, 1]."""
    denom = uaa + ubb - 2.0 * uab
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, jnp.clip((ubb - uab) / safe, 0.0, 1.0), 0.5)


def _closed_form(u, init, maxiter, tol):
    k = u.shape[0]
    if k == 1:
        return jnp.ones((1,), u.dtype)
    if k != 2:
        raise ValueError(f"min_norm_weights: method='closed_form' needs K <= 2, got U of shape {u.shape}.")
    w1 = _pair_weight(u[0, 0], u[1, 1], u[0, 1])
    return jnp.stack([w1, 1.0 - w1])


def _frank_wolfe(u, init, maxiter, tol):
    k = u.shape[0]
    if k == 1:
        return jnp.ones((1,), u.dtype)
    # Best pair of vertices (the MGDA initialisation).
    diag = jnp.diagonal(u)
    t = _pair_weight(diag[:, None], diag[None, :], u)  # weight on row index
    value = t**2 * diag[:, None] + (1 - t) ** 2 * diag[None, :] + 2 * t * (1 - t) * u
    value = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, value)
    flat = jnp.argmin(value)
    i, j = flat // k, flat % k
    w0 = jnp.zeros(k, u.dtype).at[i].add(t[i, j]).at[j].add(1.0 - t[i, j])

    def cond(carry):
        it, _, gap = carry
        return (it < maxiter) & (gap > tol)

    def body(carry):
        it, w, _ = carry
        uw = u @ w
        vv = w @ uw
        idx = jnp.argmin(uw)
        gap = vv - uw[idx]  # Frank-Wolfe duality gap / 2
        gamma = _pair_weight(u[idx, idx], vv, uw[idx])  # weight on vertex idx
        w_new = (1.0 - gamma) * w + gamma * jax.nn.one_hot(idx, k, dtype=u.dtype)
        return it + 1, w_new, gap

    _, w, _ = jax.lax.while_loop(cond, body, (0, w0, jnp.asarray(jnp.inf, u.dtype)))
    return w


def _projected_gradient(u, init, maxiter, tol):
    if u.shape[0] == 1:
        return jnp.ones((1,), u.dtype)
    return _jaxopt_backend.projected_gradient(u, init, maxiter, tol)


def _osqp(u, init, maxiter, tol):
    if u.shape[0] == 1:
        return jnp.ones((1,), u.dtype)
    return _jaxopt_backend.osqp(u, init, maxiter, tol)


_BACKENDS: dict[str, Callable] = {
    "projected_gradient": _projected_gradient,
    "osqp": _osqp,
    "frank_wolfe": _frank_wolfe,
    "closed_form": _closed_form,
}

_DEFAULT_MAXITER = {"projected_gradient": 200, "osqp": 1000, "frank_wolfe": 200, "closed_form": 0}


def min_norm_weights(
    gram: Array,
    *,
    method: str | Callable = "projected_gradient",
    init: Array | None = None,
    maxiter: int | None = None,
    tol: float = 1e-7,
) -> Array:
    """Minimum-norm convex combination weights ``argmin_{w in simplex} w^T U w``.

    Args:
      gram: U, shape (K, K), symmetric positive semi-definite (small
        asymmetries and negative eigenvalues from rounding are tolerated).
      method: one of ``"projected_gradient"`` (default), ``"osqp"``,
        ``"frank_wolfe"``, ``"closed_form"`` (K <= 2), or a callable
        ``(U, init, maxiter, tol) -> w`` taking the rescaled U.
      init: optional warm start on the simplex, shape (K,) (used by
        ``"projected_gradient"``; others ignore it). Defaults to uniform.
      maxiter: iteration cap; a per-method default when ``None``.
      tol: solver tolerance, relative to U's largest diagonal entry.

    Returns:
      Weights of shape (K,), non-negative, summing to one, in U's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax import min_norm_weights
      >>> U = jnp.array([[1.0, -1.0], [-1.0, 1.0]])   # opposite directions
      >>> min_norm_weights(U, method="closed_form").tolist()
      [0.5, 0.5]
    """
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"min_norm_weights: gram must be a square (K, K) matrix with K >= 1, got shape {gram.shape}.")
    if not jnp.issubdtype(gram.dtype, jnp.floating):
        gram = gram.astype(jnp.result_type(float))
    k = gram.shape[0]
    if callable(method):
        solve, name = method, getattr(method, "__name__", "custom")
    else:
        if method not in _BACKENDS:
            raise ValueError(f"min_norm_weights: method must be one of {SOLVERS} or a callable, got {method!r}.")
        solve, name = _BACKENDS[method], method
    if maxiter is None:
        maxiter = _DEFAULT_MAXITER.get(name, 200)
    if init is None:
        init = jnp.full((k,), 1.0 / k, gram.dtype)
    else:
        init = jnp.asarray(init, gram.dtype)
        if init.shape != (k,):
            raise ValueError(f"min_norm_weights: init must have shape ({k},) to match gram, got {init.shape}.")

    finite = jnp.all(jnp.isfinite(gram))
    sym = 0.5 * (gram + gram.T)
    scale = jnp.max(jnp.abs(jnp.diagonal(sym)))
    scale = jnp.where(finite & (scale > 0), scale, 1.0)
    scaled = jnp.where(finite, sym / scale, jnp.eye(k, dtype=gram.dtype))
    init = projection_simplex(init)
    w = jnp.asarray(solve(scaled, init, maxiter, tol), gram.dtype)
    # A backend that diverged (non-finite or wildly off-simplex iterates) falls back to the
    # warm start, so the guarantee below never rests on the backend behaving.
    sane = jnp.all(jnp.isfinite(w)) & (jnp.max(jnp.abs(w)) < 1e3)
    w = projection_simplex(jnp.where(sane, w, init))
    return jnp.where(finite, w, jnp.full((k,), 1.0 / k, gram.dtype))
