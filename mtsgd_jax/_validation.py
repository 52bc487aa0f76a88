"""Input checks shared by the public functions (run at trace time, so errors are early).

Shapes of particle sets and per-target gradients; dtypes (floating-point
particles and gradients), Python lists of numbers given for arrays, the state
type each transformation's ``update`` receives, and the transformations'
factory options.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Leaves that are numbers rather than arrays (what a Python list of numbers flattens to).
_PY_NUMBERS = (bool, int, float, complex, np.generic)


def leaf_paths(tree: PyTree):
    """[(path string, leaf)] for every leaf of ``tree``."""
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def num_particles(particles: PyTree, name: str = "particles") -> int:
    """Leading-axis length M shared by every leaf; raise a clear error otherwise."""
    check_not_python_numbers(particles, name)
    leaves = leaf_paths(particles)
    if not leaves:
        raise ValueError(f"{name} is an empty pytree: expected leaves of shape (M, ...) with M >= 1.")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            fix = " (a number, not an array: convert the particles with jnp.asarray)" if isinstance(leaf, _PY_NUMBERS) else ""
            raise ValueError(
                f"{name}{path} is a scalar: every leaf needs a leading particle axis, shape (M, ...){fix}."
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


# ---------------------------------------------------------------------------
# Input checks called at the top of the transformations' init / update
# ---------------------------------------------------------------------------

def _container_at(tree: PyTree, path: tuple):
    """The node of ``tree`` at key path ``path`` (None where it cannot be followed)."""
    node = tree
    for key in path:
        try:
            if isinstance(key, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)):
                node = node[key.key if isinstance(key, jax.tree_util.DictKey) else key.idx]
            elif isinstance(key, jax.tree_util.GetAttrKey):
                node = getattr(node, key.name)
            else:
                return None
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return node


def check_not_python_numbers(tree: PyTree, name: str = "params", caller: str | None = None) -> None:
    """Reject a Python list/tuple of numbers (e.g. ``[[0., 1.], [2., 3.]]``) given for an array.

    A list of arrays is a valid pytree (one leaf per entry); a list of numbers
    is also a pytree, but of scalar leaves with no particle axis. Raises a
    TypeError naming the list and the fix (``jnp.asarray``).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, _PY_NUMBERS):
            continue
        cut = next((i for i, key in enumerate(path) if isinstance(key, jax.tree_util.SequenceKey)), None)
        if cut is None:
            continue
        where = name + jax.tree_util.keystr(path[:cut])
        kind = "tuple" if isinstance(_container_at(tree, path[:cut]), tuple) else "list"
        prefix = f"{caller}: " if caller else ""
        raise TypeError(
            f"{prefix}{where} is a Python {kind} of numbers ({name}{jax.tree_util.keystr(path)} = {leaf!r}); "
            f"convert it with jnp.asarray(...), e.g. {where} = jnp.asarray({where}, jnp.float32), "
            f"to get an array of shape (M, ...). (A {kind} of arrays is a valid pytree of particles; "
            f"a {kind} of numbers is not.)"
        )


def _leaf_dtype(leaf):
    try:
        return jnp.result_type(leaf)
    except TypeError:
        return None


def check_float_leaves(tree: PyTree, name: str = "params", caller: str | None = None, what: str = "particles") -> None:
    """Every leaf of ``tree`` must be a real floating-point array (bfloat16 and float16 included).

    Integer (and bool) leaves would make the update integer (truncated); complex
    leaves would lose their imaginary part in the real Stein algebra. Raises a
    TypeError naming the leaf path, its dtype and the fix.
    """
    prefix = f"{caller}: " if caller else ""
    for path, leaf in leaf_paths(tree):
        dtype = _leaf_dtype(leaf)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            continue
        if dtype is None:
            got = f"is a {type(leaf).__name__}, not an array"
            why = f"{what} must be floating-point arrays"
        elif jnp.issubdtype(dtype, jnp.complexfloating):
            got = f"has dtype {dtype}"
            why = f"complex {what} are not supported (the imaginary part would be silently dropped)"
        else:
            got = f"has dtype {dtype}"
            why = f"{what} must be floating point (with dtype {dtype} the update would be truncated)"
        raise TypeError(
            f"{prefix}{name}{path} {got}; {why}. Convert with jnp.asarray(x, jnp.float32) "
            "(or another float dtype: float64, bfloat16, float16)."
        )


def check_real_array(value, name: str, caller: str | None = None) -> None:
    """``value`` (if not None) must be a real (integer or floating) array: no complex, bool or non-numeric."""
    if value is None:
        return
    prefix = f"{caller}: " if caller else ""
    check_not_python_numbers(value, name, caller)
    dtype = _leaf_dtype(value)
    if dtype is None or jnp.issubdtype(dtype, jnp.bool_) or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(f"{prefix}{name} must be a real-valued array, got {type(value).__name__} of dtype {dtype}.")
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{prefix}{name} has dtype {dtype}; complex values are not supported (the imaginary part would be "
            "silently dropped). Convert with jnp.asarray(x, jnp.float32)."
        )


def _type_name(state) -> str:
    name = type(state).__name__
    if isinstance(state, (tuple, list)) and not hasattr(state, "_fields"):
        inner = ", ".join(type(s).__name__ for s in state)
        return f"{name} ({inner})"
    return name


def _article(word: str) -> str:
    """'an' before a vowel sound: 'an MTSGDState', 'an SVGDState', 'a ParetoMTLState'."""
    acronym = len(word) > 1 and word[:2].isupper()
    return "an" if word[0] in "AEIOU" or (acronym and word[0] in "FHLMNRSX") else "a"


def check_state(state, state_type: type, caller: str) -> None:
    """``state`` must be ``state_type`` (what this transformation's ``init`` returned).

    ``caller`` is ``"<factory>.update"``. A state type without fields (such as
    ``optax.EmptyState``) accepts any state without leaves (``()``, ``None``,
    a restored empty container) and rejects any state that has arrays.
    """
    factory = caller.split(".")[0]
    if not getattr(state_type, "_fields", True):
        if not jax.tree_util.tree_leaves(state):
            return
        expected = f"an empty state ({state_type.__name__}) from {factory}(...).init"
    elif isinstance(state, state_type):
        return
    else:
        expected = f"{_article(state_type.__name__)} {state_type.__name__} from {factory}(...).init"
    hint = ""
    if isinstance(state, (tuple, list)) and not hasattr(state, "_fields"):
        idx = [i for i, s in enumerate(state) if isinstance(s, state_type)]
        if idx and getattr(state_type, "_fields", True):
            hint = (
                f" (this looks like an optax.chain state: give it to the chain's update, or pass its element "
                f"[{idx[0]}] here)"
            )
    elif isinstance(getattr(state, "inner_state", None), state_type):
        hint = " (this wraps the right state: pass its .inner_state here, or call the wrapper's update)"
    raise TypeError(
        f"{caller}: state must be {expected}, got {_type_name(state)}{hint}; pass the state that this "
        "transformation's init returned (inside optax.chain, the chain's own state)."
    )


def check_init_params(params: PyTree, caller: str) -> None:
    """The particles must be an array pytree (not a list of numbers) with floating-point leaves."""
    check_not_python_numbers(params, "params", caller)
    check_float_leaves(params, "params", caller)


def check_init_inputs(params: PyTree, caller: str, **options) -> None:
    """What every transformation's ``init`` checks first: its factory options, then the particles.

    Args:
      params: the particles given to ``init``, leaves (M, ...).
      caller: ``"<factory>.init"``, used in the messages.
      **options: factory options to check (see :func:`check_options`).
    """
    check_options(caller, **options)
    check_init_params(params, caller)


def check_update_inputs(
    grads: PyTree, state, params: PyTree, state_type: type, caller: str, *, check_params: bool = True, **real_arrays
) -> None:
    """What every transformation's ``update`` checks first (shapes are checked afterwards).

    Args:
      grads: the gradients/updates given to ``update``: float leaves.
      state: must be a ``state_type`` (see :func:`check_state`).
      params: the particles (skipped when None: the caller decides whether it is required).
      state_type: the transformation's state class.
      caller: ``"<factory>.update"``, used in the messages.
      check_params: False where integer params are legitimate (e.g. a box projection).
      **real_arrays: further arrays (e.g. ``losses=``) that must be real-valued when given.
    """
    check_state(state, state_type, caller)
    if params is not None and check_params:
        check_init_params(params, caller)
    check_not_python_numbers(grads, "grads", caller)
    check_float_leaves(grads, "grads", caller, what="gradients")
    for name, value in real_arrays.items():
        check_real_array(value, name, caller)


# ---------------------------------------------------------------------------
# Factory options (checked by init, before any update runs)
# ---------------------------------------------------------------------------


def _is_flag(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (int, np.integer)):
        return int(value) in (0, 1)
    if isinstance(value, (np.ndarray, jax.Array)) and np.shape(value) == ():
        return jnp.issubdtype(value.dtype, jnp.bool_)
    return False


def check_options(caller: str, **options) -> None:
    """Check a transformation's factory options by name; raise TypeError/ValueError naming the option.

    Recognised names: the flags ``warm_start``, ``normalize_grads``, ``normalize_weights``
    (bool); the finite non-negative reals ``repulsion`` and
    ``constraint_tol``. Other names raise a ``KeyError`` (a programming
    error in the caller).
    """
    factory = caller.split(".")[0]
    for name, value in options.items():
        if name in ("warm_start", "normalize_grads", "normalize_weights"):
            if not _is_flag(value):
                raise TypeError(f"{factory}: {name} must be True or False, got {type(value).__name__} {value!r}.")
        elif name in ("repulsion", "constraint_tol"):
            if isinstance(value, (bool, np.bool_)):
                raise TypeError(
                    f"{factory}: {name} must be a non-negative number, got the bool {value!r}; "
                    f"pass a float (e.g. {name}={float(value)})."
                )
            if not np.isfinite(value):
                raise ValueError(f"{factory}: {name} must be finite, got {value!r}.")
        else:
            raise KeyError(f"check_options: unknown option {name!r}.")
