"""MOO-SVGD (Liu, Tong & Liu, NeurIPS 2021): one MGDA problem per particle, then SVGD smoothing."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtsgd_jax import kernels as _kernels
from mtsgd_jax import stein as _stein
from mtsgd_jax._validation import check_init_inputs, check_target_grads, check_update_inputs, num_particles
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles
from mtsgd_jax.transforms._common import (
    _check_num_targets,
    _feature_map,
    _float_dtype,
    _is_real_number,
    _make_solver,
    _per_particle_min_norm,
)

Array = jax.Array
PyTree = Any

__all__ = ["MOOSVGDState", "moo_svgd"]


class MOOSVGDState(NamedTuple):
    """State of :func:`moo_svgd`.

    Attributes:
      weights: (M, K) every particle's MGDA weights at the last step (uniform
        before the first); they warm-start the next QPs.
      bandwidth: () kernel bandwidth used at the last step (NaN before the first).
      count: () int32 number of updates performed.
      nonfinite: () int32 number of particles left out of the kernel sums at
        the last step because their position, a loss gradient, their MGDA
        direction or (with ``features``) their feature row was not finite (0
        at init). Their updates are NaN and their stored weights uniform.
    """

    weights: Array
    bandwidth: Array
    count: Array
    nonfinite: Array


def moo_svgd(
    num_targets: int,
    kernel: _kernels.RadialKernel | None = None,
    *,
    features: Callable[..., Array] | None = None,
    repulsion: float = 1.0,
    solver: str | Callable = "auto",
    solver_options: dict | None = None,
    normalize_grads: bool = False,
    warm_start: bool = True,
    block_size: int | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """MOO-SVGD: per-particle MGDA directions, smoothed and repelled with a kernel.

    Per update (docs/algorithm.md section 5): for EVERY particle m the MGDA problem
    ``w_m = argmin_{w in simplex} ||sum_k w_k g_km||^2`` on its own K loss
    gradients gives ``g*_m`` (M QPs, solved together with ``vmap``); then

        d_m = (1/M) sum_a [ k(z_a, z_m) g*_a - alpha grad_{theta_a} k(z_a, z_m) ]

    is returned (a "gradient": chain with a first-order optimiser). With the
    default ``z = theta`` the kernel acts on the parameters. With
    ``features`` it acts on a feature vector per particle ``z_m = F(theta_m)``
    (e.g. the objective values, as in the published ZDT code), and the
    repulsion is pulled back through the feature map:
    ``-grad_{theta_m} sum_a k(F(theta_m), F(theta_a))`` with the other
    particles' features held fixed (one VJP for all particles). For
    ``F = identity`` the two coincide.

    Args:
      num_targets: K.
      kernel: a :class:`~mtsgd_jax.kernels.RadialKernel`; default ``rbf("median")``.
      features: optional ``features(params, **extra_args) -> (M, p)``: the
        particles' feature vectors (row m must depend on particle m only).
        Extra keyword arguments given to ``update`` (e.g. a data batch) are
        forwarded.
      repulsion: alpha >= 0, the weight of the repulsive term (0 gives a
        kernel-smoothed MGDA without diversity).
      solver, solver_options, normalize_grads, warm_start: as in
        :func:`~mtsgd_jax.transforms.mgda` for the M per-particle QPs.
      block_size: row-block size for the kernel interactions (bounded memory
        for large M, see :func:`~mtsgd_jax.kernels.kernel_products`).
      axis_name: mesh axis sharding the particles when ``update`` runs inside
        ``shard_map`` (see :func:`~mtsgd_jax.transforms.mtsgd`); each device
        solves its own particles' QPs.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state,
      params, **extra_args)`` takes loss gradients with leaves (K, M, ...) and
      returns directions shaped like ``params``, with :class:`MOOSVGDState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtsgd_jax import moo_svgd
      >>> x = jax.random.uniform(jax.random.key(0), (10, 2))
      >>> grads = jnp.stack([x - 1.0, x + 1.0])
      >>> opt = optax.chain(moo_svgd(2), optax.sgd(0.1))
      >>> updates, state = opt.update(grads, opt.init(x), x)
      >>> updates.shape
      (10, 2)
    """
    _check_num_targets("moo_svgd", num_targets)
    if not (_is_real_number(repulsion) and repulsion >= 0):
        raise ValueError(f"moo_svgd: repulsion must be a non-negative number, got {repulsion!r}.")
    if features is not None and not callable(features):
        raise TypeError(f"moo_svgd: features must be callable or None, got {type(features).__name__}.")
    context = _stein.kernel_context(kernel, block_size=block_size, axis_name=axis_name, where="moo_svgd")
    solve = _make_solver(solver, solver_options, num_targets)
    alpha = float(repulsion)

    def init_fn(params):
        check_init_inputs(params, "moo_svgd.init", repulsion=repulsion, normalize_grads=normalize_grads, warm_start=warm_start)
        m = num_particles(params, "params")
        dtype = _float_dtype(params)
        return MOOSVGDState(
            weights=jnp.full((m, num_targets), 1.0 / num_targets, dtype),
            bandwidth=jnp.full((), jnp.nan, dtype),
            count=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), jnp.int32),
        )

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, MOOSVGDState, "moo_svgd.update")
        check_target_grads(grads, params, num_targets)
        _stein.announce_context(context)
        x, spec = flatten_particles(params, dtype=_float_dtype(params))
        g = flatten_target_grads(grads, dtype=x.dtype)
        init = state.weights.astype(x.dtype) if warm_start else None
        weights, g_star = _per_particle_min_norm(g, solve, init, normalize_grads)
        # A particle with a non-finite position, gradient, MGDA direction or feature row drops out of the kernel sums.
        if features is None:
            points, pullback = x, None
            valid = _stein._finite_rows(x, g, g_star)
        else:
            points, pullback = _feature_map(features, params, extra_args, x, "moo_svgd")
            valid = _stein._finite_rows(x, g, g_star, points)
        prods = _kernels.kernel_products(
            context.kernel, points, g_star, block_size=context.block_size, axis_name=context.axis_name, valid=valid
        )
        rep = prods.repulsion
        if pullback is not None:
            rep = jnp.where(valid[:, None], pullback(rep), jnp.zeros((), x.dtype))
        bad = jnp.sum(~valid, dtype=jnp.int32)
        n = jnp.sum(valid, dtype=jnp.int32)
        if context.axis_name is not None:
            bad, n = jax.lax.psum((bad, n), context.axis_name)
        direction = (prods.kv - alpha * rep) / jnp.maximum(n, 1).astype(x.dtype)
        direction = jnp.where(valid[:, None], direction, jnp.asarray(jnp.nan, direction.dtype))
        weights = jnp.where(valid[:, None], weights, jnp.asarray(1.0 / num_targets, weights.dtype))
        new_state = MOOSVGDState(
            weights=weights.astype(state.weights.dtype),
            bandwidth=prods.bandwidth.astype(state.bandwidth.dtype),
            count=optax.safe_int32_increment(state.count),
            nonfinite=bad,
        )
        return unflatten_particles(direction, spec), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
