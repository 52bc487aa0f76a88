"""Per-target Stein (SVGD) directions and their RKHS Gram matrix U.

Notation (ALGORITHM.md sections 2-3): particles ``x`` (M, d), scores
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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtsgd_jax import kernels as _kernels
from mtsgd_jax._validation import check_target_grads
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles

Array = jax.Array
PyTree = Any

__all__ = [
    "SteinTerms",
    "SteinQuantities",
    "stein_terms_flat",
    "gram_from_terms",
    "stein_quantities",
    "stein_directions",
    "gram_matrix",
    "kernel_stein_discrepancy",
]


class SteinTerms(NamedTuple):
    """Intermediate products shared by the directions and U (flat layout).

    Particles whose position or score (any target) is not finite are excluded
    from every sum (see :func:`stein_terms_flat`).

    Attributes:
      kernel_scores: ``Kmat @ (S_k / scale)`` for every target, (K, M, d)
        (this device's rows when sharded; zero rows for excluded particles).
      repulsion: ``R``, (M, d) (zero rows for excluded particles).
      trace_term: scalar ``t`` of U's decomposition (already divided by n^2).
      bandwidth: scalar bandwidth used.
      num_particles: n, the number of included particles of the whole set,
        () float (M when every particle is finite).
      axis_name: mesh axis the particles are split over, or ``None``.
      scale: () power of two ``alpha`` the scores were divided by (exact), so
        that no product of scores overflows.
      valid: (M,) bool, the included particles (this device's rows).
    """

    kernel_scores: Array
    repulsion: Array
    trace_term: Array
    bandwidth: Array
    num_particles: Array | None = None
    axis_name: str | None = None
    scale: Array | None = None
    valid: Array | None = None


def _axis_size(axis_name) -> int:
    if axis_name is None:
        return 1
    size = getattr(jax.lax, "axis_size", None)
    return int(size(axis_name)) if size is not None else int(jax.lax.psum(1, axis_name))


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x, axis_name):
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def valid_particles(x: Array, vectors: Array) -> Array:
    """(M,) True for particles whose row of ``x`` (M, d) and rows of ``vectors`` (K, M, d) are all finite."""
    return _kernels._finite_rows(x, vectors)


def power_of_two_scale(vectors: Array, valid: Array, axis_name: str | None = None) -> Array:
    """A power of two ``alpha`` with ``max |vectors| / alpha`` in [1, 2) over the valid rows (1 if all zero).

    Dividing by it is exact, and products of the scaled vectors cannot overflow.
    ``vectors`` (K, M, d), ``valid`` (M,).
    """
    amax = jnp.max(jnp.where(valid[None, :, None], jnp.abs(vectors), 0), initial=0)
    amax = _pmax(amax, axis_name)
    _, e = jnp.frexp(amax)
    return jnp.where(amax > 0, jnp.ldexp(jnp.ones((), vectors.dtype), e - 1), jnp.ones((), vectors.dtype))


def stein_terms_flat(
    x: Array,
    scores: Array,
    kernel: _kernels.RadialKernel,
    *,
    block_size: int | None = None,
    axis_name: str | None = None,
) -> SteinTerms:
    """Shared Stein products for particles ``x`` (M, d) and ``scores`` (K, M, d).

    ``block_size`` processes the (M, M) kernel interactions B rows at a time
    (see :func:`~mtsgd_jax.kernels.kernel_products`); ``None`` does them at once.
    ``axis_name``: inside ``shard_map`` with the particles split over that mesh
    axis, ``x`` and ``scores`` hold this device's particles; the outputs are
    this device's rows and every sum over particles is global.

    A particle whose position or score (any target) is not finite drops out
    of every kernel sum: the other particles' directions and U equal those of
    the set without it (the median bandwidth and the 1/n normalisation use
    the number n of finite particles), and its own directions are NaN.
    """
    m, d = x.shape
    k = scores.shape[0]
    valid = valid_particles(x, scores)
    alpha = power_of_two_scale(scores, valid, axis_name)
    scaled = jnp.where(valid[None, :, None], scores, jnp.zeros((), scores.dtype)) / alpha
    # One GEMM for all targets: (M, M) @ (M, K*d).
    s_stacked = jnp.transpose(scaled, (1, 0, 2)).reshape(m, k * d)
    prods = _kernels.kernel_products(kernel, x, s_stacked, block_size=block_size, axis_name=axis_name, valid=valid)
    ks = prods.kv.reshape(m, k, d).transpose(1, 0, 2)
    n = _psum(jnp.sum(valid), axis_name).astype(x.dtype)
    n_safe = jnp.maximum(n, 1)
    return SteinTerms(ks, prods.repulsion, prods.trace_sum / (n_safe * n_safe), prods.bandwidth, n, axis_name, alpha, valid)


def _num(terms: SteinTerms):
    n = terms.num_particles if terms.num_particles is not None else terms.repulsion.shape[0]
    return jnp.maximum(n, 1)


def _scale(terms) -> Array:
    return jnp.ones((), terms.repulsion.dtype) if terms.scale is None else terms.scale


def _scaled_scores(scores: Array, terms: SteinTerms) -> Array:
    """``S / scale`` with excluded particles' rows zero, as :func:`stein_terms_flat` used them."""
    if terms.valid is not None:
        scores = jnp.where(terms.valid[None, :, None], scores, jnp.zeros((), scores.dtype))
    return scores / _scale(terms).astype(scores.dtype)


def scaled_first_term(scores: Array, terms: SteinTerms) -> Array:
    """``G / scale^2`` (K, K): the first term of U on the scaled scores (never overflows)."""
    m = _num(terms)
    s = _scaled_scores(scores, terms)
    return _psum(jnp.einsum("kmd,lmd->kl", s, terms.kernel_scores), terms.axis_name) / (m * m)


def first_term(scores: Array, terms: SteinTerms) -> Array:
    """G (K, K), the first term of U: ``G_kl = <S_k, Kmat S_l> / n^2`` (may overflow for huge scores)."""
    alpha = _scale(terms)
    return scaled_first_term(scores, terms) * alpha * alpha


def assemble_scaled_gram(first: Array, cross: Array, trace_term, alpha: Array) -> tuple[Array, Array]:
    """``U / beta^2`` and ``beta = max(alpha, 1)`` from the scaled pieces.

    With ``first = G / alpha^2`` (K, K), ``cross = c / alpha`` (K,) and the
    constant ``t``: ``U / beta^2 = (alpha/beta)^2 first + (alpha/beta^2)
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


def scaled_gram_from_terms(scores: Array, terms: SteinTerms, first: Array | None = None) -> tuple[Array, Array]:
    """``(U / beta^2, beta)`` from ``scores`` (K, M, d) and :func:`stein_terms_flat` output.

    ``first`` may pass a precomputed :func:`scaled_first_term`. See
    :func:`assemble_scaled_gram`.
    """
    m = _num(terms)
    g = scaled_first_term(scores, terms) if first is None else first
    s = _scaled_scores(scores, terms)
    c = _psum(jnp.einsum("kmd,md->k", s, terms.repulsion), terms.axis_name) / (m * m)
    return assemble_scaled_gram(g, c, terms.trace_term, _scale(terms))


def gram_from_terms(scores: Array, terms: SteinTerms, first: Array | None = None) -> Array:
    """U (K, K) from ``scores`` (K, M, d) and :func:`stein_terms_flat` output.

    ``first`` may pass a precomputed :func:`scaled_first_term`. U is formed on
    scaled scores and scaled back at the end, so it is finite unless its
    entries truly exceed the dtype's range.
    """
    return unscale_gram(*scaled_gram_from_terms(scores, terms, first))


def _nan_rows(x: Array, valid: Array | None) -> Array:
    """``x`` (..., M, d) with the rows of excluded particles set to NaN."""
    if valid is None:
        return x
    return jnp.where(valid[:, None], x, jnp.asarray(jnp.nan, x.dtype))


def directions_from_terms(terms: SteinTerms) -> Array:
    """Per-target directions Phi (K, M, d) from :func:`stein_terms_flat` output (NaN rows for excluded particles)."""
    phi = (terms.kernel_scores * _scale(terms) + terms.repulsion[None]) / _num(terms)
    return _nan_rows(phi, terms.valid)


def combined_direction(terms: SteinTerms, weights: Array) -> Array:
    """``sum_k w_k Phi_k`` (M, d) for weights on the simplex, in O(K M d) (NaN rows for excluded particles)."""
    mixed = jnp.einsum("k,kmd->md", weights.astype(terms.kernel_scores.dtype), terms.kernel_scores)
    phi = (mixed * _scale(terms) + terms.repulsion * jnp.sum(weights).astype(mixed.dtype)) / _num(terms)
    return _nan_rows(phi, terms.valid)


class GramTerms(NamedTuple):
    """U's ingredients computed from inner products only (the small-M, large-d path).

    For vectors ``V`` (K, M, d) (the scores, or the loss gradients = -scores),
    scaled by a power of two ``alpha`` and with excluded particles' rows zeroed
    (``V'``), and n included particles:

    Attributes:
      first: ``<V'_k, Kmat V'_l> / n^2``, (K, K) (the same for V and -V).
      cross: ``<V'_k, R> / n^2``, (K,) (changes sign with V).
      sq_norms: ``||V'_k||_F^2``, (K,).
      trace_term: ``t`` of U's decomposition (already divided by n^2).
      kernel: the :class:`~mtsgd_jax.kernels.KernelMatrices` on the particles.
      repulsion: ``R``, (M, d).
      scale: ``alpha``.
      valid: (M,) bool, the included particles.
      num_particles: () n.
    """

    first: Array
    cross: Array
    sq_norms: Array
    trace_term: Array
    kernel: _kernels.KernelMatrices
    repulsion: Array
    scale: Array
    valid: Array
    num_particles: Array


def gram_terms_flat(x: Array, vectors: Array, kernel: _kernels.RadialKernel) -> GramTerms:
    """U's ingredients without forming ``Kmat @ V``: one GEMM over ``V``'s (K M, d) rows.

    ``Kmat @ S_k`` costs K M^2 d and writes K M d numbers; when d is much larger
    than K M (particles that are networks) it is cheaper to take the inner
    products ``V V^T`` (K M, K M) once and contract them with the (M, M)
    kernel matrix, plus the repulsion R (M, d) (one (M, M) x (M, d) GEMM): every
    big array is read a few times and nothing of size K M d is written. The
    combined direction then needs only ``Kmat @ (sum_k w_k V_k)`` (see
    :func:`direction_from_weighted`). Particles with a non-finite position or
    vector are excluded as in :func:`stein_terms_flat`.
    """
    m, d = x.shape
    k = vectors.shape[0]
    valid = valid_particles(x, vectors)
    alpha = power_of_two_scale(vectors, valid)
    v = jnp.where(valid[None, :, None], vectors, jnp.zeros((), vectors.dtype)) / alpha
    km, rep, _ = _kernels._kernel_matrices_and_repulsion(kernel, x, valid)
    n = jnp.sum(valid).astype(x.dtype)
    nn = jnp.maximum(n, 1) ** 2
    flat = v.reshape(k * m, d)
    vv = jnp.matmul(flat, flat.T).reshape(k, m, k, m)
    first = jnp.einsum("ab,kalb->kl", km.k.astype(vv.dtype), vv) / nn
    cross = jnp.einsum("kmd,md->k", v, rep.astype(v.dtype)) / nn
    sq = jnp.einsum("kmkm->k", vv)
    return GramTerms(first, cross, sq, km.trace_sum / nn, km, rep, alpha, valid, n)


def direction_from_weighted(weighted: Array, weight_sum: Array, gt: GramTerms) -> Array:
    """``(Kmat @ (alpha weighted) + weight_sum * R) / n`` (M, d), NaN rows for excluded particles.

    ``sum_k w_k Phi_k`` when ``weighted = sum_k w_k S'_k`` on the scaled,
    masked scores ``S' = S / alpha`` of :func:`gram_terms_flat`.
    """
    kw = jnp.matmul(gt.kernel.k.astype(weighted.dtype), weighted) * gt.scale.astype(weighted.dtype)
    phi = (kw + weight_sum * gt.repulsion) / jnp.maximum(gt.num_particles, 1)
    return _nan_rows(phi, gt.valid)


class SteinQuantities(NamedTuple):
    """Stein quantities of a particle set against K targets.

    Attributes:
      directions: pytree shaped like the scores, leaves (K, M, ...): Phi_k at
        every particle.
      gram: U, (K, K), symmetric positive semi-definite (formed on scaled
        scores, so only entries that truly exceed the dtype's range are inf).
      ksd: diag(U), (K,): squared kernel Stein discrepancy per target.

    Particles whose position or score is not finite are left out (see
    :func:`stein_terms_flat`); their directions are NaN.
      bandwidth: scalar kernel bandwidth used.
    """

    directions: PyTree
    gram: Array
    ksd: Array
    bandwidth: Array


def _flatten_inputs(particles, scores):
    check_target_grads(scores, particles, None, name="scores", params_name="particles")
    x, spec = flatten_particles(particles)
    s = flatten_target_grads(scores, dtype=x.dtype)
    return x, s, spec


def stein_quantities(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
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
    kernel = _kernels.check_kernel(kernel, "stein_quantities")
    x, s, spec = _flatten_inputs(particles, scores)
    terms = stein_terms_flat(x, s, kernel, block_size=block_size)
    u = gram_from_terms(s, terms)
    phi = unflatten_particles(directions_from_terms(terms), spec)
    return SteinQuantities(phi, u, jnp.diagonal(u), terms.bandwidth)


def stein_directions(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> PyTree:
    """Per-target SVGD directions Phi_k at the particles: leaves (K, M, ...).

    See :func:`stein_quantities` for the arguments.
    """
    kernel = _kernels.check_kernel(kernel, "stein_directions")
    x, s, spec = _flatten_inputs(particles, scores)
    return unflatten_particles(directions_from_terms(stein_terms_flat(x, s, kernel, block_size=block_size)), spec)


def gram_matrix(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> Array:
    """U with ``U_kl = <phi_k, phi_l>`` in the kernel's RKHS, shape (K, K).

    See :func:`stein_quantities` for the arguments.
    """
    kernel = _kernels.check_kernel(kernel, "gram_matrix")
    x, s, _ = _flatten_inputs(particles, scores)
    return gram_from_terms(s, stein_terms_flat(x, s, kernel, block_size=block_size))


def kernel_stein_discrepancy(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> Array:
    """Squared KSD (V-statistic) of the particles against each target: diag(U), (K,)."""
    return jnp.diagonal(gram_matrix(particles, scores, kernel, block_size=block_size))
