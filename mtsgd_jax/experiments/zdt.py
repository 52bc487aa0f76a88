"""ZDT3 (docs/algorithm.md section 7): MT-SGD against MOO-SVGD, MGDA and linear scalarisation.

Setting (the seed's, and the published MOO-SVGD ZDT script's): ZDT3 with
n = 30 variables, M = 50 particles drawn uniformly in ``[0, 1]^30``, Adam with
learning rate 5e-4, 10,000 iterations. After every step the particles are
projected onto the box ``[1e-6, 1 - 1e-6]^n`` (:func:`~mtsgd_jax.project_box`,
last in the optax chain; the published code clamps to the same box). The two
targets are ``p_k ∝ exp(-f_k / T)`` with temperature ``T`` (default 1, the
seed's ``exp(-f_k)``). For a seed, every method starts from the same particles.

Methods (``--methods``; a method is ``NAME`` or ``NAME:key=value,...``, read
by the transformations' registry, :func:`~mtsgd_jax.transforms.parse_spec`):

* ``mtsgd`` -- :func:`~mtsgd_jax.mtsgd`, RBF kernel on theta, median bandwidth;
  ``mtsgd_obj`` = ``mtsgd:space=objectives``;
* ``moo_svgd`` -- :func:`~mtsgd_jax.moo_svgd` with the kernel on theta;
  ``moo_svgd_obj`` = ``moo_svgd:space=objectives`` (kernel on the objective
  vectors, as in the published ZDT code);
* ``mgda`` -- :func:`~mtsgd_jax.mgda` on every particle (no interaction);
* ``linear_scalarization`` (or ``linear``) --
  :func:`~mtsgd_jax.linear_scalarization` with one preference vector per
  particle (:func:`~mtsgd_jax.preference_vectors`: ``(i/(M-1), 1 - i/(M-1))``),
  no interaction.

Options: every scalar option of the method's transformation
(:func:`~mtsgd_jax.transforms.transform_options`), e.g.
``weighting=stein|normalized|score`` and ``solver=...`` (``mtsgd``),
``repulsion=<alpha>`` (``moo_svgd``), ``normalize_grads=0|1`` (``moo_svgd``,
``mgda``: unit-norm per-particle task gradients before MGDA; ``normalize=``
is accepted for it), and the experiment's own:

* ``space=theta|objectives`` (``mtsgd``, ``moo_svgd``): the kernel on theta,
  or on the objective vectors ``(f1, f2)`` with the repulsion pulled back
  through the objectives (the transformations' ``features=``);
* ``h=median|<float>`` (``mtsgd``, ``moo_svgd``): the kernel bandwidth;
* ``T=<temperature>`` (overrides ``--temperature``) and ``lr=<learning
  rate>`` (overrides ``--lr``), for every method;
* ``normalize_grads=0|1`` (``mtsgd``): every particle's gradient of each target
  scaled to unit norm, then by ``1 / T``
  (:func:`~mtsgd_jax.transforms.normalize_target_grads` and ``optax.scale``
  before the method): each target drives every particle equally hard, and T
  alone sets the balance against the kernel repulsion;
* ``T_end=<temperature>`` (every method): the temperature annealed
  geometrically from T to ``T_end`` over the run (``optax.scale_by_schedule``
  before the method);
* ``momentum=<decay in [0, 1)>`` (every method): ``optax.trace`` between the
  method and Adam;
* ``box=<margin in [0, 0.5)>`` (every method): project onto
  ``[box, 1 - box]`` instead of :data:`BOX` (``box=0``: the unit box).

See :func:`build_optimizer` for the chain each spec builds.

Temperature. MT-SGD and MOO-SVGD are samplers: each step balances a driving
term (kernel-smoothed scores, ``∝ 1/T``) against the kernel repulsion
(independent of T). With ``T = 1`` the target ``exp(-f1)`` is almost flat
on the box (its density varies by a factor e over ``[0, 1]`` in theta_1 and
not at all in theta_2..30), so a sampler has no reason to put the particles
on the Pareto set. Lowering T sharpens both targets; ``T -> 0`` approaches a
kernel-smoothed optimiser. Under Adam (invariant to a constant rescaling of
its input up to its epsilon) T changes nothing for ``mgda`` and ``linear``,
and for ``moo_svgd`` it is the same as multiplying the repulsion weight by T
(``moo_svgd`` with ``normalize_grads=1`` ignores T altogether). For ``mtsgd`` T also
changes the QP: ``U(T) = G / T^2 + (c 1^T + 1 c^T) / T + t``.

Metrics, on the objective vectors of the final particles (all M of them, one
point set per seed; :mod:`mtsgd_jax.metrics`):

* ``hv`` -- hypervolume w.r.t. :data:`REFERENCE_POINT` = (1.1, 1.1): the
  nadir of the true front, (0.8518, 1.0), rounded up to 1 and padded by 0.1
  in both objectives (a common choice for ZDT problems; every true-front
  point strictly dominates it). Dominated points add nothing to a
  hypervolume, so it is the hypervolume of the non-dominated subset.
* ``hv_published`` -- hypervolume w.r.t. :data:`PUBLISHED_REFERENCE_POINT` =
  (0.99022638, 6.54635266), the point the published MOO-SVGD ZDT3 script
  uses (with its large f2 it mostly measures convergence, little spread).
* ``igd`` and ``igd_plus`` -- against :data:`FRONT_POINTS` = 1000 points of the
  analytic true front spread over its five segments in proportion to their
  lengths, computed on ALL final points (a dominated point only matters if it
  is the nearest obtained point to some front point).
* ``gd`` -- generational distance: mean distance from each obtained point
  to the front (convergence alone).
* ``segments`` -- how many of the five front segments have an obtained point
  within 0.05 (:func:`~mtsgd_jax.metrics.segments_covered`).
* ``non_dominated`` -- how many of the M points no other point dominates.
* ``wall_s`` -- seconds of the compiled 10,000-step run per seed (the run is
  compiled ahead of time once per method; ``compile_s`` is reported apart).

The JSON also has the optimal values (the hypervolume of 100,000 true-front
points for both reference points), the hypervolume and IGD every
``trace_every`` steps (mean and std over seeds), every seed's final metrics
and final objective vectors.

Default methods (:data:`DEFAULT_METHODS`): the five of the seed's setting
(``mtsgd``, ``moo_svgd``, ``moo_svgd_obj``, ``mgda``, ``linear``, all at
T = 1 with the median bandwidth), ``mtsgd_obj`` (MT-SGD with the objective
kernel, T = 1, median), the two kernel samplers with the temperature and
objective-space bandwidth chosen on separate tuning seeds 100-104 (highest
mean hypervolume over the same (T, h) grid for both; see
``docs/results/zdt3/tuning.json``): ``mtsgd_obj:T=0.03,h=0.01`` and
``moo_svgd_obj:h=0.005`` (T = 1), and :data:`TUNED_MTSGD` =
``mtsgd_obj:T=0.1,h=0.001,normalize_grads=1``: unit per-particle target
gradients at T = 0.1 and an objective-space bandwidth of 0.001, chosen on
seeds 100-104 over :data:`TUNING_METHODS` (lowest sum of the HV and IGD
ranks).

Named configurations (:data:`CONFIGS`, ``mtsgd zdt --config NAME``):
``default`` (the methods above, seeds 0-4), ``ablation``
(:data:`ABLATION_METHODS`: :data:`TUNED_MTSGD` with each ingredient switched
off, replaced or added, seeds 0-4) and ``tuning`` (:data:`TUNING_METHODS`,
seeds 100-104); the recorded results are in ``benchmarks/results/zdt3_ablation``
and ``benchmarks/results/zdt3_tuning``.

Outputs (in ``out``): ``zdt3_fronts.png`` (one panel per method: the final
objective vectors of every seed over the true front), ``zdt3_hv.png``
(hypervolume for both reference points and IGD against the iteration, mean
± std over seeds), ``zdt3.json`` and ``zdt3_table.md`` (the summary as a
markdown table, with the command that reproduces it). Command line:
``mtsgd zdt --help``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax import kernels as _kernels
from mtsgd_jax import report
from mtsgd_jax.metrics import hypervolume_2d, igd, igd_plus, non_dominated_mask, segments_covered
from mtsgd_jax.problems import zdt
from mtsgd_jax.sampling import sample
from mtsgd_jax.transforms import make_transform, normalize_target_grads, parse_spec, preference_vectors, project_box, transform_options

__all__ = [
    "ABLATION_METHODS",
    "BOX",
    "CONFIGS",
    "DEFAULT_METHODS",
    "FRONT_POINTS",
    "METRICS",
    "PUBLISHED_REFERENCE_POINT",
    "REFERENCE_POINT",
    "MethodSpec",
    "TUNED_MTSGD",
    "TUNING_METHODS",
    "TUNING_SEEDS",
    "ZDTConfig",
    "build_optimizer",
    "main",
    "parse_method",
    "plot_fronts",
    "plot_hv",
    "point_set_metrics",
    "run_zdt",
    "tempered_log_probs",
]

REFERENCE_POINT = (1.1, 1.1)
"""Main hypervolume reference point: the true front's nadir (0.8518, 1.0) rounded up to 1, plus 0.1."""

PUBLISHED_REFERENCE_POINT = (0.99022638, 6.54635266)
"""The reference point of the published MOO-SVGD ZDT3 script (``get_ref_point('zdt3')``)."""

BOX = (1e-6, 1.0 - 1e-6)
"""Every variable is projected into this interval after each step (the published code's clamp)."""

FRONT_POINTS = 1000
"""Points of the true front that IGD and IGD+ are measured against."""

_OPTIMAL_HV_POINTS = 100_000
BASES = ("mtsgd", "moo_svgd", "mgda", "linear_scalarization")
ALIASES = {
    "moo_svgd_obj": "moo_svgd:space=objectives",
    "mtsgd_obj": "mtsgd:space=objectives",
    "linear": "linear_scalarization",
}
TUNED_MTSGD = "mtsgd_obj:T=0.1,h=0.001,normalize_grads=1"
"""MT-SGD's best configuration (chosen on :data:`TUNING_SEEDS`, see :data:`TUNING_METHODS`)."""

DEFAULT_METHODS = (
    "mtsgd",
    "mtsgd_obj",
    "mtsgd_obj:T=0.03,h=0.01",
    TUNED_MTSGD,
    "moo_svgd",
    "moo_svgd_obj",
    "moo_svgd_obj:h=0.005",
    "mgda",
    "linear",
)

TUNING_SEEDS = (100, 101, 102, 103, 104)
"""Seeds the configurations are chosen on; the reported runs use seeds 0-4."""

TUNING_METHODS = tuple(
    f"mtsgd_obj:T={t},h={h},normalize_grads=1" for t in (0.1, 0.05, 0.03, 0.02, 0.01) for h in (0.001, 0.002, 0.003, 0.01)
) + ("mtsgd_obj:T=0.03,normalize_grads=1",)
"""The grid :data:`TUNED_MTSGD` was chosen from: unit per-particle target gradients at temperature T (5 values)
times the objective-space bandwidth h (4 fixed values), plus the median bandwidth at T = 0.03. Rule: the lowest
sum of the two ranks (mean hypervolume at :data:`REFERENCE_POINT`, descending; mean IGD, ascending) over
:data:`TUNING_SEEDS`."""

ABLATION_METHODS = (
    TUNED_MTSGD,
    "mtsgd:T=0.1,normalize_grads=1",
    "mtsgd_obj:T=0.1,normalize_grads=1",
    "mtsgd_obj:T=0.1,h=0.01,normalize_grads=1",
    "mtsgd_obj:T=0.1,h=0.001",
    "mtsgd_obj:T=0.03,h=0.01",
    "mtsgd_obj:h=0.001,normalize_grads=1",
    "mtsgd_obj:T=0.1,h=0.001,normalize_grads=1,momentum=0.5",
    "mtsgd_obj:T=0.1,h=0.001,normalize_grads=1,momentum=0.9",
    "mtsgd_obj:T=0.3,T_end=0.03,h=0.001,normalize_grads=1",
    "mtsgd_obj:T=0.1,h=0.001,normalize_grads=1,box=0",
)
""":data:`TUNED_MTSGD` and, one at a time, each of its ingredients switched off or replaced (kernel on theta;
median or h = 0.01 objective-space bandwidth; raw tempered gradients; T = 1), or one added (momentum 0.5 / 0.9,
temperature annealed geometrically 0.3 -> 0.03, the unit box instead of the clamp to [1e-6, 1 - 1e-6]); the
earlier best ``mtsgd_obj:T=0.03,h=0.01`` for reference."""


class ZDTConfig(NamedTuple):
    """A named run of :func:`main` (``mtsgd zdt --config NAME``): its methods and seeds."""

    methods: tuple
    seeds: tuple
    description: str


CONFIGS = {
    "default": ZDTConfig(DEFAULT_METHODS, (0, 1, 2, 3, 4), "every method, seeds 0-4 (the README's ZDT3 table)"),
    "ablation": ZDTConfig(ABLATION_METHODS, (0, 1, 2, 3, 4), "the tuned MT-SGD and each ingredient on/off, seeds 0-4"),
    "tuning": ZDTConfig(TUNING_METHODS, TUNING_SEEDS, "the grid the tuned MT-SGD was chosen from, tuning seeds 100-104"),
}
"""Named configurations of ``mtsgd zdt --config``."""

EXPERIMENT_OPTIONS = ("space", "h", "T", "lr", "T_end", "momentum", "box", "normalize_grads")
"""Options of a method spec that belong to the experiment, not to the transformation (``normalize_grads``
belongs to the experiment for ``mtsgd`` only; ``moo_svgd`` and ``mgda`` have their own)."""
_KERNEL_METHODS = ("mtsgd", "moo_svgd")
_OPTION_ALIASES = {"normalize": "normalize_grads"}  # the name the experiment used first, still accepted
# Transformation options a spec may not set: the experiment sets them (kernel from h, features from
# space, weights: one preference vector per particle), or they have no text form or no use here.
_NOT_IN_SPECS = ("kernel", "features", "weights", "solver_options", "axis_name")
METRICS = ("hv", "hv_published", "igd", "igd_plus", "gd", "segments", "non_dominated")

class MethodSpec(NamedTuple):
    """A parsed ``--methods`` entry.

    Attributes:
      label: the entry as given (white space stripped): the method's name in the results.
      base: the transformation's name in :data:`~mtsgd_jax.transforms.TRANSFORMS`.
      options: the transformation's options and the experiment's (:data:`EXPERIMENT_OPTIONS`), converted.
    """

    label: str
    base: str
    options: dict


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def _bandwidth(text: str):
    if text == "median":
        return text
    try:
        return _positive(text)
    except ValueError:
        raise ValueError(f"expected median or a positive number, got {text!r}") from None


def _decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(f"expected a number in [0, 1), got {text!r}")
    return value


def _box_margin(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise ValueError(f"expected a number in [0, 0.5), got {text!r}")
    return value


def _space(text: str) -> str:
    if text not in ("theta", "objectives"):
        raise ValueError(f"expected theta or objectives, got {text!r}")
    return text


def parse_method(spec: str) -> MethodSpec:
    """Parse ``NAME`` or ``NAME:key=value,...`` (see the module docstring).

    Raises:
      ValueError: for an unknown method or option (the message lists the valid
        ones), or a bad value; the message starts with the entry as given.

    Example:
      >>> parse_method("mtsgd:weighting=score,T=0.01")
      MethodSpec(label='mtsgd:weighting=score,T=0.01', base='mtsgd', options={'weighting': 'score', 'T': 0.01})
      >>> parse_method("moo_svgd_obj:normalize=1").options
      {'normalize_grads': True, 'space': 'objectives'}
    """
    label = spec.strip()
    name, _, rest = label.partition(":")
    name = name.strip()
    if name in ALIASES:  # an alias, possibly with extra options: moo_svgd_obj:T=0.1
        name, _, alias_rest = ALIASES[name].partition(":")
        rest = ",".join(s for s in (alias_rest, rest) if s.strip())
    if name not in BASES:
        raise ValueError(f"unknown method {name!r} in {spec!r}; expected one of {BASES + tuple(ALIASES)}.")
    items = []
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        items.append(f"{_OPTION_ALIASES[key.strip()]}={value}" if eq and key.strip() in _OPTION_ALIASES else item)
    extra = {"T": _positive, "lr": _positive, "T_end": _positive, "momentum": _decay, "box": _box_margin}
    if name in _KERNEL_METHODS:
        extra.update(h=_bandwidth, space=_space)
    if name == "mtsgd":
        extra["normalize_grads"] = bool
    allowed = [k for k in transform_options(name) if k not in _NOT_IN_SPECS]
    expanded = f"{name}:{','.join(items)}"
    try:
        parsed = parse_spec(expanded, methods=BASES, options=allowed, extra_options=extra)
        options = {**parsed.options, **parsed.extras}
        if name == "mtsgd" and options.get("space") == "objectives" and options.get("weighting") == "normalized":
            raise ValueError("weighting=normalized is not available with space=objectives (mtsgd features=).")
        make_transform(parsed, 2)  # the factory's own checks of the values, now rather than mid-run
    except ValueError as err:
        message = str(err)
        if message.startswith(f"spec {expanded!r}: "):
            message = message[len(f"spec {expanded!r}: ") :]
        raise ValueError(f"method {label!r}: {message}") from None
    return MethodSpec(label, name, options)


@functools.lru_cache(maxsize=None)
def tempered_log_probs(name: str, num_variables: int, temperature: float) -> tuple:
    """The two log-densities ``-f_k(theta) / T`` of a ZDT problem (cached: one object per setting).

    Example:
      >>> import jax.numpy as jnp
      >>> lp = tempered_log_probs("zdt3", 3, 0.5)
      >>> [float(f(jnp.array([0.25, 0.0, 0.0]))) for f in lp][0]
      -0.5
    """
    prob = zdt(name, num_variables)
    if temperature == 1.0:
        return prob.log_probs
    inv = 1.0 / float(temperature)
    f1, f2 = prob.log_probs
    return (lambda theta: inv * f1(theta), lambda theta: inv * f2(theta))


def build_optimizer(
    spec: MethodSpec, prob, num_particles: int, lr: float, *, temperature: float = 1.0, steps: int | None = None
) -> optax.GradientTransformation:
    """``optax.chain([pre...], <method>, [trace], adam(lr), project_box(box, 1 - box))`` for one parsed method.

    The method is :func:`~mtsgd_jax.transforms.make_transform` of ``spec.base``
    with the spec's transformation options; the experiment's options become
    the kernel (``h``), the features (``space``: ``prob.objectives`` of every
    particle) and the learning rate (``lr``); linear scalarisation gets one
    preference vector per particle. The optional stages, each present only
    when its option is given:

    * ``normalize_grads=1`` (``mtsgd``):
      ``normalize_target_grads(), optax.scale(1 / T)`` before the method: every
      particle's gradient of each (tempered) target scaled to norm ``1 / T``;
    * ``T_end``: ``optax.scale_by_schedule`` before the method, so that the
      temperature goes geometrically from ``T`` (first step) to ``T_end``
      (after ``steps`` steps): the gradients are multiplied by
      ``(T / T_end)^(count / steps)``;
    * ``momentum``: ``optax.trace(decay=momentum)`` between the method and Adam
      (heavy-ball momentum on the method's direction);
    * ``box``: the projection box ``[box, 1 - box]`` instead of :data:`BOX`.

    Args:
      spec: a parsed method (:func:`parse_method`).
      prob: the :class:`~mtsgd_jax.problems.zdt.ZDTProblem`.
      num_particles: M.
      lr: Adam's learning rate unless the spec sets ``lr``.
      temperature: T unless the spec sets ``T`` (used by ``normalize_grads`` and ``T_end``).
      steps: the run's length; required with ``T_end``.
    """
    o = spec.options
    lr = o.get("lr", lr)
    t0 = o.get("T", temperature)
    ours = EXPERIMENT_OPTIONS if spec.base == "mtsgd" else tuple(k for k in EXPERIMENT_OPTIONS if k != "normalize_grads")
    options = {k: v for k, v in o.items() if k not in ours}
    if spec.base in _KERNEL_METHODS:
        options["kernel"] = _kernels.rbf(o.get("h", "median"))
        options["features"] = jax.vmap(prob.objectives) if o.get("space") == "objectives" else None
    elif spec.base == "linear_scalarization":
        options["weights"] = preference_vectors(num_particles, 2)
    stage = make_transform(spec.base, 2, **options)
    chain = []
    if spec.base == "mtsgd" and o.get("normalize_grads", False):
        chain += [normalize_target_grads(), optax.scale(1.0 / t0)]
    if "T_end" in o:
        if steps is None:
            raise ValueError(f"method {spec.label!r}: T_end needs the number of steps (build_optimizer(..., steps=...)).")
        ratio, n = t0 / o["T_end"], float(steps)
        chain.append(optax.scale_by_schedule(lambda count: ratio ** (count / n)))
    chain.append(stage)
    if o.get("momentum"):
        chain.append(optax.trace(decay=o["momentum"]))
    return optax.chain(*chain, optax.adam(lr), project_box(*method_box(spec)))


def method_box(spec: MethodSpec) -> tuple[float, float]:
    """The projection box of a method: ``(box, 1 - box)`` with its ``box=`` option, else :data:`BOX`."""
    if "box" in spec.options:
        return (spec.options["box"], 1.0 - spec.options["box"])
    return BOX


def point_set_metrics(objs, front) -> dict:
    """Every metric of ``METRICS`` for one (N, 2) set of ZDT3 objective vectors (floats / ints)."""
    objs = jnp.asarray(objs)
    front = jnp.asarray(front, objs.dtype)
    return {
        "hv": float(hypervolume_2d(objs, jnp.asarray(REFERENCE_POINT))),
        "hv_published": float(hypervolume_2d(objs, jnp.asarray(PUBLISHED_REFERENCE_POINT))),
        "igd": float(igd(objs, front)),
        "igd_plus": float(igd_plus(objs, front)),
        "gd": float(igd(front, objs)),  # mean over the obtained points of the distance to the front
        "segments": int(segments_covered(objs, zdt("zdt3").front_polylines())),
        "non_dominated": int(jnp.sum(non_dominated_mask(objs))),
    }


@jax.jit
def _curves(objs, front):
    """(T, M, 2) snapshots -> hypervolume for both reference points and IGD, each (T,)."""

    def one(f):
        return (
            hypervolume_2d(f, jnp.asarray(REFERENCE_POINT, f.dtype)),
            hypervolume_2d(f, jnp.asarray(PUBLISHED_REFERENCE_POINT, f.dtype)),
            igd(f, front),
        )

    return jax.vmap(one)(objs)


def _mean_std(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def run_zdt(
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    num_particles: int = 50,
    num_variables: int = 30,
    steps: int = 10_000,
    lr: float = 5e-4,
    temperature: float = 1.0,
    trace_every: int = 100,
    progress: bool = True,
) -> dict:
    """Run every method from every seed's initial particles; returns the raw results (numpy)."""
    if steps % trace_every:
        raise ValueError(f"trace_every ({trace_every}) must divide steps ({steps}).")
    prob = zdt("zdt3", num_variables)
    front = prob.pareto_front(FRONT_POINTS)
    specs = [parse_method(m) for m in methods]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods must be distinct, got {labels}.")
    inits = [prob.init_particles(jax.random.key(int(s)), num_particles) for s in seeds]
    # Every optimiser is built and initialised before the first run: a bad option stops here.
    opts = [build_optimizer(spec, prob, num_particles, lr, temperature=temperature, steps=steps) for spec in specs]
    for opt in opts:
        opt.init(inits[0])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds) * len(specs), desc="zdt3", unit="run")
    results = {}
    for spec, opt in zip(specs, opts):
        t_k = spec.options.get("T", temperature)
        target = tempered_log_probs("zdt3", num_variables, t_k)
        start = time.perf_counter()
        compiled = jax.jit(lambda x: sample(target, opt, x, steps, trace_every=trace_every)).lower(inits[0]).compile()
        compile_s = time.perf_counter() - start
        box = method_box(spec)
        rec = {"temperature": t_k, "lr": spec.options.get("lr", lr), "box": box, "compile_s": compile_s, "wall_s": [], "final": [], "objectives": [], "particle_range": []}
        curves = {"hv": [], "hv_published": [], "igd": []}
        for seed, x0 in zip(seeds, inits):
            start = time.perf_counter()
            res = jax.block_until_ready(compiled(x0))
            rec["wall_s"].append(time.perf_counter() - start)
            snaps = np.asarray(res.trace.particles)
            lo, hi = np.asarray(box[0], snaps.dtype), np.asarray(box[1], snaps.dtype)  # as project_box casts them
            if not np.all((snaps[1:] >= lo) & (snaps[1:] <= hi)):  # NaN fails too; snapshot 0 is the initial draw
                raise RuntimeError(f"{spec.label}, seed {seed}: particles left the box {box} or are not finite.")
            objs = jax.vmap(jax.vmap(prob.objectives))(res.trace.particles)  # (T, M, 2)
            hv, hv_pub, igd_t = _curves(objs, jnp.asarray(front, objs.dtype))
            for key, val in zip(curves, (hv, hv_pub, igd_t)):
                curves[key].append(np.asarray(val))
            final = np.asarray(objs[-1])
            rec["objectives"].append(final)
            rec["particle_range"].append([float(snaps[-1].min()), float(snaps[-1].max())])
            rec["final"].append(point_set_metrics(final, front))
            if bar is not None:
                bar.set_postfix_str(f"{spec.label} seed {seed}: HV {rec['final'][-1]['hv']:.3f}")
                bar.update(1)
        rec["steps"] = np.asarray(res.trace.step)
        rec["curves"] = {k: np.stack(v) for k, v in curves.items()}
        rec["objectives"] = np.stack(rec["objectives"])
        results[spec.label] = rec
    if bar is not None:
        bar.close()
    dense = prob.pareto_front(_OPTIMAL_HV_POINTS)
    optimal = {
        "hv": float(hypervolume_2d(dense, np.asarray(REFERENCE_POINT))),
        "hv_published": float(hypervolume_2d(dense, np.asarray(PUBLISHED_REFERENCE_POINT))),
    }
    return {
        "seeds": [int(s) for s in seeds],
        "methods": results,
        "optimal": optimal,
        "config": {
            "problem": "zdt3",
            "num_variables": num_variables,
            "num_particles": num_particles,
            "steps": steps,
            "lr": lr,
            "temperature": temperature,
            "trace_every": trace_every,
            "box": BOX,
            "reference_point": REFERENCE_POINT,
            "published_reference_point": PUBLISHED_REFERENCE_POINT,
            "front_points": FRONT_POINTS,
            "optimizer": "optax.chain(<method>, optax.adam(lr), project_box(*box))",
            "init": "uniform in [0, 1]^n, jax.random.key(seed), the same for every method",
        },
    }


def summarise(result: dict) -> dict:
    """Mean and std (over seeds) of every final metric and of the wall time, per method."""
    out = {}
    for label, rec in result["methods"].items():
        row = {m: _mean_std([f[m] for f in rec["final"]]) for m in METRICS}
        row["wall_s"] = _mean_std(rec["wall_s"])
        out[label] = row
    return out


_STYLE = ("C0", "C3", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")


def _colour(i: int, n: int):
    if n <= len(_STYLE):
        return _STYLE[i]
    import matplotlib

    return matplotlib.colormaps["turbo"](i / max(n - 1, 1))


def _true_front_lines(ax, prob):
    for lo, hi in prob.segments:
        f1 = np.linspace(lo, hi, 200)
        ax.plot(f1, 1.0 - np.sqrt(f1) - f1 * np.sin(10 * np.pi * f1), color="0.35", lw=2.2, zorder=1)


def plot_fronts(result: dict, path: str) -> str:
    """One panel per method: every seed's final objective vectors over the true front; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prob = zdt("zdt3", result["config"]["num_variables"])
    methods = result["methods"]
    summary = summarise(result)
    n = len(methods)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), squeeze=False, layout="constrained")
    seeds = result["seeds"]
    ymax = max(1.25, min(7.0, max(float(np.max(r["objectives"][..., 1])) for r in methods.values()) + 0.1))
    for ax, (label, rec) in zip(axes.ravel(), methods.items()):
        _true_front_lines(ax, prob)
        for i, seed in enumerate(seeds):
            o = rec["objectives"][i]
            ax.scatter(o[:, 0], o[:, 1], s=12, alpha=0.55, color=_STYLE[i % len(_STYLE)], label=f"seed {seed}", zorder=2, lw=0)
        s = summary[label]
        hidden = int(np.sum(rec["objectives"][..., 1] > ymax))
        if hidden:
            ax.text(0.98, 0.6, f"{hidden} point(s) above f2 = {ymax:.1f}", transform=ax.transAxes, ha="right", va="center", fontsize=7)
        ax.set_title(
            f"{label}\nHV {s['hv']['mean']:.3f}±{s['hv']['std']:.3f}, IGD {s['igd']['mean']:.3f}, "
            f"segments {s['segments']['mean']:.1f}/5",
            fontsize=9,
        )
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.9, ymax)
        ax.set_xlabel("$f_1$")
        ax.set_ylabel("$f_2$")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="upper right", markerscale=1.5)
    c = result["config"]
    fig.suptitle(
        f"ZDT3 (n = {c['num_variables']}), final objective vectors of M = {c['num_particles']} particles after "
        f"{c['steps']} Adam steps (lr {c['lr']:g}), {len(seeds)} seeds; grey: true Pareto front",
        fontsize=10,
    )
    try:
        report.save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)
    return path


def plot_hv(result: dict, path: str) -> str:
    """Hypervolume (both reference points) and IGD against the iteration, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    panels = (
        ("hv", f"hypervolume, reference {REFERENCE_POINT}", result["optimal"]["hv"]),
        ("hv_published", f"hypervolume, reference {PUBLISHED_REFERENCE_POINT}\n(published MOO-SVGD ZDT3 script)", result["optimal"]["hv_published"]),
        ("igd", f"IGD to {FRONT_POINTS} true-front points (log scale;\nband: mean ± std, floored at the best seed)", None),
    )
    for i, (label, rec) in enumerate(result["methods"].items()):
        colour = _colour(i, len(result["methods"]))
        t = rec["steps"]
        for ax, (key, _, _) in zip(axes, panels):
            v = rec["curves"][key]
            mean, std = v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.zeros_like(v[0]))
            low = mean - std if key != "igd" else np.maximum(mean - std, v.min(0))  # stays > 0 on the log axis
            ax.plot(t, mean, color=colour, lw=1.6, label=label)
            ax.fill_between(t, low, mean + std, color=colour, alpha=0.15, lw=0)
    for ax, (key, title, best) in zip(axes, panels):
        if best is not None:
            ax.axhline(best, color="k", ls="--", lw=1, label="true front")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.suptitle(f"ZDT3: mean ± std over {len(result['seeds'])} seeds (seeds {result['seeds']})", fontsize=10)
    try:
        report.save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)
    return path


def _round(x, decimals: int = 5) -> np.ndarray:
    """float64 copy rounded to ``decimals`` (so that the JSON holds short decimals, not float32 noise)."""
    return np.round(np.asarray(x, np.float64), decimals)


def _write_compact_json(path: str, payload: dict) -> str:
    """Like :func:`report.write_json` (indented, NaN -> null) with every list of numbers on one line."""
    import json
    import re

    text = json.dumps(report._jsonable(payload), indent=1)
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?|null)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    # then lists of such one-line lists (e.g. one seed's (M, 2) objective vectors)
    text = re.sub(r"\[\s+(\[[^\[\]\n]*\](?:,\s+\[[^\[\]\n]*\])*)\s+\]", lambda m: "[" + re.sub(r",\s+\[", ", [", m.group(1)) + "]", text)
    return report.write_text(path, text + "\n")


def _fmt(ms: dict, digits: int = 3) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def summary_rows(summary: dict) -> list[list[str]]:
    rows = []
    for label, s in summary.items():
        rows.append(
            [
                label,
                _fmt(s["hv"]),
                _fmt(s["hv_published"]),
                _fmt(s["igd"]),
                _fmt(s["igd_plus"]),
                _fmt(s["gd"]),
                _fmt(s["segments"], 1),
                _fmt(s["wall_s"], 2),
            ]
        )
    return rows


def markdown_table(payload: dict, command: str | None = None) -> str:
    """The summary of a :func:`main` payload as a markdown table (mean ± std over seeds), with the setting and command."""
    c = payload["config"]
    rows = summary_rows(payload["summary"])
    lines = [
        "| " + " | ".join(SUMMARY_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(SUMMARY_HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join([f"`{r[0]}`"] + r[1:]) + " |" for r in rows]
    head = (
        f"ZDT3, n = {c['num_variables']}, M = {c['num_particles']}, {c['steps']} steps of Adam (lr {c['lr']:g}); "
        f"mean ± std over seeds {', '.join(str(s) for s in c['seeds'])}; true front: HV (1.1, 1.1) = "
        f"{payload['optimal']['hv']:.4f}, HV (0.990, 6.546) = {payload['optimal']['hv_published']:.4f}."
    )
    tail = [] if command is None else ["", f"Command: `{command}`"]
    return "\n".join([head, ""] + lines + tail) + "\n"


SUMMARY_HEADER = ["method", "HV (1.1, 1.1)", "HV (0.990, 6.546)", "IGD", "IGD+", "GD", "segments /5", "wall s"]


def main(
    out: str,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    num_particles: int = 50,
    num_variables: int = 30,
    steps: int = 10_000,
    lr: float = 5e-4,
    temperature: float = 1.0,
    trace_every: int = 100,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
    command: str | None = None,
) -> dict:
    """Run, write ``zdt3.json`` and ``zdt3_table.md``, print a table, then plot ``zdt3_fronts.png`` and ``zdt3_hv.png`` into ``out``.

    ``command``, when given, is recorded in both files as the command that reproduces them.

    Raises:
      mtsgd_jax.experiments.report.PlotError: a figure failed; the JSON is written and kept.
    """
    os.makedirs(out, exist_ok=True)
    result = run_zdt(
        seeds,
        methods,
        num_particles=num_particles,
        num_variables=num_variables,
        steps=steps,
        lr=lr,
        temperature=temperature,
        trace_every=trace_every,
        progress=progress,
    )
    summary = summarise(result)
    payload = {
        "config": result["config"] | {"seeds": result["seeds"], "methods": list(result["methods"]), "command": command},
        "notes": {
            "hv": "hypervolume of the final particles' objective vectors w.r.t. reference_point (dominated points add nothing)",
            "hv_published": "the same w.r.t. published_reference_point, the MOO-SVGD ZDT3 script's",
            "igd": "mean over front_points true-front points of the distance to the nearest final point (all M points)",
            "igd_plus": "IGD+ (dominance-compliant distance), all M points",
            "gd": "mean over the M final points of the distance to the nearest true-front point",
            "segments": "ZDT3 front segments with a final point within 0.05 (objective space)",
            "wall_s": "seconds per compiled run (compile time apart, in compile_s)",
            "std": "sample standard deviation over seeds (ddof = 1)",
            "curves": "hv, hv_published and igd of the particles every trace_every steps (at the steps listed): mean and std over seeds",
            "final_objectives": "(seeds, M, 2) objective vectors of the final particles, per seed",
            "particle_range": "per seed, [min, max] over every coordinate of the final particles (inside the method's box)",
            "box": "the method's projection box [lower, upper] (the box= option, else config.box)",
        },
        "optimal": result["optimal"],
        "machine": report.machine_info(),
        "summary": summary,
        "methods": {
            label: {
                "temperature": rec["temperature"],
                "lr": rec["lr"],
                "box": rec.get("box", BOX),
                "compile_s": rec["compile_s"],
                "wall_s": rec["wall_s"],
                "final": rec["final"],
                "particle_range": rec["particle_range"],
                "steps": rec["steps"],
                "curves": {
                    k: {"mean": _round(v.mean(0)), "std": _round(v.std(0, ddof=1) if len(v) > 1 else 0 * v[0])}
                    for k, v in rec["curves"].items()
                },
                "final_objectives": _round(rec["objectives"]),
            }
            for label, rec in result["methods"].items()
        },
    }
    # The results first: a failing figure must not lose them.
    js = _write_compact_json(os.path.join(out, "zdt3.json"), payload)
    md = report.write_text(os.path.join(out, "zdt3_table.md"), markdown_table(payload, command))
    print_fn(report.format_table(SUMMARY_HEADER, summary_rows(summary)))
    print_fn(f"true front: HV (1.1, 1.1) = {result['optimal']['hv']:.4f}, HV (0.990, 6.546) = {result['optimal']['hv_published']:.4f}")
    print_fn(f"wrote {js} and {md}")
    fronts, hv_png = report.write_figures(
        [
            (lambda p: plot_fronts(result, p), os.path.join(out, "zdt3_fronts.png")),
            (lambda p: plot_hv(result, p), os.path.join(out, "zdt3_hv.png")),
        ],
        results=[js],
    )
    print_fn(f"wrote {fronts} and {hv_png}")
    return payload
