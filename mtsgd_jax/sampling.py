"""A jit-compiled sampling loop: N optimiser steps in one ``lax.scan``."""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtsgd_jax._validation import num_particles, tree_shapes_match
from mtsgd_jax.targets import TargetFns, log_prob_value_and_loss_grads, stack_targets
from mtsgd_jax.transforms import MTSGDState, SVGDState

PyTree = Any
Array = jax.Array

__all__ = ["Trace", "SampleResult", "sample", "find_stein_state"]


class Trace(NamedTuple):
    """Snapshots recorded every ``trace_every`` steps (leading axis T).

    Attributes:
      step: (T,) number of steps taken when the snapshot was recorded.
      particles: particle pytree with leaves (T, M, ...).
      weights: (T, K) MT-SGD weights held in the optimiser state at the
        snapshot, i.e. those of the last step taken (at snapshot 0: the
        state's initial weights, uniform for a fresh state). NaN if the
        optimiser has no MT-SGD/SVGD stage.
      ksd: (T, K) diag(U) of the last step taken, measured at the particles
        that step started from (NaN at snapshot 0 of a fresh state, and NaN
        without an MT-SGD/SVGD stage).
      log_prob: (T, K, M) log-densities of the targets at the recorded
        particles (before the step that follows).
    """

    step: Array
    particles: PyTree
    weights: Array
    ksd: Array
    log_prob: Array


class SampleResult(NamedTuple):
    """Output of :func:`sample`.

    Attributes:
      particles: final particles, leaves (M, ...).
      opt_state: final optimiser state (can resume sampling).
      trace: a :class:`Trace`, or ``None`` when ``trace_every`` is 0.
    """

    particles: PyTree
    opt_state: Any
    trace: Trace | None


def find_stein_state(opt_state: Any) -> MTSGDState | SVGDState | None:
    """First :class:`MTSGDState` or :class:`SVGDState` inside an (optax chain) state."""
    found = []

    def visit(x):
        if isinstance(x, (MTSGDState, SVGDState)):
            found.append(x)
        return x

    jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda x: isinstance(x, (MTSGDState, SVGDState)))
    return found[0] if found else None


def _diagnostics(opt_state, k, dtype):
    st = find_stein_state(opt_state)
    if isinstance(st, MTSGDState):
        return st.weights.astype(dtype), st.ksd.astype(dtype)
    if isinstance(st, SVGDState):
        return jnp.ones((1,), dtype), st.ksd[None].astype(dtype)
    nan = jnp.full((k,), jnp.nan, dtype)
    return nan, nan


class _Progress:
    """Host-side tqdm bar driven from inside the compiled loop."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step")

    def update(self, n):
        self.bar.update(int(n))

    def close(self, *_):
        self.bar.close()


def _check_updates(updates, particles):
    if not tree_shapes_match(updates, particles):
        shapes = jax.tree_util.tree_map(jnp.shape, updates)
        raise ValueError(
            "optimizer.update must turn per-target loss gradients (leaves (K, M, ...)) into updates "
            f"shaped like the particles (leaves (M, ...)); got updates with shapes {shapes}. Put a "
            "multi-target stage such as mtsgd(K) or svgd() first in the optax chain."
        )


_BARS: dict[int, _Progress] = {}
_BAR_IDS = itertools.count()


def _tick(progress_id, n):
    bar = _BARS.get(int(progress_id))
    if bar is not None:
        bar.update(n)


@functools.partial(jax.jit, static_argnames=("target", "optimizer", "num_steps", "trace_every", "progress_every"))
def _run(particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, progress_id):
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(particles))

    def log_prob(x):
        return jax.vmap(stack_targets(target))(x).T  # (K, M)

    def step(carry, i):
        x, s = carry
        _, grads = log_prob_value_and_loss_grads(target, x)
        updates, s = optimizer.update(grads, s, x)
        _check_updates(updates, x)
        x = optax.apply_updates(x, updates)
        if progress_every:
            jax.lax.cond(
                (i + 1) % progress_every == 0,
                lambda: jax.debug.callback(_tick, progress_id, progress_every, ordered=True),
                lambda: None,
            )
        return (x, s), None

    if not trace_every:
        (x, s), _ = jax.lax.scan(step, (particles, opt_state), jnp.arange(num_steps))
        return SampleResult(x, s, None)

    k = log_prob(particles).shape[0]

    def chunk(carry, j):
        carry, _ = jax.lax.scan(step, carry, j * trace_every + jnp.arange(trace_every))
        return carry, (carry[0],) + _diagnostics(carry[1], k, dtype)

    (x, s), (xs, ws, ksds) = jax.lax.scan(chunk, (particles, opt_state), jnp.arange(num_steps // trace_every))
    # Snapshot 0 is the starting point, so snapshot t holds the particles after t * trace_every steps.
    xs = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), particles, xs)
    w0, ksd0 = _diagnostics(opt_state, k, dtype)
    trace = Trace(
        step=jnp.arange(num_steps // trace_every + 1) * trace_every,
        particles=xs,
        weights=jnp.concatenate([w0[None], ws]),
        ksd=jnp.concatenate([ksd0[None], ksds]),
        log_prob=jax.vmap(log_prob)(xs),
    )
    return SampleResult(x, s, trace)


def sample(
    log_probs: TargetFns,
    optimizer: optax.GradientTransformation,
    particles: PyTree,
    num_steps: int,
    *,
    opt_state: Any = None,
    trace_every: int = 0,
    progress_bar: bool = False,
) -> SampleResult:
    """Run ``optimizer`` for ``num_steps`` steps on K unnormalised log-densities.

    The whole loop is one jit-compiled ``lax.scan``; repeated calls with the
    same targets, optimiser object and sizes reuse the compiled program.

    Args:
      log_probs: K functions ``log p_k(theta)`` of ONE particle, or one function
        returning the (K,) vector of log-densities (hashable: a function, or
        a tuple of functions).
      optimizer: an optax transformation whose ``update(grads, state, params)``
        takes per-target loss gradients with leaves (K, M, ...), e.g.
        ``optax.chain(mtsgd(K), optax.adam(3e-2))``.
      particles: initial particles, pytree with leaves (M, ...).
      num_steps: N >= 0.
      opt_state: optional optimiser state to resume from; ``optimizer.init``
        otherwise.
      trace_every: record a :class:`Trace` every this many steps (0 = no
        trace). Must divide ``num_steps``.
      progress_bar: show a tqdm progress bar (updated from the compiled loop
        about 100 times).

    Returns:
      :class:`SampleResult`.

    Example:
      >>> import jax, optax
      >>> from mtsgd_jax import mtsgd, sample, toy_problem
      >>> prob = toy_problem()
      >>> x0 = prob.init_particles(jax.random.key(0), 50)
      >>> res = sample(prob.log_prob, optax.chain(mtsgd(3), optax.adam(3e-2)), x0, 1000)
    """
    num_particles(particles)
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
    if not isinstance(trace_every, int) or trace_every < 0:
        raise ValueError(f"trace_every must be a non-negative int, got {trace_every!r}.")
    if trace_every and num_steps % trace_every:
        raise ValueError(f"trace_every ({trace_every}) must divide num_steps ({num_steps}).")
    target = log_probs if callable(log_probs) else tuple(log_probs)
    stack_targets(target)  # validates
    if opt_state is None:
        opt_state = optimizer.init(particles)
    progress_every = max(1, num_steps // 100) if progress_bar and num_steps else 0
    pid = next(_BAR_IDS) % (2**31 - 1)
    if progress_every:
        _BARS[pid] = _Progress(num_steps, "sampling")
    try:
        result = _run(particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, pid)
        if progress_every:
            jax.block_until_ready(result)
            jax.effects_barrier()
    finally:
        bar = _BARS.pop(pid, None)
        if bar is not None:
            bar.close()
    return result
