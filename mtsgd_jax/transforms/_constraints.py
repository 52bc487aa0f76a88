"""Box constraints: keep the particles (or any parameters) inside ``[lower, upper]``.

:func:`project_box` is an optax transformation to put LAST in a chain: it
rewrites the final update so that ``optax.apply_updates`` lands on the
projection of the unconstrained step onto the box,

    >>> import optax
    >>> from mtsgd_jax import mtsgd
    >>> opt = optax.chain(mtsgd(2), optax.adam(1e-2), project_box(0.0, 1.0))

which is projected (stochastic) gradient descent for the particles. The
MOO-SVGD reference code does the same by clamping after every step
(docs/algorithm.md section 6). :func:`clip_to_box` is the plain projection.

Bounds are given as

* scalars (the same bound for every coordinate of every leaf), or
* a pytree with the structure of ONE particle (leaves ``(...)``, broadcast over
  the particle axis) or of the whole ``params`` (leaves ``(M, ...)``); a
  single array is used for every leaf; per leaf a scalar, ``params_leaf.shape[1:]``
  or ``params_leaf.shape`` are accepted.

Use ``-jnp.inf`` / ``jnp.inf`` for one-sided bounds.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax._validation import check_state, leaf_paths

PyTree = Any
Array = jax.Array

__all__ = ["clip_to_box", "project_box"]


def _is_leaf_bound(bound) -> bool:
    """A bound that is one array-like (used for every leaf of params)."""
    return len(jax.tree_util.tree_leaves(bound)) == 1 and jax.tree_util.treedef_is_leaf(
        jax.tree_util.tree_structure(bound)
    )


def _check_bounds(lower: PyTree, upper: PyTree) -> None:
    """Early checks on the bounds alone: matching structures, no NaN, lower <= upper."""
    for name, b in (("lower", lower), ("upper", upper)):
        if b is None or not jax.tree_util.tree_leaves(b):
            raise ValueError(f"{name} must be a scalar, an array or a pytree of arrays, got {b!r}.")
    lo_single, hi_single = _is_leaf_bound(lower), _is_leaf_bound(upper)
    if not (lo_single or hi_single):
        lo_def, hi_def = jax.tree_util.tree_structure(lower), jax.tree_util.tree_structure(upper)
        if lo_def != hi_def:
            raise ValueError(
                f"lower and upper must have the same pytree structure (or one of them be a single "
                f"scalar/array); got {lo_def} and {hi_def}."
            )
    lo_leaves = leaf_paths(lower)
    hi_leaves = leaf_paths(upper)
    if lo_single:
        lo_leaves = [(p, lo_leaves[0][1]) for p, _ in hi_leaves]
    if hi_single:
        hi_leaves = [(p, hi_leaves[0][1]) for p, _ in lo_leaves]
    for (path, lo), (_, hi) in zip(lo_leaves, hi_leaves):
        try:
            lo_np, hi_np = np.asarray(lo), np.asarray(hi)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            continue  # values unknown while tracing: only shapes are checked (at update time)
        if not (np.issubdtype(lo_np.dtype, np.number) and np.issubdtype(hi_np.dtype, np.number)):
            raise ValueError(f"bounds{path} must be numeric, got dtypes {lo_np.dtype} and {hi_np.dtype}.")
        try:
            ok = np.broadcast_arrays(lo_np, hi_np)
        except ValueError:
            raise ValueError(
                f"lower{path} has shape {lo_np.shape} and upper{path} has shape {hi_np.shape}: "
                "they must have the same shape (or one be a scalar)."
            ) from None
        if np.isnan(ok[0]).any() or np.isnan(ok[1]).any():
            raise ValueError(f"bounds{path} contain NaN; use -inf / inf for a missing bound.")
        if np.any(ok[0] > ok[1]):
            i = np.argwhere(ok[0] > ok[1])[0]
            where = f" at index {tuple(int(j) for j in i)}" if ok[0].ndim else ""
            raise ValueError(
                f"lower{path} must be <= upper{path} everywhere; got lower = {ok[0][tuple(i)]} > "
                f"upper = {ok[1][tuple(i)]}{where}."
            )


def _leaf_bound(bound, path, leaf, name):
    """Broadcast one bound leaf against one params leaf, checking the allowed shapes."""
    b = jnp.asarray(bound)
    leaf_shape = tuple(np.shape(leaf))
    shape = tuple(b.shape)
    if shape == () or shape == leaf_shape:
        pass
    elif leaf_shape and shape == leaf_shape[1:]:
        b = b[None]
    else:
        one = f", one particle's shape {leaf_shape[1:]}" if leaf_shape else ""
        raise ValueError(
            f"{name}{path} has shape {shape}; expected a scalar{one} or the shape of params{path}, {leaf_shape}."
        )
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return b.astype(dtype)


def _bounds_for(params: PyTree, lower: PyTree, upper: PyTree, caller: str):
    """Per-leaf (lower, upper) lists broadcastable against ``params``' leaves."""
    if params is None:
        raise ValueError(
            f"{caller} needs params: call update(updates, state, params) with the current parameters "
            "(put project_box LAST in the optax chain)."
        )
    p_leaves = leaf_paths(params)
    p_def = jax.tree_util.tree_structure(params)
    out = []
    for name, bound in (("lower", lower), ("upper", upper)):
        if _is_leaf_bound(bound):
            leaves = [bound] * len(p_leaves)
        else:
            b_def = jax.tree_util.tree_structure(bound)
            if b_def != p_def:
                hint = " (a list or tuple is a pytree: pass an array instead)" if isinstance(bound, (list, tuple)) else ""
                raise ValueError(
                    f"{caller}: {name} must be a scalar, a single array, or a pytree with the structure "
                    f"of params; got {b_def} for {name} and {p_def} for params{hint}."
                )
            leaves = jax.tree_util.tree_leaves(bound)
        out.append([_leaf_bound(b, path, leaf, name) for b, (path, leaf) in zip(leaves, p_leaves)])
    return out


def clip_to_box(params: PyTree, lower: PyTree, upper: PyTree) -> PyTree:
    """Project ``params`` onto the box ``[lower, upper]`` (elementwise clip).

    Args:
      params: pytree of arrays, e.g. particles with leaves (M, ...).
      lower: lower bounds: a scalar, or per leaf a scalar, one particle's shape
        ``leaf.shape[1:]`` or ``leaf.shape`` (see the module docstring).
      upper: upper bounds, same conventions; ``lower <= upper`` everywhere.

    Returns:
      ``params`` clipped into the box (same structure, shapes and dtypes).

    Example:
      >>> import jax.numpy as jnp
      >>> clip_to_box(jnp.array([[-0.5, 0.5], [1.5, 0.25]]), 0.0, jnp.array([1.0, 0.375])).tolist()
      [[0.0, 0.375], [1.0, 0.25]]
    """
    _check_bounds(lower, upper)
    los, his = _bounds_for(params, lower, upper, "clip_to_box")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    clipped = [jnp.clip(p, lo, hi).astype(jnp.result_type(p)) for p, lo, hi in zip(leaves, los, his)]
    return jax.tree_util.tree_unflatten(treedef, clipped)


def _landing_update(p, u, lo, hi):
    """``clip(p + u, lo, hi) - p``, nudged by one ulp where rounding would land outside the box."""
    dtype = jnp.result_type(p)
    if not jnp.issubdtype(dtype, jnp.floating):
        return (jnp.clip(p + u, lo, hi) - p).astype(jnp.result_type(u))
    target = jnp.clip((p + u.astype(dtype)).astype(dtype), lo, hi)
    step = (target - p).astype(dtype)
    # optax.apply_updates computes p + step in floating point; (target - p) + p can differ from
    # target by one rounding, which may cross the bound. One ulp of `step` towards the inside
    # is then enough (the rounding error of target - p is at most half an ulp of it).
    land = p + step
    step = jnp.where(land > hi, jnp.nextafter(step, jnp.asarray(-jnp.inf, dtype)), step)
    step = jnp.where(land < lo, jnp.nextafter(step, jnp.asarray(jnp.inf, dtype)), step)
    return step.astype(jnp.result_type(u))


def project_box(lower: PyTree, upper: PyTree) -> optax.GradientTransformationExtraArgs:
    """Optax transformation that keeps ``apply_updates(params, updates)`` inside ``[lower, upper]``.

    Must be the LAST element of an ``optax.chain`` (it needs the final update):
    ``update(updates, state, params)`` returns ``clip(params + updates, lower, upper) - params``
    (corrected by one ulp where needed, so that the floating-point sum
    ``params + updates`` that :func:`optax.apply_updates` computes lands exactly
    inside the box, not one rounding outside it). That is guaranteed whenever
    the box is wider than the float spacing at ``|params - bound|`` (e.g. for
    ``[0, 1]`` and float32 params with ``|params| < 1e6``); a box narrower than
    that (``lower == upper`` included) cannot always be hit exactly by
    ``params + updates`` and is then met to within that spacing. Parameters
    that start outside the box are moved onto it by the first update.

    Args:
      lower: lower bounds: a scalar, a single array, or a pytree; per params
        leaf ``(M, ...)`` a scalar, one particle's shape ``(...)`` or the full
        shape ``(M, ...)``; ``-inf`` for none.
      upper: upper bounds, same conventions; ``inf`` for none.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      ``optax.EmptyState()``; its ``update`` requires ``params``. Extra keyword
      arguments are ignored.

    Raises:
      ValueError: at construction if ``lower > upper`` somewhere, a bound is
        NaN or the two bounds' structures/shapes disagree; at ``init`` /
        ``update`` if a bound's shape fits neither one particle nor the params.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> x = jnp.array([[0.1, 0.9], [0.5, 0.5]])
      >>> opt = optax.chain(optax.sgd(1.0), project_box(0.0, 1.0))
      >>> state = opt.init(x)
      >>> grads = jnp.array([[1.0, -1.0], [0.25, -0.25]])   # pushes the first particle out
      >>> updates, state = opt.update(grads, state, x)
      >>> optax.apply_updates(x, updates).tolist()
      [[0.0, 1.0], [0.25, 0.75]]
    """
    _check_bounds(lower, upper)

    def init_fn(params):
        _bounds_for(params, lower, upper, "project_box.init")  # shape errors at init time
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        check_state(state, optax.EmptyState, "project_box.update")
        del extra_args
        los, his = _bounds_for(params, lower, upper, "project_box")
        p_leaves, treedef = jax.tree_util.tree_flatten(params)
        u_def = jax.tree_util.tree_structure(updates)
        if u_def != treedef:
            raise ValueError(f"project_box: updates must have the structure of params; got {u_def} and {treedef}.")
        u_leaves = jax.tree_util.tree_leaves(updates)
        for (path, u), p in zip(leaf_paths(updates), p_leaves):
            if np.shape(u) != np.shape(p):
                raise ValueError(
                    f"project_box: updates{path} has shape {np.shape(u)} but params{path} has shape "
                    f"{np.shape(p)}; project_box must come last in the chain, after the updates are "
                    "shaped like the params."
                )
        new = [_landing_update(p, u, lo, hi) for p, u, lo, hi in zip(p_leaves, u_leaves, los, his)]
        return jax.tree_util.tree_unflatten(treedef, new), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
