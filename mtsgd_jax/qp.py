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
    exact solution for K <= 2: ``w_1 = clip((U22 - U12) / (U11 + U22 - 2 U12), 0, 1)``
    when the denominator is positive, else (an indefinite U from rounding) the
    vertex of smaller diagonal entry.
``"enumerate"``
    exact for small K (at most 12): solves the KKT system of every one of the
    2^K - 1 candidate supports at once (batched, no loop) and keeps the
    candidate of smallest Lemma-1 gap. No iterations, so it is the fastest choice for a few targets
    and, vmapped, for MOO-SVGD's and MGDA's per-particle problems.

Whatever the backend, U is first multiplied by an exact power of two that
puts its largest entry in [1, 2), then symmetrised (the minimiser is scale
invariant; the scaling is exact, so nothing overflows or flushes to zero, and
it makes tolerances relative). Iterative backends' answers are then polished by
a short active-set search that keeps the candidate with the smallest Lemma-1
gap ``w^T U w - min_k (U w)_k`` (zero exactly at a minimiser, and an upper
bound on half the objective excess), and never one worse than the backend's
own. The returned weights are always non-negative and sum to one. A U with
non-finite entries gives uniform weights, and a backend whose output is
non-finite or far off the simplex falls back to the initial point. All
backends are jit- and vmap-compatible.

``"auto"`` picks an exact backend for few targets (:func:`_auto_method`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtsgd_jax import _jaxopt_backend

Array = jax.Array

__all__ = ["min_norm_weights", "projection_simplex", "SOLVERS"]

SOLVERS = ("projected_gradient", "osqp", "frank_wolfe", "closed_form", "enumerate")

_ENUMERATE_MAX_K = 12

# "auto": the exact closed form up to this K, exact enumeration of the supports up to
# _AUTO_ENUMERATE_MAX_K (2^K - 1 batched KKT solves: cheap there), projected gradient above.
_AUTO_CLOSED_FORM_MAX_K = 2
_AUTO_ENUMERATE_MAX_K = 6


def _auto_method(num_targets: int) -> str:
    """The backend ``"auto"`` stands for with K = ``num_targets`` targets.

    ``"closed_form"`` for K <= 2, ``"enumerate"`` for 3 <= K <= 6 (both exact),
    ``"projected_gradient"`` (polished) above.
    """
    if num_targets <= _AUTO_CLOSED_FORM_MAX_K:
        return "closed_form"
    if num_targets <= _AUTO_ENUMERATE_MAX_K:
        return "enumerate"
    return "projected_gradient"


_OPTION_NAMES = ("maxiter", "tol", "polish")


def _check_solver_options(options: Mapping | None, *, where: str) -> dict:
    """Validated ``{"maxiter", "tol", "polish"}`` (each optional), with plain Python values.

    Args:
      options: a mapping with a subset of the keys ``maxiter`` (int >= 0),
        ``tol`` (finite number >= 0) and ``polish`` (bool); ``None`` values mean
        the method's default.
      where: how error messages name the options: ``"solver_options"`` gives
        ``solver_options['tol']``, a name ending in a colon such as
        ``"min_norm_weights:"`` gives ``min_norm_weights: tol``.

    Raises:
      ValueError: naming the offending key, the value given and what is expected.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{where} must be a dict with keys among {_OPTION_NAMES} or None, got {options!r}.")
    unknown = sorted(set(options) - set(_OPTION_NAMES), key=str)
    if unknown:
        raise ValueError(
            f"{where} accepts only the keys {_OPTION_NAMES}, got unexpected {unknown}; remove them "
            "(optimiser settings such as a learning rate belong to the optax optimiser chained after it)."
        )
    def label(key):
        return f"{where} {key}" if where.endswith(":") else f"{where}[{key!r}]"

    out = {}
    maxiter = options.get("maxiter")
    if maxiter is not None:
        if isinstance(maxiter, (bool, np.bool_)) or not isinstance(maxiter, (int, np.integer)) or maxiter < 0:
            raise ValueError(
                f"{label('maxiter')} must be a non-negative int (the iteration cap), or None for the "
                f"method's default; got {maxiter!r}."
            )
        out["maxiter"] = int(maxiter)
    tol = options.get("tol")
    if tol is not None:
        ok = not isinstance(tol, (bool, np.bool_)) and isinstance(tol, (int, float, np.integer, np.floating))
        if not ok or not math.isfinite(tol) or tol < 0:
            raise ValueError(
                f"{label('tol')} must be a finite number >= 0 (relative to U's largest entry), or None for "
                f"the dtype's default; got {tol!r}."
            )
        out["tol"] = float(tol)
    polish = options.get("polish")
    if polish is not None:
        if not isinstance(polish, (bool, np.bool_)):
            raise ValueError(f"{label('polish')} must be True, False or None (the method's default); got {polish!r}.")
        out["polish"] = bool(polish)
    return out


def _exp2(n: Array, dtype) -> Array:
    """``2.0 ** n`` exactly in ``dtype``, built from its bits; n is an integer array in the normal exponent range."""
    info = jnp.finfo(dtype)
    bias = 1 - info.minexp
    n = jnp.clip(n.astype(jnp.int32), info.minexp, info.maxexp - 1)
    uint = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[info.bits]
    return lax.bitcast_convert_type((n + bias).astype(uint) << info.nmant, dtype)


def _scale_by_power_of_two(x: Array, amax: Array) -> Array:
    """``x * 2**(1 - e)`` with ``amax = m 2**e``, ``m in [0.5, 1)``: an exact rescaling putting ``amax`` in [1, 2).

    Args:
      x: any shape, float.
      amax: shape broadcastable against ``x``, the (non-negative) magnitude to
        normalise, typically ``max |x|`` over the axes that share one scale.
        Zero or non-finite ``amax`` leaves ``x`` unchanged.

    Returns:
      ``x``'s shape and dtype. The factor is applied as two multiplications by
      powers of two that each stay in the normal range, so it is exact unless
      an entry falls more than the dtype's exponent range below ``amax``;
      nothing is ever computed as a reciprocal (XLA rewrites ``x / s`` as
      ``x * (1 / s)``, and ``1 / s`` is subnormal -- flushed to zero -- for
      ``s`` near the top of the range).
    """
    amax = jnp.asarray(amax, x.dtype)
    ok = jnp.isfinite(amax) & (amax > 0)
    _, e = jnp.frexp(jnp.where(ok, amax, 1.0))
    n = jnp.where(ok, 1 - e.astype(jnp.int32), 0)
    half = n // 2
    return x * _exp2(half, x.dtype) * _exp2(n - half, x.dtype)


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
    """Weight ``t`` on ``a`` minimising ``t^2 U_aa + (1 - t)^2 U_bb + 2 t (1 - t) U_ab`` over [0, 1], any symmetric U.

    Convex along the segment (``U_aa + U_bb - 2 U_ab > 0``): the clipped
    stationary point. Otherwise (linear, or concave for an indefinite U) the
    better end point, ``U_aa`` and ``U_bb`` being the objective there; equal
    end points of a constant objective give 1/2. Arguments broadcast together.
    """
    denom = uaa + ubb - 2.0 * uab
    convex = denom > 0
    interior = jnp.clip((ubb - uab) / jnp.where(convex, denom, 1.0), 0.0, 1.0)
    vertex = jnp.where(ubb < uaa, 0.0, jnp.where((uaa < ubb) | (denom < 0), 1.0, 0.5))
    return jnp.where(convex, interior, vertex).astype(jnp.result_type(uaa, ubb, uab))


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
    off the support replaced by the identity. May be infeasible, or NaN when the
    system is singular (non-finite solve, or a residual above sqrt(eps) of its
    scale); the caller checks.
    """
    k = u.shape[0]
    on = support.astype(u.dtype)
    both = on[:, None] * on[None, :]
    # A ridge of (K + 1) eps (U is scaled to a largest entry in [1, 2), so this is at rounding level)
    # makes U_SS definite: equal or dependent rows of U (a singular system) then give the
    # ridge's minimiser on the face instead of no answer.
    ridge = (k + 1) * jnp.finfo(u.dtype).eps
    top = jnp.concatenate([2.0 * (u + ridge * jnp.eye(k, dtype=u.dtype)) * both + jnp.diag(1.0 - on), -on[:, None]], axis=1)
    bottom = jnp.concatenate([on, jnp.zeros((1,), u.dtype)])[None, :]
    rhs = jnp.zeros((k + 1,), u.dtype).at[k].set(1.0)
    a = jnp.concatenate([top, bottom], axis=0)
    sol = jnp.linalg.solve(a, rhs)
    # A (numerically) singular system -- e.g. two equal rows of U on the support -- can come back
    # finite but meaningless from LU; its residual gives it away. Report it as non-finite.
    resid = jnp.max(jnp.abs(a @ sol - rhs))
    bound = jnp.sqrt(jnp.finfo(u.dtype).eps) * (jnp.max(jnp.abs(a)) * jnp.max(jnp.abs(sol)) + 1.0)
    return jnp.where(resid <= bound, sol[:k], jnp.nan)


def _certificate(u, w):
    """Lemma-1 gap of ``w``: ``w^T U w - min_k (U w)_k``, shape (), and ``U w``, shape (K,).

    On the simplex the gap is non-negative and zero exactly at a minimiser
    (``(U w)_k >= w^T U w`` for every k, with equality on the support); U being
    convex, ``f(w) - min f <= 2 * gap``.
    """
    uw = u @ w
    return w @ uw - jnp.min(uw), uw


def _polish(u, w):
    """Refine an approximate minimiser ``w`` (K,) of ``w^T U w`` by a short primal active-set search.

    Starting from the support of ``w``, each round solves the KKT system on the
    current support; a solution with a negative weight (or a singular system)
    drops the most negative index, a feasible one adds the index of least
    ``(U w)_k``. Every round's solution, projected onto the simplex, is scored
    by its Lemma-1 gap (:func:`_certificate`), and the best-scoring point seen
    -- ``w`` itself included -- is returned, so the result never has a larger
    gap than ``w``. Stops when the gap is at rounding level (about
    ``(K + 1) eps`` of U's largest entry), when the support stops changing, or
    after 2K + 2 rounds. ``u`` (K, K) is symmetric, scaled to a largest entry
    in [1, 2).
    """
    k = u.shape[0]
    tight = (k + 1) * jnp.finfo(u.dtype).eps

    def cond(carry):
        it, _, _, gap, stalled = carry
        return (~stalled) & (gap > tight) & (it < 2 * k + 2)

    def body(carry):
        it, support, best, best_gap, _ = carry
        raw = _kkt_candidate(u, support)
        finite = jnp.all(jnp.isfinite(raw))
        cand = projection_simplex(jnp.where(finite, raw, best))
        gap, ucand = _certificate(u, cand)
        better = finite & (gap < best_gap)
        best = jnp.where(better, cand, best)
        best_gap = jnp.where(better, gap, best_gap)
        # Negative weight or singular system: drop the most negative weight (for a singular
        # system, the smallest weight of the seed) -- never the last index. Otherwise add the
        # index of least (U w)_k.
        infeasible = ~finite | jnp.any(support & (raw < 0))
        score = jnp.where(support, jnp.where(finite, raw, w), jnp.inf)
        can_drop = jnp.sum(support) > 1
        dropped = support.at[jnp.argmin(score)].set(False)
        added = support.at[jnp.argmin(ucand)].set(True)
        new_support = jnp.where(infeasible, jnp.where(can_drop, dropped, support), added)
        stalled = jnp.all(new_support == support)
        return it + 1, new_support, best, best_gap, stalled

    support = w > 1e-9
    support = jnp.where(jnp.any(support), support, jax.nn.one_hot(jnp.argmax(w), k) > 0)
    gap0, _ = _certificate(u, w)
    gap0 = jnp.where(jnp.isfinite(gap0), gap0, jnp.inf)
    init = (0, support, w, gap0, jnp.asarray(False))
    _, _, best, _, _ = jax.lax.while_loop(cond, body, init)
    return best


def _enumerate(u, init, maxiter, tol):
    """Exact minimiser by enumeration of the supports (K <= 12); ``u`` (K, K) symmetric.

    Every support's KKT solution is computed in one batched solve; those
    non-negative to rounding are feasible. Among the feasible ones whose
    Lemma-1 gap (:func:`_certificate`) is at rounding level, (K + 1) eps, the
    one of least objective wins (each is a minimiser to rounding: objective
    excess at most twice the gap); if there is none, the one of least gap.
    Singular systems (e.g. repeated directions) are simply infeasible: a
    smaller support attains the same value. If nothing is feasible (only
    possible for a numerically indefinite U) the vertex of least diagonal
    entry is returned.
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
    eps = jnp.finfo(u.dtype).eps
    feasible = jnp.all(jnp.isfinite(raw), axis=1) & jnp.all(raw >= -64 * eps * k, axis=1)
    cand = jnp.where(feasible[:, None], jnp.maximum(raw, 0.0), 1.0 / k)
    cand = cand / jnp.sum(cand, axis=1, keepdims=True)
    ucand = cand @ u  # U symmetric: rows are (U w)^T
    value = jnp.sum(cand * ucand, axis=1)
    gap = jnp.where(feasible, value - jnp.min(ucand, axis=1), jnp.inf)
    # Among the feasible candidates certified to rounding level, the least objective (it breaks
    # the ties of a degenerate U the way a minimum-norm direction wants); without any, the least
    # gap; without any feasible one (only for a numerically indefinite U), the smallest diagonal.
    certified = gap <= (k + 1) * eps
    score = jnp.where(jnp.any(certified), jnp.where(certified, value, jnp.inf), gap)
    best = jnp.argmin(score)
    vertex = jax.nn.one_hot(jnp.argmin(jnp.diagonal(u)), k, dtype=u.dtype)
    return jnp.where(jnp.isfinite(score[best]), cand[best], vertex)


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
        asymmetries and negative eigenvalues from rounding are tolerated), any
        finite magnitude: it is rescaled by an exact power of two first.
      method: one of ``"projected_gradient"`` (default), ``"osqp"``,
        ``"frank_wolfe"``, ``"closed_form"`` (K <= 2), ``"enumerate"``
        (exact, K <= 12), ``"auto"`` (exact ``"closed_form"`` for K <= 2,
        ``"enumerate"`` for K <= 6, ``"projected_gradient"`` above), or a
        callable ``(U, init, maxiter, tol) -> w`` taking the rescaled,
        symmetrised U (largest entry in [1, 2)).
      init: optional warm start on the simplex, shape (K,) (used by
        ``"projected_gradient"``; others ignore it). Defaults to uniform.
      maxiter: iteration cap, an int >= 0; a per-method default when ``None``.
      tol: solver tolerance, a finite number >= 0 relative to U's largest
        entry; default ``max(10 * eps, 1e-10)`` of U's dtype (about 1e-6 in
        float32), the finest accuracy the dtype supports.
      polish: refine the backend's answer (default: for the iterative built-in
        backends only, not ``"closed_form"``, ``"enumerate"`` or a callable)
        by a short active-set search seeded with the support it found, which
        returns the point of smallest Lemma-1 gap it met (never a larger gap
        than the backend's answer). Makes the iterative backends exact on
        small K, where the backend has come close.

    Returns:
      Weights of shape (K,), non-negative, summing to one, in U's dtype.

    Raises:
      ValueError: for a gram that is not (K, K), an unknown method, an init
        of the wrong shape, or a ``maxiter`` / ``tol`` / ``polish`` of the
        wrong type or range.

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
    options = _check_solver_options({"maxiter": maxiter, "tol": tol, "polish": polish}, where="min_norm_weights:")
    if isinstance(method, str) and method == "auto":
        method = _auto_method(k)
    if callable(method):
        solve, name = method, getattr(method, "__name__", "custom")
    else:
        if method not in _BACKENDS:
            raise ValueError(
                f"min_norm_weights: method must be 'auto', one of {SOLVERS} or a callable, got {method!r}."
            )
        solve, name = _BACKENDS[method], method
    maxiter = options.get("maxiter", _DEFAULT_MAXITER.get(name, 200))
    tol = options.get("tol", max(10.0 * float(jnp.finfo(gram.dtype).eps), 1e-10))
    if init is None:
        init = jnp.full((k,), 1.0 / k, gram.dtype)
    else:
        init = jnp.asarray(init, gram.dtype)
        if init.shape != (k,):
            raise ValueError(f"min_norm_weights: init must have shape ({k},) to match gram, got {init.shape}.")

    finite = jnp.all(jnp.isfinite(gram))
    safe = jnp.where(finite, gram, 0.0)
    # Exact power-of-two rescaling BEFORE symmetrising: entries end in [-2, 2], so the sum
    # below cannot overflow and no reciprocal of a huge scale is ever formed.
    scaled = _scale_by_power_of_two(safe, jnp.max(jnp.abs(safe)))
    scaled = jnp.where(finite, 0.5 * (scaled + scaled.T), jnp.eye(k, dtype=gram.dtype))
    if name not in ("closed_form", "enumerate"):  # the exact methods ignore the warm start
        init = projection_simplex(init)
    w = jnp.asarray(solve(scaled, init, maxiter, tol), gram.dtype)
    # A backend that diverged (non-finite or wildly off-simplex iterates) falls back to the
    # warm start, so the guarantee below never rests on the backend behaving.
    sane = jnp.all(jnp.isfinite(w)) & (jnp.max(jnp.abs(w)) < 1e3)
    w = projection_simplex(jnp.where(sane, w, init))
    polish = options.get("polish", name in _ITERATIVE)
    if polish and k > 1:
        w = _polish(scaled, w)
    return jnp.where(finite, w, jnp.full((k,), 1.0 / k, gram.dtype))
