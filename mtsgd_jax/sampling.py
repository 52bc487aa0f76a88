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

__all__ = ["Trace", "SampleResult", "sample", "find_stein_state", "shard_particles"]


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


def _run_impl(particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, progress_id, master_dtype=None):
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(particles))
    if master_dtype is not None:
        dtype = jnp.promote_types(dtype, jnp.float32)
        low = jax.tree_util.tree_map(lambda a: a.dtype, particles)
        to_low = lambda x: jax.tree_util.tree_map(lambda a, t: a.astype(t), x, low)  # noqa: E731
        particles = jax.tree_util.tree_map(lambda a: a.astype(master_dtype), particles)
    else:
        to_low = lambda x: x  # noqa: E731

    def log_prob(x):
        return jax.vmap(stack_targets(target))(x).T  # (K, M)

    def step(carry, i):
        x, s = carry
        xl = to_low(x)  # what the targets and the optimiser see (the particles' own dtype)
        _, grads = log_prob_value_and_loss_grads(target, xl)
        updates, s = optimizer.update(grads, s, xl)
        _check_updates(updates, xl)
        if master_dtype is None:
            x = optax.apply_updates(x, updates)
        else:  # accumulate in the master copy
            x = jax.tree_util.tree_map(lambda a, u: a + u.astype(a.dtype), x, updates)
        if progress_every:
            jax.lax.cond(
                (i + 1) % progress_every == 0,
                # Unordered: ordered effects are not allowed across several devices (sharded runs).
                lambda: jax.debug.callback(_tick, progress_id, progress_every),
                lambda: None,
            )
        return (x, s), None

    if not trace_every:
        (x, s), _ = jax.lax.scan(step, (particles, opt_state), jnp.arange(num_steps))
        return SampleResult(to_low(x), s, None)

    k = log_prob(particles).shape[0]

    def chunk(carry, j):
        carry, _ = jax.lax.scan(step, carry, j * trace_every + jnp.arange(trace_every))
        return carry, (to_low(carry[0]),) + _diagnostics(carry[1], k, dtype)

    (x, s), (xs, ws, ksds) = jax.lax.scan(chunk, (particles, opt_state), jnp.arange(num_steps // trace_every))
    # Snapshot 0 is the starting point, so snapshot t holds the particles after t * trace_every steps.
    xs = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), to_low(particles), xs)
    w0, ksd0 = _diagnostics(opt_state, k, dtype)
    trace = Trace(
        step=jnp.arange(num_steps // trace_every + 1) * trace_every,
        particles=xs,
        weights=jnp.concatenate([w0[None], ws]),
        ksd=jnp.concatenate([ksd0[None], ksds]),
        log_prob=jax.vmap(log_prob)(xs),
    )
    return SampleResult(to_low(x), s, trace)


_run = jax.jit(_run_impl, static_argnames=("target", "optimizer", "num_steps", "trace_every", "progress_every", "master_dtype"))


def _shard_map(fn, mesh, in_specs, out_specs):
    """``shard_map`` across jax versions, without the replication checker.

    The checker rejects loops whose carry starts device-invariant and becomes
    device-varying (e.g. per-particle QP iterations); the replicated outputs
    here (MT-SGD's weights, step counters) are replicated by construction.
    """
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:  # pragma: no cover - versions with jax.shard_map but the older keyword
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older jax

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _particle_specs(tree, axis_name):
    from jax.sharding import PartitionSpec as P

    return jax.tree_util.tree_map(lambda _: P(axis_name), tree)


def _state_specs(optimizer, particles, m, axis_name):
    """Which optimiser-state leaves are per-particle (sharded) and which are global (replicated).

    Found by initialising abstractly for M and for 2 M particles: the leaves
    whose leading axis follows M are per-particle.
    """
    from jax.sharding import PartitionSpec as P

    one = jax.eval_shape(optimizer.init, particles)
    try:
        doubled = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((2 * a.shape[0],) + a.shape[1:], a.dtype), particles)
        two = jax.eval_shape(optimizer.init, doubled)
        return jax.tree_util.tree_map(
            lambda a, b: P(axis_name) if (a.ndim and b.shape[0] == 2 * a.shape[0]) else P(), one, two
        )
    except Exception:  # an init that insists on exactly M particles: fall back to the leading size
        return jax.tree_util.tree_map(lambda a: P(axis_name) if (a.ndim and a.shape[0] == m) else P(), one)


@functools.partial(
    jax.jit,
    static_argnames=("target", "optimizer", "num_steps", "trace_every", "progress_every", "mesh", "axis_name", "master_dtype"),
)
def _run_sharded(
    particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, progress_id, mesh, axis_name, master_dtype=None
):
    from jax.sharding import PartitionSpec as P

    m = num_particles(particles)
    p_specs = _particle_specs(particles, axis_name)
    s_specs = _state_specs(optimizer, particles, m, axis_name)
    trace_specs = None
    if trace_every:
        trace_specs = Trace(
            step=P(),
            particles=jax.tree_util.tree_map(lambda _: P(None, axis_name), particles),
            weights=P(),
            ksd=P(),
            log_prob=P(None, None, axis_name),
        )

    def body(x, s, pid):
        return _run_impl(x, s, target, optimizer, num_steps, trace_every, progress_every, pid, master_dtype)

    fn = _shard_map(body, mesh, (p_specs, s_specs, P()), SampleResult(p_specs, s_specs, trace_specs))
    return fn(particles, opt_state, progress_id)


def shard_particles(particles: PyTree, mesh, axis_name: str = "particles") -> PyTree:
    """Place a particle pytree on ``mesh`` split along the particle axis (leaves (M, ...)).

    Every leaf gets ``NamedSharding(mesh, P(axis_name))``; M must be divisible
    by the size of that mesh axis.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> from mtsgd_jax import shard_particles
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("particles",))
      >>> x = shard_particles(jax.numpy.zeros((8, 2)), mesh)
      >>> x.sharding.spec == P("particles")
      True
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    _check_mesh(particles, mesh, axis_name)
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, NamedSharding(mesh, P(axis_name))), particles)


def _check_mesh(particles, mesh, axis_name):
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh (axes {mesh.axis_names}).")
    m = num_particles(particles)
    size = mesh.shape[axis_name]
    if m % size:
        raise ValueError(f"particles: M = {m} particles cannot be split evenly over the {size} devices of mesh axis {axis_name!r}.")


def sample(
    log_probs: TargetFns,
    optimizer: optax.GradientTransformation,
    particles: PyTree,
    num_steps: int,
    *,
    opt_state: Any = None,
    trace_every: int = 0,
    progress_bar: bool = False,
    mesh=None,
    axis_name: str = "particles",
    master_dtype=None,
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
      mesh: a ``jax.sharding.Mesh`` to split the particles over its
        ``axis_name`` axis: every device runs the loop on its M / D particles
        inside ``shard_map`` and the particle interactions communicate. Build
        the optimiser for that axis (``mtsgd(K, axis_name=axis_name)``,
        ``svgd(axis_name=...)``, ``moo_svgd(K, axis_name=...)``; ``mgda`` and
        ``linear_scalarization`` with shared weights need no communication),
        otherwise every device would sample on its own. Particles, per-particle
        optimiser state and the trace stay sharded. See :func:`shard_particles`.
      axis_name: the mesh axis that splits the particles.
      master_dtype: mixed precision for low-precision particles (e.g.
        bfloat16): keep a copy of the particles in this dtype (e.g.
        ``jnp.float32``) inside the loop and add the updates to it; the
        targets and the optimiser see the particles in their own dtype (the
        Stein algebra accumulates in float32 anyway), and the returned
        particles are cast back. Without it, steps smaller than half the
        bfloat16 spacing (about 0.4% of a coordinate) round away and the
        particles stall far from the origin.

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
    if mesh is not None:
        _check_mesh(particles, mesh, axis_name)
    if master_dtype is not None:
        master_dtype = jnp.dtype(master_dtype)
        if not jnp.issubdtype(master_dtype, jnp.floating):
            raise ValueError(f"master_dtype must be a floating dtype (e.g. jnp.float32), got {master_dtype}.")
    if opt_state is None:
        opt_state = optimizer.init(particles)
    progress_every = max(1, num_steps // 100) if progress_bar and num_steps else 0
    pid = next(_BAR_IDS) % (2**31 - 1)
    if progress_every:
        # Sharded: every device reports its own progress, so the bar counts D times the steps.
        devices = 1 if mesh is None else mesh.shape[axis_name]
        _BARS[pid] = _Progress(num_steps * devices, "sampling")
    try:
        if mesh is None:
            result = _run(particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, pid, master_dtype)
        else:
            result = _run_sharded(
                particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, pid, mesh, axis_name, master_dtype
            )
        if progress_every:
            jax.block_until_ready(result)
            jax.effects_barrier()
    finally:
        bar = _BARS.pop(pid, None)
        if bar is not None:
            bar.close()
    return result
