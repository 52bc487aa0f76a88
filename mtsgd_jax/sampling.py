"""A jit-compiled sampling loop: N optimiser steps in one ``lax.scan``."""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax import algorithm as _algorithm
from mtsgd_jax import stein as _stein
from mtsgd_jax._validation import leaf_paths, num_particles
from mtsgd_jax.algorithm import find_stein_state, mtsgd_sampler
from mtsgd_jax.targets import TargetFns, stack_targets

PyTree = Any
Array = jax.Array

__all__ = [
    "Trace",
    "SampleResult",
    "NonFiniteReport",
    "NonFiniteWarning",
    "NonFiniteError",
    "ON_NONFINITE",
    "sample",
    "find_stein_state",
    "shard_particles",
]

ON_NONFINITE = ("warn", "raise", "ignore")


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
      nonfinite: (T,) int32 number of non-finite particles at the last step
        taken (position after it, or log-density/gradient at its start; see
        :class:`~mtsgd_jax.algorithm.StepInfo`); at snapshot 0 the number of
        initial particles with a non-finite position.
    """

    step: Array
    particles: PyTree
    weights: Array
    ksd: Array
    log_prob: Array
    nonfinite: Array


class NonFiniteReport(NamedTuple):
    """How often particles became non-finite during a :func:`sample` run (() int32 arrays).

    A particle counts at a step when its position after the step, or its
    log-density or loss gradient at the start of the step, has a NaN or
    infinite entry. Counted over all M particles, also when they are split
    over devices.

    Attributes:
      steps: number of steps with at least one non-finite particle (0 for a
        clean run).
      first_step: index (0 .. num_steps - 1, counted from the start of this
        call) of the first such step, i.e. the step that started from the
        particles after ``first_step`` steps; -1 for a clean run.
      max_particles: the largest number of non-finite particles at one step.
      final_particles: number of returned particles with a non-finite
        position.
    """

    steps: Array
    first_step: Array
    max_particles: Array
    final_particles: Array


class SampleResult(NamedTuple):
    """Output of :func:`sample`.

    Attributes:
      particles: final particles, leaves (M, ...).
      opt_state: final optimiser state (can resume sampling).
      trace: a :class:`Trace`, or ``None`` when ``trace_every`` is 0.
      nonfinite: a :class:`NonFiniteReport`.
    """

    particles: PyTree
    opt_state: Any
    trace: Trace | None
    nonfinite: NonFiniteReport


class NonFiniteWarning(RuntimeWarning):
    """:func:`sample` met particles with a non-finite position, log-density or gradient."""


class NonFiniteError(FloatingPointError):
    """Raised by ``sample(..., on_nonfinite="raise")`` after the run; ``.result`` holds the :class:`SampleResult`."""

    def __init__(self, message: str, result: SampleResult | None = None):
        super().__init__(message)
        self.result = result


def _nonfinite_message(steps, first, max_particles, final, num_steps, m) -> str:
    return (
        f"sample: non-finite particles (NaN or inf in the position, log-density or gradient) at {steps} of "
        f"{num_steps} steps, first at step {first} (0-based), at most {max_particles} of {m} particles in one step; "
        f"{final} of the returned particles are not finite. Check that every log-density is finite with a finite "
        f"gradient wherever the particles go (e.g. on the initial particles), and try a smaller step size "
        f"(learning rate). on_nonfinite='ignore' silences this; result.nonfinite has the counts."
    )


def _warn_from_device(steps, first, max_particles, final, num_steps, m):
    """Host callback for runs traced inside an outer ``jax.jit``: warn once the counts are known."""
    steps, first, max_particles, final = (int(np.max(np.asarray(v))) for v in (steps, first, max_particles, final))
    if steps or final:
        warnings.warn(_nonfinite_message(steps, first, max_particles, final, num_steps, m), NonFiniteWarning, stacklevel=2)


class _Progress:
    """Host-side tqdm bar driven from inside the compiled loop."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step")

    def update(self, n):
        self.bar.update(int(n))

    def close(self, *_):
        self.bar.close()


_BARS: dict[int, _Progress] = {}
_BAR_IDS = itertools.count()


def _tick(progress_id, n):
    bar = _BARS.get(int(progress_id))
    if bar is not None:
        bar.update(n)


def _run_impl(
    particles, opt_state, target, optimizer, num_steps, trace_every, progress_every, progress_id, master_dtype=None, axis_name=None
):
    algo = mtsgd_sampler(target, optimizer, master_dtype=master_dtype, axis_name=axis_name)
    state0 = algo.init(particles, opt_state)
    dtype = _algorithm.diagnostics_dtype(particles, state0.master)
    i32 = jnp.int32
    # running NonFiniteReport (final_particles slot: the count at the last step, for the trace)
    report0 = NonFiniteReport(jnp.zeros((), i32), jnp.full((), -1, i32), jnp.zeros((), i32), jnp.zeros((), i32))

    def step(carry, i):
        state, rep = carry
        state, info = algo.step(state)
        n = info.nonfinite
        rep = NonFiniteReport(
            steps=rep.steps + (n > 0).astype(i32),
            first_step=jnp.where((rep.first_step < 0) & (n > 0), i.astype(i32), rep.first_step),
            max_particles=jnp.maximum(rep.max_particles, n),
            final_particles=n,
        )
        if progress_every:
            jax.lax.cond(
                (i + 1) % progress_every == 0,
                # Unordered: ordered effects are not allowed across several devices (sharded runs).
                lambda: jax.debug.callback(_tick, progress_id, progress_every),
                lambda: None,
            )
        return (state, rep), None

    def finish(state, rep, trace):
        final = _algorithm.count_nonfinite(state.particles, axis_name=axis_name)
        return SampleResult(state.particles, state.opt_state, trace, rep._replace(final_particles=final))

    if not trace_every:
        (state, rep), _ = jax.lax.scan(step, (state0, report0), jnp.arange(num_steps))
        return finish(state, rep, None)

    k = jax.eval_shape(jax.vmap(stack_targets(target)), particles).shape[-1]

    def log_prob(x):
        return jax.vmap(stack_targets(target))(x).T  # (K, M)

    def chunk(carry, j):
        carry, _ = jax.lax.scan(step, carry, j * trace_every + jnp.arange(trace_every))
        state, rep = carry
        w, ksd = _algorithm.stein_diagnostics(state.opt_state, k, dtype)
        return carry, (state.particles, w, ksd, rep.final_particles)

    (state, rep), (xs, ws, ksds, counts) = jax.lax.scan(chunk, (state0, report0), jnp.arange(num_steps // trace_every))
    # Snapshot 0 is the starting point, so snapshot t holds the particles after t * trace_every steps.
    xs = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), particles, xs)
    w0, ksd0 = _algorithm.stein_diagnostics(opt_state, k, dtype)
    n0 = _algorithm.count_nonfinite(particles, axis_name=axis_name)
    trace = Trace(
        step=jnp.arange(num_steps // trace_every + 1) * trace_every,
        particles=xs,
        weights=jnp.concatenate([w0[None], ws]),
        ksd=jnp.concatenate([ksd0[None], ksds]),
        log_prob=jax.vmap(log_prob)(xs),
        nonfinite=jnp.concatenate([n0[None], counts]),
    )
    return finish(state, rep, trace)


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
            nonfinite=P(),
        )
    report_specs = NonFiniteReport(P(), P(), P(), P())  # counts psum-ed over the devices: replicated

    def body(x, s, pid):
        return _run_impl(x, s, target, optimizer, num_steps, trace_every, progress_every, pid, master_dtype, axis_name)

    fn = _shard_map(body, mesh, (p_specs, s_specs, P()), SampleResult(p_specs, s_specs, trace_specs, report_specs))
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


def _as_count(name, value, *, allow_zero=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a non-negative int, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}.")
    return value


def _check_particles(particles):
    """Leaves must be floating-point arrays with a leading particle axis; clear hints otherwise."""
    if isinstance(particles, (list, tuple)) and any(
        isinstance(leaf, numbers.Number) for leaf in jax.tree_util.tree_leaves(particles)
    ):
        raise ValueError(
            f"particles is a Python {type(particles).__name__} of numbers; pass an array of shape (M, d) instead, "
            "e.g. particles=jnp.asarray(particles) (or a pytree of arrays with leaves (M, ...))."
        )
    for path, leaf in leaf_paths(particles):
        if isinstance(leaf, numbers.Number) or not hasattr(leaf, "dtype"):
            raise ValueError(
                f"particles{path} is a {type(leaf).__name__}, not an array: every leaf needs shape (M, ...); "
                "convert with jnp.asarray."
            )
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"particles{path} has dtype {leaf.dtype}; particles must be floating point: "
                f"use jnp.asarray(particles, jnp.float32) (or float64)."
            )
    return num_particles(particles)


def _abstract(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves)


@functools.lru_cache(maxsize=256)
def _check_one_step(target, optimizer, master_dtype, mesh, axis_name, p_def, p_leaves, s_def, s_leaves):
    """Trace ONE step abstractly (``jax.eval_shape``): shape errors surface before the loop is compiled.

    Cached on the (hashable) configuration and abstract shapes, so repeated
    calls cost a dictionary lookup.
    """
    x = jax.tree_util.tree_unflatten(p_def, p_leaves)
    s = jax.tree_util.tree_unflatten(s_def, s_leaves)
    algo = mtsgd_sampler(target, optimizer, master_dtype=master_dtype, axis_name=axis_name)

    def one(x, s):
        new, _ = algo.step(algo.init(x, s))
        return new.particles, new.opt_state

    if mesh is None:
        jax.eval_shape(one, x, s)
        return
    from jax.sharding import PartitionSpec as P

    m = num_particles(x)
    p_specs = _particle_specs(x, axis_name)
    s_specs = _state_specs(optimizer, x, m, axis_name)
    # step() raises while tracing; the output here is a placeholder
    jax.eval_shape(_shard_map(lambda x, s: (one(x, s), jnp.zeros(()))[1], mesh, (p_specs, s_specs), P()), x, s)


@functools.lru_cache(maxsize=256)
def _stage_context(target, optimizer, p_def, p_leaves, s_def, s_leaves):
    """The :class:`~mtsgd_jax.stein.KernelContext` of the optimiser's first Stein stage (mtsgd, svgd,
    moo_svgd), or ``None`` without one.

    Found by tracing one step abstractly until that stage's ``update`` announces
    its context (nothing after it is traced); cached like :func:`_check_one_step`.
    """
    x = jax.tree_util.tree_unflatten(p_def, p_leaves)
    s = jax.tree_util.tree_unflatten(s_def, s_leaves)
    algo = mtsgd_sampler(target, optimizer)

    def one(x, s):
        return algo.step(algo.init(x, s))[0].particles

    try:
        with _stein.observe_contexts(stop=True):
            jax.eval_shape(one, x, s)
    except _stein.ContextFound as found:
        return found.context
    return None


def _particle_axis(axis_name, stage, mesh):
    """The mesh axis that splits the particles: ``axis_name``, else the Stein stage's, else the mesh's only axis."""
    stage_axis = None if stage is None else stage.axis_name
    if mesh is None:
        if stage_axis is not None:
            raise ValueError(
                f"sample: the optimiser's Stein stage was built for particles split over the mesh axis "
                f"{stage_axis!r} (axis_name={stage_axis!r}), but no mesh was given; pass mesh= (a jax.sharding.Mesh "
                f"with an axis {stage_axis!r}), or build the stage without axis_name for a single-device run."
            )
        if axis_name is not None:
            raise ValueError(
                f"sample: axis_name={axis_name!r} names a mesh axis, but no mesh was given; pass mesh= as well, "
                "or leave axis_name=None."
            )
        return None
    axis = _algorithm.resolve_axis_name(axis_name, [] if stage is None else [stage], "sample")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"sample: the mesh has the axes {mesh.axis_names} and the optimiser names none of them; pass "
                f"axis_name= (the axis that splits the particles), e.g. axis_name={mesh.axis_names[0]!r}."
            )
        axis = mesh.axis_names[0]
    return axis


def _report(result, on_nonfinite, num_steps, m):
    rep = result.nonfinite
    if any(isinstance(v, jax.core.Tracer) for v in rep):  # inside an outer jax.jit: warn when the program runs
        if on_nonfinite == "warn":
            jax.debug.callback(functools.partial(_warn_from_device, num_steps=num_steps, m=m), *rep)
        return result
    steps, first, max_particles, final = (int(v) for v in rep)
    if not (steps or final):
        return result
    message = _nonfinite_message(steps, first, max_particles, final, num_steps, m)
    if on_nonfinite == "raise":
        raise NonFiniteError(message, result)
    warnings.warn(message, NonFiniteWarning, stacklevel=3)
    return result


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
    axis_name: str | None = None,
    master_dtype=None,
    on_nonfinite: str = "warn",
) -> SampleResult:
    """Run ``optimizer`` for ``num_steps`` steps on K unnormalised log-densities.

    The whole loop is one jit-compiled ``lax.scan`` over the ``step`` of
    :func:`~mtsgd_jax.algorithm.mtsgd_sampler`; repeated calls with the same
    targets, optimiser object and sizes reuse the compiled program. Before
    compiling, one step is traced abstractly, so an optimiser that does not
    return updates shaped like the particles, or changes its state's shapes
    (e.g. ``optax.adam`` before ``mtsgd`` in ``optax.chain``), is reported
    with a ValueError that says how to fix it.

    Every step counts the particles whose position (after the step) or
    log-density/gradient (at the step) is NaN or infinite: one reduction per
    step, summarised in ``SampleResult.nonfinite`` and, with
    ``on_nonfinite``, reported after the run.

    Args:
      log_probs: K functions ``log p_k(theta)`` of ONE particle, or one function
        returning the (K,) vector of log-densities (hashable: a function, or
        a tuple of functions).
      optimizer: an optax transformation whose ``update(grads, state, params)``
        takes per-target loss gradients with leaves (K, M, ...), e.g.
        ``optax.chain(mtsgd(K), optax.adam(3e-2))``.
      particles: initial particles, pytree of floating-point arrays with
        leaves (M, ...).
      num_steps: N >= 0.
      opt_state: optional optimiser state to resume from; ``optimizer.init``
        otherwise.
      trace_every: record a :class:`Trace` every this many steps (0 = no
        trace). Must divide ``num_steps``.
      progress_bar: show a tqdm progress bar (updated from the compiled loop
        about 100 times).
      mesh: a ``jax.sharding.Mesh`` to split the particles over its
        particle axis: every device runs the loop on its M / D particles
        inside ``shard_map`` and the particle interactions communicate. Build
        the optimiser's Stein stage for that axis (``mtsgd(K,
        axis_name="particles")``, ``svgd(axis_name=...)``, ``moo_svgd(K,
        axis_name=...)``; ``mgda`` and ``linear_scalarization`` with shared
        weights need no communication); a stage built without one samples on
        every device on its own. Particles, per-particle optimiser state and
        the trace stay sharded; the non-finite counts cover all devices. See
        :func:`shard_particles`.
      axis_name: the mesh axis that splits the particles. ``None`` (default)
        takes the ``axis_name`` the optimiser's Stein stage was built with,
        or, when it names none, the mesh's only axis. A value that differs
        from the stage's is a ValueError, and so is a stage built with an
        axis (or an ``axis_name`` here) without ``mesh``.
      master_dtype: mixed precision for low-precision particles (e.g.
        bfloat16): keep a copy of the particles in this dtype (e.g.
        ``jnp.float32``) inside the loop and add the updates to it; the
        targets and the optimiser see the particles in their own dtype (the
        Stein algebra accumulates in float32 anyway), and the returned
        particles are cast back. Without it, steps smaller than half the
        bfloat16 spacing (about 0.4% of a coordinate) round away and the
        particles stall far from the origin.
      on_nonfinite: what to do after a run in which some particle became
        non-finite (see :class:`NonFiniteReport`): ``"warn"`` (default) issues
        a :class:`NonFiniteWarning`; ``"raise"`` raises :class:`NonFiniteError`
        (a ``FloatingPointError``) whose ``.result`` is the
        :class:`SampleResult`; ``"ignore"`` only fills
        ``SampleResult.nonfinite``. Reading the counts waits for the run to
        finish; with ``"ignore"`` the call returns as soon as the program is
        dispatched. When ``sample`` is itself traced inside ``jax.jit``,
        ``"warn"`` warns from the compiled program once it runs and
        ``"raise"`` is refused (the counts are not known while tracing).

    Returns:
      :class:`SampleResult`.

    Raises:
      ValueError: for malformed arguments, and when one step of ``optimizer``
        does not keep the shapes (see above).
      NonFiniteError: with ``on_nonfinite="raise"``.

    Example:
      >>> import jax, optax
      >>> from mtsgd_jax import mtsgd, sample, toy_problem
      >>> prob = toy_problem()
      >>> x0 = prob.init_particles(jax.random.key(0), 50)
      >>> res = sample(prob.log_prob, optax.chain(mtsgd(3), optax.adam(3e-2)), x0, 1000)
      >>> int(res.nonfinite.steps), int(res.nonfinite.first_step)
      (0, -1)
    """
    m = _check_particles(particles)
    num_steps = _as_count("num_steps", num_steps)
    trace_every = _as_count("trace_every", trace_every)
    if trace_every and num_steps % trace_every:
        raise ValueError(
            f"trace_every ({trace_every}) must divide num_steps ({num_steps}); e.g. trace_every="
            f"{math.gcd(trace_every, num_steps) or 1} or num_steps={-(-num_steps // trace_every) * trace_every}."
        )
    if not isinstance(on_nonfinite, str) or on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}.")
    target = log_probs if callable(log_probs) else tuple(log_probs)
    stack_targets(target)  # validates
    _algorithm._check_optimizer(optimizer)
    for name, obj in (("log_probs", target), ("optimizer", optimizer)):
        try:
            hash(obj)
        except TypeError:
            raise TypeError(
                f"{name} must be hashable (it is a static argument of the compiled loop), got an unhashable "
                f"{type(obj).__name__}; pass a function or a tuple of functions."
            ) from None
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"sample: axis_name must be a mesh axis name (str) or None, got {axis_name!r}.")
    if master_dtype is not None:
        master_dtype = jnp.dtype(master_dtype)
        if not jnp.issubdtype(master_dtype, jnp.floating):
            raise ValueError(f"master_dtype must be a floating dtype (e.g. jnp.float32), got {master_dtype}.")
    if opt_state is None:
        opt_state = optimizer.init(particles)
    abstract = (*_abstract(particles), *_abstract(opt_state))
    axis_name = _particle_axis(axis_name, _stage_context(target, optimizer, *abstract), mesh)
    if mesh is not None:
        _check_mesh(particles, mesh, axis_name)
    if on_nonfinite == "raise" and any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(particles)):
        raise ValueError(
            "on_nonfinite='raise' needs the run's counts, which are not known while sample is traced inside "
            "jax.jit; call sample outside jit, or use on_nonfinite='warn' / 'ignore' and check result.nonfinite."
        )
    _check_one_step(target, optimizer, master_dtype, mesh, axis_name, *abstract)
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
    if on_nonfinite == "ignore":
        return result
    return _report(result, on_nonfinite, num_steps, m)
