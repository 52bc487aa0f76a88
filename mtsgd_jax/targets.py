"""Per-target values and loss gradients for K log-densities (or K losses).

The transformations want per-target LOSS gradients with leaves (K, M, ...).
These helpers produce them from either

* a sequence of K functions ``f_k(theta) -> scalar``, or
* one function ``f(theta) -> (K,)`` returning all K values at once,

where ``theta`` is ONE particle (a pytree with the particle axis removed). The
functions are vmapped over the M particles.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp

from mtsgd_jax._validation import num_particles

PyTree = Any
Array = jax.Array
TargetFns = Union[Callable[..., Array], Sequence[Callable[..., Array]]]

__all__ = ["stack_targets", "value_and_grads", "log_prob_value_and_loss_grads", "loss_value_and_grads"]


def stack_targets(fns: TargetFns) -> Callable[..., Array]:
    """Turn a sequence of K scalar functions into one function returning (K,).

    A single callable is returned unchanged (it must already return (K,)).
    """
    if callable(fns):
        return fns
    fns = tuple(fns)
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("targets must be a callable returning (K,) or a non-empty sequence of callables.")

    def stacked(theta, *args):
        return jnp.stack([jnp.asarray(f(theta, *args)).reshape(()) for f in fns])

    return stacked


def value_and_grads(fns: TargetFns, particles: PyTree, *args) -> tuple[Array, PyTree]:
    """Values (K, M) and gradients (leaves (K, M, ...)) of K functions at M particles.

    Args:
      fns: K scalar functions of one particle, or one function returning (K,).
      particles: pytree with leaves (M, ...).
      *args: extra arguments passed to every function (not vmapped), e.g. a
        data batch.
    """
    num_particles(particles)
    f = stack_targets(fns)

    def one(theta):
        values, vjp = jax.vjp(lambda t: f(t, *args), theta)
        if values.ndim != 1:
            raise ValueError(f"target functions must return a (K,) vector per particle, got shape {values.shape}.")
        # Reverse mode once per target: K VJPs against the basis vectors.
        grads = jax.vmap(vjp)(jnp.eye(values.shape[0], dtype=values.dtype))[0]
        return values, grads

    values, grads = jax.vmap(one)(particles)  # values (M, K), grads leaves (M, K, ...)
    return values.T, jax.tree_util.tree_map(lambda g: jnp.swapaxes(g, 0, 1), grads)


def log_prob_value_and_loss_grads(log_probs: TargetFns, particles: PyTree, *args) -> tuple[Array, PyTree]:
    """``log p_k`` at every particle (K, M) and the loss gradients ``-grad log p_k``.

    The gradients have leaves (K, M, ...) and can be fed straight to
    :func:`~mtsgd_jax.transforms.mtsgd`'s ``update``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax import log_prob_value_and_loss_grads
      >>> logp = [lambda x: -0.5 * jnp.sum(x**2), lambda x: -0.5 * jnp.sum((x - 1) ** 2)]
      >>> values, grads = log_prob_value_and_loss_grads(logp, jnp.zeros((5, 2)))
      >>> values.shape, grads.shape
      ((2, 5), (2, 5, 2))
    """
    values, grads = value_and_grads(log_probs, particles, *args)
    return values, jax.tree_util.tree_map(jnp.negative, grads)


def loss_value_and_grads(losses: TargetFns, particles: PyTree, *args) -> tuple[Array, PyTree]:
    """Losses ``L_k`` at every particle (K, M) and their gradients, leaves (K, M, ...).

    Use for multi-objective problems where ``p_k ~ exp(-L_k)``.
    """
    return value_and_grads(losses, particles, *args)
