"""The min-norm quadratic programme on the simplex: ``min_{w in Delta_K} w^T U w``.

MT-SGD solves ONE such (K, K) problem per step; MOO-SVGD and MGDA solve one per
particle (vmap :func:`min_norm_weights`). Backends:

``"projected_gradient"`` (default)
    accelerated projected gradient (FISTA) with Euclidean projection onto the
    simplex (jaxopt ``ProjectedGradient`` + ``projection_simplex``); its
    occasional early stop on a non-optimal vertex is repaired by the polish
    below.
``"osqp"``
    jaxopt's OSQP.
``"frank_wolfe"``
    the MGDA min-norm solver of Sener & Koltun (2018): start from the best
    pair of vertices, then Frank-Wolfe steps with exact line search.
``"closed_form"``
    exact solution for K <= 2: ``w_1 = clip((U22 - U12) / (U11 + U22 - 2 U12), 0, 1)``.
``"enumerate"``
    exact for small K (at most 12): solves the KKT system of every one of the
    2^K - 1 candidate supports at once (batched, no loop) and keeps the best
    feasible one. No iterations, so it is the fastest choice for a few targets
    and, vmapped, for MOO-SVGD's and MGDA's per-particle problems.

Whatever the backend, U is first symmetrised and scaled to unit maximum
diagonal (the minimiser is scale invariant, and this makes tolerances
relative); the backend's answer is then polished by a short active-set search
that is kept only when it certifiably solves the problem, and projected onto
the simplex, so the returned
weights are always non-negative and sum to one. A U with non-finite entries
gives uniform weights, and a backend whose output is non-finite or far off the
simplex falls back to the initial point. All backends are jit- and vmap-compatible.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtsgd_jax import _jaxopt_backend

Array = jax.Array

__all__ = ["min_norm_weights", "projection_simplex", "SOLVERS"]

SOLVERS = ("projected_gradient", "osqp", "frank_wolfe", "closed_form", "enumerate")

_ENUMERATE_MAX_K = 12


def projection_simplex(v: Array) -> Array:
    """Euclidean projection onto the probability simplex.

    ``max(v - tau, 0)`` with ``tau = max_k (sum of the k largest entries - 1) / k``.
    For K <= 16 tau comes from all pairwise comparisons (O(K^2) element-wise
    work that fuses into a few kernels, no sort: cheaper for the small K here,
    and it handles ties exactly); above, from a sort.

    Args:
      v: shape (..., K); leading axes are batch axes.

    Returns:
      Same shape: each (K,) row projected onto ``{w >= 0, sum w = 1}``.
    """
    v = jnp.asarray(v)
    if v.ndim == 0:
        raise ValueError("projection_simplex: v must have at least one axis (K,).")
    if v.ndim > 1:
        return jnp.vectorize(projection_simplex, signature="(k)->(k)")(v)
    k = v.shape[-1]
    if k <= 16:
        ge = v[None, :] >= v[:, None]  # [i, j]: v_j >= v_i, so row i sums the entries not below v_i
        top_sum = jnp.sum(jnp.where(ge, v[None, :], 0.0), axis=1)
        top_count = jnp.sum(ge, axis=1).astype(v.dtype)
        return jnp.maximum(v - jnp.max((top_sum - 1.0) / top_count), 0.0)
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


def _kkt_candidate(u, support):
    """Minimiser of w^T U w over {sum w = 1, w_j = 0 off ``support``}, from its KKT system.

    Solves [[2 U_SS, -1], [1^T, 0]] [w_S; lam] = [0; 1] with the rows and columns
    off the support replaced by the identity. May be infeasible or non-finite
    (singular U_SS); the caller checks.
    """
    k = u.shape[0]
    on = support.astype(u.dtype)
    both = on[:, None] * on[None, :]
    top = jnp.concatenate([2.0 * u * both + jnp.diag(1.0 - on), -on[:, None]], axis=1)
    bottom = jnp.concatenate([on, jnp.zeros((1,), u.dtype)])[None, :]
    rhs = jnp.zeros((k + 1,), u.dtype).at[k].set(1.0)
    return jnp.linalg.solve(jnp.concatenate([top, bottom], axis=0), rhs)[:k]


def _polish(u, w):
    """Make an approximate minimiser exact: a short primal active-set search seeded by ``w``.

    Starting from the support of ``w``, each round solves the KKT system on the
    current support; an infeasible solution (a negative weight, or a singular
    system) drops one index, a feasible one that violates Lemma 1 adds the most
    violating index. A candidate is accepted only if it is feasible and carries
    the optimality certificate of Lemma 1 ((U w)_k >= w^T U w for all k, to
    rounding); the QP is convex, so that certificate is exact. At most 2K + 2
    rounds; without a certified candidate ``w`` is returned unchanged.
    ``u`` is scaled to unit maximum diagonal.
    """
    k = u.shape[0]
    eps = 64 * jnp.finfo(u.dtype).eps * k

    def cond(carry):
        it, _, _, done = carry
        return (~done) & (it < 2 * k + 2)

    def body(carry):
        it, support, best, _ = carry
        raw = _kkt_candidate(u, support)
        finite = jnp.all(jnp.isfinite(raw))
        feasible = finite & jnp.all(raw >= -eps)
        cand = projection_simplex(jnp.where(feasible, raw, best))
        ucand = u @ cand
        certified = feasible & (cand @ ucand - jnp.min(ucand) <= eps)
        # Infeasible: drop the most negative weight (or, if the system was singular, the
        # smallest weight of the seed) -- never the last index. Feasible: add the most
        # violating index.
        score = jnp.where(support, jnp.where(finite, raw, w), jnp.inf)
        can_drop = jnp.sum(support) > 1
        dropped = support.at[jnp.argmin(score)].set(False)
        added = support.at[jnp.argmin(ucand)].set(True)
        support = jnp.where(feasible, added, jnp.where(can_drop, dropped, support))
        best = jnp.where(certified, cand, best)
        return it + 1, support, best, certified

    support = w > 1e-9
    support = jnp.where(jnp.any(support), support, jax.nn.one_hot(jnp.argmax(w), k) > 0)
    _, _, best, _ = jax.lax.while_loop(cond, body, (0, support, w, jnp.asarray(False)))
    return best


def _enumerate(u, init, maxiter, tol):
    """Exact minimiser by enumeration of the supports (K <= 12), ``u`` scaled to unit max diagonal.

    Every support's KKT solution is computed in one batched solve; among the
    feasible ones (non-negative to rounding) the one of least objective wins.
    Singular systems (e.g. repeated directions) are simply infeasible: a smaller
    support attains the same value. If nothing is feasible (only possible for
    a numerically indefinite U) the vertex of least diagonal entry is returned.
    """
    del init, maxiter, tol
    k = u.shape[0]
    if k == 1:
        return jnp.ones((1,), u.dtype)
    if k > _ENUMERATE_MAX_K:
        raise ValueError(f"min_norm_weights: method='enumerate' needs K <= {_ENUMERATE_MAX_K}, got K = {k}.")
    codes = np.arange(1, 2**k)
    masks = jnp.asarray(((codes[:, None] >> np.arange(k)[None, :]) & 1).astype(bool))
    raw = jax.vmap(lambda m: _kkt_candidate(u, m))(masks)  # (2^K - 1, K)
    eps = 64 * jnp.finfo(u.dtype).eps * k
    feasible = jnp.all(jnp.isfinite(raw), axis=1) & jnp.all(raw >= -eps, axis=1)
    cand = jnp.where(feasible[:, None], jnp.maximum(raw, 0.0), 1.0 / k)
    cand = cand / jnp.sum(cand, axis=1, keepdims=True)
    value = jnp.where(feasible, jnp.einsum("sk,kl,sl->s", cand, u, cand), jnp.inf)
    best = jnp.argmin(value)
    vertex = jax.nn.one_hot(jnp.argmin(jnp.diagonal(u)), k, dtype=u.dtype)
    return jnp.where(jnp.isfinite(value[best]), cand[best], vertex)


_BACKENDS: dict[str, Callable] = {
    "projected_gradient": _projected_gradient,
    "osqp": _osqp,
    "frank_wolfe": _frank_wolfe,
    "closed_form": _closed_form,
    "enumerate": _enumerate,
}

_ITERATIVE = ("projected_gradient", "osqp", "frank_wolfe")

_DEFAULT_MAXITER = {"projected_gradient": 1000, "osqp": 1000, "frank_wolfe": 1000, "closed_form": 0, "enumerate": 0}


def min_norm_weights(
    gram: Array,
    *,
    method: str | Callable = "projected_gradient",
    init: Array | None = None,
    maxiter: int | None = None,
    tol: float | None = None,
    polish: bool | None = None,
) -> Array:
    """Minimum-norm convex combination weights ``argmin_{w in simplex} w^T U w``.

    Args:
      gram: U, shape (K, K), symmetric positive semi-definite (small
        asymmetries and negative eigenvalues from rounding are tolerated).
      method: one of ``"projected_gradient"`` (default), ``"osqp"``,
        ``"frank_wolfe"``, ``"closed_form"`` (K <= 2), ``"enumerate"``
        (exact, K <= 12), or a callable
        ``(U, init, maxiter, tol) -> w`` taking the rescaled U.
      init: optional warm start on the simplex, shape (K,) (used by
        ``"projected_gradient"``; others ignore it). Defaults to uniform.
      maxiter: iteration cap; a per-method default when ``None``.
      tol: solver tolerance, relative to U's largest diagonal entry; default
        ``max(10 * eps, 1e-10)`` of U's dtype (about 1e-6 in float32), the
        finest accuracy the dtype supports.
      polish: refine the backend's answer (default: for the iterative built-in
        backends only, not ``"closed_form"`` or a callable) by a short exact
        active-set search
        seeded with the support it found, kept only when it provably solves
        the QP (the Lemma-1 optimality certificate holds to rounding). Makes
        the iterative backends exact on small K, where the backend has come
        close.

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
    if tol is None:
        tol = max(10.0 * float(jnp.finfo(gram.dtype).eps), 1e-10)
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
    if name not in ("closed_form", "enumerate"):  # the exact methods ignore the warm start
        init = projection_simplex(init)
    w = jnp.asarray(solve(scaled, init, maxiter, tol), gram.dtype)
    # A backend that diverged (non-finite or wildly off-simplex iterates) falls back to the
    # warm start, so the guarantee below never rests on the backend behaving.
    sane = jnp.all(jnp.isfinite(w)) & (jnp.max(jnp.abs(w)) < 1e3)
    w = projection_simplex(jnp.where(sane, w, init))
    if polish is None:
        polish = name in _ITERATIVE
    if polish and k > 1:
        w = _polish(scaled, w)
    return jnp.where(finite, w, jnp.full((k,), 1.0 / k, gram.dtype))
