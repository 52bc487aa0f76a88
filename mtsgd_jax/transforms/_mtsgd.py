"""MT-SGD and SVGD as optax gradient transformations.

Both follow the optax convention: ``update`` receives loss gradients and returns
the *negative* ascent direction, so that chaining with a first-order optimiser

    >>> import optax
    >>> from mtsgd_jax import mtsgd
    >>> opt = optax.chain(mtsgd(num_targets=3), optax.adam(3e-2))

moves the particles along ``+phi*``. The particles must be passed as ``params``
(``update(grads, state, params)``): the Stein direction depends on where every
particle is.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtsgd_jax import kernels as _kernels
from mtsgd_jax import stein as _stein
from mtsgd_jax.transforms._common import _check_num_targets, _float_dtype, _make_solver
from mtsgd_jax._validation import check_init_inputs, check_like_params, check_target_grads, check_update_inputs, num_particles, tree_shapes_match
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles

PyTree = Any
Array = jax.Array

__all__ = ["MTSGDState", "SVGDState", "WEIGHTINGS", "mtsgd", "svgd"]


class MTSGDState(NamedTuple):
    """State of :func:`mtsgd`.

    Attributes:
      weights: (K,) simplex weights applied to the K directions at the last
        step (uniform before the first); they warm-start the next QP.
      ksd: (K,) diag(U) at the last step: the squared kernel Stein
        discrepancy of the particles against each target (NaN before the
        first step: nothing measured yet). U is formed on scores scaled by a
        power of two, so the weights never see an overflow; ``ksd`` is the
        true value in the compute dtype and is +inf where it exceeds that
        dtype's range (float32: about 3.4e38, e.g. gradients near 1e19).
      bandwidth: () kernel bandwidth used at the last step (NaN before the first).
      count: () int32 number of updates performed.
      nonfinite: () int32 number of particles left out of the last step
        because their position or a loss gradient was not finite (0 at
        init). Those particles' updates are NaN; every other quantity comes
        from the remaining particles.
    """

    weights: Array
    ksd: Array
    bandwidth: Array
    count: Array
    nonfinite: Array


class SVGDState(NamedTuple):
    """State of :func:`svgd`.

    Attributes:
      ksd: () squared kernel Stein discrepancy at the last step (NaN before
        the first; +inf where it exceeds the dtype's range).
      bandwidth: () kernel bandwidth used at the last step (NaN before the first).
      count: () int32 number of updates performed.
      nonfinite: () int32 number of particles left out of the last step (non-finite
        position or gradient; their updates are NaN), 0 at init.
    """

    ksd: Array
    bandwidth: Array
    count: Array
    nonfinite: Array


WEIGHTINGS = ("stein", "normalized", "score")


def _uniform_if_bad(w: Array) -> Array:
    """``w`` if it is a finite non-negative vector with a positive sum (then renormalised), else uniform."""
    k = w.shape[0]
    total = jnp.sum(w)
    good = jnp.all(jnp.isfinite(w)) & jnp.all(w >= 0) & (total > 0)
    return jnp.where(good, w / jnp.where(good, total, 1), jnp.full((k,), 1.0 / k, w.dtype))


def _unit_norm_weights(gram, sq_norms, solve, warm_start):
    """Min-norm weights for the rescaled directions phi_k / norms_k, mapped back to raw directions.

    Solves the QP on ``gram / (norms norms^T)`` with ``norms = sqrt(sq_norms)``
    and returns ``w_k / norms_k`` rescaled onto the simplex (a positive
    rescaling of the combined direction). Safe for any finite input: the
    (K, K) ``gram`` and (K,) ``sq_norms`` are first divided by a power of two
    of their largest entry (exact; the result is scale invariant), squared
    norms below 1e-12 of the largest (or negative ones, from an indefinite
    ``gram``) are floored there, and anything non-finite gives uniform weights.
    """
    dtype = gram.dtype
    tiny = jnp.finfo(dtype).tiny
    big = jnp.max(jnp.where(jnp.isfinite(sq_norms), jnp.abs(sq_norms), 0), initial=0)
    _, e = jnp.frexp(big)
    scale = jnp.where(big > 0, jnp.ldexp(jnp.ones((), dtype), e - 1), jnp.ones((), dtype))
    sq = sq_norms / scale
    g = gram / scale
    floor = jnp.maximum(1e-12 * jnp.max(sq), tiny)
    norms = jnp.sqrt(jnp.where(sq >= floor, sq, floor))
    init = None
    if warm_start is not None:  # previous raw-direction weights -> QP variable
        init = _uniform_if_bad(warm_start * norms)
    w = solve(g / (norms[:, None] * norms[None, :]), init) / norms
    return _uniform_if_bad(w)


def _use_gram_path(k, m, d, block_size, axis_name=None):
    """Inner-product path when the particles are much longer than K M (networks); unblocked, unsharded."""
    return block_size is None and axis_name is None and 4 * (k + 1) * m <= d


def _weights(weighting, gram, first, score_sq, solve, warm_start):
    """Simplex weights (K,) from scaled pieces: ``gram`` = U / beta^2, ``first`` = G / alpha^2 and
    ``score_sq`` = ||S_k / alpha||^2 (each weighting is invariant to those positive scalings)."""
    if weighting == "stein":
        return _uniform_if_bad(solve(gram, warm_start))
    if weighting == "normalized":
        return _unit_norm_weights(gram, jnp.diagonal(gram), solve, warm_start)
    # "score": first term of U only, each target's score matrix scaled to unit norm
    return _unit_norm_weights(0.5 * (first + first.T), score_sq, solve, warm_start)


def _nonfinite_count(valid, axis_name=None):
    bad = jnp.sum(~valid, dtype=jnp.int32)
    return bad if axis_name is None else jax.lax.psum(bad, axis_name)


def _feature_step(g, x, spec, params, kernel, solve, warm_start, weighting, features, extra_args):
    """Function-space variant: kernel on features F(theta), repulsion pulled back through F."""
    k, m, d = g.shape
    feats, pullback = jax.vjp(lambda p: features(p, **extra_args), params)
    if getattr(feats, "ndim", None) != 2 or feats.shape[0] != m:
        raise ValueError(
            f"mtsgd: features(params) must return an (M, p) array with M={m}, got shape {getattr(feats, 'shape', type(feats))}."
        )
    z = jax.lax.stop_gradient(feats)
    valid = _stein.valid_particles(x, g) & _kernels._finite_rows(z)
    km, rep_z, _ = _kernels._kernel_matrices_and_repulsion(kernel, z, valid)  # rep_z: sum_a grad_{z_a} k(z_a, z_m)
    rep, _ = flatten_particles(pullback(rep_z.astype(feats.dtype))[0], dtype=x.dtype)
    rep = jnp.where(valid[:, None], rep, jnp.zeros((), rep.dtype))
    alpha = _stein.power_of_two_scale(g, valid)
    v = jnp.where(valid[None, :, None], g, jnp.zeros((), g.dtype)) / alpha  # scaled loss gradients = -S'
    n = jnp.sum(valid).astype(x.dtype)
    nn = jnp.maximum(n, 1) ** 2
    flat = v.reshape(k * m, d)
    vv = jnp.matmul(flat, flat.T).reshape(k, m, k, m)
    first = jnp.einsum("ab,kalb->kl", km.k.astype(vv.dtype), vv) / nn
    c = -jnp.einsum("kmd,md->k", v, rep) / nn  # <S'_k, R> / n^2 with S' = -v
    # U up to the constant t 1 1^T (the trace term needs every network's Jacobian); a constant shift
    # of every entry leaves argmin_{w in simplex} w^T U w unchanged.
    gram, beta = _stein.assemble_scaled_gram(first, c, jnp.zeros((), first.dtype), alpha)
    weights = _weights(weighting, gram, first, jnp.einsum("kmkm->k", vv), solve, warm_start)
    w = weights.astype(x.dtype)
    kw = jnp.matmul(km.k.astype(x.dtype), -jnp.einsum("k,kmd->md", w, v)) * alpha
    phi = (kw + jnp.sum(w) * rep) / jnp.maximum(n, 1)
    phi = jnp.where(valid[:, None], phi, jnp.asarray(jnp.nan, phi.dtype))
    ksd = jnp.diagonal(_stein.unscale_gram(gram, beta))
    return unflatten_particles(-phi, spec), weights, ksd, km.bandwidth, _nonfinite_count(valid)


def _stein_step(
    grads, params, kernel, solve, warm_start, weighting="stein", block_size=None, features=None, extra_args=None, axis_name=None
):
    """Shared core: U, weights and -phi* as a pytree (two exact paths, chosen by shape).

    Returns ``(updates, weights, ksd, bandwidth, nonfinite)``.
    """
    x, spec = flatten_particles(params, dtype=_float_dtype(params))
    g = flatten_target_grads(grads, dtype=x.dtype)  # loss gradients = -scores
    k, m, d = g.shape
    if features is not None:
        return _feature_step(g, x, spec, params, kernel, solve, warm_start, weighting, features, extra_args or {})
    if _use_gram_path(k, m, d, block_size, axis_name):
        gt = _stein.gram_terms_flat(x, g, kernel)
        gram, beta = _stein.assemble_scaled_gram(gt.first, -gt.cross, gt.trace_term, gt.scale)  # S = -g
        weights = _weights(weighting, gram, gt.first, gt.sq_norms, solve, warm_start)
        weights = jnp.where(gt.num_particles > 0, weights, jnp.full((k,), 1.0 / k, weights.dtype))
        w = weights.astype(x.dtype)
        # -phi* = -(Kmat sum_k w_k S_k + sum(w) R) / n with S' = -g / alpha
        v = jnp.where(gt.valid[None, :, None], g, jnp.zeros((), g.dtype)) / gt.scale
        neg_phi = -_stein.direction_from_weighted(-jnp.einsum("k,kmd->md", w, v), jnp.sum(w), gt)
        ksd = jnp.diagonal(_stein.unscale_gram(gram, beta))
        return unflatten_particles(neg_phi, spec), weights, ksd, gt.kernel.bandwidth, _nonfinite_count(gt.valid)
    scores = -g
    terms = _stein.stein_terms_flat(x, scores, kernel, block_size=block_size, axis_name=axis_name)
    first = _stein.scaled_first_term(scores, terms)
    gram, beta = _stein.scaled_gram_from_terms(scores, terms, first)
    score_sq = None
    if weighting == "score":
        s = _stein._scaled_scores(scores, terms)
        score_sq = _stein._psum(jnp.sum(s * s, axis=(1, 2)), axis_name)
    weights = _weights(weighting, gram, first, score_sq, solve, warm_start)
    weights = jnp.where(terms.num_particles > 0, weights, jnp.full((k,), 1.0 / k, weights.dtype))
    phi = _stein.combined_direction(terms, weights)
    ksd = jnp.diagonal(_stein.unscale_gram(gram, beta))
    return unflatten_particles(-phi, spec), weights, ksd, terms.bandwidth, _nonfinite_count(terms.valid, axis_name)


def mtsgd(
    num_targets: int,
    kernel: _kernels.RadialKernel | None = None,
    *,
    solver: str | Callable = "auto",
    solver_options: dict | None = None,
    warm_start: bool = True,
    weighting: str = "stein",
    block_size: int | None = None,
    features: Callable[..., Array] | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """MT-SGD: the Stein direction that decreases every target's KL at once.

    Per update it builds the K per-target SVGD directions, their RKHS Gram
    matrix U (K, K), solves ONE simplex QP ``w* = argmin w^T U w`` and returns
    ``-phi* = -sum_k w*_k phi_k``.

    Args:
      num_targets: K, the number of targets (the size of the grads' axis 0).
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default
        ``rbf("median")``.
      solver: QP backend for :func:`~mtsgd_jax.qp.min_norm_weights`; ``"auto"``
        (default) is exact: ``"closed_form"`` for K <= 2, ``"enumerate"`` for
        3 <= K <= 6; ``"projected_gradient"`` for K >= 7.
      solver_options: ``{"maxiter": int, "tol": float, "polish": bool}`` for
        :func:`~mtsgd_jax.qp.min_norm_weights`.
      warm_start: start each QP from the previous step's weights.
      weighting: how the K directions are weighted.

        * ``"stein"`` (default): the paper's ``w* = argmin_{w in simplex} w^T U w``
          with U the exact RKHS Gram matrix. Every target's KL decreases to
          first order (Theorem 2).
        * ``"normalized"``: the same QP for the unit-norm directions
          ``phi_k / ||phi_k||_H`` (U rescaled to its correlation matrix, like
          MGDA's gradient normalisation), the solution mapped back to the raw
          directions. Keeps the guarantee (``<phi*, phi_k> >= ||phi_k|| ||phi*||^2``)
          but no target dominates merely because its Stein discrepancy is
          currently small.
        * ``"score"``: what the paper's published toy script does: the QP on the
          first term of U only, with each target's score matrix scaled to unit
          Frobenius norm; the weights are applied to the exact directions. No
          descent guarantee, offered to reproduce the paper's toy figure.

        ``MTSGDState.weights`` always holds the simplex weights applied to the
        raw directions ``phi_k``. The README compares the three on the toy
        problem.
      block_size: process the (M, M) kernel interactions this many rows at a
        time, so memory is O(block_size * M) instead of O(M^2) (see
        :func:`~mtsgd_jax.kernels.kernel_products`); ``None`` (default) does
        them at once, which is fastest while the matrices fit in memory.
      features: optional function-space kernel (for particles that are
        networks): ``features(params, **extra_args) -> (M, p)``, e.g. each
        network's outputs on the current batch (extra keyword arguments of
        ``update`` are forwarded). The kernel then acts on ``F(theta)`` and
        the repulsion is pulled back through ``F`` with one VJP:
        ``R_m = -grad_{theta_m} sum_a k(F(theta_m), F(theta_a))`` (others
        fixed), as in :func:`~mtsgd_jax.transforms.moo_svgd`. U is formed
        from the same kernel values and repulsion, up to its constant trace
        term (which needs every network's Jacobian and does not change the
        weights), so ``MTSGDState.ksd`` is diag(U) without that constant.
        Supports ``weighting="stein"`` and ``"score"``.
      axis_name: for particles split over devices: the name of the mesh axis
        that shards the particle axis, when ``update`` runs inside
        ``shard_map`` (as :func:`~mtsgd_jax.sampling.sample` does with
        ``mesh=``). The kernel interactions all-gather the particles and
        scores, every sum over particles is ``psum``-ed, the (K, K) QP is
        solved on the same U on every device, and the update keeps the
        particles' sharding. Results equal the single-device ones up to float
        round-off. Not combined with ``features``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(grads, state, params)`` takes

      * ``grads``: per-target LOSS gradients (loss_k = -log p_k), a pytree with
        leaves (K, M, ...) -- see :func:`~mtsgd_jax.targets.log_prob_value_and_loss_grads`;
      * ``state``: :class:`MTSGDState`;
      * ``params``: the particles, same structure, leaves (M, ...);

      and returns ``(-phi*, new_state)`` with ``-phi*`` shaped (and typed) like
      ``params``. Extra keyword arguments are accepted and ignored.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtsgd_jax import mtsgd
      >>> x = jax.random.normal(jax.random.key(0), (20, 2))
      >>> grads = jnp.stack([x - 1.0, x + 1.0])          # two Gaussian targets
      >>> opt = optax.chain(mtsgd(num_targets=2), optax.sgd(0.1))
      >>> state = opt.init(x)
      >>> updates, state = opt.update(grads, state, x)
      >>> x = optax.apply_updates(x, updates)
    """
    _check_num_targets("mtsgd", num_targets)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"mtsgd: weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    kernel = _kernels.check_kernel(kernel, "mtsgd")
    solve = _make_solver(solver, solver_options, num_targets)
    block_size = _kernels._check_block_size(block_size)
    if features is not None:
        if not callable(features):
            raise TypeError(f"mtsgd: features must be callable or None, got {type(features).__name__}.")
        if weighting == "normalized":
            raise ValueError("mtsgd: weighting='normalized' needs diag(U) exactly, which features= does not give; use 'stein' or 'score'.")
        if axis_name is not None:
            raise ValueError("mtsgd: features= cannot be combined with axis_name= (sharded particles) yet.")

    def init_fn(params):
        check_init_inputs(params, "mtsgd.init", warm_start=warm_start)
        num_particles(params, "params")
        dtype = _float_dtype(params)
        return MTSGDState(
            weights=jnp.full((num_targets,), 1.0 / num_targets, dtype),
            ksd=jnp.full((num_targets,), jnp.nan, dtype),
            bandwidth=jnp.full((), jnp.nan, dtype),
            count=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), jnp.int32),
        )

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, MTSGDState, "mtsgd.update")
        check_target_grads(grads, params, num_targets)
        init = state.weights if warm_start else None
        updates, weights, ksd, h, bad = _stein_step(
            grads, params, kernel, solve, init, weighting, block_size, features, extra_args, axis_name
        )
        new_state = MTSGDState(
            weights=weights.astype(state.weights.dtype),
            ksd=ksd.astype(state.ksd.dtype),
            bandwidth=h.astype(state.bandwidth.dtype),
            count=optax.safe_int32_increment(state.count),
            nonfinite=bad,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def svgd(
    kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Stein variational gradient descent (Liu & Wang, 2016): MT-SGD with K = 1.

    Args:
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default ``rbf("median")``.
      block_size: row-block size for the kernel interactions (see :func:`mtsgd`).
      axis_name: mesh axis sharding the particles (see :func:`mtsgd`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(grads, state, params)`` takes the loss gradient
      ``-grad log p`` at every particle (a pytree shaped like ``params``, leaves
      (M, ...); leaves (1, M, ...) with a target axis of length one, as
      :func:`~mtsgd_jax.sampling.sample` passes them, are accepted too) and
      returns ``-phi``, the negative SVGD direction.

    Example:
      >>> import jax, optax
      >>> from mtsgd_jax import svgd
      >>> x = jax.random.normal(jax.random.key(0), (20, 2))
      >>> opt = optax.chain(svgd(), optax.adam(1e-2))
      >>> state = opt.init(x)
      >>> updates, state = opt.update(x, state, x)   # target N(0, I): grad = x
    """
    kernel = _kernels.check_kernel(kernel, "svgd")
    block_size = _kernels._check_block_size(block_size)

    def one_target(gram, init):
        return jnp.ones((1,), gram.dtype)

    def init_fn(params):
        check_init_inputs(params, "svgd.init")
        num_particles(params, "params")
        dtype = _float_dtype(params)
        nan = jnp.full((), jnp.nan, dtype)
        return SVGDState(nan, nan, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, SVGDState, "svgd.update")
        del extra_args
        if params is not None and tree_shapes_match(grads, params, prefix=(1,)):
            stacked = grads
        else:
            check_like_params(grads, params)
            stacked = jax.tree_util.tree_map(lambda g: jnp.expand_dims(g, 0), grads)
        updates, _, ksd, h, bad = _stein_step(stacked, params, kernel, one_target, None, block_size=block_size, axis_name=axis_name)
        return updates, SVGDState(
            ksd[0].astype(state.ksd.dtype),
            h.astype(state.bandwidth.dtype),
            optax.safe_int32_increment(state.count),
            bad,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
