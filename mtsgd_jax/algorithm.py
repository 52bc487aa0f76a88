"""Sampling as two pure functions, ``init`` and ``step``, for loops the user writes.

:func:`mtsgd_sampler` packages K log-densities and an optax transformation
(``mtsgd``, ``svgd``, ``moo_svgd``, ``mgda``, ... chained with a first-order
optimiser) as a :class:`SamplingAlgorithm`, the ``(init, step)`` pair used by
blackjax:

* ``init(particles) -> SamplerState``
* ``step(state) -> (SamplerState, StepInfo)``

Both are pure and can be jitted, scanned, or called from a Python loop that
logs, checkpoints or stops early. :func:`~mtsgd_jax.sampling.sample` runs the
same ``step`` in a compiled ``lax.scan``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtsgd_jax import stein as _stein
from mtsgd_jax._validation import leaf_paths, num_particles, tree_shapes_match
from mtsgd_jax.targets import TargetFns, log_prob_value_and_loss_grads, stack_targets
from mtsgd_jax.transforms import MTSGDState, SVGDState

PyTree = Any
Array = jax.Array

__all__ = [
    "SamplingAlgorithm",
    "SamplerState",
    "StepInfo",
    "mtsgd_sampler",
    "find_stein_state",
]

CHAIN_HINT = (
    "put the multi-target stage (mtsgd/svgd/moo_svgd/mgda/linear_scalarization/pareto_mtl) FIRST in optax.chain: "
    "per-target gradients (K, M, ...) must be combined before element-wise optimisers such as adam, "
    "e.g. optax.chain(mtsgd(K), optax.adam(1e-2))."
)


class SamplerState(NamedTuple):
    """State of a :class:`SamplingAlgorithm`.

    Attributes:
      particles: pytree with leaves (M, ...), in the dtype the particles were
        given in (what the targets and the optimiser see).
      opt_state: the optimiser's state.
      master: ``None``, or with ``master_dtype`` a higher-precision copy of
        ``particles`` (leaves (M, ...) in ``master_dtype``) that accumulates
        the updates; ``particles`` is its cast.
    """

    particles: PyTree
    opt_state: Any
    master: PyTree = None


class StepInfo(NamedTuple):
    """What one step measured.

    Attributes:
      log_prob: (K, M) log-densities at the particles the step started from.
      weights: (K,) MT-SGD weights used by the step (ones for SVGD, NaN when
        the optimiser has no MT-SGD/SVGD stage).
      ksd: (K,) diag(U) of the step: squared kernel Stein discrepancy per
        target at the particles the step started from (NaN without an
        MT-SGD/SVGD stage).
      nonfinite: () int32 number of particles whose position after the step,
        or whose log-density or loss gradient at the start of the step, has a
        NaN or infinite entry (over all M particles, also when they are split
        over devices).
    """

    log_prob: Array
    weights: Array
    ksd: Array
    nonfinite: Array


class SamplingAlgorithm(NamedTuple):
    """A pair of pure functions (the blackjax ``SamplingAlgorithm`` shape).

    Attributes:
      init: ``init(particles, opt_state=None) -> SamplerState``.
      step: ``step(state, *args) -> (SamplerState, StepInfo)``; ``args`` are
        passed to every log-density after the particle (e.g. a data batch).
    """

    init: Callable[..., SamplerState]
    step: Callable[..., tuple]


def find_stein_state(opt_state: Any) -> MTSGDState | SVGDState | None:
    """First :class:`MTSGDState` or :class:`SVGDState` inside an (optax chain) state."""
    found = []

    def visit(x):
        if isinstance(x, (MTSGDState, SVGDState)):
            found.append(x)
        return x

    jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda x: isinstance(x, (MTSGDState, SVGDState)))
    return found[0] if found else None


def stein_diagnostics(opt_state: Any, num_targets: int, dtype) -> tuple[Array, Array]:
    """(K,) weights and (K,) diag(U) held in the optimiser state (NaN without a Stein stage)."""
    st = find_stein_state(opt_state)
    if isinstance(st, MTSGDState):
        return st.weights.astype(dtype), st.ksd.astype(dtype)
    if isinstance(st, SVGDState):
        return jnp.ones((1,), dtype), st.ksd[None].astype(dtype)
    nan = jnp.full((num_targets,), jnp.nan, dtype)
    return nan, nan


def diagnostics_dtype(particles: PyTree, master: PyTree = None):
    """Float dtype of the per-step diagnostics: the particles' dtype, or the master copy's if wider."""
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(particles))
    if master is not None:
        dtype = jnp.promote_types(dtype, jnp.result_type(*jax.tree_util.tree_leaves(master)))
    return dtype


def nonfinite_mask(particles: PyTree, values: Array | None = None, grads: PyTree = None) -> Array:
    """(M,) bool: particle m has a non-finite position, log-density (``values`` (K, M)) or gradient (leaves (K, M, ...))."""

    def per_particle(a, lead):  # any non-finite entry, reduced to the particle axis at position ``lead``
        bad = ~jnp.isfinite(a)
        if lead:
            bad = jnp.any(bad, axis=tuple(range(lead)))
        return jnp.any(bad.reshape(bad.shape[0], -1), axis=1)

    masks = [per_particle(a, 0) for a in jax.tree_util.tree_leaves(particles)]
    if values is not None:
        masks.append(per_particle(values, 1))
    if grads is not None:
        masks.extend(per_particle(g, 1) for g in jax.tree_util.tree_leaves(grads))
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def count_nonfinite(particles: PyTree, values: Array | None = None, grads: PyTree = None, axis_name: str | None = None) -> Array:
    """() int32 number of particles flagged by :func:`nonfinite_mask`, summed over ``axis_name`` if given."""
    count = jnp.sum(nonfinite_mask(particles, values, grads), dtype=jnp.int32)
    return count if axis_name is None else jax.lax.psum(count, axis_name)


def _describe(tree):
    return jax.tree_util.tree_map(lambda a: f"{jnp.shape(a)} {jnp.result_type(a)}", tree)


def check_step_output(updates: PyTree, new_state: Any, particles: PyTree, old_state: Any) -> None:
    """Raise a ValueError (with the chain-order hint) unless ``optimizer.update`` kept the shapes.

    ``updates`` must be shaped like ``particles`` (leaves (M, ...)), and the
    new state must have the old state's tree structure, leaf shapes and
    dtypes (a ``lax.scan`` carry, or a ``jax.jit`` loop, needs that).
    """
    if not tree_shapes_match(updates, particles):
        raise ValueError(
            "optimizer.update must turn per-target loss gradients (leaves (K, M, ...)) into updates shaped like the "
            f"particles {_describe(particles)}; got updates {_describe(updates)}. Fix: {CHAIN_HINT}"
        )
    old_def, new_def = jax.tree_util.tree_structure(old_state), jax.tree_util.tree_structure(new_state)
    if old_def != new_def:
        raise ValueError(
            f"optimizer.update returned a state with a different tree structure than the one it was given "
            f"(optimizer.init(particles) or opt_state): {new_def} vs {old_def}. Fix: {CHAIN_HINT}"
        )
    for (path, new), (_, old) in zip(leaf_paths(new_state), leaf_paths(old_state)):
        new_sd = (tuple(jnp.shape(new)), jnp.result_type(new))
        old_sd = (tuple(jnp.shape(old)), jnp.result_type(old))
        if new_sd != old_sd:
            raise ValueError(
                f"optimizer.update changed the optimiser state at opt_state{path}: shape {new_sd[0]} {new_sd[1]} after "
                f"the update vs {old_sd[0]} {old_sd[1]} from optimizer.init(particles) (or the opt_state given); "
                f"a stage received per-target gradients (K, M, ...) where it expected (M, ...). Fix: {CHAIN_HINT}"
            )


def check_opt_state(opt_state: Any, expected: Any) -> None:
    """Raise a ValueError unless ``opt_state`` has the structure and leaf shapes of ``expected`` (``optimizer.init``'s)."""
    hint = "pass the state saved together with these particles (same M and leaf shapes), or opt_state=None to start afresh."
    got_def, want_def = jax.tree_util.tree_structure(opt_state), jax.tree_util.tree_structure(expected)
    if got_def != want_def:
        raise ValueError(f"opt_state does not have the structure of optimizer.init(particles): {got_def} vs {want_def}; {hint}")
    for (path, got), (_, want) in zip(leaf_paths(opt_state), leaf_paths(expected)):
        if tuple(jnp.shape(got)) != tuple(want.shape):
            raise ValueError(
                f"opt_state{path} has shape {tuple(jnp.shape(got))} but optimizer.init(particles) gives {tuple(want.shape)}; {hint}"
            )


def resolve_axis_name(axis_name: str | None, contexts, where: str) -> str | None:
    """The particle axis: ``axis_name`` if given, else the first stage's; a ValueError if they differ.

    ``contexts`` are the :class:`~mtsgd_jax.stein.KernelContext` s announced
    by the optimiser's stages (see :func:`~mtsgd_jax.stein.observe_contexts`);
    stages built without an axis (``axis_name=None``) impose none.
    """
    stage_axes = [c.axis_name for c in contexts if c.axis_name is not None]
    if axis_name is None:
        return stage_axes[0] if stage_axes else None
    for stage in stage_axes:
        if stage != axis_name:
            raise ValueError(
                f"{where}: axis_name={axis_name!r} but the optimiser's Stein stage was built with "
                f"axis_name={stage!r}; leave {where}'s axis_name=None to take the optimiser's, or build the "
                f"optimiser with axis_name={axis_name!r} (e.g. mtsgd(K, axis_name={axis_name!r}))."
            )
    return axis_name


def _check_optimizer(optimizer):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update") and callable(optimizer.update)):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (with init and update), got {type(optimizer).__name__}; "
            "e.g. optax.chain(mtsgd(K), optax.adam(1e-2))."
        )


def mtsgd_sampler(
    log_probs: TargetFns,
    optimizer: optax.GradientTransformation,
    *,
    master_dtype=None,
    axis_name: str | None = None,
) -> SamplingAlgorithm:
    """MT-SGD (or any multi-target transformation) as a blackjax-style ``(init, step)`` pair.

    Args:
      log_probs: K functions ``log p_k(theta, *args)`` of ONE particle, or one
        function returning the (K,) vector of log-densities.
      optimizer: an optax transformation whose ``update(grads, state, params)``
        takes per-target loss gradients with leaves (K, M, ...) and returns
        updates shaped like the particles, e.g.
        ``optax.chain(mtsgd(K), optax.adam(3e-2))``.
      master_dtype: keep a copy of the particles in this floating dtype (e.g.
        ``jnp.float32`` for bfloat16 particles) that accumulates the updates;
        see :func:`~mtsgd_jax.sampling.sample`.
      axis_name: the mesh axis the particles are split over when ``step``
        runs inside ``shard_map`` (``StepInfo.nonfinite`` then counts over all
        devices). ``None`` (default) takes it from the optimiser: the
        ``axis_name`` its mtsgd/svgd/moo_svgd stage was built with (none
        without such a stage). A value that differs from the stage's is a
        ValueError when ``step`` is traced.

    Returns:
      A :class:`SamplingAlgorithm` with

      * ``init(particles, opt_state=None) -> SamplerState``: particles with
        leaves (M, ...); ``opt_state`` resumes from a saved optimiser state
        (``optimizer.init(particles)`` otherwise);
      * ``step(state, *args) -> (SamplerState, StepInfo)``: one update of all
        M particles; ``args`` go to every log-density (not vmapped).

      ``step`` raises a ValueError while tracing if ``optimizer.update``
      returns updates not shaped like the particles or changes the state's
      structure, shapes or dtypes (e.g. ``optax.adam`` placed before
      ``mtsgd`` in the chain).

    Example:
      >>> import jax, optax
      >>> from mtsgd_jax import mtsgd, mtsgd_sampler, toy_problem
      >>> prob = toy_problem()
      >>> algo = mtsgd_sampler(prob.log_prob, optax.chain(mtsgd(3), optax.adam(3e-2)))
      >>> state = algo.init(prob.init_particles(jax.random.key(0), 50))
      >>> step = jax.jit(algo.step)
      >>> for _ in range(10):
      ...     state, info = step(state)
      >>> state.particles.shape, info.log_prob.shape, int(info.nonfinite)
      ((50, 2), (3, 50), 0)
    """
    target = log_probs if callable(log_probs) else tuple(log_probs)
    stack_targets(target)  # validates
    _check_optimizer(optimizer)
    if master_dtype is not None:
        master_dtype = jnp.dtype(master_dtype)
        if not jnp.issubdtype(master_dtype, jnp.floating):
            raise ValueError(f"master_dtype must be a floating dtype (e.g. jnp.float32), got {master_dtype}.")
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a mesh axis name (str) or None, got {axis_name!r}.")

    def check_axis(context):
        resolve_axis_name(axis_name, [context], "mtsgd_sampler")

    def init(particles: PyTree, opt_state: Any = None) -> SamplerState:
        num_particles(particles)
        if opt_state is None:
            opt_state = optimizer.init(particles)
        else:
            check_opt_state(opt_state, jax.eval_shape(optimizer.init, particles))
        master = None
        if master_dtype is not None:
            master = jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(master_dtype), particles)
        return SamplerState(particles, opt_state, master)

    def step(state: SamplerState, *args) -> tuple[SamplerState, StepInfo]:
        x = state.particles
        values, grads = log_prob_value_and_loss_grads(target, x, *args)
        with _stein.observe_contexts(check=check_axis) as contexts:
            updates, opt_state = optimizer.update(grads, state.opt_state, x)
        check_step_output(updates, opt_state, x, state.opt_state)
        axis = resolve_axis_name(axis_name, contexts, "mtsgd_sampler")
        if state.master is None:
            master = None
            new_x = optax.apply_updates(x, updates)
        else:  # accumulate in the master copy; the particles are its cast
            master = jax.tree_util.tree_map(lambda a, u: a + u.astype(a.dtype), state.master, updates)
            new_x = jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), master, x)
        count = count_nonfinite(new_x, values, grads, axis)
        weights, ksd = stein_diagnostics(opt_state, values.shape[0], diagnostics_dtype(x, state.master))
        return SamplerState(new_x, opt_state, master), StepInfo(values, weights, ksd, count)

    return SamplingAlgorithm(init, step)
