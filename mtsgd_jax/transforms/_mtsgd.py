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
from mtsgd_jax.transforms._common import _check_num_targets, _feature_map, _float_dtype, _make_solver
from mtsgd_jax._validation import check_init_inputs, check_like_params, check_target_grads, check_update_inputs, num_particles, tree_shapes_match
from mtsgd_jax.particles import flatten_particles, target_grad_pieces, unflatten_particles

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
    scale = _stein._power_of_two_above(big, None, dtype)
    sq = sq_norms / scale
    g = gram / scale
    floor = jnp.maximum(1e-12 * jnp.max(sq), tiny)
    norms = jnp.sqrt(jnp.where(sq >= floor, sq, floor))
    init = None
    if warm_start is not None:  # previous raw-direction weights -> QP variable
        init = _uniform_if_bad(warm_start * norms)
    w = solve(g / (norms[:, None] * norms[None, :]), init) / norms
    return _uniform_if_bad(w)


# Each weighting maps (system, scaled_gram, solve, warm_start) to simplex weights (K,), where
# ``scaled_gram`` = U / beta^2 = system.scaled_gram()[0] and ``system`` is the step's
# :class:`~mtsgd_jax.stein.SteinSystem`; every weighting is invariant to the positive powers of two
# the pieces are scaled by.


def _stein_weights(system, gram, solve, warm_start):
    """The paper's ``argmin_{w in simplex} w^T U w``."""
    return _uniform_if_bad(solve(gram, warm_start))


def _normalized_weights(system, gram, solve, warm_start):
    """The same QP for the unit-norm directions ``phi_k / ||phi_k||_H`` (U as a correlation matrix)."""
    return _unit_norm_weights(gram, jnp.diagonal(gram), solve, warm_start)


def _score_weights(system, gram, solve, warm_start):
    """The QP on U's first term only, each target's score matrix scaled to unit Frobenius norm."""
    return _unit_norm_weights(0.5 * (system.first + system.first.T), system.score_sq, solve, warm_start)


class _Weighting(NamedTuple):
    rule: Callable[..., Array]
    exact_diagonal: bool  # needs diag(U) including the trace term (a kernel on features leaves it out)


_WEIGHTING_RULES = {
    "stein": _Weighting(_stein_weights, exact_diagonal=False),
    "normalized": _Weighting(_normalized_weights, exact_diagonal=True),
    "score": _Weighting(_score_weights, exact_diagonal=False),
}
WEIGHTINGS = tuple(_WEIGHTING_RULES)


def _weighting(weighting, where: str, has_features: bool) -> Callable[..., Array]:
    """The weighting rule named ``weighting``, or a ValueError naming the valid ones."""
    if not isinstance(weighting, str) or weighting not in _WEIGHTING_RULES:
        raise ValueError(f"{where}: weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    entry = _WEIGHTING_RULES[weighting]
    if has_features and entry.exact_diagonal:
        usable = tuple(name for name, w in _WEIGHTING_RULES.items() if not w.exact_diagonal)
        raise ValueError(
            f"{where}: weighting={weighting!r} needs diag(U) exactly, which features= does not give "
            f"(U is known up to its constant trace term); use one of {usable}."
        )
    return entry.rule


def _nonfinite_count(valid, axis_name=None):
    bad = jnp.sum(~valid, dtype=jnp.int32)
    return bad if axis_name is None else jax.lax.psum(bad, axis_name)


def _combine(system: _stein.SteinSystem, rule, solve, warm_start) -> tuple[Array, Array, Array]:
    """``(sum_k w_k Phi_k (M, d), w (K,), diag(U) (K,))`` with ``w`` from ``rule`` (uniform when no particle is included)."""
    gram, beta = system.scaled_gram()
    weights = rule(system, gram, solve, warm_start)
    k = weights.shape[0]
    weights = jnp.where(system.num_particles > 0, weights, jnp.full((k,), 1.0 / k, weights.dtype))
    return system.direction(weights), weights, jnp.diagonal(_stein.unscale_gram(gram, beta))


def _system(grads, params, context, features, extra_args, where):
    """The step's :class:`~mtsgd_jax.stein.SteinSystem` from loss gradients (leaves (K, M, ...)) and the particles."""
    x, spec = flatten_particles(params, dtype=_float_dtype(params))
    # loss gradients = -scores, one piece per leaf (the inner-product path never concatenates them)
    g = target_grad_pieces(grads, dtype=x.dtype)
    feats = None if features is None else _feature_map(features, params, extra_args, x, where)
    return _stein.stein_system(x, tuple(-p for p in g), context, features=feats), spec


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
        Supports ``weighting="stein"`` and ``"score"``, and ``block_size`` and
        ``axis_name`` (then ``Kmat`` is applied to the gradients through
        :func:`~mtsgd_jax.kernels.kernel_products` instead of forming inner
        products; the results agree to float round-off).
      axis_name: for particles split over devices: the name of the mesh axis
        that shards the particle axis, when ``update`` runs inside
        ``shard_map`` (as :func:`~mtsgd_jax.sampling.sample` does with
        ``mesh=``). The kernel interactions all-gather the particles and
        scores, every sum over particles is ``psum``-ed, the (K, K) QP is
        solved on the same U on every device, and the update keeps the
        particles' sharding. Results equal the single-device ones up to float
        round-off. :func:`~mtsgd_jax.sampling.sample` with ``mesh=`` takes this
        axis from the transformation.

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
    if features is not None and not callable(features):
        raise TypeError(f"mtsgd: features must be callable or None, got {type(features).__name__}.")
    rule = _weighting(weighting, "mtsgd", has_features=features is not None)
    context = _stein.kernel_context(kernel, block_size=block_size, axis_name=axis_name, where="mtsgd")
    solve = _make_solver(solver, solver_options, num_targets)

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
        _stein.announce_context(context)
        system, spec = _system(grads, params, context, features, extra_args, "mtsgd")
        phi, weights, ksd = _combine(system, rule, solve, state.weights if warm_start else None)
        updates = unflatten_particles(-phi, spec)
        new_state = MTSGDState(
            weights=weights.astype(state.weights.dtype),
            ksd=ksd.astype(state.ksd.dtype),
            bandwidth=system.bandwidth.astype(state.bandwidth.dtype),
            count=optax.safe_int32_increment(state.count),
            nonfinite=_nonfinite_count(system.valid, context.axis_name),
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
    context = _stein.kernel_context(kernel, block_size=block_size, axis_name=axis_name, where="svgd")

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
        _stein.announce_context(context)
        system, spec = _system(stacked, params, context, None, None, "svgd")
        phi = system.direction(jnp.ones((1,), system.first.dtype))
        ksd = jnp.diagonal(system.gram())
        return unflatten_particles(-phi, spec), SVGDState(
            ksd[0].astype(state.ksd.dtype),
            system.bandwidth.astype(state.bandwidth.dtype),
            optax.safe_int32_increment(state.count),
            _nonfinite_count(system.valid, context.axis_name),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
