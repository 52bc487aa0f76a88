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

    Attributes:
      kernel_scores: ``Kmat @ S_k`` for every target, (K, M, d) (this device's
        rows when sharded).
      repulsion: ``R``, (M, d).
      trace_term: scalar ``t`` of U's decomposition (already divided by M^2).
      bandwidth: scalar bandwidth used.
      num_particles: M, the size of the whole particle set (static int).
      axis_name: mesh axis the particles are split over, or ``None``.
    """

    kernel_scores: Array
    repulsion: Array
    trace_term: Array
    bandwidth: Array
    num_particles: int | None = None
    axis_name: str | None = None


def _axis_size(axis_name) -> int:
    if axis_name is None:
        return 1
    size = getattr(jax.lax, "axis_size", None)
    return int(size(axis_name)) if size is not None else int(jax.lax.psum(1, axis_name))


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


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
    """
    m, d = x.shape
    k = scores.shape[0]
    # One GEMM for all targets: (M, M) @ (M, K*d).
    s_stacked = jnp.transpose(scores, (1, 0, 2)).reshape(m, k * d)
    prods = _kernels.kernel_products(kernel, x, s_stacked, block_size=block_size, axis_name=axis_name)
    ks = prods.kv.reshape(m, k, d).transpose(1, 0, 2)
    m_all = m * _axis_size(axis_name)
    return SteinTerms(ks, prods.repulsion, prods.trace_sum / (m_all * m_all), prods.bandwidth, m_all, axis_name)


def _num(terms: SteinTerms) -> int:
    return terms.num_particles if terms.num_particles is not None else terms.repulsion.shape[0]


def first_term(scores: Array, terms: SteinTerms) -> Array:
    """G (K, K), the first term of U: ``G_kl = <S_k, Kmat S_l> / M^2``."""
    m = _num(terms)
    return _psum(jnp.einsum("kmd,lmd->kl", scores, terms.kernel_scores), terms.axis_name) / (m * m)


def gram_from_terms(scores: Array, terms: SteinTerms, first: Array | None = None) -> Array:
    """U (K, K) from ``scores`` (K, M, d) and :func:`stein_terms_flat` output.

    ``first`` may pass a precomputed :func:`first_term`.
    """
    m = _num(terms)
    g = first_term(scores, terms) if first is None else first
    c = _psum(jnp.einsum("kmd,md->k", scores, terms.repulsion), terms.axis_name) / (m * m)
    u = g + c[:, None] + c[None, :] + terms.trace_term
    return 0.5 * (u + u.T)


def directions_from_terms(terms: SteinTerms) -> Array:
    """Per-target directions Phi (K, M, d) from :func:`stein_terms_flat` output."""
    return (terms.kernel_scores + terms.repulsion[None]) / _num(terms)


def combined_direction(terms: SteinTerms, weights: Array) -> Array:
    """``sum_k w_k Phi_k`` (M, d) for weights on the simplex, in O(K M d)."""
    mixed = jnp.einsum("k,kmd->md", weights.astype(terms.kernel_scores.dtype), terms.kernel_scores)
    return (mixed + terms.repulsion * jnp.sum(weights).astype(mixed.dtype)) / _num(terms)


class GramTerms(NamedTuple):
    """U's ingredients computed from inner products only (the small-M, large-d path).

    For vectors ``V`` (K, M, d) (the scores, or the loss gradients = -scores):

    Attributes:
      first: ``<V_k, Kmat V_l> / M^2``, (K, K) (the same for V and -V).
      cross: ``<V_k, R> / M^2``, (K,) (changes sign with V).
      sq_norms: ``||V_k||_F^2``, (K,).
      trace_term: ``t`` of U's decomposition (already divided by M^2).
      kernel: the :class:`~mtsgd_jax.kernels.KernelMatrices` on the particles.
    """

    first: Array
    cross: Array
    sq_norms: Array
    trace_term: Array
    kernel: _kernels.KernelMatrices


def gram_terms_flat(x: Array, vectors: Array, kernel: _kernels.RadialKernel) -> GramTerms:
    """U's ingredients without forming ``Kmat @ V``: two GEMMs over ``V``'s (K M, d) rows.

    ``Kmat @ S_k`` costs K M^2 d and writes K M d numbers; when d is much larger
    than K M (particles that are networks) it is cheaper to take the inner
    products ``V V^T`` (K M, K M) and ``V x^T`` (K M, M) once and contract them
    with the (M, M) kernel matrices: every big array is read once and nothing
    of size K M d is written. The combined direction then needs only
    ``Kmat @ (sum_k w_k V_k)`` (see :func:`direction_from_weighted`).
    """
    m, d = x.shape
    k = vectors.shape[0]
    km = _kernels.kernel_matrices(kernel, x)
    flat = vectors.reshape(k * m, d)
    vv = jnp.matmul(flat, flat.T).reshape(k, m, k, m)
    vx = jnp.matmul(flat, x.T).reshape(k, m, m)  # [k, m, a] = V_km . x_a
    first = jnp.einsum("ab,kalb->kl", km.k.astype(vv.dtype), vv) / (m * m)
    # <V_k, R> with R_m = 2 sum_a kappa'_am (x_a - x_m)
    own = jnp.einsum("kmm->km", vx)
    cross = 2.0 * (jnp.einsum("kma,am->k", vx, km.dk) - jnp.einsum("km,m->k", own, jnp.sum(km.dk, axis=0))) / (m * m)
    sq = jnp.einsum("kmkm->k", vv)
    return GramTerms(first, cross, sq, km.trace_sum / (m * m), km)


def direction_from_weighted(x: Array, weighted: Array, weight_sum: Array, km: _kernels.KernelMatrices) -> Array:
    """``(Kmat @ weighted + weight_sum * R) / M`` (M, d): ``sum_k w_k Phi_k`` when ``weighted = sum_k w_k S_k``."""
    m = x.shape[0]
    rep = _kernels._repulsion(km.dk, x)
    return (jnp.matmul(km.k.astype(weighted.dtype), weighted) + weight_sum * rep) / m


class SteinQuantities(NamedTuple):
    """Stein quantities of a particle set against K targets.

    Attributes:
      directions: pytree shaped like the scores, leaves (K, M, ...): Phi_k at
        every particle.
      gram: U, (K, K), symmetric positive semi-definite.
      ksd: diag(U), (K,): squared kernel Stein discrepancy per target.
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
    kernel = kernel or _kernels.rbf()
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
    kernel = kernel or _kernels.rbf()
    x, s, spec = _flatten_inputs(particles, scores)
    return unflatten_particles(directions_from_terms(stein_terms_flat(x, s, kernel, block_size=block_size)), spec)


def gram_matrix(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> Array:
    """U with ``U_kl = <phi_k, phi_l>`` in the kernel's RKHS, shape (K, K).

    See :func:`stein_quantities` for the arguments.
    """
    kernel = kernel or _kernels.rbf()
    x, s, _ = _flatten_inputs(particles, scores)
    return gram_from_terms(s, stein_terms_flat(x, s, kernel, block_size=block_size))


def kernel_stein_discrepancy(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None
) -> Array:
    """Squared KSD (V-statistic) of the particles against each target: diag(U), (K,)."""
    return jnp.diagonal(gram_matrix(particles, scores, kernel))
