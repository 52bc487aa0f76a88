"""Linear scalarisation: a fixed convex combination of the K losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax._validation import check_init_inputs, check_target_grads, check_update_inputs, num_particles
from mtsgd_jax.transforms._common import _check_num_targets

__all__ = ["linear_scalarization", "preference_vectors"]


def preference_vectors(num_particles: int, num_targets: int = 2) -> np.ndarray:
    """Evenly spread preference vectors, one per particle: (M, K), rows on the simplex.

    For K = 2 particle i gets ``(i / (M - 1), 1 - i / (M - 1))`` (the warm-up
    preferences of the MT-SGD reference code); for K > 2 the rows are the
    points of a simplex lattice (Das-Dennis), taking the first M of the
    smallest lattice that has at least M points. M = 1 gets uniform weights.

    Example:
      >>> preference_vectors(3).tolist()
      [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    """
    if num_particles < 1 or num_targets < 1:
        raise ValueError(f"preference_vectors: need M >= 1 and K >= 1, got M={num_particles}, K={num_targets}.")
    if num_particles == 1 or num_targets == 1:
        return np.full((num_particles, num_targets), 1.0 / num_targets)
    if num_targets == 2:
        t = np.arange(num_particles) / (num_particles - 1)
        return np.stack([t, 1.0 - t], axis=1)
    divisions = 1
    while True:
        pts = _lattice(num_targets, divisions)
        if len(pts) >= num_particles:
            return pts[:num_particles] / divisions
        divisions += 1


def _lattice(k, n):
    if k == 1:
        return np.array([[n]], dtype=float)
    rows = [np.concatenate([[i], rest]) for i in range(n + 1) for rest in _lattice(k - 1, n - i)]
    return np.array(rows, dtype=float)


def linear_scalarization(num_targets: int, weights=None) -> optax.GradientTransformationExtraArgs:
    """Descend ``sum_k w_k loss_k``: fixed weights, shared or one vector per particle.

    Args:
      num_targets: K.
      weights: ``None`` for uniform ``1/K``; a (K,) vector shared by every
        particle; or an (M, K) array, one preference vector per particle (see
        :func:`preference_vectors`). Must be finite and non-negative; they are
        used as given (not renormalised).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(grads, state, params)`` maps loss gradients with leaves
      (K, M, ...) to ``sum_k w_mk g_km`` shaped like the particles.
      ``params`` is used only to check shapes and may be omitted.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax import linear_scalarization
      >>> grads = jnp.stack([jnp.ones((3, 2)), 3 * jnp.ones((3, 2))])
      >>> t = linear_scalarization(2, weights=[0.25, 0.75])
      >>> t.update(grads, t.init(jnp.zeros((3, 2))))[0][0].tolist()
      [2.5, 2.5]
    """
    _check_num_targets("linear_scalarization", num_targets)
    if weights is None:
        w = np.full((num_targets,), 1.0 / num_targets)
    else:
        w = np.asarray(weights, dtype=float)
        if w.ndim not in (1, 2) or w.shape[-1] != num_targets:
            raise ValueError(
                f"linear_scalarization: weights must have shape ({num_targets},) or (M, {num_targets}), got {w.shape}."
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("linear_scalarization: weights must be finite and non-negative.")

    def init_fn(params):
        check_init_inputs(params, "linear_scalarization.init")
        m = num_particles(params, "params")
        if w.ndim == 2 and w.shape[0] != m:
            raise ValueError(f"linear_scalarization: weights has {w.shape[0]} rows but params has M={m} particles.")
        return optax.EmptyState()

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, optax.EmptyState, "linear_scalarization.update")
        del extra_args
        if params is not None:
            check_target_grads(grads, params, num_targets)
        elif jax.tree_util.tree_leaves(grads)[0].shape[0] != num_targets:
            raise ValueError(f"linear_scalarization: grads leaves must have leading axis K={num_targets}.")
        leaves = jax.tree_util.tree_leaves(grads)
        m = leaves[0].shape[1] if leaves and leaves[0].ndim > 1 else None
        if w.ndim == 2 and w.shape[0] != m:
            raise ValueError(f"linear_scalarization: weights has {w.shape[0]} rows but the grads have M={m} particles.")

        def combine(g):
            wj = jnp.asarray(w, g.dtype)
            if w.ndim == 1:
                return jnp.tensordot(wj, g, axes=1)
            return jnp.einsum("mk,km...->m...", wj, g)

        return jax.tree_util.tree_map(combine, grads), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
