"""Pareto metrics against independent brute-force computations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtsgd_jax.metrics.pareto import (
    SEGMENT_COVERAGE_TOL,
    hypervolume_2d,
    igd,
    igd_plus,
    non_dominated_mask,
    segment_coverage,
    segments_covered,
)
from mtsgd_jax.problems.zdt import ZDT3_SEGMENTS, zdt1, zdt2, zdt3

# ---------------------------------------------------------------------------
# brute-force references (plain numpy / python loops)


def _dominates(a, b):
    return bool(np.all(a <= b) and np.any(a < b))


def _nd_brute(points):
    return np.array([not any(_dominates(q, p) for q in points) for p in points], bool)


def _hv_grid(points, ref):
    """Union area by coordinate compression: a grid cell is covered iff some point is <= its lower corner."""
    pts = [p for p in points if p[0] < ref[0] and p[1] < ref[1]]
    if not pts:
        return 0.0
    xs = sorted({p[0] for p in pts} | {ref[0]})
    ys = sorted({p[1] for p in pts} | {ref[1]})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs[:-1], xs[1:]), zip(ys[:-1], ys[1:])):
        if any(p[0] <= x0 and p[1] <= y0 for p in pts):
            area += (x1 - x0) * (y1 - y0)
    return area


def _igd_loop(points, front, plus=False):
    total = 0.0
    for z in front:
        best = np.inf
        for a in points:
            d = np.maximum(a - z, 0.0) if plus else a - z
            best = min(best, float(np.sqrt(np.sum(d * d))))
        total += best
    return total / len(front)


# A few fixed sizes, so that the jitted functions below compile a handful of times only.
SIZES = (1, 5, 13)


def _point_sets(cols):
    """Small point sets with many ties (small integers), or floats."""
    shapes = st.tuples(st.sampled_from(SIZES), st.just(cols))
    ints = hnp.arrays(np.float64, shapes, elements=st.integers(0, 5).map(float))
    # no subnormals: XLA's CPU backend flushes them to zero (numpy does not), so 2e-313 would tie
    # with 0 in the library and not in the reference
    floats = hnp.arrays(np.float64, shapes, elements=st.floats(-2, 7, allow_nan=False, allow_subnormal=False))
    return st.one_of(ints, floats)


_nd = jax.jit(non_dominated_mask)
_hv = jax.jit(hypervolume_2d)
_igd = jax.jit(igd)
_igd_plus = jax.jit(igd_plus)
_ZDT3_POLYLINES = zdt3().front_polylines()


def zdt3_segments_covered(points, tol=SEGMENT_COVERAGE_TOL):
    return segments_covered(points, _ZDT3_POLYLINES, tol)


def zdt3_segment_coverage(points, tol=SEGMENT_COVERAGE_TOL):
    return segment_coverage(points, _ZDT3_POLYLINES, tol)


_covered = jax.jit(zdt3_segments_covered)
_coverage = jax.jit(zdt3_segment_coverage)


# ---------------------------------------------------------------------------
# non-dominated mask


def test_non_dominated_hand_example():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [2.0, 3.0], [3.0, 1.0], [1.0, 3.0], [1.0, 4.0], [3.0, 0.5]])
    np.testing.assert_array_equal(_nd(pts), [True, True, False, False, True, False, True])


@pytest.mark.x64
@given(_point_sets(2))
def test_non_dominated_2d_matches_brute_force(points):
    np.testing.assert_array_equal(np.asarray(_nd(points)), _nd_brute(points))


@pytest.mark.x64
@given(st.one_of(_point_sets(3), _point_sets(1)))
def test_non_dominated_other_dims_match_brute_force(points):
    np.testing.assert_array_equal(np.asarray(_nd(points)), _nd_brute(points))


def test_non_dominated_jit_and_empty():
    pts = jax.random.uniform(jax.random.key(0), (50, 2))
    np.testing.assert_array_equal(np.asarray(_nd(pts)), _nd_brute(np.asarray(pts)))
    assert _nd(jnp.zeros((0, 2))).shape == (0,)
    with pytest.raises(ValueError, match=r"points must have shape \(N, p\)"):
        _nd(jnp.zeros(3))


# ---------------------------------------------------------------------------
# hypervolume


def test_hypervolume_hand_values():
    ref = np.array([4.0, 4.0])
    assert float(_hv(np.array([[1.0, 2.0]]), ref)) == 6.0
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert float(_hv(pts, ref)) == 6.0  # staircase 3 + 2 + 1
    # Adding dominated points, duplicates and points not better than the reference changes nothing.
    extra = np.array([[2.5, 2.5], [2.0, 2.0], [1.0, 3.0], [5.0, 0.0], [0.0, 4.0], [4.0, 4.0], [9.0, 9.0], [3.0, 3.0]])
    assert float(_hv(np.concatenate([extra, pts, extra]), ref)) == 6.0
    # NaN rows are ignored; nothing better than the reference gives 0; so does N = 0.
    assert float(_hv(np.array([[np.nan, 0.0], [1.0, 2.0]]), ref)) == 6.0
    assert float(_hv(np.array([[4.0, 0.0], [0.0, 5.0]]), ref)) == 0.0
    assert float(_hv(jnp.zeros((0, 2)), ref)) == 0.0


@pytest.mark.x64
@given(points=_point_sets(2), ref=st.tuples(st.integers(0, 7), st.integers(0, 7)))
def test_hypervolume_matches_grid_union(points, ref):
    ref = np.array(ref, np.float64)
    got = float(_hv(points, ref))
    np.testing.assert_allclose(got, _hv_grid(points, ref), rtol=1e-12, atol=1e-12)


@pytest.mark.x64
@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_random_sets_permutation_invariant_and_monotone(seed):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1.2, size=(30, 2))
    pts = np.concatenate([pts, pts[:5]])  # duplicates
    ref = np.array([1.0, 1.1])
    hv = float(_hv(pts, ref))
    np.testing.assert_allclose(hv, _hv_grid(pts, ref), rtol=1e-12)
    np.testing.assert_allclose(float(_hv(pts[rng.permutation(len(pts))], ref)), hv, rtol=1e-12)
    # Only the non-dominated points matter (the others replaced by copies of a non-dominated one).
    nd = np.asarray(_nd(pts))
    np.testing.assert_allclose(float(_hv(np.where(nd[:, None], pts, pts[nd][:1]), ref)), hv, rtol=1e-12)
    # Moving a point down-left never decreases it.
    assert float(_hv(np.r_[[[0.05, 0.05]], pts[1:]], ref)) >= hv


def test_hypervolume_of_analytic_fronts():
    # Area above f2 = 1 - sqrt(f1) inside [0, 1]^2 is 1 - 1/3 = 2/3; above 1 - f1^2 it is 1/3.
    ref = np.array([1.0, 1.0])
    np.testing.assert_allclose(float(_hv(zdt1().pareto_front(20_001), ref)), 2 / 3, atol=1e-4)
    np.testing.assert_allclose(float(_hv(zdt2().pareto_front(20_001), ref)), 1 / 3, atol=1e-4)
    ref = np.array([1.1, 1.1])
    np.testing.assert_allclose(float(_hv(zdt1().pareto_front(20_001), ref)), 2 / 3 + 0.21, atol=1e-4)


@pytest.mark.x64
def test_hypervolume_jit_dtype_and_errors():
    pts = jax.random.uniform(jax.random.key(3), (40, 2), jnp.float32)
    hv = _hv(pts, jnp.array([1.0, 1.0]))
    assert hv.dtype == jnp.float32 and hv.shape == ()
    np.testing.assert_allclose(float(hv), _hv_grid(np.asarray(pts, np.float64), np.array([1.0, 1.0])), rtol=1e-5)
    assert _hv(np.array([[0, 1]]), np.array([2, 2])).dtype == jnp.result_type(float)
    with pytest.raises(ValueError, match=r"points must have shape \(N, 2\)"):
        _hv(jnp.zeros((3, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"reference must have shape \(2,\)"):
        _hv(jnp.zeros((3, 2)), jnp.ones(3))


# ---------------------------------------------------------------------------
# IGD / IGD+


@pytest.mark.x64
@given(points=_point_sets(2), front=_point_sets(2))
def test_igd_and_igd_plus_match_loops(points, front):
    np.testing.assert_allclose(float(_igd(points, front)), _igd_loop(points, front), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        float(_igd_plus(points, front)), _igd_loop(points, front, plus=True), rtol=1e-12, atol=1e-12
    )
    assert float(_igd_plus(points, front)) <= float(_igd(points, front)) + 1e-12


@pytest.mark.x64
def test_igd_three_objectives_and_properties():
    rng = np.random.default_rng(0)
    pts, front = rng.normal(size=(17, 3)), rng.normal(size=(9, 3))
    np.testing.assert_allclose(float(_igd(pts, front)), _igd_loop(pts, front), rtol=1e-12)
    np.testing.assert_allclose(float(_igd_plus(pts, front)), _igd_loop(pts, front, True), rtol=1e-12)
    front = zdt1().pareto_front(100)
    assert float(_igd(front, front)) == 0.0
    # Points that dominate the front have IGD+ = 0 but IGD > 0.
    better = front - 0.1
    assert float(_igd_plus(better, front)) == 0.0 and float(_igd(better, front)) > 0.09
    # IGD+ only counts how much worse: one point 0.1 above a one-point front costs 0.1, one below 0.
    z = np.array([[0.3, 0.4]])
    np.testing.assert_allclose(float(_igd_plus(z + [0.0, 0.1], z)), 0.1, rtol=1e-12)
    assert float(_igd_plus(z - [0.0, 0.1], z)) == 0.0
    np.testing.assert_allclose(float(_igd_plus(z + [0.3, -0.4], z)), 0.3, rtol=1e-12)


def test_igd_errors():
    with pytest.raises(ValueError, match="at least 1 row"):
        _igd(jnp.zeros((0, 2)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="reference_front must have at least 1 row"):
        _igd_plus(jnp.zeros((2, 2)), jnp.zeros((0, 2)))
    with pytest.raises(ValueError, match="2 objectives .* reference_front has 3"):
        _igd(jnp.zeros((2, 2)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"reference_front must have shape \(N, p\)"):
        _igd_plus(jnp.zeros((2, 2)), jnp.zeros(2))


# ---------------------------------------------------------------------------
# ZDT3 segment coverage


def _curve3(f1):
    return 1.0 - np.sqrt(f1) - f1 * np.sin(10.0 * np.pi * f1)


def _on_segment(s, frac):
    lo, hi = ZDT3_SEGMENTS[s]
    f1 = lo + frac * (hi - lo)
    return np.array([f1, _curve3(f1)])


def test_zdt3_full_front_covers_all_five():
    assert SEGMENT_COVERAGE_TOL == 0.05
    assert int(_covered(zdt3().pareto_front(5))) == 5
    assert int(_covered(zdt3().pareto_front(200), tol=0.0)) == 5
    assert int(_covered(jnp.asarray(zdt3().pareto_front(50), jnp.float32))) == 5


@pytest.mark.parametrize("subset", [(), (0,), (4,), (1, 3), (0, 2, 4), (0, 1, 2, 3)])
def test_zdt3_subsets_of_segments(subset):
    rng = np.random.default_rng(len(subset))
    pts = [_on_segment(s, rng.uniform()) + rng.uniform(-0.02, 0.02, 2) for s in subset for _ in range(3)]
    pts = np.array(pts).reshape(-1, 2)
    mask = np.asarray(_coverage(pts))
    np.testing.assert_array_equal(mask, [s in subset for s in range(5)])
    assert int(_covered(pts)) == len(subset)


def test_zdt3_distance_threshold():
    # Against the distance to a dense sample of each segment, for random points near the front.
    rng = np.random.default_rng(0)
    dense = [np.stack([f := np.linspace(lo, hi, 20_001), _curve3(f)], 1) for lo, hi in ZDT3_SEGMENTS]
    pts = np.stack([rng.uniform(-0.1, 1.0, 40), rng.uniform(-0.9, 1.1, 40)], 1)
    dist = np.stack([np.min(np.linalg.norm(pts[:, None] - d[None], axis=-1), axis=1) for d in dense], 1)  # (40, 5)
    cover = _coverage
    for i in range(len(pts)):
        for s in range(5):
            assert bool(cover(pts[i : i + 1], dist[i, s] + 1e-4)[s])
            if dist[i, s] > 1e-3:
                assert not bool(cover(pts[i : i + 1], dist[i, s] - 1e-4)[s])
    # To the right of the segment's end by more than tol: not covered (f1 outside the padded range).
    hi = ZDT3_SEGMENTS[3, 1]
    assert int(_covered(np.array([[hi + 0.06, _curve3(hi)]]))) == 0
    assert int(_covered(np.array([[hi + 0.04, _curve3(hi)]]))) == 1
    # Points on the dominated part of the curve, mid-gap, cover nothing.
    gaps = np.array([0.5 * (ZDT3_SEGMENTS[i, 1] + ZDT3_SEGMENTS[i + 1, 0]) for i in range(4)])
    assert int(_covered(np.stack([gaps, _curve3(gaps)], 1))) == 0
    # Converged but shifted front (g = 1.05 for every point): still counted with the default tol.
    f1 = zdt3().pareto_front(20)[:, 0]
    g = 1.05
    shifted = np.stack([f1, g * (1 - np.sqrt(f1 / g) - f1 / g * np.sin(10 * np.pi * f1))], 1)
    assert int(_covered(shifted)) == 5
    assert int(_covered(jnp.zeros((0, 2)))) == 0


def test_zdt3_coverage_errors():
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        zdt3_segments_covered(jnp.zeros((2, 2)), tol=-0.1)  # checked when tol is concrete
    for bad in (np.nan, "x", None):
        with pytest.raises(ValueError, match="tol must be a finite number"):
            zdt3_segments_covered(jnp.zeros((2, 2)), tol=bad)
    with pytest.raises(ValueError, match="tol must be a scalar"):
        zdt3_segments_covered(jnp.zeros((2, 2)), tol=jnp.ones(5))
    with pytest.raises(ValueError, match=r"points must have shape \(N, 2\)"):
        _coverage(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"polylines must have shape \(S, L, 2\)"):
        segments_covered(jnp.zeros((2, 2)), np.zeros((5, 1, 2)))
    # A traced tol is accepted.
    f = _covered
    assert int(f(jnp.asarray(zdt3().pareto_front(10)), 0.01)) == 5


@pytest.mark.x64
def test_front_polylines_lie_on_the_front():
    for problem, segments in ((zdt1(), 1), (zdt2(), 1), (zdt3(), 5)):
        poly = problem.front_polylines(33)
        assert poly.shape == (segments, 33, 2)
        np.testing.assert_allclose(poly[..., 0], np.stack([np.linspace(lo, hi, 33) for lo, hi in problem.segments]))
        # Every vertex is an attainable objective vector of a Pareto-optimal theta (g = 1).
        theta = np.zeros((poly.size // 2, problem.num_variables))
        theta[:, 0] = poly[..., 0].ravel()
        objs = np.asarray(jax.vmap(problem.objectives)(jnp.asarray(theta)))
        np.testing.assert_allclose(objs, poly.reshape(-1, 2), atol=1e-12)
    with pytest.raises(ValueError, match="num_vertices"):
        zdt3().front_polylines(1)
