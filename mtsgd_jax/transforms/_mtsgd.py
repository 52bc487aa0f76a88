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
from mtsgd_jax.transforms._common import _check_num_targets, _float_dtype, _make_solver, _safe_norms
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
        first step: nothing measured yet).
      bandwidth: () kernel bandwidth used at the last step (NaN before the first).
      count: () int32 number of updates performed.
    """

    weights: Array
    ksd: Array
    bandwidth: Array
    count: Array


class SVGDState(NamedTuple):
    """State of :func:`svgd`.

    Attributes:
      ksd: () squared kernel Stein discrepancy at the last step (NaN before the first).
      bandwidth: () kernel bandwidth used at the last step (NaN before the first).
      count: () int32 number of updates performed.
    """

    ksd: Array
    bandwidth: Array
    count: Array


WEIGHTINGS = ("stein", "normalized", "score")


def _unit_norm_weights(gram, norms, solve, warm_start):
    """Min-norm weights for the rescaled directions phi_k / norms_k, mapped back to raw directions.

    Solves the QP on ``gram / (norms norms^T)`` and returns ``w_k / norms_k``
    rescaled onto the simplex (a positive rescaling of the combined direction).
    """
    tiny = jnp.finfo(gram.dtype).tiny
    init = None
    if warm_start is not None:  # previous raw-direction weights -> QP variable
        init = warm_start * norms
        init = init / jnp.maximum(jnp.sum(init), tiny)
    w = solve(gram / (norms[:, None] * norms[None, :]), init) / norms
    return w / jnp.maximum(jnp.sum(w), tiny)


def _use_gram_path(k, m, d, block_size, axis_name=None):
    """Inner-product path when the particles are much longer than K M (networks); unblocked, unsharded."""
    return block_size is None and axis_name is None and 4 * (k + 1) * m <= d


def _weights(weighting, gram, first, score_sq, solve, warm_start):
    if weighting == "stein":
        return solve(gram, warm_start)
    if weighting == "normalized":
        return _unit_norm_weights(gram, _safe_norms(jnp.diagonal(gram)), solve, warm_start)
    # "score": first term of U only, each target's score matrix scaled to unit norm
    return _unit_norm_weights(0.5 * (first + first.T), _safe_norms(score_sq), solve, warm_start)


def _feature_step(g, x, spec, params, kernel, solve, warm_start, weighting, features, extra_args):
    """Function-space variant: kernel on features F(theta), repulsion pulled back through F."""
    k, m, d = g.shape
    feats, pullback = jax.vjp(lambda p: features(p, **extra_args), params)
    if getattr(feats, "ndim", None) != 2 or feats.shape[0] != m:
        raise ValueError(
            f"mtsgd: features(params) must return an (M, p) array with M={m}, got shape {getattr(feats, 'shape', type(feats))}."
        )
    z = jax.lax.stop_gradient(feats)
    km = _kernels.kernel_matrices(kernel, z)
    rep_z = _kernels._repulsion(km.dk, z)  # sum_a grad_{z_a} k(z_a, z_m), in feature space
    rep, _ = flatten_particles(pullback(rep_z.astype(feats.dtype))[0], dtype=x.dtype)
    flat = g.reshape(k * m, d)
    vv = jnp.matmul(flat, flat.T).reshape(k, m, k, m)
    first = jnp.einsum("ab,kalb->kl", km.k.astype(vv.dtype), vv) / (m * m)
    c = -jnp.einsum("kmd,md->k", g, rep) / (m * m)  # <S_k, R> / M^2 with S = -g
    # U up to the constant t 1 1^T (the trace term needs every network's Jacobian); a constant shift
    # of every entry leaves argmin_{w in simplex} w^T U w unchanged.
    gram = first + c[:, None] + c[None, :]
    gram = 0.5 * (gram + gram.T)
    weights = _weights(weighting, gram, first, jnp.einsum("kmkm->k", vv), solve, warm_start)
    w = weights.astype(x.dtype)
    phi = (jnp.matmul(km.k.astype(x.dtype), -jnp.einsum("k,kmd->md", w, g)) + jnp.sum(w) * rep) / m
    return unflatten_particles(-phi, spec), weights, jnp.diagonal(gram), km.bandwidth


def _stein_step(
    grads, params, kernel, solve, warm_start, weighting="stein", block_size=None, features=None, extra_args=None, axis_name=None
):
    """Shared core: U, weights and -phi* as a pytree (two exact paths, chosen by shape)."""
    x, spec = flatten_particles(params, dtype=_float_dtype(params))
    g = flatten_target_grads(grads, dtype=x.dtype)  # loss gradients = -scores
    k, m, d = g.shape
    if features is not None:
        return _feature_step(g, x, spec, params, kernel, solve, warm_start, weighting, features, extra_args or {})
    if _use_gram_path(k, m, d, block_size, axis_name):
        gt = _stein.gram_terms_flat(x, g, kernel)
        c = -gt.cross  # cross term of the scores
        gram = gt.first + c[:, None] + c[None, :] + gt.trace_term
        gram = 0.5 * (gram + gram.T)
        weights = _weights(weighting, gram, gt.first, gt.sq_norms, solve, warm_start)
        w = weights.astype(x.dtype)
        # -phi* = -(Kmat sum_k w_k S_k + sum(w) R) / M with S = -g
        neg_phi = -_stein.direction_from_weighted(x, -jnp.einsum("k,kmd->md", w, g), jnp.sum(w), gt.kernel)
        return unflatten_particles(neg_phi, spec), weights, jnp.diagonal(gram), gt.kernel.bandwidth
    scores = -g
    terms = _stein.stein_terms_flat(x, scores, kernel, block_size=block_size, axis_name=axis_name)
    first = _stein.first_term(scores, terms)
    gram = _stein.gram_from_terms(scores, terms, first)
    score_sq = _stein._psum(jnp.sum(scores * scores, axis=(1, 2)), axis_name) if weighting == "score" else None
    weights = _weights(weighting, gram, first, score_sq, solve, warm_start)
    phi = _stein.combined_direction(terms, weights)
    return unflatten_particles(-phi, spec), weights, jnp.diagonal(gram), terms.bandwidth


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
    kernel = kernel or _kernels.rbf()
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
        )

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, MTSGDState, "mtsgd.update")
        check_target_grads(grads, params, num_targets)
        init = state.weights if warm_start else None
        updates, weights, ksd, h = _stein_step(
            grads, params, kernel, solve, init, weighting, block_size, features, extra_args, axis_name
        )
        new_state = MTSGDState(
            weights=weights.astype(state.weights.dtype),
            ksd=ksd.astype(state.ksd.dtype),
            bandwidth=h.astype(state.bandwidth.dtype),
            count=optax.safe_int32_increment(state.count),
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
    kernel = kernel or _kernels.rbf()
    block_size = _kernels._check_block_size(block_size)

    def one_target(gram, init):
        return jnp.ones((1,), gram.dtype)

    def init_fn(params):
        check_init_inputs(params, "svgd.init")
        num_particles(params, "params")
        dtype = _float_dtype(params)
        nan = jnp.full((), jnp.nan, dtype)
        return SVGDState(nan, nan, jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, SVGDState, "svgd.update")
        del extra_args
        if params is not None and tree_shapes_match(grads, params, prefix=(1,)):
            stacked = grads
        else:
            check_like_params(grads, params)
            stacked = jax.tree_util.tree_map(lambda g: jnp.expand_dims(g, 0), grads)
        updates, _, ksd, h = _stein_step(stacked, params, kernel, one_target, None, block_size=block_size, axis_name=axis_name)
        return updates, SVGDState(
            ksd[0].astype(state.ksd.dtype),
            h.astype(state.bandwidth.dtype),
            optax.safe_int32_increment(state.count),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
