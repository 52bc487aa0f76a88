"""Multi-objective quality indicators: dominance, hypervolume, IGD, IGD+, front-segment coverage.

Conventions (docs/algorithm.md §8):

* MINIMISATION: ``a`` dominates ``b`` when ``a <= b`` in every objective and
  ``a < b`` in at least one.
* ``points`` are obtained objective vectors, shape (N, p) (p = 2 where a
  function says so); reference fronts are (P, p). Inputs should be finite;
  integer inputs are promoted to the default float dtype.
* Every function is vectorised ``jax.numpy`` (no Python loop over points) and
  jit-able; shapes are checked eagerly (at trace time under ``jit``) with a
  ``ValueError`` naming the argument. Scalars are 0-d arrays in the dtype of
  ``points``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "SEGMENT_COVERAGE_TOL",
    "hypervolume_2d",
    "igd",
    "igd_plus",
    "non_dominated_mask",
    "segment_coverage",
    "segments_covered",
]

SEGMENT_COVERAGE_TOL = 0.05
"""Default distance (objective space) for :func:`segments_covered`.

On ZDT3 no attainable objective vector lies within 0.079 of two different front
segments, so with ``tol < 0.079`` one point covers at most one segment; 0.05
also allows a modest distance to the front (a ZDT3 point with ``g = 1.05`` sits
about 0.04 above it).
"""


def _float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _as_points(x, name: str, fn: str, num_objectives: int | None = None, min_rows: int = 0) -> Array:
    x = _float(x)
    if x.ndim != 2 or (num_objectives is not None and x.shape[1] != num_objectives):
        cols = num_objectives if num_objectives is not None else "p"
        raise ValueError(f"{fn}: {name} must have shape (N, {cols}), one objective vector per row; got {x.shape}.")
    if x.shape[1] < 1:
        raise ValueError(f"{fn}: {name} must have at least one objective (column), got shape {x.shape}.")
    if x.shape[0] < min_rows:
        raise ValueError(f"{fn}: {name} must have at least {min_rows} row(s), got shape {x.shape}.")
    return x


def non_dominated_mask(points) -> Array:
    """Which points no other point dominates (minimisation).

    Duplicates do not dominate each other: every copy of a non-dominated point
    is kept. For p = 2 the mask is computed with one sort and a running minimum,
    O(N log N); for p != 2 by comparing all pairs, O(N^2 p) time and memory.

    Args:
      points: (N, p) objective vectors.

    Returns:
      (N,) bool, True for the non-dominated points.

    Example:
      >>> import jax.numpy as jnp
      >>> pts = jnp.array([[1.0, 3.0], [2.0, 2.0], [2.0, 3.0], [3.0, 1.0], [1.0, 3.0]])
      >>> non_dominated_mask(pts).tolist()
      [True, True, False, True, True]
    """
    x = _as_points(points, "points", "non_dominated_mask")
    n, p = x.shape
    if n == 0:
        return jnp.zeros((0,), bool)
    if p != 2:
        le = jnp.all(x[:, None, :] <= x[None, :, :], axis=-1)  # [j, i]: x_j <= x_i everywhere
        lt = jnp.any(x[:, None, :] < x[None, :, :], axis=-1)
        return ~jnp.any(le & lt, axis=0)
    order = jnp.lexsort((x[:, 1], x[:, 0]))  # by f1, ties by f2
    f1, f2 = x[order, 0], x[order, 1]
    running = jax.lax.cummin(f2)
    inf = jnp.full((1,), jnp.inf, f2.dtype)
    # Every earlier point has a smaller f1, or the same f1 and f2 <= ours: a strictly
    # smaller f2 among them dominates us.
    before = jnp.concatenate([inf, running[:-1]])
    # Points with a strictly smaller f1 dominate us already with an equal f2.
    group_start = jnp.searchsorted(f1, f1, side="left")
    smaller_f1 = jnp.where(group_start > 0, running[jnp.maximum(group_start - 1, 0)], jnp.inf)
    dominated = (before < f2) | (smaller_f1 <= f2)
    return jnp.zeros((n,), bool).at[order].set(~dominated)


def hypervolume_2d(points, reference) -> Array:
    """Exact hypervolume (area) dominated by 2-objective points and bounded by a reference.

    The area of the union of the rectangles ``[a_1, r_1] x [a_2, r_2]`` over the
    points ``a`` strictly better than the reference ``r`` in BOTH objectives
    (the others contribute nothing). Dominated points and duplicates are
    handled (they add nothing). Computed with one sort by f1 and a running
    minimum of f2: O(N log N), no Python loop.

    Args:
      points: (N, 2) objective vectors (minimisation). N = 0 gives 0.
      reference: (2,) reference point, worse than the region of interest.

    Returns:
      () hypervolume, in the dtype of ``points``.

    Example:
      >>> import jax.numpy as jnp
      >>> pts = jnp.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [2.5, 2.5], [5.0, 0.0]])
      >>> float(hypervolume_2d(pts, jnp.array([4.0, 4.0])))   # 3 + 2 + 1; the last two add nothing
      6.0
    """
    x = _as_points(points, "points", "hypervolume_2d", num_objectives=2)
    ref = jnp.asarray(reference)
    if ref.shape != (2,):
        raise ValueError(f"hypervolume_2d: reference must have shape (2,), got {ref.shape}.")
    ref = ref.astype(x.dtype)
    if x.shape[0] == 0:
        return jnp.zeros((), x.dtype)
    valid = (x[:, 0] < ref[0]) & (x[:, 1] < ref[1])  # False for NaN too
    # Points that do not strictly dominate the reference become the reference: zero area.
    f1 = jnp.where(valid, x[:, 0], ref[0])
    f2 = jnp.where(valid, x[:, 1], ref[1])
    order = jnp.lexsort((f2, f1))
    f1, f2 = f1[order], f2[order]
    height = ref[1] - jax.lax.cummin(f2)  # height of the union over the strip [f1_i, f1_{i+1}]
    width = jnp.concatenate([f1[1:], ref[:1]]) - f1
    return jnp.sum(width * height)


def _check_same_objectives(x, front, fn):
    if x.shape[1] != front.shape[1]:
        raise ValueError(
            f"{fn}: points has {x.shape[1]} objectives (columns) but reference_front has {front.shape[1]}; "
            "they must match."
        )


def igd(points, reference_front) -> Array:
    """Inverted generational distance: mean over the true front of the distance to the nearest point.

    ``IGD = (1/P) sum_z min_a ||z - a||_2`` with ``z`` the reference-front points
    and ``a`` the obtained points. Lower is better; 0 iff every reference point
    was obtained. Uses O(P N p) memory.

    Args:
      points: (N, p) obtained objective vectors, N >= 1.
      reference_front: (P, p) points of the true Pareto front, P >= 1 (e.g.
        ``ZDTProblem.pareto_front(P)``).

    Returns:
      () IGD, in the dtype of ``points`` and ``reference_front`` promoted.

    Example:
      >>> import jax.numpy as jnp
      >>> front = jnp.array([[0.0, 1.0], [1.0, 0.0]])
      >>> float(igd(jnp.array([[0.0, 1.0], [1.0, 0.5]]), front))   # (0 + 0.5) / 2
      0.25
    """
    x = _as_points(points, "points", "igd", min_rows=1)
    z = _as_points(reference_front, "reference_front", "igd", min_rows=1)
    _check_same_objectives(x, z, "igd")
    diff = z[:, None, :] - x[None, :, :]  # (P, N, p)
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    return jnp.mean(jnp.min(dist, axis=1))


def igd_plus(points, reference_front) -> Array:
    """IGD+ (Ishibuchi et al., 2015): IGD with the dominance-compliant distance.

    ``d+(z, a) = sqrt(sum_i max(a_i - z_i, 0)^2)`` (minimisation) only counts
    how much the obtained point ``a`` is WORSE than the reference point ``z``;
    ``IGD+ = (1/P) sum_z min_a d+(z, a)``. Unlike IGD it is weakly Pareto
    compliant: a point set that dominates another never scores worse.

    Args:
      points: (N, p) obtained objective vectors, N >= 1.
      reference_front: (P, p) points of the true Pareto front, P >= 1.

    Returns:
      () IGD+, in the dtype of ``points`` and ``reference_front`` promoted.

    Example:
      >>> import jax.numpy as jnp
      >>> front = jnp.array([[0.0, 1.0], [1.0, 0.0]])
      >>> float(igd_plus(jnp.array([[0.0, 0.5], [1.5, 0.0]]), front))   # (0 + 0.5) / 2
      0.25
    """
    x = _as_points(points, "points", "igd_plus", min_rows=1)
    z = _as_points(reference_front, "reference_front", "igd_plus", min_rows=1)
    _check_same_objectives(x, z, "igd_plus")
    worse = jnp.maximum(x[None, :, :] - z[:, None, :], 0)  # (P, N, p)
    dist = jnp.sqrt(jnp.sum(worse * worse, axis=-1))
    return jnp.mean(jnp.min(dist, axis=1))


def _check_tol(tol, fn):
    if np.ndim(tol) != 0:
        raise ValueError(f"{fn}: tol must be a scalar, got shape {np.shape(tol)}.")
    try:
        value = float(tol)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced under jit: its value cannot be checked, it is used as is
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: tol must be a finite number >= 0, got {tol!r}.") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: tol must be a finite number >= 0, got {tol!r}.")


def _as_polylines(polylines, dtype) -> Array:
    poly = jnp.asarray(polylines, dtype)
    if poly.ndim != 3 or poly.shape[1] < 2 or poly.shape[2] != 2:
        raise ValueError(
            "segment_coverage: polylines must have shape (S, L, 2) with L >= 2 vertices per segment "
            f"(e.g. zdt3().front_polylines()), got {tuple(poly.shape)}."
        )
    return poly


def segment_coverage(points, polylines, tol=SEGMENT_COVERAGE_TOL) -> Array:
    """Which segments of a true front have an obtained point within ``tol``.

    Segment s, given as a polyline ``polylines[s]`` in objective space, is
    covered when some point lies within Euclidean distance ``tol`` of it. For
    a disconnected front (ZDT3: ``zdt3().front_polylines()``, five segments) a
    point near a dominated gap of the curve then only counts for a segment
    whose END it is close to.

    Args:
      points: (N, 2) obtained objective vectors. N = 0 covers nothing.
      polylines: (S, L, 2) the front's S segments, each as L >= 2 vertices
        (:meth:`~mtsgd_jax.problems.ZDTProblem.front_polylines` builds them
        within ~1e-6 of the analytic curve).
      tol: distance threshold in objective space, >= 0 (default
        :data:`SEGMENT_COVERAGE_TOL` = 0.05).

    Returns:
      (S,) bool, one entry per segment.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax.problems import zdt3
      >>> pts = jnp.array([[0.0, 1.0], [0.2, 0.56], [0.9, 0.0]])   # near segments 1 and 2
      >>> segment_coverage(pts, zdt3().front_polylines()).tolist()
      [True, True, False, False, False]
    """
    x = _as_points(points, "points", "segment_coverage", num_objectives=2)
    _check_tol(tol, "segment_coverage")
    poly = _as_polylines(polylines, x.dtype)  # (S, L, 2)
    if x.shape[0] == 0:
        return jnp.zeros((poly.shape[0],), bool)
    a, b = poly[:, :-1, :], poly[:, 1:, :]  # edges (S, L-1, 2)
    ab = b - a
    ap = x[:, None, None, :] - a[None]  # (N, S, L-1, 2)
    t = jnp.clip(jnp.sum(ap * ab, -1) / jnp.maximum(jnp.sum(ab * ab, -1), jnp.finfo(x.dtype).tiny), 0.0, 1.0)
    gap = ap - t[..., None] * ab
    dist = jnp.min(jnp.sqrt(jnp.sum(gap * gap, -1)), axis=-1)  # (N, S)
    return jnp.any(dist <= jnp.asarray(tol, x.dtype), axis=0)


def segments_covered(points, polylines, tol=SEGMENT_COVERAGE_TOL) -> Array:
    """How many segments of a true front an obtained point set covers.

    ``sum(segment_coverage(points, polylines, tol))``; see :func:`segment_coverage`.

    Args:
      points: (N, 2) obtained objective vectors.
      polylines: (S, L, 2) the front's segments as polylines.
      tol: distance threshold in objective space (default 0.05).

    Returns:
      () int32 count in 0..S (use ``int(...)``).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax.problems import zdt3
      >>> problem = zdt3()
      >>> int(segments_covered(problem.pareto_front(5), problem.front_polylines()))   # one point per segment
      5
      >>> int(segments_covered(jnp.array([[0.0, 1.0], [0.0, 1.02]]), problem.front_polylines()))
      1
    """
    return jnp.sum(segment_coverage(points, polylines, tol), dtype=jnp.int32)
