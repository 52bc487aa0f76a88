"""The blackjax-style ``mtsgd_sampler``: ``init`` / ``step`` pure functions, and ``sample`` built on them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mtsgd_jax as mj
from mtsgd_jax import algorithm as _algorithm

PROB = mj.toy_problem()
OPT = optax.chain(mj.mtsgd(3), optax.adam(3e-2))
ALGO = mj.mtsgd_sampler(PROB.log_prob, OPT)
STEP = jax.jit(ALGO.step)
N = 12
DTYPES = [jnp.float32, jnp.float64]


def _tol(dtype, steps=N):
    # every step is the same computation; round-off may differ per fusion: a few ulps per step, relative to |x| ~ 1
    return 32 * steps * float(jnp.finfo(dtype).eps)


def _x0(dtype, m=16, seed=0):
    return PROB.init_particles(jax.random.key(seed), m).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_loop_equals_sample_step_for_step(dtype):
    x0 = _x0(dtype)
    res = mj.sample(PROB.log_prob, OPT, x0, N, trace_every=1)
    state = ALGO.init(x0)
    assert isinstance(state, mj.SamplerState) and state.master is None
    tol = _tol(dtype)
    for t in range(N):
        state, info = STEP(state)
        assert state.particles.dtype == dtype
        np.testing.assert_allclose(np.asarray(state.particles), np.asarray(res.trace.particles[t + 1]), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(info.weights), np.asarray(res.trace.weights[t + 1]), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(info.ksd), np.asarray(res.trace.ksd[t + 1]), rtol=tol, atol=tol)
        assert int(info.nonfinite) == int(res.trace.nonfinite[t + 1]) == 0
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(res.opt_state)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)
    assert int(mj.find_stein_state(state.opt_state).count) == N
    # not a trivial run: the particles moved
    assert float(jnp.max(jnp.abs(state.particles - x0))) > 0.1


@pytest.mark.x64
def test_step_scanned_equals_python_loop():
    x0 = _x0(jnp.float64)

    @jax.jit
    def run(x):
        state, infos = jax.lax.scan(lambda s, _: ALGO.step(s), ALGO.init(x), None, length=5)
        return state, infos

    state, infos = run(x0)
    ref = ALGO.init(x0)
    for t in range(5):
        ref, info = STEP(ref)
        np.testing.assert_allclose(np.asarray(infos.log_prob[t]), np.asarray(info.log_prob), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state.particles), np.asarray(ref.particles), rtol=_tol(jnp.float64, 5), atol=_tol(jnp.float64, 5))
    assert infos.log_prob.shape == (5, 3, 16) and infos.weights.shape == (5, 3) and infos.nonfinite.shape == (5,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_info_is_measured_at_the_start_of_the_step(dtype):
    x0 = _x0(dtype)
    state = ALGO.init(x0)
    new, info = STEP(state)
    # log_prob at the particles the step started from, against a direct evaluation
    ref = np.asarray(jax.jit(jax.vmap(PROB.log_prob))(x0)).T
    assert info.log_prob.shape == (3, 16) and info.log_prob.dtype == dtype
    np.testing.assert_allclose(np.asarray(info.log_prob), ref, rtol=8 * float(jnp.finfo(dtype).eps), atol=8 * float(jnp.finfo(dtype).eps))
    # weights / ksd are the ones the step stored in the optimiser state
    stein = mj.find_stein_state(new.opt_state)
    np.testing.assert_array_equal(np.asarray(info.weights), np.asarray(stein.weights))
    np.testing.assert_array_equal(np.asarray(info.ksd), np.asarray(stein.ksd))
    np.testing.assert_allclose(float(jnp.sum(info.weights)), 1.0, rtol=4 * float(jnp.finfo(dtype).eps) * 3)
    # diag(U) against the Stein Gram matrix computed independently from the scores
    u = jax.jit(lambda x: mj.gram_matrix(x, -mj.log_prob_value_and_loss_grads(PROB.log_prob, x)[1], mj.rbf()))(x0)
    np.testing.assert_allclose(np.asarray(info.ksd), np.diag(np.asarray(u)), rtol=1e3 * float(jnp.finfo(dtype).eps))


def _logp_a(x, shift):
    return -0.5 * jnp.sum((x - shift) ** 2)


def _logp_b(x, shift):
    return -jnp.sum((x + shift) ** 2)


@pytest.mark.x64
def test_step_args_reach_the_targets():
    # a data argument passed through step equals the same value closed over
    opt = optax.chain(mj.mtsgd(2, solver="closed_form"), optax.sgd(0.1))
    shift = jnp.array([1.0, -0.5])
    with_arg = mj.mtsgd_sampler([_logp_a, _logp_b], opt)
    closed = mj.mtsgd_sampler([lambda x: _logp_a(x, shift), lambda x: _logp_b(x, shift)], opt)
    x0 = _x0(jnp.float64)
    a, ia = jax.jit(with_arg.step)(with_arg.init(x0), shift)
    b, ib = jax.jit(closed.step)(closed.init(x0))
    np.testing.assert_array_equal(np.asarray(a.particles), np.asarray(b.particles))
    np.testing.assert_array_equal(np.asarray(ia.log_prob), np.asarray(ib.log_prob))


def test_master_copy_matches_sample():
    x0 = _x0(jnp.float32).astype(jnp.bfloat16)
    algo = mj.mtsgd_sampler(PROB.log_prob, OPT, master_dtype=jnp.float32)
    state = algo.init(x0)
    assert state.master.dtype == jnp.float32 and state.particles.dtype == jnp.bfloat16
    step = jax.jit(algo.step)
    for _ in range(4):
        state, info = step(state)
    assert state.particles.dtype == jnp.bfloat16 and state.master.dtype == jnp.float32
    # the particles are the cast of the master copy
    np.testing.assert_array_equal(np.asarray(state.particles), np.asarray(state.master.astype(jnp.bfloat16)))
    assert info.weights.dtype == jnp.float32
    res = mj.sample(PROB.log_prob, OPT, x0, 4, master_dtype=jnp.float32)
    np.testing.assert_allclose(
        np.asarray(res.particles, np.float32), np.asarray(state.particles, np.float32), rtol=2 ** -7, atol=2 ** -7
    )


@pytest.mark.x64
def test_pytree_particles_and_resume():
    params = {"a": _x0(jnp.float64)[:, :1], "b": _x0(jnp.float64)[:, 1]}
    logp = lambda p: PROB.log_prob(jnp.concatenate([p["a"], p["b"][None]]))  # noqa: E731
    algo = mj.mtsgd_sampler(logp, OPT)
    state = algo.init(params)
    step = jax.jit(algo.step)
    for _ in range(3):
        state, _ = step(state)
    flat = ALGO.init(_x0(jnp.float64))
    for _ in range(3):
        flat, _ = STEP(flat)
    got = jnp.concatenate([state.particles["a"], state.particles["b"][:, None]], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(flat.particles), rtol=1e-12, atol=1e-12)
    # init(particles, opt_state) resumes: the state is used as given
    resumed = algo.init(state.particles, state.opt_state)
    assert resumed.opt_state is state.opt_state


def test_nonfinite_counts_in_step():
    # log p is NaN for the particles with x0 > 1 (value only) and has a NaN gradient at the origin (score only)
    def logp(x):
        r = jnp.sqrt(jnp.sum(x**2))  # d r / d x = x / r is NaN at the origin
        return jnp.where(x[0] > 1.0, jnp.nan, -r)[None]

    x0 = jnp.array([[0.0, 0.0], [2.0, 0.0], [3.0, 1.0], [-1.0, 0.5], [0.2, -0.3]])
    opt = optax.chain(mj.linear_scalarization(1), optax.sgd(0.1))
    algo = mj.mtsgd_sampler(logp, opt)
    _, info = jax.jit(algo.step)(algo.init(x0))
    assert int(info.nonfinite) == 3  # the origin (gradient) and the two with x0 > 1 (value)


def test_errors_are_early_and_clear():
    x0 = _x0(jnp.float32)
    wrong = mj.mtsgd_sampler(PROB.log_prob, optax.chain(optax.adam(1e-2), mj.mtsgd(3)))
    with pytest.raises(ValueError, match="FIRST in optax.chain") as err:
        jax.jit(wrong.step)(wrong.init(x0))
    assert "mu" in str(err.value) and "(3, 16, 2)" in str(err.value)
    # a stage that reduces nothing: updates keep the target axis
    keep_k = mj.mtsgd_sampler(PROB.log_prob, optax.sgd(0.1))
    with pytest.raises(ValueError, match="updates shaped like the particles"):
        jax.jit(keep_k.step)(keep_k.init(x0))
    with pytest.raises(TypeError, match="GradientTransformation"):
        mj.mtsgd_sampler(PROB.log_prob, optax.adam)
    with pytest.raises(ValueError, match="master_dtype"):
        mj.mtsgd_sampler(PROB.log_prob, OPT, master_dtype=jnp.int32)
    with pytest.raises(TypeError):
        mj.mtsgd_sampler([], OPT)


def _nonfinite_ref(x, values, grads):
    bad = ~np.isfinite(x).reshape(x.shape[0], -1).all(1)
    bad |= ~np.isfinite(values).all(0)
    bad |= ~np.isfinite(grads).reshape(grads.shape[0], grads.shape[1], -1).all((0, 2))
    return bad


_MASK = jax.jit(_algorithm.nonfinite_mask)
_COUNT = jax.jit(_algorithm.count_nonfinite)


@given(
    bad=st.lists(
        st.tuples(st.sampled_from(["x", "v", "g"]), st.integers(0, 1000), st.sampled_from([np.nan, np.inf, -np.inf])),
        max_size=6,
    ),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_nonfinite_mask_matches_reference(bad, dtype, seed):
    m, k, d = 6, 2, 3  # fixed sizes: one compilation per dtype
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, d)).astype(dtype)
    values = rng.normal(size=(k, m)).astype(dtype)
    grads = rng.normal(size=(k, m, d)).astype(dtype)
    arrays = {"x": x, "v": values, "g": grads}
    for which, pos, val in bad:
        a = arrays[which]
        a.reshape(-1)[pos % a.size] = val
    ref = _nonfinite_ref(x, values, grads)
    got = np.asarray(_MASK(jnp.asarray(x), jnp.asarray(values), jnp.asarray(grads)))
    np.testing.assert_array_equal(got, ref)
    assert int(_COUNT(jnp.asarray(x), jnp.asarray(values), jnp.asarray(grads))) == int(ref.sum())
    # a pytree of particles: the mask is per particle over all leaves
    y = rng.normal(size=(m, 2, 2)).astype(dtype)
    y[rng.integers(m), 1, 0] = np.nan
    tree = {"p": jnp.asarray(x), "q": jnp.asarray(y)}
    np.testing.assert_array_equal(np.asarray(_MASK(tree)), ~(np.isfinite(x).all(1) & np.isfinite(y).reshape(m, -1).all(1)))
