"""Box constraints: clip_to_box and the project_box optax transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mtsgd_jax as mj
from mtsgd_jax.problems.zdt import zdt
from mtsgd_jax.transforms._constraints import clip_to_box, project_box


def _apply(transform, updates, params):
    state = transform.init(params)
    new, state = transform.update(updates, state, params)
    assert isinstance(state, optax.EmptyState)
    return new, optax.apply_updates(params, new)


def test_clip_to_box_scalar_and_per_coordinate_bounds():
    x = jnp.array([[-1.0, 0.5, 2.0], [0.2, 3.0, -0.1]])
    np.testing.assert_array_equal(clip_to_box(x, 0.0, 1.0), np.float32([[0.0, 0.5, 1.0], [0.2, 1.0, 0.0]]))
    lo, hi = jnp.array([0.0, -1.0, 0.5]), jnp.array([0.1, 1.0, 1.5])  # one particle's shape
    np.testing.assert_array_equal(clip_to_box(x, lo, hi), np.clip(np.asarray(x), lo, hi))
    full_lo = jnp.zeros_like(x).at[1, 1].set(2.5)  # the whole params' shape
    np.testing.assert_array_equal(clip_to_box(x, full_lo, 3.0), np.clip(np.asarray(x), full_lo, 3.0))
    # One-sided bounds.
    np.testing.assert_array_equal(clip_to_box(x, -jnp.inf, 1.0), np.minimum(np.asarray(x), 1.0))
    assert clip_to_box(x.astype(jnp.float32), 0.0, 1.0).dtype == jnp.float32


def test_clip_to_box_pytree_bounds():
    params = {"w": jnp.array([[2.0, -2.0], [0.5, 0.5]]), "b": jnp.array([5.0, -5.0])}
    out = clip_to_box(params, {"w": jnp.array([0.0, 0.0]), "b": -1.0}, {"w": 1.0, "b": jnp.array([1.0, 2.0])})
    np.testing.assert_array_equal(out["w"], [[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_array_equal(out["b"], [1.0, -1.0])
    out = clip_to_box(params, 0.0, 1.0)  # a scalar is used for every leaf
    np.testing.assert_array_equal(out["b"], [1.0, 0.0])


def test_bound_errors():
    with pytest.raises(ValueError, match=r"lower must be <= upper.*lower = 2.0 > upper = 1.0"):
        project_box(2.0, 1.0)
    with pytest.raises(ValueError, match=r"<= upper.* at index \(1,\)"):
        project_box(jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        project_box(jnp.nan, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        project_box(jnp.zeros(2), jnp.ones(3))
    with pytest.raises(ValueError, match="same pytree structure"):
        project_box({"a": 0.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="lower must be a scalar"):
        project_box(None, 1.0)
    with pytest.raises(ValueError, match="<= upper"):
        clip_to_box(jnp.zeros(3), 1.0, 0.0)
    x = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"upper has shape \(2,\); expected a scalar, one particle's shape \(3,\)"):
        project_box(0.0, jnp.ones(2)).init(x)
    with pytest.raises(ValueError, match=r"lower\['a'\] has shape \(5,\)"):
        clip_to_box({"a": x}, {"a": jnp.zeros(5)}, 1.0)
    with pytest.raises(ValueError, match="structure of params"):
        project_box({"a": 0.0, "b": 0.0}, 1.0).init({"a": x})
    with pytest.raises(ValueError, match="pass an array instead"):
        project_box([0.0, 0.0], 1.0).init(x)
    with pytest.raises(ValueError, match="needs params"):
        project_box(0.0, 1.0).update(x, optax.EmptyState())
    with pytest.raises(ValueError, match="must come last"):
        project_box(0.0, 1.0).update(jnp.zeros((2, 4, 3)), optax.EmptyState(), x)


def test_update_is_projection_step():
    x = jnp.array([[0.1, 0.9], [0.5, 0.5], [-0.3, 1.7]])  # the last particle starts outside
    u = jnp.array([[-0.4, 0.3], [0.25, -0.25], [0.1, 0.0]])
    new, landed = _apply(project_box(0.0, 1.0), u, x)
    np.testing.assert_allclose(np.asarray(new), np.clip(np.asarray(x + u), 0, 1) - np.asarray(x), atol=1e-15)
    np.testing.assert_array_equal(landed, [[0.0, 1.0], [0.75, 0.25], [0.0, 1.0]])
    assert new.dtype == u.dtype


# No subnormals: XLA's CPU backend flushes them to zero (numpy does not), so a subnormal bound or
# point would be compared with a different number than the library used.
FLOATS = st.floats(-1e6, 1e6, allow_nan=False, width=32, allow_subnormal=False)


# Exact landing is guaranteed when the box is wider than the float spacing at |params - bound|
# (float32 at 1e6: 0.0625); narrower boxes cannot always be hit by params + update.
@pytest.mark.x64
@given(
    x=hnp.arrays(np.float64, (6, 3), elements=FLOATS),
    u=hnp.arrays(np.float64, (6, 3), elements=FLOATS),
    lo=st.floats(-10, 10, width=32, allow_subnormal=False),
    width=st.one_of(st.just(0.125), st.floats(0.125, 10, width=32)),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_landing_is_exactly_inside_the_box(x, u, lo, width, dtype):
    x, u = jnp.asarray(x, dtype), jnp.asarray(u, dtype)
    lo = np.asarray(lo, dtype)
    hi = np.asarray(lo + width, dtype)
    new, landed = _apply(project_box(lo, hi), u, x)
    landed = np.asarray(landed)
    assert landed.dtype == dtype
    assert np.all((landed >= lo) & (landed <= hi))
    # Equal to the projection of the unconstrained step up to one rounding.
    want = np.clip(np.asarray(x) + np.asarray(u), lo, hi)
    scale = np.maximum(np.abs(np.asarray(x)), np.abs(want)) + 1.0
    assert np.all(np.abs(landed - want) <= 4 * np.finfo(dtype).eps * scale)


@pytest.mark.x64
def test_landing_near_bound_rounding_cases():
    # Many tiny/huge params with a target exactly on a non-zero bound: (hi - p) + p can round past hi.
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        p = np.concatenate([rng.uniform(-3, 0.7, 5000), -(10.0 ** rng.uniform(-12, 2, 5000))]).astype(dtype)
        p = jnp.asarray(p[:, None])
        lo, hi = dtype(0.3), dtype(0.7)
        _, landed = _apply(project_box(lo, hi), jnp.full_like(p, 100.0), p)
        assert np.all((np.asarray(landed) >= lo) & (np.asarray(landed) <= hi))
        _, landed = _apply(project_box(lo, hi), jnp.full_like(p, -100.0), p)
        assert np.all((np.asarray(landed) >= lo) & (np.asarray(landed) <= hi))


def test_pytree_params_and_jit():
    params = {"a": jnp.array([[0.5, 2.0], [0.1, 0.1]]), "b": jnp.array([[3.0], [-3.0]])}
    tr = project_box({"a": jnp.array([0.0, 0.0]), "b": -1.0}, {"a": 1.0, "b": jnp.array([[1.0], [2.0]])})
    u = jax.tree_util.tree_map(jnp.ones_like, params)
    state = tr.init(params)
    new, _ = jax.jit(tr.update)(u, state, params)
    landed = optax.apply_updates(params, new)
    np.testing.assert_array_equal(landed["a"], [[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(landed["b"], [[1.0], [-1.0]])


def test_chain_with_adam_keeps_particles_in_box():
    x = jax.random.uniform(jax.random.key(0), (16, 3))
    opt = optax.chain(optax.adam(0.1), project_box(0.0, 1.0))
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(jnp.broadcast_to(jnp.array([-1.0, 1.0, 0.0]), x.shape), s, x))
    for _ in range(30):
        upd, state = step(x, state)
        x = optax.apply_updates(x, upd)
        assert np.all((np.asarray(x) >= 0) & (np.asarray(x) <= 1))
    np.testing.assert_array_equal(x[:, 0], 1.0)  # pushed to the upper bound
    np.testing.assert_array_equal(x[:, 1], 0.0)  # pushed to the lower bound


@pytest.mark.x64
def test_sample_zdt_stays_in_box():
    prob = zdt("zdt3", num_variables=5)
    x0 = prob.init_particles(jax.random.key(0), 12, jnp.float64)
    opt = optax.chain(mj.mtsgd(2), optax.adam(1e-2), project_box(prob.lower, prob.upper))
    res = mj.sample(prob.log_probs, opt, x0, 150, trace_every=15)
    xs = np.asarray(res.trace.particles)
    assert np.all((xs >= 0.0) & (xs <= 1.0))
    f = np.asarray(jax.vmap(prob.objectives)(res.particles))
    assert np.all(np.isfinite(f))
    # The tail variables are driven out of the interior (f2's g pulls them to 0, the 4-D repulsion of
    # the parameter-space kernel pushes some to the far face) and the projection leaves each one
    # exactly on a face of the box; a good share sits at g's minimum, 0.
    tail = np.asarray(res.particles)[:, 1:]
    assert np.all((tail == 0.0) | (tail == 1.0))
    assert np.mean(tail == 0.0) > 0.25


@pytest.mark.x64
def test_sample_gradient_pushing_outside():
    # Both targets increase without bound in every coordinate: unconstrained, every particle would
    # leave [0, 1]^2 through the upper corner.
    log_probs = (lambda t: 5.0 * jnp.sum(t), lambda t: 3.0 * t[0] + 7.0 * t[1])
    x0 = jax.random.uniform(jax.random.key(1), (10, 2), jnp.float64)
    opt = optax.chain(mj.mtsgd(2), optax.adam(5e-2), project_box(0.0, 1.0))
    res = mj.sample(log_probs, opt, x0, 200, trace_every=10)
    xs = np.asarray(res.trace.particles)
    assert np.all((xs >= 0.0) & (xs <= 1.0))
    # They are held exactly on the upper bound (Adam alone would take them to about 1 + 200 * 0.05).
    assert np.mean(np.asarray(res.particles) == 1.0) > 0.5
