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
      kernel_scores: ``Kmat @ S_k`` for every target, (K, M, d).
      repulsion: ``R``, (M, d).
      trace_term: scalar ``t`` of U's decomposition (already divided by M^2).
      bandwidth: scalar bandwidth used.
    """

    kernel_scores: Array
    repulsion: Array
    trace_term: Array
    bandwidth: Array


def stein_terms_flat(x: Array, scores: Array, kernel: _kernels.RadialKernel) -> SteinTerms:
    """Shared Stein products for particles ``x`` (M, d) and ``scores`` (K, M, d)."""
    m, d = x.shape
    km = _kernels.kernel_matrices(kernel, x)
    k = scores.shape[0]
    # One GEMM for all targets: (M, M) @ (M, K*d).
    s_stacked = jnp.transpose(scores, (1, 0, 2)).reshape(m, k * d)
    ks = jnp.matmul(km.k, s_stacked).reshape(m, k, d).transpose(1, 0, 2)
    # R_m = sum_a 2 kappa'_am (x_a - x_m) = 2 (dk @ x)_m - 2 (sum_a dk_am) x_m
    repulsion = 2.0 * (jnp.matmul(km.dk, x) - jnp.sum(km.dk, axis=1)[:, None] * x)
    trace = km.trace_sum / (m * m)
    return SteinTerms(ks, repulsion, trace, km.bandwidth)


def first_term(scores: Array, terms: SteinTerms) -> Array:
    """G (K, K), the first term of U: ``G_kl = <S_k, Kmat S_l> / M^2``."""
    m = scores.shape[1]
    return jnp.einsum("kmd,lmd->kl", scores, terms.kernel_scores) / (m * m)


def gram_from_terms(scores: Array, terms: SteinTerms, first: Array | None = None) -> Array:
    """U (K, K) from ``scores`` (K, M, d) and :func:`stein_terms_flat` output.

    ``first`` may pass a precomputed :func:`first_term`.
    """
    m = scores.shape[1]
    g = first_term(scores, terms) if first is None else first
    c = jnp.einsum("kmd,md->k", scores, terms.repulsion) / (m * m)
    u = g + c[:, None] + c[None, :] + terms.trace_term
    return 0.5 * (u + u.T)


def directions_from_terms(terms: SteinTerms) -> Array:
    """Per-target directions Phi (K, M, d) from :func:`stein_terms_flat` output."""
    m = terms.repulsion.shape[0]
    return (terms.kernel_scores + terms.repulsion[None]) / m


def combined_direction(terms: SteinTerms, weights: Array) -> Array:
    """``sum_k w_k Phi_k`` (M, d) for weights on the simplex, in O(K M d)."""
    m = terms.repulsion.shape[0]
    mixed = jnp.einsum("k,kmd->md", weights.astype(terms.kernel_scores.dtype), terms.kernel_scores)
    return (mixed + terms.repulsion * jnp.sum(weights).astype(mixed.dtype)) / m


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


def stein_quantities(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None) -> SteinQuantities:
    """Per-target Stein directions, U and the per-target KSD in one pass.

    Args:
      particles: pytree with leaves (M, ...).
      scores: pytree with the same structure, leaves (K, M, ...):
        ``grad log p_k`` at every particle (the NEGATIVE loss gradient).
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default RBF with the
        median heuristic.

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
    terms = stein_terms_flat(x, s, kernel)
    u = gram_from_terms(s, terms)
    phi = unflatten_particles(directions_from_terms(terms), spec)
    return SteinQuantities(phi, u, jnp.diagonal(u), terms.bandwidth)


def stein_directions(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None) -> PyTree:
    """Per-target SVGD directions Phi_k at the particles: leaves (K, M, ...).

    See :func:`stein_quantities` for the arguments.
    """
    kernel = kernel or _kernels.rbf()
    x, s, spec = _flatten_inputs(particles, scores)
    return unflatten_particles(directions_from_terms(stein_terms_flat(x, s, kernel)), spec)


def gram_matrix(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None) -> Array:
    """U with ``U_kl = <phi_k, phi_l>`` in the kernel's RKHS, shape (K, K).

    See :func:`stein_quantities` for the arguments.
    """
    kernel = kernel or _kernels.rbf()
    x, s, _ = _flatten_inputs(particles, scores)
    return gram_from_terms(s, stein_terms_flat(x, s, kernel))


def kernel_stein_discrepancy(particles: PyTree, scores: PyTree, kernel: _kernels.RadialKernel | None = None) -> Array:
    """Squared KSD (V-statistic) of the particles against each target: diag(U), (K,)."""
    return jnp.diagonal(gram_matrix(particles, scores, kernel))
