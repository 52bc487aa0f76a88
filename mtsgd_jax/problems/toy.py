"""The paper's toy problem: three two-component Gaussian mixtures in 2-D.

Target k is ``0.7 N(mu_k1, 0.5 I) + 0.3 N(mu_k2, 0.5 I)`` with means

    k = 1: (4, -4), (0, 0.5)
    k = 2: (-4, 4), (0.5, 0)
    k = 3: (-3, -3), (0, 0)

The minor components overlap near the origin, which is the region that is
likely under every target at once (docs/algorithm.md §7).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["ToyProblem", "toy_problem", "gaussian_mixture_log_prob"]

TOY_MEANS = np.array(
    [
        [[4.0, -4.0], [0.0, 0.5]],
        [[-4.0, 4.0], [0.5, 0.0]],
        [[-3.0, -3.0], [0.0, 0.0]],
    ]
)
TOY_WEIGHTS = np.array([0.7, 0.3])
TOY_VARIANCE = 0.5


def gaussian_mixture_log_prob(x: Array, means: Array, weights: Array, variance: float) -> Array:
    """Normalised log-density of an isotropic Gaussian mixture at ONE point.

    Args:
      x: (d,) point.
      means: (C, d) component means.
      weights: (C,) mixture weights summing to one.
      variance: shared isotropic variance.
    """
    d = x.shape[-1]
    sq = jnp.sum((x[None, :] - means) ** 2, axis=-1)
    log_norm = -0.5 * d * jnp.log(2.0 * jnp.pi * variance)
    return jax.scipy.special.logsumexp(jnp.log(weights) + log_norm - 0.5 * sq / variance)


class ToyProblem(NamedTuple):
    """A ready multi-target sampling problem.

    Attributes:
      log_prob: ``theta (2,) -> (K,)`` log-densities of all targets (jit/vmap-able).
      log_probs: tuple of K scalar functions ``theta (2,) -> log p_k(theta)``.
      log_prob_max: (K,) maximum of each target's log-density.
      init_particles: ``(key, M) -> (M, 2)`` the paper's initialisation
        ``clip(5 N(0, I), -10, 10)``.
      in_joint_region: ``(x (M, 2), fraction=0.01) -> (M,) bool``: True where
        EVERY target's density is at least ``fraction`` of its maximum.
      means: (K, 2, 2) component means; ``weights`` (2,); ``variance`` float.
    """

    log_prob: Callable
    log_probs: tuple
    log_prob_max: Array
    init_particles: Callable
    in_joint_region: Callable
    means: np.ndarray
    weights: np.ndarray
    variance: float


def _mixture_max(means, weights, variance):
    """Maximum log-density of each mixture, by Newton-free fixed-point ascent from each mean."""
    f = jax.vmap(lambda mu, x: gaussian_mixture_log_prob(x, mu, weights, variance), in_axes=(None, 0))

    def best(mu):
        # Mean-shift iterations converge monotonically to a mode of a Gaussian mixture.
        def shift(x, _):
            logw = jnp.log(weights) - 0.5 * jnp.sum((x[None] - mu) ** 2, -1) / variance
            r = jax.nn.softmax(logw)
            return r @ mu, None

        modes = jax.vmap(lambda x0: jax.lax.scan(shift, x0, None, length=200)[0])(mu)
        return jnp.max(f(mu, modes))

    return jax.vmap(best)(means)


def toy_problem() -> ToyProblem:
    """The three-target toy problem of the MT-SGD paper (see the module docstring)."""
    means = jnp.asarray(TOY_MEANS)
    weights = jnp.asarray(TOY_WEIGHTS)

    def log_prob(theta):
        return jax.vmap(lambda mu: gaussian_mixture_log_prob(theta, mu.astype(theta.dtype), weights.astype(theta.dtype), TOY_VARIANCE))(means)

    def component(k):
        return lambda theta: log_prob(theta)[k]

    log_max = _mixture_max(means, weights, TOY_VARIANCE)

    def init_particles(key, num_particles, dtype=jnp.float32):
        return jnp.clip(5.0 * jax.random.normal(key, (num_particles, 2), dtype), -10.0, 10.0)

    def in_joint_region(x, fraction=0.01):
        lp = jax.vmap(log_prob)(x)  # (M, K)
        return jnp.all(lp >= log_max.astype(lp.dtype) + jnp.log(fraction), axis=-1)

    return ToyProblem(
        log_prob=log_prob,
        log_probs=tuple(component(k) for k in range(3)),
        log_prob_max=log_max,
        init_particles=init_particles,
        in_joint_region=in_joint_region,
        means=TOY_MEANS,
        weights=TOY_WEIGHTS,
        variance=TOY_VARIANCE,
    )
