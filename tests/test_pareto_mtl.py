"""Pareto MTL (Lin et al. 2019): preference regions, descent, and one step against an independent QP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from mtsgd_jax.targets import loss_value_and_grads
from mtsgd_jax.transforms._pareto_mtl import ParetoMTLState, pareto_mtl, pareto_mtl_preferences

A = np.array([1.0, 0.0])
B = np.array([0.0, 1.0])


def _quadratics(th):
    """Two quadratics with minima A and B; the Pareto set is the segment [A, B]."""
    return jnp.stack([jnp.sum((th - A) ** 2), jnp.sum((th - B) ** 2)])


def _region_bounds(prefs):
    """Angular interval (degrees) of each preference cone for unit-norm 2-D preferences."""
    ang = np.degrees(np.arctan2(prefs[:, 1], prefs[:, 0]))
    mids = (ang[1:] + ang[:-1]) / 2
    lo = np.concatenate([[0.0], mids])
    hi = np.concatenate([mids, [90.0]])
    return lo, hi


# One transformation, compiled once, shared by the tests below (compilation dominates their cost):
# M = 4 particles in 2-D, K = 2, float64, a warm-up long enough for the initial phase.
M = 4
T = pareto_mtl(2, warmup_steps=300)
_update = jax.jit(T.update)
_grads = jax.jit(lambda x: loss_value_and_grads(_quadratics, x))


def _run(x, steps=500, lr=0.05):
    """Plain SGD on the Pareto MTL direction (a Python loop over the compiled update)."""
    st = T.init(x)
    for _ in range(steps):
        v, g = _grads(x)
        d, st = _update(g, st, x, losses=v)
        x = x - lr * d
    return x, st


def _in_cones(x_end):
    losses = np.asarray(jax.vmap(_quadratics)(x_end))
    ang = np.degrees(np.arctan2(losses[:, 1], losses[:, 0]))
    lo, hi = _region_bounds(pareto_mtl_preferences(M, 2))
    assert np.all(ang >= lo - 0.05) and np.all(ang <= hi + 0.05), (ang, lo, hi)
    return ang


def test_default_preferences():
    p = pareto_mtl_preferences(5, 2)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0)
    np.testing.assert_allclose(np.degrees(np.arctan2(p[:, 1], p[:, 0])), [0, 22.5, 45, 67.5, 90], atol=1e-12)
    p3 = pareto_mtl_preferences(6, 3)
    assert p3.shape == (6, 3) and np.all(p3 >= 0)
    np.testing.assert_allclose(np.linalg.norm(p3, axis=1), 1.0)
    assert len({tuple(r) for r in np.round(p3, 9)}) == 6
    np.testing.assert_allclose(pareto_mtl_preferences(1, 2), [[2**-0.5, 2**-0.5]])


@pytest.mark.x64
def test_particles_end_in_their_preference_cones_on_the_pareto_set():
    x = jax.random.uniform(jax.random.key(3, impl="rbg"), (M, 2), jnp.float64, -1.0, 2.0)
    x_end, st = _run(x)
    x_end = np.asarray(x_end)
    # on the Pareto set: the segment between the two minima
    np.testing.assert_allclose(x_end.sum(axis=1), 1.0, atol=1e-4)
    assert np.all(x_end >= -1e-4) and np.all(x_end <= 1 + 1e-4)
    ang = _in_cones(x_end)
    # distinct solutions, spread over the front, in the preferences' order
    assert np.all(np.diff(ang) > 1.0)
    assert bool(np.all(st.main_phase))


@pytest.mark.x64
def test_initial_phase_reaches_the_region_before_the_main_phase():
    # Every particle starts next to the minimum of loss 1 (loss vector ~ (0, 2), angle ~ 90 degrees),
    # which lies in the region of the last preference only.
    x = jnp.tile(jnp.asarray(A, jnp.float64), (M, 1)) + 1e-3
    v, g = loss_value_and_grads(_quadratics, x)
    _, st0 = _update(g, T.init(x), x, losses=v)
    assert np.asarray(st0.main_phase).tolist() == [False, False, False, True]
    x_end, st = _run(x)
    assert isinstance(st, ParetoMTLState)
    assert bool(np.all(st.main_phase)), "every particle found a feasible point within the warm-up"
    _in_cones(np.asarray(x_end))


def _independent_direction(vectors):
    """Min-norm point of conv(vectors) by SLSQP (scipy), for the check below."""
    v = np.asarray(vectors, float)
    n = len(v)
    gram = v @ v.T
    res = minimize(
        lambda w: w @ gram @ w,
        np.full(n, 1.0 / n),
        jac=lambda w: 2 * gram @ w,
        bounds=[(0, 1)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return res.x @ v


@pytest.mark.x64
def test_one_step_matches_an_independent_computation_and_descends():
    rng = np.random.default_rng(0)
    k, m, d = 2, M, 2
    g = rng.normal(size=(k, m, d))
    prefs = pareto_mtl_preferences(m, k)
    # loss vectors: particle 0 inside its region, the others outside (some constraints violated)
    angles = np.radians([5.0, 80.0, 10.0, 50.0])
    losses = np.stack([np.cos(angles), np.sin(angles)]) * rng.uniform(0.5, 2.0, size=m)
    x = jnp.asarray(rng.normal(size=(m, d)))
    update = _update
    fresh = T.init(x)
    for main_phase in (False, True):  # the initial phase (fresh state), then the main phase throughout
        state = fresh._replace(main_phase=jnp.full((m,), main_phase))
        d_out, st = update(jnp.asarray(g), state, x, losses=jnp.asarray(losses))
        for j in range(m):
            c = prefs - prefs[j]
            val = c @ (losses[:, j] / np.linalg.norm(losses[:, j]))
            violated = [i for i in range(m) if i != j and val[i] > 0]
            cons = [c[i] @ g[:, j] for i in violated]  # gradient of G_i = (u_i - u_j)^T L
            if not main_phase and violated:  # initial phase: only the violated constraints
                expected = _independent_direction(cons)
                assert not bool(st.main_phase[j])
                gens = cons
            else:
                gens = [g[0, j], g[1, j]] + cons
                expected = _independent_direction(gens)
                assert bool(st.main_phase[j])
            dj = np.asarray(d_out[j])
            np.testing.assert_allclose(dj, expected, atol=1e-6)
            assert int(st.num_active[j]) == len(violated)
            np.testing.assert_allclose(np.asarray(st.weights[j]) @ g[:, j], expected, atol=1e-6)
            # min-norm optimality: <d, v> >= ||d||^2 for every generator v, so descending d lowers
            # every loss (main phase) and every active constraint to first order
            for v in gens:
                assert dj @ v >= dj @ dj - 1e-8


def test_requires_losses_and_checks_shapes():
    x = jnp.zeros((3, 2), jnp.float32)
    g = jnp.ones((2, 3, 2), jnp.float32)
    t = pareto_mtl(2)
    with pytest.raises(ValueError, match="losses=values"):
        t.update(g, t.init(x), x)
    with pytest.raises(ValueError, match=r"shape \(K, M\)"):
        t.update(g, t.init(x), x, losses=jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="preferences has 4 rows"):
        pareto_mtl(2, np.ones((4, 2))).init(x)
    with pytest.raises(ValueError, match="shape"):
        pareto_mtl(2, np.ones((3, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        pareto_mtl(2, -np.ones((3, 2)))
    with pytest.raises(ValueError, match="warmup_steps"):
        pareto_mtl(2, warmup_steps=-1)


def test_float32_pytree_and_duplicate_preferences():
    params = {"a": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    grads = jax.tree_util.tree_map(lambda p: jnp.stack([p + 1.0, p - 2.0]), params)
    losses = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], jnp.float32)
    prefs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # particles 0 and 1 share a preference
    t = pareto_mtl(2, prefs, warmup_steps=0, normalize_weights=True)
    d, st = jax.jit(t.update)(grads, t.init(params), params, losses=losses)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(d))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(d))
    np.testing.assert_allclose(np.abs(np.asarray(st.weights)).sum(axis=1), 2.0, rtol=1e-5)
