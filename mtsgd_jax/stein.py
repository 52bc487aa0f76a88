"""Per-target Stein (SVGD) directions and their RKHS Gram matrix U.

Notation (docs/algorithm.md sections 2-3): particles ``x`` (M, d), scores
``s_k = grad log p_k`` stacked as ``S`` (K, M, d), kernel matrix ``Kmat``
(M, M) and repulsion ``R_m = sum_a grad_{x_a} k(x_a, x_m)`` (M, d), which is
the same for every target. Then

    Phi_k = (Kmat S_k + R) / M                          (K, M, d)
    U     = G + c 1^T + 1 c^T + t                       (K, K)
    G_kl  = <S_k, Kmat S_l> / M^2
    c_k   = <S_k, R> / M^2
    t     = sum_ab (-2 d kappa'_ab - 4 r2_ab kappa''_ab) / M^2

so the whole computation is one (M, M) x (M, K d) product plus O(K^2 M d)
contractions: O(K M^2 d) time and O(M^2 + K M d) memory, with no per-pair work.
``diag(U)`` is the squared kernel Stein discrepancy (V-statistic) of the
particle set against each target.

Every path to U (the kernel products ``Kmat S`` for small d, the inner
products ``S S^T`` for particles much longer than K M, and a kernel on
features ``F(theta)`` with the repulsion pulled back through ``F``) produces
one :class:`SteinSystem`: the pieces of U and what the combined direction
``sum_k w_k Phi_k`` needs. U is assembled from them by one function
(:func:`assemble_scaled_gram`). The kernel and how its interactions are
evaluated (row blocks, a mesh axis) travel together as a
:class:`KernelContext`, validated once.

Numerics: the scores are divided by a power of two ``alpha`` of their largest
entry before any product is formed (exact), and U is assembled as
``U / beta^2`` with ``beta = max(alpha, 1)``, so no intermediate overflows;
only the reported U / diag(U) are scaled back (and are +inf exactly where
they exceed the dtype's range). Distances and the repulsion are formed on
centred points without cancellation (see :func:`~mtsgd_jax.kernels.kernel_products`):
in float32, U agrees with float64 on the same inputs to a few hundred ulps of
max|U| (about 1e-5 relative) for clusters far from the origin (spread 1 at
1e3, 0.01 at 1e2) and fixed bandwidths down to 1e-8. A particle whose
position or score is not finite is left out of every sum (M then counts the
finite particles) and its directions are NaN.

The public functions take pytrees: ``particles`` with leaves (M, ...) and
``scores`` with leaves (K, M, ...) (an (M, d) array is a one-leaf pytree).
The ``*_flat`` functions take the (M, d) / (K, M, d) matrices directly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtsgd_jax import kernels as _kernels
from mtsgd_jax._validation import check_target_grads
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles

Array = jax.Array
PyTree = Any

__all__ = [
    "KernelContext",
    "kernel_context",
    "SteinSystem",
    "stein_system",
    "assemble_scaled_gram",
    "unscale_gram",
    "SteinQuantities",
    "stein_quantities",
    "stein_directions",
    "gram_matrix",
    "kernel_stein_discrepancy",
]


# ---------------------------------------------------------------------------
# the execution context of the kernel work
# ---------------------------------------------------------------------------


class KernelContext(NamedTuple):
    """How the kernel interactions of a particle set are evaluated; built by :func:`kernel_context`.

    Attributes:
      kernel: the :class:`~mtsgd_jax.kernels.RadialKernel`.
      block_size: ``None`` (the (M, M) matrices at once) or B (B rows at a
        time, O(B M) memory; see :func:`~mtsgd_jax.kernels.kernel_products`).
      axis_name: ``None``, or the mesh axis the particles are split over when
        the computation runs inside ``shard_map``: every sum over particles is
        then global.
    """

    kernel: _kernels.RadialKernel
    block_size: int | None = None
    axis_name: str | None = None


def kernel_context(
    kernel: _kernels.RadialKernel | None = None,
    *,
    block_size: int | None = None,
    axis_name: str | None = None,
    where: str = "kernel_context",
) -> KernelContext:
    """A validated :class:`KernelContext` (errors name ``where``, the caller).

    Args:
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`, or ``None`` for
        ``rbf("median")``.
      block_size: a positive int or ``None``.
      axis_name: a mesh axis name (str) or ``None``.
      where: the name the error messages start with (e.g. ``"mtsgd"``).

    Raises:
      TypeError: for a kernel that is not a RadialKernel (e.g. the string
        ``"rbf"``) or an axis name that is not a string.
      ValueError: for a block size that is not a positive int.
    """
    kernel = _kernels.check_kernel(kernel, where)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
            raise ValueError(
                f"{where}: block_size must be a positive int (rows of the kernel matrix per block) or None, "
                f"got {block_size!r}; e.g. block_size=1024, or None to form the (M, M) matrices at once."
            )
        block_size = int(block_size)
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(
            f"{where}: axis_name must be the name (str) of the mesh axis that splits the particles, or None, "
            f"got {axis_name!r} ({type(axis_name).__name__}); e.g. axis_name='particles'."
        )
    return KernelContext(kernel, block_size, axis_name)


# Contexts announced by transformations while their update is traced (see :func:`observe_contexts`).
_OBSERVERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("mtsgd_jax_kernel_context_observers", default=())


class ContextFound(Exception):
    """Raised by :func:`announce_context` inside ``observe_contexts(stop=True)``: ``.context`` is the first one."""

    def __init__(self, context: KernelContext):
        super().__init__(context)
        self.context = context


@contextlib.contextmanager
def observe_contexts(*, stop: bool = False, check: Callable[[KernelContext], None] | None = None) -> Iterator[list]:
    """Collect the :class:`KernelContext` of every transformation whose ``update`` runs (is traced) inside.

    Yields a list that fills in call order. ``check(context)`` runs on each
    announcement before anything else (it may raise, e.g. on a mesh axis
    that disagrees, before the update issues a collective). With
    ``stop=True`` the first announcement raises :class:`ContextFound`
    instead of returning, which ends an abstract trace as soon as the
    context is known (nothing after it is traced).
    """
    seen: list = []
    token = _OBSERVERS.set(_OBSERVERS.get() + ((seen, stop, check),))
    try:
        yield seen
    finally:
        _OBSERVERS.reset(token)


def announce_context(context: KernelContext) -> None:
    """Called by a transformation's ``update`` first thing: report ``context`` to the active observers (no effect otherwise)."""
    observers = _OBSERVERS.get()
    for seen, _, check in observers:
        if check is not None:
            check(context)
        seen.append(context)
    if any(stop for _, stop, _ in observers):
        raise ContextFound(context)


# ---------------------------------------------------------------------------
# U's pieces and the combined direction, one value for every path
# ---------------------------------------------------------------------------


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x, axis_name):
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _finite_rows(*arrays: Array) -> Array:
    """(M,) True where every entry of particle m's row is finite; arrays (M, ...) or (K, M, ...)."""
    ok = None
    for a in arrays:
        lead = 0 if a.ndim == 2 else 1
        fin = jnp.all(jnp.isfinite(a), axis=tuple(i for i in range(a.ndim) if i != lead))
        ok = fin if ok is None else ok & fin
    return ok


def valid_particles(x: Array, vectors: Array) -> Array:
    """(M,) True for particles whose row of ``x`` (M, d) and rows of ``vectors`` (K, M, d) are all finite."""
    return _finite_rows(x, vectors)


def _power_of_two_above(amax: Array, axis_name: str | None, dtype) -> Array:
    """The power of two ``alpha`` with ``amax / alpha`` in [1, 2), ``amax`` () being the largest
    ``|entry|`` of some vectors (maximised over devices); 1 if it is 0. Dividing the vectors by
    it is exact, and products of the scaled vectors cannot overflow."""
    amax = _pmax(amax, axis_name)
    _, e = jnp.frexp(amax)
    return jnp.where(amax > 0, jnp.ldexp(jnp.ones((), dtype), e - 1), jnp.ones((), dtype))


def assemble_scaled_gram(first: Array, cross: Array, trace_term: Array, alpha: Array) -> tuple[Array, Array]:
    """``U / beta^2`` (K, K) and ``beta = max(alpha, 1)`` from the scaled pieces; the one place U is formed.

    With ``first = G / alpha^2`` (K, K), ``cross = c / alpha`` (K,) and the
    constant ``t`` (): ``U / beta^2 = (alpha/beta)^2 first + (alpha/beta^2)
    (cross 1^T + 1 cross^T) + t / beta^2``. Every factor is a power of two
    (exact) and every term is finite whenever the pieces are; the simplex QP's
    solution is the same for U and U / beta^2. Symmetrised.
    """
    one = jnp.ones((), first.dtype)
    alpha = alpha.astype(first.dtype)
    beta = jnp.maximum(alpha, one)
    inv_beta = one / beta
    a_b = jnp.minimum(alpha, one)  # alpha / beta
    a_b2 = a_b * inv_beta  # alpha / beta^2
    u = a_b * a_b * first + a_b2 * (cross[:, None] + cross[None, :]) + (trace_term * inv_beta) * inv_beta
    return 0.5 * (u + u.T), beta


def unscale_gram(scaled: Array, beta: Array) -> Array:
    """``U`` from ``U / beta^2`` (entries beyond the dtype's range become +-inf)."""
    return (scaled * beta) * beta


def _nan_rows(x: Array, valid: Array) -> Array:
    """``x`` (..., M, d) with the rows of excluded particles set to NaN."""
    return jnp.where(valid[:, None], x, jnp.asarray(jnp.nan, x.dtype))


def _as_pieces(scores) -> tuple[Array, ...]:
    """Scores given as one (K, M, d) array or as (K, M, d_l) pieces, as a tuple of pieces."""
    return tuple(scores) if isinstance(scores, (tuple, list)) else (scores,)


class SteinSystem(NamedTuple):
    """U's pieces and the combined direction of a particle set against K targets (flat layout).

    Built by :func:`stein_system` on any of its paths. The scores ``S``
    (K, M, d) enter as ``S' = S / alpha`` with excluded particles' rows zero,
    and n counts the included particles (over all devices when sharded).

    Attributes:
      first: ``G / alpha^2 = <S'_k, Kmat S'_l> / n^2``, (K, K).
      cross: ``c / alpha = <S'_k, R> / n^2``, (K,).
      trace_term: ``t`` of U's decomposition, () (0 for a kernel on features,
        where it would need every network's Jacobian; a constant shift of U
        leaves the simplex QP's solution unchanged).
      score_sq: ``||S'_k||_F^2``, (K,): the diagonal of the scores' Gram.
      scaled_scores: ``S'``, (K, M, d) (this device's rows when sharded), or
        the tuple of its (K, M, d_l) pieces when the scores came in pieces
        and the inner-product path was taken.
      kernel_scores: ``Kmat S'_k`` for every target, (K, M, d), or ``None``
        on the inner-product path.
      kernel_matrix: ``Kmat`` (M, M) on the inner-product path, else ``None``.
      repulsion: ``R``, (M, d), zero rows for excluded particles.
      scale: ``alpha``, () power of two.
      num_particles: n, () float.
      valid: (M,) bool, the included particles.
      bandwidth: () kernel bandwidth used.
      axis_name: the mesh axis of the particles, or ``None``.
    """

    first: Array
    cross: Array
    trace_term: Array
    score_sq: Array
    scaled_scores: Array | tuple[Array, ...]
    kernel_scores: Array | None
    kernel_matrix: Array | None
    repulsion: Array
    scale: Array
    num_particles: Array
    valid: Array
    bandwidth: Array
    axis_name: str | None = None

    def scaled_gram(self) -> tuple[Array, Array]:
        """``(U / beta^2, beta)``: U (K, K) formed on the scaled pieces, and the power of two it is divided by."""
        return assemble_scaled_gram(self.first, self.cross, self.trace_term, self.scale)

    def gram(self) -> Array:
        """U (K, K): finite unless its entries truly exceed the dtype's range."""
        return unscale_gram(*self.scaled_gram())

    def direction(self, weights: Array) -> Array:
        """``sum_k w_k Phi_k`` (M, d) for ``weights`` (K,), in O(K M d) past the kernel work; NaN rows for excluded particles."""
        dtype = self.repulsion.dtype
        w = weights.astype(dtype)
        if self.kernel_scores is not None:
            smoothed = jnp.einsum("k,kmd->md", w, self.kernel_scores)
        else:
            kmat = self.kernel_matrix.astype(dtype)
            parts = [jnp.matmul(kmat, jnp.einsum("k,kmd->md", w, p)) for p in _as_pieces(self.scaled_scores)]
            smoothed = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        phi = (smoothed * self.scale.astype(dtype) + jnp.sum(w) * self.repulsion) / jnp.maximum(self.num_particles, 1)
        return _nan_rows(phi, self.valid)

    def directions(self) -> Array:
        """Every target's direction Phi (K, M, d) (NaN rows for excluded particles)."""
        ks = self.kernel_scores
        if ks is None:
            scores = jnp.concatenate(_as_pieces(self.scaled_scores), axis=2)
            ks = jnp.einsum("ab,kbd->kad", self.kernel_matrix.astype(scores.dtype), scores)
        phi = (ks * self.scale + self.repulsion[None]) / jnp.maximum(self.num_particles, 1)
        return _nan_rows(phi, self.valid)


def use_inner_products(num_targets: int, num_particles: int, dim: int, context: KernelContext) -> bool:
    """Whether :func:`stein_system` takes the inner-product path for K targets, M particles of dimension d.

    It does when the particles are much longer than K M (networks): ``4 (K + 1) M <= d``,
    unblocked and unsharded (that path holds the (M, M) kernel matrix on one device).
    """
    return context.block_size is None and context.axis_name is None and 4 * (num_targets + 1) * num_particles <= dim


def stein_system(
    x: Array,
    scores: Array,
    context: KernelContext,
    *,
    features: tuple[Array, Callable[[Array], Array]] | None = None,
    inner_products: bool | None = None,
) -> SteinSystem:
    """U's pieces and the combined direction for particles ``x`` (M, d) and ``scores`` (K, M, d).

    Args:
      x: particles (this device's rows when ``context.axis_name`` is set).
      scores: ``grad log p_k`` at every particle (K, M, d).
      context: a :class:`KernelContext`; ``block_size`` and ``axis_name`` are
        honoured on every path.
      features: ``(z, pullback)`` for a kernel on features: ``z`` (M, p) the
        particles' feature vectors and ``pullback`` mapping a (M, p) cotangent
        to the (M, d) one on the particles (a VJP of the feature map). The
        repulsion is then ``pullback(sum_a grad_{z_a} k(z_a, z_m))`` and the
        trace term is left out (0). ``None``: the kernel acts on ``x``.
      inner_products: ``True`` forms ``Kmat`` (M, M) and the inner products
        ``S' S'^T`` (K M, K M) instead of ``Kmat S'`` (K, M, d): cheaper when
        d is much larger than K M, since nothing of size K M d is written
        (needs ``block_size`` and ``axis_name`` None). ``None`` (default)
        decides by :func:`use_inner_products`.

    ``scores`` may also be a tuple of pieces (K, M, d_l) whose concatenation
    along the last axis is the (K, M, d) array (a network's layers, from
    :func:`~mtsgd_jax.particles.target_grad_pieces`): the inner-product path
    then works piece by piece and never copies the scores into one array (the
    other paths concatenate them).

    Returns:
      :class:`SteinSystem`. A particle whose position, score (any target) or
      feature row is not finite drops out of every kernel sum: the others'
      directions and U equal those of the set without it (the median
      bandwidth and the 1/n normalisation use the number n of finite
      particles), and its own directions are NaN.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtsgd_jax import rbf
      >>> from mtsgd_jax.stein import kernel_context, stein_system
      >>> x = jax.random.normal(jax.random.key(0), (10, 2))
      >>> system = stein_system(x, jnp.stack([-x, 1.0 - x]), kernel_context(rbf(), block_size=4))
      >>> system.gram().shape, system.direction(jnp.array([0.5, 0.5])).shape
      ((2, 2), (10, 2))
    """
    pieces = _as_pieces(scores)
    if not pieces or any(p.ndim != 3 or p.shape[:2] != pieces[0].shape[:2] for p in pieces):
        raise ValueError(
            "stein_system: scores must be (K, M, d) or a tuple of (K, M, d_l) pieces, got shapes "
            f"{[jnp.shape(p) for p in pieces]}."
        )
    k, m = pieces[0].shape[:2]
    d = sum(p.shape[2] for p in pieces)
    axis = context.axis_name
    if inner_products is None:
        inner_products = use_inner_products(k, m, d, context)
    elif inner_products and (context.block_size is not None or axis is not None):
        raise ValueError("stein_system: inner_products=True needs block_size=None and axis_name=None.")
    if not inner_products and len(pieces) > 1:
        pieces = (jnp.concatenate(pieces, axis=2),)
    points, pullback = (x, None) if features is None else features
    # one pass over the scores for both their finiteness and their scale: a row's largest |entry|
    # is non-finite exactly when the row holds a NaN or an infinity (max propagates NaN)
    row_amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p), axis=2, initial=0) for p in pieces])  # (K, M)
    valid = jnp.all(jnp.isfinite(row_amax), axis=0) & (_finite_rows(x) if features is None else _finite_rows(x, points))
    dtype = pieces[0].dtype
    alpha = _power_of_two_above(jnp.max(jnp.where(valid[None, :], row_amax, 0), initial=0), axis, dtype)
    sp = tuple(jnp.where(valid[None, :, None], p, jnp.zeros((), dtype)) / alpha for p in pieces)
    n = _psum(jnp.sum(valid), axis).astype(x.dtype)
    nn = jnp.maximum(n, 1) ** 2
    if inner_products:
        # Kmat itself, as Kmat @ I (exact), from the same kernel evaluation as the repulsion.
        prods = _kernels.kernel_products(context.kernel, points, jnp.eye(m, dtype=points.dtype), valid=valid)
        kmat = prods.kv
        ss = functools.reduce(jnp.add, [jnp.matmul(f, f.T) for f in (p.reshape(k * m, -1) for p in sp)])
        ss = ss.reshape(k, m, k, m)
        first = jnp.einsum("ab,kalb->kl", kmat.astype(ss.dtype), ss) / nn
        score_sq = jnp.einsum("kmkm->k", ss)
        ks = None
    else:
        (s,) = sp
        # One GEMM for all targets: (M, M) @ (M, K d).
        stacked = jnp.transpose(s, (1, 0, 2)).reshape(m, k * d)
        prods = _kernels.kernel_products(
            context.kernel, points, stacked, block_size=context.block_size, axis_name=axis, valid=valid
        )
        ks = prods.kv.reshape(m, k, d).transpose(1, 0, 2)
        first = _psum(jnp.einsum("kmd,lmd->kl", s, ks), axis) / nn
        score_sq = _psum(jnp.sum(s * s, axis=(1, 2)), axis)
        kmat = None
    if pullback is None:
        rep = prods.repulsion
        trace_term = prods.trace_sum / nn
    else:
        rep = pullback(prods.repulsion.astype(points.dtype)).astype(x.dtype)
        rep = jnp.where(valid[:, None], rep, jnp.zeros((), rep.dtype))
        trace_term = jnp.zeros((), x.dtype)
    if inner_products:
        # <S'_k, R> as the diagonal blocks of S' R^T (K M, M): GEMMs over the scores as they lie in
        # memory (an einsum over (m, d) lets the compiler transpose the (K, M, d) scores instead of R)
        r = rep.astype(dtype)
        offsets = np.cumsum([0] + [p.shape[2] for p in sp])
        sr = functools.reduce(
            jnp.add, [jnp.matmul(p.reshape(k * m, -1), r[:, lo:hi].T) for p, lo, hi in zip(sp, offsets[:-1], offsets[1:])]
        )
        cross = jnp.trace(sr.reshape(k, m, m), axis1=1, axis2=2) / nn
    else:
        cross = _psum(jnp.einsum("kmd,md->k", s, rep.astype(s.dtype)), axis) / nn
    s = sp if len(sp) > 1 else sp[0]
    return SteinSystem(first, cross, trace_term, score_sq, s, ks, kmat, rep, alpha, n, valid, prods.bandwidth, axis)


def stein_terms_flat(
    x: Array,
    scores: Array,
    kernel: _kernels.RadialKernel,
    *,
    block_size: int | None = None,
    axis_name: str | None = None,
) -> SteinSystem:
    """:func:`stein_system` on the kernel-products path (per-target directions available), ``x`` (M, d), ``scores`` (K, M, d)."""
    ctx = kernel_context(kernel, block_size=block_size, axis_name=axis_name, where="stein_terms_flat")
    return stein_system(x, scores, ctx, inner_products=False)


def directions_from_terms(system: SteinSystem) -> Array:
    """Per-target directions Phi (K, M, d) of a :class:`SteinSystem` (NaN rows for excluded particles)."""
    return system.directions()


# ---------------------------------------------------------------------------
# pytree API
# ---------------------------------------------------------------------------


class SteinQuantities(NamedTuple):
    """Stein quantities of a particle set against K targets.

    Particles whose position or score is not finite are left out (see
    :func:`stein_system`); their directions are NaN.

    Attributes:
      directions: pytree shaped like the scores, leaves (K, M, ...): Phi_k at
        every particle.
      gram: U, (K, K), symmetric positive semi-definite (formed on scaled
        scores, so only entries that truly exceed the dtype's range are inf).
      ksd: diag(U), (K,): squared kernel Stein discrepancy per target.
      bandwidth: scalar kernel bandwidth used.
    """

    directions: PyTree
    gram: Array
    ksd: Array
    bandwidth: Array


def _flat_system(particles, scores, kernel, block_size, where):
    ctx = kernel_context(kernel, block_size=block_size, where=where)
    check_target_grads(scores, particles, None, name="scores", params_name="particles")
    x, spec = flatten_particles(particles)
    s = flatten_target_grads(scores, dtype=x.dtype)
    return stein_system(x, s, ctx, inner_products=False), spec


def stein_quantities(
    particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> SteinQuantities:
    """Per-target Stein directions, U and the per-target KSD in one pass.

    Args:
      particles: pytree with leaves (M, ...).
      scores: pytree with the same structure, leaves (K, M, ...):
        ``grad log p_k`` at every particle (the NEGATIVE loss gradient).
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default RBF with the
        median heuristic.
      block_size: process the (M, M) kernel interactions this many rows at a
        time (bounded memory for large M); ``None`` (default) all at once.

    Returns:
      :class:`SteinQuantities`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtsgd_jax import stein_quantities, rbf
      >>> x = jax.random.normal(jax.random.key(0), (10, 2))
      >>> scores = jnp.stack([-x, -(x - 1.0)])        # two Gaussian targets
      >>> q = stein_quantities(x, scores, rbf())
      >>> q.gram.shape, q.directions.shape
      ((2, 2), (2, 10, 2))
    """
    system, spec = _flat_system(particles, scores, kernel, block_size, "stein_quantities")
    u = system.gram()
    return SteinQuantities(unflatten_particles(system.directions(), spec), u, jnp.diagonal(u), system.bandwidth)


def stein_directions(
    particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> PyTree:
    """Per-target SVGD directions Phi_k at the particles: leaves (K, M, ...).

    See :func:`stein_quantities` for the arguments.
    """
    system, spec = _flat_system(particles, scores, kernel, block_size, "stein_directions")
    return unflatten_particles(system.directions(), spec)


def gram_matrix(
    particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> Array:
    """U with ``U_kl = <phi_k, phi_l>`` in the kernel's RKHS, shape (K, K).

    See :func:`stein_quantities` for the arguments.
    """
    return _flat_system(particles, scores, kernel, block_size, "gram_matrix")[0].gram()


def kernel_stein_discrepancy(
    particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> Array:
    """Squared KSD (V-statistic) of the particles against each target: diag(U), (K,).

    See :func:`stein_quantities` for the arguments (``block_size`` bounds the memory as there).
    """
    return jnp.diagonal(_flat_system(particles, scores, kernel, block_size, "kernel_stein_discrepancy")[0].gram())
