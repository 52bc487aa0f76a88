"""Particle sets as pytrees whose every leaf has a leading particle axis M.

A particle set can be a plain (M, d) array, a dict of arrays, or M stacked
copies of a flax model's variables: anything whose leaves share the leading
axis. For the kernel algebra each particle is flattened to a vector of length
d (the total number of entries per particle), giving an (M, d) matrix.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtsgd_jax._validation import leaf_paths, num_particles

PyTree = Any
Array = jax.Array

__all__ = [
    "init_particles",
    "init_flax_particles",
    "flatten_particles",
    "flatten_target_grads",
    "unflatten_particles",
    "ParticleSpec",
    "num_particles",
]


def init_particles(init_fn: Callable[[Array], PyTree], key: Array, num_particles: int) -> PyTree:
    """Build M particles by vmapping ``init_fn`` over M keys split from ``key``.

    Args:
      init_fn: ``key -> pytree`` giving ONE particle.
      key: a PRNG key.
      num_particles: M >= 1.

    Returns:
      The pytree of ``init_fn`` with a leading axis of length M on every leaf.

    Example:
      >>> import jax
      >>> from mtsgd_jax import init_particles
      >>> x = init_particles(lambda k: 5.0 * jax.random.normal(k, (2,)), jax.random.key(0), 50)
      >>> x.shape
      (50, 2)
    """
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}.")
    keys = jax.random.split(key, int(num_particles))
    return jax.vmap(init_fn)(keys)


def init_flax_particles(module, key: Array, num_particles: int, *inputs, **kwargs) -> PyTree:
    """M independently initialised copies of a flax ``linen`` module's variables.

    Equivalent to ``jax.vmap(lambda k: module.init(k, *inputs, **kwargs))`` over M
    keys: every leaf of the returned variables gets a leading axis M. Use
    ``variables["params"]`` as the particle set, and apply one particle with
    ``jax.vmap(module.apply, in_axes=(0, None))``.

    Args:
      module: a ``flax.linen.Module``.
      key: a PRNG key.
      num_particles: M >= 1.
      *inputs, **kwargs: example inputs for ``module.init`` (not batched over M).
    """
    return init_particles(lambda k: module.init(k, *inputs, **kwargs), key, num_particles)


class ParticleSpec(NamedTuple):
    """What :func:`unflatten_particles` needs to rebuild a pytree from (M, d)."""

    treedef: Any
    shapes: tuple  # per-leaf shape without the particle axis
    dtypes: tuple
    sizes: tuple


def _spec(particles: PyTree) -> ParticleSpec:
    leaves, treedef = jax.tree_util.tree_flatten(particles)
    shapes = tuple(tuple(np.shape(leaf)[1:]) for leaf in leaves)
    dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
    sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in shapes)
    return ParticleSpec(treedef, shapes, dtypes, sizes)


def _check_cast(leaves, dtype, name):
    """Refuse a cast that loses the imaginary part (complex leaves into a real matrix)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return
    for path, leaf in leaves:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"{name}{path} has dtype {jnp.result_type(leaf)}; casting it to {dtype} would drop the imaginary "
                "part. Pass real arrays (jnp.asarray(x, jnp.float32)) or a complex dtype."
            )


def flatten_particles(particles: PyTree, dtype=None) -> tuple[Array, ParticleSpec]:
    """Flatten a particle pytree to an (M, d) matrix.

    Args:
      particles: pytree with leaves (M, ...).
      dtype: dtype of the matrix; defaults to the promoted dtype of the leaves.

    Returns:
      ``(x, spec)`` with ``x`` of shape (M, d), d = sum of per-particle leaf sizes
      in tree-flatten order, and ``spec`` for :func:`unflatten_particles`.

    Raises:
      TypeError: if ``dtype`` is real and a leaf is complex (the cast would drop
        the imaginary part).
    """
    m = num_particles(particles)
    spec = _spec(particles)
    leaves = jax.tree_util.tree_leaves(particles)
    dtype = dtype or jnp.result_type(*leaves)
    _check_cast(leaf_paths(particles), dtype, "particles")
    x = jnp.concatenate([jnp.reshape(leaf, (m, -1)).astype(dtype) for leaf in leaves], axis=1)
    return x, spec


def flatten_target_grads(grads: PyTree, dtype=None) -> Array:
    """Flatten per-target gradients with leaves (K, M, ...) to a (K, M, d) array.

    Raises TypeError if ``dtype`` is real and a leaf is complex.
    """
    return jnp.concatenate(target_grad_pieces(grads, dtype), axis=2)


def target_grad_pieces(grads: PyTree, dtype=None) -> tuple[Array, ...]:
    """Per-target gradients with leaves (K, M, ...) as one (K, M, d_l) array per leaf, without copying
    them into one array: :func:`flatten_target_grads` concatenates these along the last axis.

    Raises TypeError if ``dtype`` is real and a leaf is complex.
    """
    leaves = jax.tree_util.tree_leaves(grads)
    dtype = dtype or jnp.result_type(*leaves)
    _check_cast(leaf_paths(grads), dtype, "grads")
    k, m = np.shape(leaves[0])[:2]
    return tuple(jnp.reshape(leaf, (k, m, -1)).astype(dtype) for leaf in leaves)


def _as_leaf(part: Array, dtype) -> Array:
    """``part`` in the leaf's dtype; a real leaf of a complex matrix (from complex siblings) takes the real part."""
    if jnp.issubdtype(part.dtype, jnp.complexfloating) and not jnp.issubdtype(dtype, jnp.complexfloating):
        part = jnp.real(part)
    return part.astype(dtype)


def unflatten_particles(x: Array, spec: ParticleSpec) -> PyTree:
    """Inverse of :func:`flatten_particles`.

    ``x`` has shape (..., M, d); leading batch axes (e.g. a target axis K) are
    kept on every leaf. Leaf dtypes are restored from ``spec``.
    """
    batch = x.shape[:-1]
    offsets = np.cumsum((0,) + spec.sizes)
    leaves = [
        _as_leaf(jnp.reshape(x[..., lo:hi], batch + shape), dt)
        for lo, hi, shape, dt in zip(offsets[:-1], offsets[1:], spec.shapes, spec.dtypes)
    ]
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)
