"""Per-particle normalisation of the per-target gradients, as a stage of an optax chain."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtsgd_jax import qp as _qp

PyTree = Any

__all__ = ["normalize_target_grads"]


def _target_grad_shape(grads: PyTree, where: str) -> tuple[int, int]:
    """(K, M) shared by every leaf (K, M, ...) of ``grads``, or a ValueError naming the offending leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    if not leaves:
        raise ValueError(f"{where}: grads has no leaves; expected per-target loss gradients with leaves (K, M, ...).")
    shapes = set()
    for path, leaf in leaves:
        shape = tuple(jnp.shape(leaf))
        if len(shape) < 2:
            raise ValueError(
                f"{where}: grads{jax.tree_util.keystr(path)} has shape {shape}; expected (K, M, ...): one loss "
                "gradient per target (axis 0) and particle (axis 1)."
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"{where}: grads{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; expected floats.")
        shapes.add(shape[:2])
    if len(shapes) > 1:
        raise ValueError(f"{where}: the leaves of grads disagree on (K, M) (axes 0 and 1): {sorted(shapes)}.")
    return shapes.pop()


def normalize_target_grads() -> optax.GradientTransformation:
    """Scale every particle's gradient of every target to unit Euclidean norm.

    For loss gradients ``g_km`` (target k, particle m; the norm is taken over
    every leaf of the pytree together) returns ``g_km / ||g_km||``; a zero
    gradient stays zero. The per-particle analogue of the gradient
    normalisation of :func:`~mtsgd_jax.transforms.mgda` and
    :func:`~mtsgd_jax.transforms.moo_svgd` (``normalize_grads=True``), as a
    separate stage that goes BEFORE a multi-target transformation in an
    ``optax.chain``, e.g. ``optax.chain(normalize_target_grads(),
    optax.scale(1 / T), mtsgd(K, ...), optax.adam(lr))``: every target then
    drives each particle with the same strength ``1 / T``, whatever the
    magnitude of its gradient there (for MT-SGD the repulsion is untouched, so
    ``T`` sets the balance between the two).

    Numerics: each particle's K gradients are first multiplied by the power of
    two that puts their largest entry in [1, 2) (exact), so the squared norm
    neither overflows nor underflows for any finite gradient (subnormal
    entries may be flushed to zero first, as XLA does on CPU). Non-finite
    entries give non-finite results for that target and particle only.

    Returns:
      An ``optax.GradientTransformation`` (no state: ``optax.EmptyState``)
      whose ``update(grads, state, params=None)`` takes a pytree with leaves
      (K, M, ...) and returns the normalised gradients, same structure, shapes
      and dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax.transforms import normalize_target_grads
      >>> g = jnp.array([[[0.0, -8.0], [0.0, 0.0]], [[-3.0, 0.0], [1e30, 0.0]]])  # (K=2, M=2, 2)
      >>> t = normalize_target_grads()
      >>> t.update(g, t.init(None))[0].tolist()
      [[[0.0, -1.0], [0.0, 0.0]], [[-1.0, 0.0], [1.0, 0.0]]]
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(grads, state, params=None):
        del params
        _target_grad_shape(grads, "normalize_target_grads.update")
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        dtypes = [leaf.dtype for leaf in leaves]
        dtype = jnp.result_type(*dtypes)
        flat = [jnp.reshape(leaf.astype(dtype), leaf.shape[:2] + (-1,)) for leaf in leaves]
        amax = jnp.max(jnp.stack([jnp.max(jnp.abs(f), axis=2, initial=0) for f in flat]), axis=0)  # (K, M)
        scaled = [_qp._scale_by_power_of_two(f, amax[..., None]) for f in flat]
        sq = sum(jnp.sum(f * f, axis=2) for f in scaled)  # (K, M), in [1, 4 d) where finite and non-zero
        norm = jnp.where(sq > 0, jnp.sqrt(sq), jnp.ones((), dtype))[..., None]
        out = [(f / norm).reshape(leaf.shape).astype(dt) for f, leaf, dt in zip(scaled, leaves, dtypes)]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)
