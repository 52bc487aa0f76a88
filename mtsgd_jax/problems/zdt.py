"""The ZDT1, ZDT2 and ZDT3 bi-objective benchmarks (Zitzler, Deb & Thiele, 2000).

Every problem has ``n`` variables in the box ``[0, 1]^n`` and two objectives
to MINIMISE:

    f1(theta) = theta_1
    g(theta)  = 1 + 9 / (n - 1) * sum_{i >= 2} theta_i
    ZDT1: f2 = g (1 - sqrt(f1 / g))
    ZDT2: f2 = g (1 - (f1 / g)^2)
    ZDT3: f2 = g (1 - sqrt(f1 / g) - (f1 / g) sin(10 pi f1))

The Pareto set is ``theta_i = 0`` for ``i >= 2`` (so ``g = 1``) and the true
front is ``f2 = 1 - sqrt(f1)`` (ZDT1, convex), ``f2 = 1 - f1^2`` (ZDT2,
concave), and ``f2 = 1 - sqrt(f1) - f1 sin(10 pi f1)`` restricted to the five
intervals of :data:`ZDT3_SEGMENTS` (ZDT3, disconnected).

As a multi-target sampling problem (docs/algorithm.md §7) the K = 2 targets
are ``p_k(theta) ∝ exp(-f_k(theta))``; :attr:`ZDTProblem.log_probs` plugs
straight into :func:`mtsgd_jax.sample`. Keep the particles in the box with
:func:`mtsgd_jax.transforms._constraints.project_box` as the last element of
the optax chain: the objectives are only defined there.

Example:
  >>> import jax, optax
  >>> from mtsgd_jax import mtsgd, sample
  >>> from mtsgd_jax.problems.zdt import zdt
  >>> from mtsgd_jax.transforms._constraints import project_box
  >>> prob = zdt("zdt3", num_variables=5)
  >>> x0 = prob.init_particles(jax.random.key(0), 8)
  >>> opt = optax.chain(mtsgd(2), optax.adam(1e-2), project_box(prob.lower, prob.upper))
  >>> res = sample(prob.log_probs, opt, x0, 20)
  >>> bool(((res.particles >= 0) & (res.particles <= 1)).all())
  True
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "ZDT3_SEGMENTS",
    "ZDT_NAMES",
    "ZDTProblem",
    "zdt",
    "zdt1",
    "zdt2",
    "zdt3",
    "zdt_front_points",
]

ZDT_NAMES = ("zdt1", "zdt2", "zdt3")

ZDT3_SEGMENTS = np.array(
    [
        [0.0, 0.0830015349],
        [0.1822287281, 0.2577623633],
        [0.4093136749, 0.4538821040],
        [0.6183967945, 0.6525117038],
        [0.8233317984, 0.8518328654],
    ]
)
"""(5, 2) ``[start, end]`` f1-intervals of the five ZDT3 Pareto-front segments.

Each right end is a local minimum of ``c(f1) = 1 - sqrt(f1) - f1 sin(10 pi f1)``;
the next left end is where ``c`` comes back down to that value (so in exact
arithmetic that left end ties with the previous right end). Points of the
curve between two segments are dominated by the earlier segment's right end.
The ends are rounded INWARD to 10 decimals (exact values, e.g. 0.18222872803,
0.25776236339), so every point of the closed intervals, ends included, is
strictly non-dominated in float64.
"""
ZDT3_SEGMENTS.setflags(write=False)

_FULL_INTERVAL = np.array([[0.0, 1.0]])
_FULL_INTERVAL.setflags(write=False)

# Below this value of f1 / g the derivative of sqrt is evaluated at the floor:
# the gradient stays finite (at most 0.5 / sqrt(_SQRT_FLOOR) = 5e5 per unit of
# f1 / g) on the boundary theta_1 = 0, where d sqrt(f1 / g) / d f1 is infinite.
_SQRT_FLOOR = 1e-12


@jax.custom_jvp
def _safe_sqrt(x):
    """sqrt(max(x, 0)) whose derivative is evaluated at max(x, _SQRT_FLOOR): finite at 0."""
    return jnp.sqrt(jnp.maximum(x, 0))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    floor = jnp.asarray(_SQRT_FLOOR, x.dtype)
    return _safe_sqrt(x), t * (0.5 / jnp.sqrt(jnp.maximum(x, floor)))


def _front_f2(index: int, f1):
    """f2 on the true front (g = 1) as a function of f1 (numpy or jax arrays)."""
    xp = jnp if isinstance(f1, jax.Array) else np
    if index == 1:
        return 1.0 - xp.sqrt(f1)
    if index == 2:
        return 1.0 - f1**2
    return 1.0 - xp.sqrt(f1) - f1 * xp.sin(10.0 * np.pi * f1)


def _check_num_points(num_points, name="num_points"):
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise ValueError(f"{name} must be a positive int, got {num_points!r}.")
    return int(num_points)


def _allocate(num_points: int, lengths: np.ndarray) -> np.ndarray:
    """Split ``num_points`` over intervals: min(2, P // S) each, the rest proportional to length."""
    s = len(lengths)
    base = min(2, num_points // s)
    rest = num_points - base * s
    share = rest * lengths / lengths.sum()
    counts = np.floor(share).astype(int)
    left = rest - counts.sum()
    # Largest remainder first; ties go to the earlier interval (stable sort).
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:left]] += 1
    return counts + base


def zdt_front_points(segments: np.ndarray, num_points: int) -> np.ndarray:
    """``num_points`` f1 values spread over f1-intervals, proportionally to their lengths.

    Every interval gets ``min(2, P // S)`` points (so both of its ends are
    included once ``P >= 2 S``), the remaining points are shared in proportion
    to the interval lengths (largest remainder); within an interval the points
    are evenly spaced from its start to its end (its midpoint for one point).

    Args:
      segments: (S, 2) ``[start, end]`` intervals, e.g. :data:`ZDT3_SEGMENTS`.
      num_points: P >= 1.

    Returns:
      (P,) float64 numpy array, increasing.

    Example:
      >>> zdt_front_points(np.array([[0.0, 1.0], [2.0, 2.5]]), 8)
      array([0.  , 0.25, 0.5 , 0.75, 1.  , 2.  , 2.25, 2.5 ])
    """
    num_points = _check_num_points(num_points)
    segments = np.asarray(segments, np.float64)
    if segments.ndim != 2 or segments.shape[1] != 2 or len(segments) == 0:
        raise ValueError(f"segments must have shape (S, 2) with S >= 1, got {segments.shape}.")
    if np.any(segments[:, 1] < segments[:, 0]):
        raise ValueError("segments: every interval needs start <= end.")
    counts = _allocate(num_points, segments[:, 1] - segments[:, 0])
    parts = []
    for (lo, hi), c in zip(segments, counts):
        if c == 1:
            parts.append(np.array([0.5 * (lo + hi)]))
        elif c > 1:
            parts.append(np.linspace(lo, hi, c))
    return np.concatenate(parts)


class ZDTProblem(NamedTuple):
    """A ZDT benchmark as a two-target sampling / bi-objective problem.

    Attributes:
      name: ``"zdt1"``, ``"zdt2"`` or ``"zdt3"``.
      num_variables: n >= 2.
      objectives: ``theta (n,) -> (2,)`` the objective vector ``(f1, f2)`` to
        minimise, in the dtype of ``theta`` (jit/vmap/grad-able; gradients are
        finite on the whole box, including ``theta_1 = 0``). Defined on the box
        ``[0, 1]^n`` only.
      log_prob: ``theta (n,) -> (2,)``, ``-objectives(theta)``.
      log_probs: tuple of the two scalar functions ``theta (n,) -> -f_k(theta)``:
        the unnormalised log-densities of the targets ``p_k ∝ exp(-f_k)``, ready
        for :func:`mtsgd_jax.sample`.
      lower: (n,) float64 lower bounds (zeros, read-only).
      upper: (n,) float64 upper bounds (ones, read-only).
      segments: (S, 2) f1-intervals of the true front (``[[0, 1]]`` for ZDT1 and
        ZDT2, :data:`ZDT3_SEGMENTS` for ZDT3).
      pareto_front: ``num_points -> (P, 2)`` float64 numpy array of points of the
        analytic true front, f1 increasing, spread over :attr:`segments` in
        proportion to their lengths (see :func:`zdt_front_points`).
      pareto_set: ``num_points -> (P, n)`` float64 numpy array of Pareto-optimal
        variables, ``objectives(pareto_set(P)) == pareto_front(P)``.
      init_particles: ``(key, M, dtype=float32) -> (M, n)`` uniform in the box.
      front_polylines: ``(num_vertices=257) -> (S, L, 2)`` float64 numpy array:
        each front segment as a polyline of ``num_vertices`` points of the
        analytic curve (within ~1e-6 of it at the default), for
        :func:`mtsgd_jax.metrics.segments_covered`.
    """

    name: str
    num_variables: int
    objectives: Callable
    log_prob: Callable
    log_probs: tuple
    lower: np.ndarray
    upper: np.ndarray
    segments: np.ndarray
    pareto_front: Callable
    pareto_set: Callable
    init_particles: Callable
    front_polylines: Callable


def _resolve_index(name_or_index) -> int:
    if isinstance(name_or_index, bool):
        pass
    elif isinstance(name_or_index, (int, np.integer)) and int(name_or_index) in (1, 2, 3):
        return int(name_or_index)
    elif isinstance(name_or_index, str) and name_or_index.strip().lower() in ZDT_NAMES:
        return ZDT_NAMES.index(name_or_index.strip().lower()) + 1
    raise ValueError(f"name_or_index must be one of {ZDT_NAMES} or 1, 2, 3; got {name_or_index!r}.")


def _check_num_variables(num_variables) -> int:
    if isinstance(num_variables, bool) or not isinstance(num_variables, (int, np.integer)) or num_variables < 2:
        raise ValueError(f"num_variables must be an int >= 2, got {num_variables!r}.")
    return int(num_variables)


@functools.lru_cache(maxsize=None)
def _build(index: int, n: int) -> ZDTProblem:
    name = ZDT_NAMES[index - 1]
    segments = ZDT3_SEGMENTS if index == 3 else _FULL_INTERVAL

    def _check_theta(theta):
        theta = jnp.asarray(theta)
        if theta.shape != (n,):
            raise ValueError(
                f"{name}: theta must be ONE particle of shape (num_variables,) = ({n},), got shape "
                f"{theta.shape}; use jax.vmap for a batch of particles."
            )
        if not jnp.issubdtype(theta.dtype, jnp.floating):
            theta = theta.astype(jnp.result_type(float))
        return theta

    def f1_fn(theta):
        return _check_theta(theta)[0]

    def f2_fn(theta):
        theta = _check_theta(theta)
        f1 = theta[0]
        g = 1.0 + (9.0 / (n - 1)) * jnp.sum(theta[1:])
        r = f1 / g
        if index == 1:
            h = 1.0 - _safe_sqrt(r)
        elif index == 2:
            h = 1.0 - r**2
        else:
            h = 1.0 - _safe_sqrt(r) - r * jnp.sin(10.0 * jnp.pi * f1)
        return g * h

    def objectives(theta):
        return jnp.stack([f1_fn(theta), f2_fn(theta)])

    def log_prob(theta):
        return -objectives(theta)

    def neg_f1(theta):
        return -f1_fn(theta)

    def neg_f2(theta):
        return -f2_fn(theta)

    def pareto_set(num_points):
        f1 = zdt_front_points(segments, num_points)
        theta = np.zeros((len(f1), n))
        theta[:, 0] = f1
        return theta

    def pareto_front(num_points):
        f1 = zdt_front_points(segments, num_points)
        return np.stack([f1, _front_f2(index, f1)], axis=1)

    def init_particles(key, num_particles, dtype=jnp.float32):
        num_particles = _check_num_points(num_particles, "num_particles")
        return jax.random.uniform(key, (num_particles, n), dtype, 0.0, 1.0)

    def front_polylines(num_vertices=257):
        num_vertices = _check_num_points(num_vertices, "num_vertices")
        if num_vertices < 2:
            raise ValueError(f"num_vertices must be >= 2 (a segment needs two ends), got {num_vertices}.")
        f1 = np.stack([np.linspace(lo, hi, num_vertices) for lo, hi in segments])  # (S, L)
        out = np.stack([f1, _front_f2(index, f1)], axis=-1)
        out.setflags(write=False)
        return out

    lower, upper = np.zeros(n), np.ones(n)
    lower.setflags(write=False)
    upper.setflags(write=False)
    return ZDTProblem(
        name=name,
        num_variables=n,
        objectives=objectives,
        log_prob=log_prob,
        log_probs=(neg_f1, neg_f2),
        lower=lower,
        upper=upper,
        segments=segments,
        pareto_front=pareto_front,
        pareto_set=pareto_set,
        init_particles=init_particles,
        front_polylines=front_polylines,
    )


def zdt(name_or_index: str | int, num_variables: int = 30) -> ZDTProblem:
    """A ZDT problem by name (``"zdt1"``, ``"ZDT3"``, ...) or index (1, 2, 3).

    Repeated calls with the same arguments return the same object (and the same
    functions), so jit-compiled loops such as :func:`mtsgd_jax.sample` reuse
    their compiled programs.

    Args:
      name_or_index: which problem.
      num_variables: n >= 2 (default 30, as in the paper's ZDT3 experiment).

    Returns:
      :class:`ZDTProblem`.

    Example:
      >>> import jax.numpy as jnp
      >>> prob = zdt("zdt1", num_variables=3)
      >>> prob.objectives(jnp.array([0.25, 0.0, 0.0])).tolist()   # on the front: f2 = 1 - sqrt(0.25)
      [0.25, 0.5]
      >>> prob.pareto_front(3)
      array([[0.        , 1.        ],
             [0.5       , 0.29289322],
             [1.        , 0.        ]])
    """
    return _build(_resolve_index(name_or_index), _check_num_variables(num_variables))


def zdt1(num_variables: int = 30) -> ZDTProblem:
    """ZDT1 (convex front ``f2 = 1 - sqrt(f1)``); see :func:`zdt`.

    Example:
      >>> zdt1().num_variables
      30
    """
    return zdt(1, num_variables)


def zdt2(num_variables: int = 30) -> ZDTProblem:
    """ZDT2 (concave front ``f2 = 1 - f1^2``); see :func:`zdt`.

    Example:
      >>> zdt2(10).pareto_front(2)
      array([[0., 1.],
             [1., 0.]])
    """
    return zdt(2, num_variables)


def zdt3(num_variables: int = 30) -> ZDTProblem:
    """ZDT3 (five disconnected front segments, :data:`ZDT3_SEGMENTS`); see :func:`zdt`.

    Example:
      >>> zdt3().pareto_front(10)[:, 0].round(4)
      array([0.    , 0.083 , 0.1822, 0.2578, 0.4093, 0.4539, 0.6184, 0.6525,
             0.8233, 0.8518])
    """
    return zdt(3, num_variables)
