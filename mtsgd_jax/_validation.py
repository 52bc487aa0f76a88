"""Shape checks shared by the public functions (run at trace time, so errors are early)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def leaf_paths(tree: PyTree):
    """[(path string, leaf)] for every leaf of ``tree``."""
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def num_particles(particles: PyTree, name: str = "particles") -> int:
    """Leading-axis length M shared by every leaf; raise a clear error otherwise."""
    leaves = leaf_paths(particles)
    if not leaves:
        raise ValueError(f"{name} is an empty pytree: expected leaves of shape (M, ...) with M >= 1.")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name}{path} is a scalar: every leaf needs a leading particle axis, shape (M, ...)."
            )
        sizes[path] = shape[0]
    distinct = set(sizes.values())
    if len(distinct) > 1:
        detail = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise ValueError(f"{name}: leaves disagree on the particle axis M (leading dimension): {detail}.")
    m = distinct.pop()
    if m == 0:
        raise ValueError(f"{name} is an empty particle set (M = 0): at least one particle is needed.")
    return int(m)


def require_params(params: PyTree) -> None:
    """The Stein transformations need the particles: a clear error when ``params`` is missing."""
    if params is None:
        raise ValueError(
            "params is required: call update(grads, state, params) with the particles "
            "(leaves of shape (M, ...)); the Stein direction depends on where the particles are."
        )


def tree_shapes_match(tree: PyTree, ref: PyTree, prefix: tuple = ()) -> bool:
    """True if ``tree`` has ``ref``'s structure and every leaf shape is ``prefix + ref leaf shape``."""
    if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(ref):
        return False
    pairs = zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref))
    return all(tuple(np.shape(t)) == tuple(prefix) + tuple(np.shape(r)) for t, r in pairs)


def check_target_grads(
    grads: PyTree, params: PyTree, num_targets: int | None, name: str = "grads", params_name: str = "params"
) -> int:
    """Check that ``grads`` has leaves (K, M, ...) matching ``params`` leaves (M, ...). Returns K."""
    require_params(params)
    m = num_particles(params, params_name)
    p_def = jax.tree_util.tree_structure(params)
    g_def = jax.tree_util.tree_structure(grads)
    if p_def != g_def:
        raise ValueError(
            f"{name} must have the same pytree structure as {params_name} (leaves (K, M, ...) vs (M, ...));"
            f" got {g_def} for {name} and {p_def} for {params_name}."
        )
    ks = set()
    for (path, g), (_, p) in zip(leaf_paths(grads), leaf_paths(params)):
        gs, ps = tuple(np.shape(g)), tuple(np.shape(p))
        if len(gs) != len(ps) + 1 or gs[2:] != ps[1:]:
            hint = " (did you forget the leading target axis K?)" if gs == ps else ""
            raise ValueError(
                f"{name}{path} has shape {gs}; expected (K, M, ...) = (K,) + {ps} "
                f"with one loss gradient per target{hint}."
            )
        if gs[1] != m:
            raise ValueError(
                f"{name}{path} has {gs[1]} particles on axis 1 but {params_name} has M = {m}: expected shape "
                f"(K, {m}) + {ps[1:]}."
            )
        ks.add(gs[0])
    if len(ks) > 1:
        raise ValueError(f"{name}: leaves disagree on the number of targets K (axis 0): {sorted(ks)}.")
    k = ks.pop()
    if k == 0:
        raise ValueError(f"{name} has K = 0 targets: at least one target is needed.")
    if num_targets is not None and k != num_targets:
        raise ValueError(
            f"{name} has K = {k} targets on axis 0 but the transformation was built with "
            f"num_targets = {num_targets}."
        )
    return int(k)


def check_like_params(grads: PyTree, params: PyTree, name: str = "grads") -> None:
    """Check that ``grads`` has exactly the structure and leaf shapes of ``params`` (M, ...)."""
    require_params(params)
    num_particles(params, "params")
    if tree_shapes_match(grads, params):
        return
    if jax.tree_util.tree_structure(grads) != jax.tree_util.tree_structure(params):
        raise ValueError(f"{name} must have the same pytree structure as params.")
    for (path, g), (_, p) in zip(leaf_paths(grads), leaf_paths(params)):
        if tuple(np.shape(g)) != tuple(np.shape(p)):
            raise ValueError(
                f"{name}{path} has shape {tuple(np.shape(g))}; expected the shape of params{path}, "
                f"{tuple(np.shape(p))} = (M, ...): one loss gradient per particle (no target axis for svgd)."
            )
