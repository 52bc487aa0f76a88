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
from mtsgd_jax import qp as _qp
from mtsgd_jax import stein as _stein
from mtsgd_jax._validation import check_like_params, check_target_grads, num_particles
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles

PyTree = Any
Array = jax.Array

__all__ = ["MTSGDState", "SVGDState", "mtsgd", "svgd"]


class MTSGDState(NamedTuple):
    """State of :func:`mtsgd`.

    Attributes:
      weights: (K,) simplex weights w* of the last step (uniform before the
        first); also the warm start of the next QP.
      ksd: (K,) diag(U) at the last step: the squared kernel Stein
        discrepancy of the particles against each target (0 before the first).
      bandwidth: () kernel bandwidth used at the last step.
      count: () int32 number of updates performed.
    """

    weights: Array
    ksd: Array
    bandwidth: Array
    count: Array


class SVGDState(NamedTuple):
    """State of :func:`svgd`.

    Attributes:
      ksd: () squared kernel Stein discrepancy at the last step.
      bandwidth: () kernel bandwidth used at the last step.
      count: () int32 number of updates performed.
    """

    ksd: Array
    bandwidth: Array
    count: Array


def _float_dtype(params):
    leaves = jax.tree_util.tree_leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _stein_step(grads, params, kernel, solve, warm_start):
    """Shared core: flat Stein terms, U, weights and -phi* as a pytree."""
    x, spec = flatten_particles(params, dtype=_float_dtype(params))
    scores = -flatten_target_grads(grads, dtype=x.dtype)
    terms = _stein.stein_terms_flat(x, scores, kernel)
    gram = _stein.gram_from_terms(scores, terms)
    weights = solve(gram, warm_start)
    phi = _stein.combined_direction(terms, weights)
    updates = unflatten_particles(-phi, spec)
    return updates, weights, jnp.diagonal(gram), terms.bandwidth


def _make_solver(solver, solver_options):
    options = dict(solver_options or {})
    unknown = set(options) - {"maxiter", "tol"}
    if unknown:
        raise ValueError(f"solver_options accepts 'maxiter' and 'tol', got unexpected {sorted(unknown)}.")
    if not callable(solver) and solver not in _qp.SOLVERS:
        raise ValueError(f"solver must be one of {_qp.SOLVERS} or a callable, got {solver!r}.")

    def solve(gram, init):
        return _qp.min_norm_weights(gram, method=solver, init=init, **options)

    return solve


def mtsgd(
    num_targets: int,
    kernel: _kernels.RadialKernel | None = None,
    *,
    solver: str | Callable = "projected_gradient",
    solver_options: dict | None = None,
    warm_start: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """MT-SGD: the Stein direction that decreases every target's KL at once.

    Per update it builds the K per-target SVGD directions, their RKHS Gram
    matrix U (K, K), solves ONE simplex QP ``w* = argmin w^T U w`` and returns
    ``-phi* = -sum_k w*_k phi_k``.

    Args:
      num_targets: K, the number of targets (the size of the grads' axis 0).
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default
        ``rbf("median")``.
      solver: QP backend for :func:`~mtsgd_jax.qp.min_norm_weights`.
      solver_options: ``{"maxiter": int, "tol": float}`` for the solver.
      warm_start: start each QP from the previous step's weights.

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
    if not isinstance(num_targets, int) or num_targets < 1:
        raise ValueError(f"mtsgd: num_targets must be a positive int (K), got {num_targets!r}.")
    kernel = kernel or _kernels.rbf()
    solve = _make_solver(solver, solver_options)

    def init_fn(params):
        num_particles(params, "params")
        dtype = _float_dtype(params)
        return MTSGDState(
            weights=jnp.full((num_targets,), 1.0 / num_targets, dtype),
            ksd=jnp.zeros((num_targets,), dtype),
            bandwidth=jnp.zeros((), dtype),
            count=jnp.zeros((), jnp.int32),
        )

    def update_fn(grads, state, params=None, **extra_args):
        del extra_args
        check_target_grads(grads, params, num_targets)
        init = state.weights if warm_start else None
        updates, weights, ksd, h = _stein_step(grads, params, kernel, solve, init)
        new_state = MTSGDState(
            weights=weights.astype(state.weights.dtype),
            ksd=ksd.astype(state.ksd.dtype),
            bandwidth=h.astype(state.bandwidth.dtype),
            count=optax.safe_int32_increment(state.count),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def svgd(kernel: _kernels.RadialKernel | None = None) -> optax.GradientTransformationExtraArgs:
    """Stein variational gradient descent (Liu & Wang, 2016): MT-SGD with K = 1.

    Args:
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default ``rbf("median")``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(grads, state, params)`` takes the loss gradient
      ``-grad log p`` at every particle (a pytree shaped like ``params``, leaves
      (M, ...)) and returns ``-phi``, the negative SVGD direction.

    Example:
      >>> import jax, optax
      >>> from mtsgd_jax import svgd
      >>> x = jax.random.normal(jax.random.key(0), (20, 2))
      >>> opt = optax.chain(svgd(), optax.adam(1e-2))
      >>> state = opt.init(x)
      >>> updates, state = opt.update(x, state, x)   # target N(0, I): grad = x
    """
    kernel = kernel or _kernels.rbf()

    def one_target(gram, init):
        return jnp.ones((1,), gram.dtype)

    def init_fn(params):
        num_particles(params, "params")
        dtype = _float_dtype(params)
        return SVGDState(jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None, **extra_args):
        del extra_args
        check_like_params(grads, params)
        stacked = jax.tree_util.tree_map(lambda g: jnp.expand_dims(g, 0), grads)
        updates, _, ksd, h = _stein_step(stacked, params, kernel, one_target, None)
        return updates, SVGDState(
            ksd[0].astype(state.ksd.dtype),
            h.astype(state.bandwidth.dtype),
            optax.safe_int32_increment(state.count),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
