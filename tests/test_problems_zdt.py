"""ZDT1-3: objective values, analytic fronts, ZDT3 segments, gradients on the boundary."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtsgd_jax.problems.zdt import ZDT3_SEGMENTS, ZDT_NAMES, ZDTProblem, zdt, zdt1, zdt2, zdt3, zdt_front_points


def _by_hand(index, theta):
    """The ZDT formulas in plain Python floats."""
    n = len(theta)
    f1 = theta[0]
    g = 1.0 + 9.0 / (n - 1) * sum(theta[1:])
    r = f1 / g
    if index == 1:
        f2 = g * (1.0 - math.sqrt(r))
    elif index == 2:
        f2 = g * (1.0 - r**2)
    else:
        f2 = g * (1.0 - math.sqrt(r) - r * math.sin(10.0 * math.pi * f1))
    return f1, f2


def _curve3(f1):
    return 1.0 - np.sqrt(f1) - f1 * np.sin(10.0 * np.pi * f1)


@pytest.mark.x64
@pytest.mark.parametrize("index", [1, 2, 3])
def test_objectives_at_zero(index):
    prob = zdt(index)
    f = prob.objectives(jnp.zeros(30, jnp.float64))
    assert f.shape == (2,)
    # f1 = 0, g = 1: f2 = 1 for all three problems.
    np.testing.assert_allclose(np.asarray(f), [0.0, 1.0], atol=1e-15)


@pytest.mark.x64
def test_objectives_hand_computed_point():
    # theta_1 = 0.25, the other 29 variables 0.5: g = 1 + 9/29 * 29 * 0.5 = 5.5.
    theta = [0.25] + [0.5] * 29
    g = 5.5
    r = 0.25 / 5.5
    expected = {
        1: (0.25, 5.5 * (1.0 - math.sqrt(r))),
        2: (0.25, 5.5 * (1.0 - r * r)),
        3: (0.25, 5.5 * (1.0 - math.sqrt(r) - r * math.sin(2.5 * math.pi))),  # sin(10 pi / 4) = 1
    }
    assert g == 1.0 + 9.0 / 29.0 * 29 * 0.5
    for index in (1, 2, 3):
        f = np.asarray(zdt(index).objectives(jnp.asarray(theta, jnp.float64)))
        np.testing.assert_allclose(f, expected[index], rtol=1e-13)
        np.testing.assert_allclose(f, _by_hand(index, theta), rtol=1e-13)
    # ZDT3 value written out: 5.5 - sqrt(0.25 * 5.5) - 0.25.
    np.testing.assert_allclose(expected[3][1], 5.5 - math.sqrt(1.375) - 0.25, rtol=1e-14)


@pytest.mark.x64
@pytest.mark.parametrize("index", [1, 2, 3])
@pytest.mark.parametrize("n", [2, 5, 30])
def test_objectives_match_formula_random(index, n):
    rng = np.random.default_rng(index * 100 + n)
    thetas = rng.uniform(size=(20, n))
    thetas[0, 0] = 0.0
    thetas[1] = 1.0
    prob = zdt(index, num_variables=n)
    got = np.asarray(jax.jit(jax.vmap(prob.objectives))(jnp.asarray(thetas)))
    want = np.array([_by_hand(index, list(t)) for t in thetas])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    # log_prob / log_probs are the negated objectives.
    lp = np.asarray(jax.vmap(prob.log_prob)(jnp.asarray(thetas)))
    np.testing.assert_allclose(lp, -want, rtol=1e-12, atol=1e-14)
    for k in range(2):
        lp_k = np.asarray(jax.vmap(prob.log_probs[k])(jnp.asarray(thetas)))
        np.testing.assert_allclose(lp_k, -want[:, k], rtol=1e-12, atol=1e-14)


@pytest.mark.x64
def test_dtype_follows_input():
    prob = zdt3(4)
    assert prob.objectives(jnp.full(4, 0.3, jnp.float32)).dtype == jnp.float32
    assert prob.objectives(jnp.full(4, 0.3, jnp.float64)).dtype == jnp.float64
    assert prob.init_particles(jax.random.key(0), 3).dtype == jnp.float32


@pytest.mark.x64
@pytest.mark.parametrize("index", [1, 2, 3])
def test_pareto_front_on_curve_and_consistent_with_set(index):
    prob = zdt(index, num_variables=7)
    front = prob.pareto_front(101)
    assert front.shape == (101, 2)
    assert np.all(np.diff(front[:, 0]) > 0)
    curve = {1: lambda x: 1 - np.sqrt(x), 2: lambda x: 1 - x**2, 3: _curve3}[index]
    np.testing.assert_allclose(front[:, 1], curve(front[:, 0]), atol=1e-14)
    theta = prob.pareto_set(101)
    assert theta.shape == (101, 7)
    assert np.all(theta[:, 1:] == 0)
    np.testing.assert_allclose(np.asarray(jax.vmap(prob.objectives)(jnp.asarray(theta))), front, atol=1e-14)
    if index != 3:
        np.testing.assert_allclose(front[[0, -1], 0], [0.0, 1.0])


def _dominated_by_curve(points, tol=1e-9):
    """For each point: is it dominated (by more than tol) by some point of the dense ZDT3 curve?"""
    x = np.linspace(0.0, 1.0, 400_001)
    y = _curve3(x)
    # The best f2 among curve points with f1 <= a given value.
    best = np.minimum.accumulate(y)
    idx = np.searchsorted(x, points[:, 0], side="right") - 1
    return best[idx] < points[:, 1] - tol


@pytest.mark.parametrize("index", [1, 2, 3])
def test_pareto_front_non_dominated(index):
    front = zdt(index).pareto_front(500)
    # Pairwise: no front point dominates another.
    le = np.all(front[:, None] <= front[None], -1)
    lt = np.any(front[:, None] < front[None], -1)
    assert not np.any(le & lt)
    if index == 3:
        assert not np.any(_dominated_by_curve(front, tol=0.0))


def test_zdt3_segments_are_exactly_the_non_dominated_part_of_the_curve():
    x = np.linspace(0.0, 1.0, 400_001)
    y = _curve3(x)
    nd = ~_dominated_by_curve(np.stack([x, y], 1), tol=0.0)
    edges = np.flatnonzero(np.diff(nd.astype(int)))
    starts = np.r_[0, edges[1::2] + 1]
    ends = edges[0::2]
    found = np.stack([x[starts], x[ends]], 1)
    assert found.shape == (5, 2)
    np.testing.assert_allclose(found, ZDT3_SEGMENTS, atol=5e-6)
    # Right ends are local minima of the curve; each next start returns to that f2 value.
    for (_, r), (l_next, _) in zip(ZDT3_SEGMENTS[:-1], ZDT3_SEGMENTS[1:]):
        np.testing.assert_allclose(_curve3(l_next), _curve3(r), atol=1e-9)
    # Just outside a segment the curve is dominated; just inside it is not.
    for lo, hi in ZDT3_SEGMENTS:
        inside = np.array([lo, lo + 1e-4, hi - 1e-4, hi])
        assert not np.any(_dominated_by_curve(np.stack([inside, _curve3(inside)], 1), tol=0.0))
        outside = np.array([hi + 1e-3] + ([lo - 1e-3] if lo > 0 else []))
        assert np.all(_dominated_by_curve(np.stack([outside, _curve3(outside)], 1)))


@pytest.mark.parametrize("num_points", [1, 3, 5, 7, 10, 11, 100, 1000])
def test_zdt3_front_resolution(num_points):
    front = zdt3().pareto_front(num_points)
    assert front.shape == (num_points, 2)
    seg = np.array([np.flatnonzero((ZDT3_SEGMENTS[:, 0] <= f) & (f <= ZDT3_SEGMENTS[:, 1]))[0] for f in front[:, 0]])
    counts = np.bincount(seg, minlength=5)
    assert counts.sum() == num_points
    if num_points >= 5:
        assert np.all(counts >= 1)  # the front has 5 segments, each represented
    if num_points >= 10:
        # Both ends of every segment are included.
        np.testing.assert_allclose(np.sort(np.r_[front[:, 0]]), front[:, 0])
        for lo, hi in ZDT3_SEGMENTS:
            assert np.isclose(front[:, 0], lo).any() and np.isclose(front[:, 0], hi).any()
    if num_points >= 100:
        lengths = ZDT3_SEGMENTS[:, 1] - ZDT3_SEGMENTS[:, 0]
        np.testing.assert_allclose(counts / num_points, lengths / lengths.sum(), atol=0.03)


def test_front_points_helper():
    np.testing.assert_allclose(zdt_front_points(np.array([[0.0, 1.0]]), 5), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(zdt_front_points(np.array([[0.0, 1.0], [2.0, 4.0]]), 1), [3.0])
    with pytest.raises(ValueError, match="num_points"):
        zdt_front_points(np.array([[0.0, 1.0]]), 0)
    with pytest.raises(ValueError, match="segments"):
        zdt_front_points(np.array([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="start <= end"):
        zdt_front_points(np.array([[1.0, 0.0]]), 3)


@pytest.mark.x64
@pytest.mark.parametrize("index", [1, 2, 3])
def test_gradients_finite_on_boundary(index):
    prob = zdt(index, num_variables=6)
    jac = jax.jit(jax.jacrev(prob.objectives))
    rng = np.random.default_rng(index)
    thetas = [np.zeros(6), np.ones(6), np.r_[0.0, rng.uniform(size=5)], np.r_[1.0, np.zeros(5)], np.r_[0.0, np.ones(5)]]
    for theta in thetas:
        for dtype in (jnp.float32, jnp.float64):
            j = np.asarray(jac(jnp.asarray(theta, dtype)))
            assert j.shape == (2, 6)
            assert np.all(np.isfinite(j)), (theta, j)
            np.testing.assert_array_equal(j[0], np.eye(6)[0])
    # Away from the boundary the gradient is the exact one (checked by central differences).
    theta = jnp.asarray(np.r_[0.37, rng.uniform(0.1, 0.9, size=5)], jnp.float64)
    j = np.asarray(jac(theta))
    eps = 1e-6
    f = jax.jit(prob.objectives)
    fd = np.stack([(np.asarray(f(theta + eps * e)) - np.asarray(f(theta - eps * e))) / (2 * eps) for e in jnp.eye(6)], 1)
    np.testing.assert_allclose(j, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.x64
def test_grad_of_log_probs_vmapped_and_jitted():
    prob = zdt1(5)
    x = prob.init_particles(jax.random.key(1), 11, jnp.float64)
    g = jax.jit(jax.vmap(jax.grad(prob.log_probs[1])))(x)
    assert g.shape == (11, 5) and np.all(np.isfinite(np.asarray(g)))
    # d(-f2)/d theta_1 = 0.5 / sqrt(theta_1 / g) for ZDT1 (because f2 = g - sqrt(theta_1 g)).
    gval = 1 + 9 / 4 * np.asarray(x[:, 1:]).sum(1)
    np.testing.assert_allclose(np.asarray(g[:, 0]), 0.5 * np.sqrt(gval / np.asarray(x[:, 0])), rtol=1e-10)


def test_init_particles_in_box():
    prob = zdt2(8)
    x = prob.init_particles(jax.random.key(0), 64)
    assert x.shape == (64, 8)
    assert np.all((np.asarray(x) >= prob.lower) & (np.asarray(x) <= prob.upper))
    assert prob.lower.shape == prob.upper.shape == (8,)
    with pytest.raises(ValueError, match="num_particles"):
        prob.init_particles(jax.random.key(0), 0)


def test_constructor_and_errors():
    assert ZDT_NAMES == ("zdt1", "zdt2", "zdt3")
    for i, name in enumerate(ZDT_NAMES, 1):
        assert zdt(name).name == name == zdt(i).name == zdt(name.upper()).name
    p = zdt3()
    assert isinstance(p, ZDTProblem) and p.num_variables == 30
    assert zdt("zdt3") is p  # cached: same functions, jit caches are reused
    assert zdt1().segments.shape == (1, 2) and zdt3().segments.shape == (5, 2)
    assert len(p.log_probs) == 2
    for bad in ("zdt4", 0, 4, True, None):
        with pytest.raises(ValueError, match="name_or_index"):
            zdt(bad)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="num_variables"):
            zdt(1, bad)
    with pytest.raises(ValueError, match=r"shape \(num_variables,\) = \(30,\)"):
        p.objectives(jnp.zeros((4, 30)))
    with pytest.raises(ValueError, match="theta"):
        p.log_probs[0](jnp.zeros(29))
    with pytest.raises(ValueError):
        p.lower[0] = 1.0  # read-only
