"""The jit-compiled sampling loop ``sample``.

Every distinct (targets, optimiser object, sizes, trace_every, progress) combination
compiles one program, so the tests share module-level targets and optimisers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtsgd_jax as mj
from mtsgd_jax import sampling as _sampling


def _logp_a(x):
    return -0.5 * jnp.sum((x - jnp.array([2.0, 0.5])) ** 2)


def _logp_b(x):
    return -jnp.sum((x - jnp.array([-1.5, 1.0])) ** 2)


LOGPS = (_logp_a, _logp_b)
X0 = 1.5 * jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
KERNEL = mj.rbf()  # median heuristic; the same kernel object for every use below
OPT = optax.chain(mj.mtsgd(2, KERNEL, solver="closed_form"), optax.adam(5e-2))
N = 20
EVERY = 5


@jax.jit
def _manual_step(x, s):
    _, g = mj.log_prob_value_and_loss_grads(LOGPS, x)
    u, s = OPT.update(g, s, x)
    return optax.apply_updates(x, u), s


@pytest.fixture(scope="module")
def run20():
    return mj.sample(LOGPS, OPT, X0, N, trace_every=EVERY)


@pytest.fixture(scope="module")
def manual20():
    """Particles after each of N manual jitted steps (index t = after t steps)."""
    x, s = X0, OPT.init(X0)
    xs = [x]
    for _ in range(N):
        x, s = _manual_step(x, s)
        xs.append(x)
    return np.stack([np.asarray(a) for a in xs]), s


def test_trace_shapes(run20):
    tr = run20.trace
    t = N // EVERY + 1
    assert isinstance(tr, mj.Trace)
    np.testing.assert_array_equal(np.asarray(tr.step), np.arange(t) * EVERY)
    assert tr.particles.shape == (t, 16, 2)
    assert tr.weights.shape == (t, 2)
    assert tr.ksd.shape == (t, 2)
    assert tr.log_prob.shape == (t, 2, 16)
    assert run20.particles.shape == X0.shape and run20.particles.dtype == jnp.float64


def test_trace_contents(run20):
    tr = run20.trace
    # snapshot 0 is the start, the last one is the result
    np.testing.assert_array_equal(np.asarray(tr.particles[0]), np.asarray(X0))
    np.testing.assert_array_equal(np.asarray(tr.particles[-1]), np.asarray(run20.particles))
    # log_prob is (K, M) at each recorded particle set
    pts = np.asarray(tr.particles)
    ref = np.stack(
        [
            -0.5 * np.sum((pts - [2.0, 0.5]) ** 2, -1),
            -np.sum((pts - [-1.5, 1.0]) ** 2, -1),
        ],
        axis=1,
    )
    np.testing.assert_allclose(np.asarray(tr.log_prob), ref, rtol=1e-12, atol=1e-12)
    # snapshot 0 holds the initial state; later ones the weights of a real step
    np.testing.assert_allclose(np.asarray(tr.weights[0]), [0.5, 0.5])
    w = np.asarray(tr.weights[1:])
    assert np.all(w >= 0) and np.allclose(w.sum(-1), 1.0)
    assert np.all(np.asarray(tr.ksd[1:]) > 0)
    # the particles moved towards the targets
    assert np.all(ref[-1].mean(-1) > ref[0].mean(-1))
    # the optimiser state carries the step count
    assert int(mj.find_stein_state(run20.opt_state).count) == N


def test_trace_diagnostics_are_those_of_the_step_leading_there(manual20):
    # with trace_every = 1, weights[t] / ksd[t] come from the update at particles[t - 1]
    res = mj.sample(LOGPS, OPT, X0, 4, trace_every=1)
    xs, _ = manual20
    np.testing.assert_allclose(np.asarray(res.trace.particles), xs[:5], rtol=1e-10, atol=1e-12)

    @jax.jit
    def gram(x):
        _, g = mj.log_prob_value_and_loss_grads(LOGPS, x)
        return mj.gram_matrix(x, -g, KERNEL)

    for t in range(1, 5):
        u = np.asarray(gram(jnp.asarray(xs[t - 1])))
        np.testing.assert_allclose(np.asarray(res.trace.ksd[t]), np.diag(u), rtol=1e-8)
        w1 = np.clip((u[1, 1] - u[0, 1]) / (u[0, 0] + u[1, 1] - 2 * u[0, 1]), 0.0, 1.0)
        np.testing.assert_allclose(np.asarray(res.trace.weights[t]), [w1, 1 - w1], atol=1e-8)


def test_sample_equals_manual_jitted_steps(run20, manual20):
    xs, s = manual20
    np.testing.assert_allclose(np.asarray(run20.particles), xs[-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(run20.trace.particles), xs[::EVERY], rtol=1e-6, atol=1e-6)
    # opt states agree too
    for a, b in zip(jax.tree_util.tree_leaves(run20.opt_state), jax.tree_util.tree_leaves(s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    # and the run is not trivially short: the particles moved
    assert np.max(np.abs(xs[-1] - xs[0])) > 0.1


def test_resume_equals_one_call(run20):
    half = mj.sample(LOGPS, OPT, X0, N // 2, trace_every=EVERY)
    size = _sampling._run._cache_size()
    rest = mj.sample(LOGPS, OPT, half.particles, N // 2, opt_state=half.opt_state, trace_every=EVERY)
    assert _sampling._run._cache_size() == size  # the second half reuses the program
    np.testing.assert_allclose(np.asarray(rest.particles), np.asarray(run20.particles), rtol=1e-10, atol=1e-12)
    # the resumed trace starts where the first one stopped, with the carried diagnostics
    np.testing.assert_array_equal(np.asarray(rest.trace.particles[0]), np.asarray(half.particles))
    np.testing.assert_allclose(np.asarray(rest.trace.weights[0]), np.asarray(half.trace.weights[-1]))
    np.testing.assert_allclose(np.asarray(rest.trace.weights[-1]), np.asarray(run20.trace.weights[-1]), atol=1e-10)
    assert int(mj.find_stein_state(rest.opt_state).count) == N
    # without opt_state the optimiser restarts (Adam moments reset): a different path
    fresh = mj.sample(LOGPS, OPT, half.particles, N // 2, trace_every=EVERY)
    assert not np.allclose(np.asarray(fresh.particles), np.asarray(run20.particles), atol=1e-6)


def test_second_call_does_not_recompile(run20):
    size = _sampling._run._cache_size()
    again = mj.sample(LOGPS, OPT, X0 + 0.25, N, trace_every=EVERY)
    # a new list holding the same functions is the same target
    again2 = mj.sample(list(LOGPS), OPT, X0, N, trace_every=EVERY)
    assert _sampling._run._cache_size() == size
    np.testing.assert_array_equal(np.asarray(again2.particles), np.asarray(run20.particles))
    assert not np.allclose(np.asarray(again.particles), np.asarray(run20.particles))


def test_new_optimizer_object_compiles_again(run20):
    # the check above has teeth: the cache does grow for a new optimiser object
    size = _sampling._run._cache_size()
    opt = optax.chain(mj.mtsgd(2, KERNEL, solver="closed_form"), optax.adam(5e-2))
    other = mj.sample(LOGPS, opt, X0, 2)
    assert _sampling._run._cache_size() == size + 1
    assert other.trace is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="divide"):
        mj.sample(LOGPS, OPT, X0, 10, trace_every=3)
    with pytest.raises(ValueError, match="num_steps"):
        mj.sample(LOGPS, OPT, X0, -1)
    with pytest.raises(ValueError, match="trace_every"):
        mj.sample(LOGPS, OPT, X0, 10, trace_every=-5)
    with pytest.raises(ValueError, match="empty"):
        mj.sample(LOGPS, OPT, jnp.zeros((0, 2)), 10)
    with pytest.raises(TypeError):
        mj.sample([], OPT, X0, 10)


def test_progress_bar_same_result(run20, capsys):
    res = mj.sample(LOGPS, OPT, X0, N, trace_every=EVERY, progress_bar=True)
    np.testing.assert_array_equal(np.asarray(res.particles), np.asarray(run20.particles))
    np.testing.assert_array_equal(np.asarray(res.trace.weights), np.asarray(run20.trace.weights))
    err = capsys.readouterr().err
    assert "sampling" in err and f"{N}/{N}" in err
    assert not _sampling._BARS  # the bar was closed and unregistered


def _sum_over_targets():
    """A stateless stage that reduces (K, M, ...) loss gradients to (M, ...): no Stein stage."""
    return optax.stateless(lambda g, p=None: jax.tree_util.tree_map(lambda a: jnp.sum(a, 0), g))


PLAIN = optax.chain(_sum_over_targets(), optax.adam(5e-2))


def test_optimizer_without_stein_stage_gives_nan_diagnostics():
    res = mj.sample(LOGPS, PLAIN, X0, 10, trace_every=5)
    assert res.trace.weights.shape == (3, 2) and res.trace.ksd.shape == (3, 2)
    assert np.all(np.isnan(np.asarray(res.trace.weights)))
    assert np.all(np.isnan(np.asarray(res.trace.ksd)))
    assert np.all(np.isfinite(np.asarray(res.particles)))
    assert mj.find_stein_state(res.opt_state) is None
    # it is plain gradient ascent on the summed log-densities: it moved
    assert np.max(np.abs(np.asarray(res.particles - X0))) > 0.1


def test_svgd_through_sample():
    svgd_opt = optax.chain(mj.svgd(KERNEL), optax.adam(5e-2))
    res = mj.sample([_logp_a], svgd_opt, X0, 10, trace_every=5)
    tr = res.trace
    assert tr.weights.shape == (3, 1) and tr.ksd.shape == (3, 1) and tr.log_prob.shape == (3, 1, 16)
    np.testing.assert_array_equal(np.asarray(tr.weights), np.ones((3, 1)))
    assert np.all(np.asarray(tr.ksd[1:]) > 0)
    assert isinstance(mj.find_stein_state(res.opt_state), mj.SVGDState)
    # identical to MT-SGD with K = 1
    mt_opt = optax.chain(mj.mtsgd(1, KERNEL), optax.adam(5e-2))
    ref = mj.sample([_logp_a], mt_opt, X0, 10, trace_every=5)
    np.testing.assert_allclose(np.asarray(res.particles), np.asarray(ref.particles), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(tr.ksd), np.asarray(ref.trace.ksd), rtol=1e-12, atol=1e-14)
    # particles moved towards the target mean (2, 0.5)
    before = np.linalg.norm(np.asarray(X0).mean(0) - [2.0, 0.5])
    after = np.linalg.norm(np.asarray(res.particles).mean(0) - [2.0, 0.5])
    assert after < before


def test_no_trace_and_zero_steps():
    res = mj.sample(LOGPS, OPT, X0, 0)
    assert res.trace is None
    np.testing.assert_array_equal(np.asarray(res.particles), np.asarray(X0))


def test_pytree_particles_through_sample(run20):
    params = {"a": X0[:, :1], "b": X0[:, 1]}
    logps = [lambda p, f=f: f(jnp.concatenate([p["a"], p["b"][None]])) for f in LOGPS]
    res = mj.sample(logps, OPT, params, N, trace_every=EVERY)
    assert res.trace.particles["a"].shape == (N // EVERY + 1, 16, 1)
    assert res.trace.particles["b"].shape == (N // EVERY + 1, 16)
    assert res.trace.log_prob.shape == (N // EVERY + 1, 2, 16)
    flat = jnp.concatenate([res.particles["a"], res.particles["b"][:, None]], axis=1)
    np.testing.assert_allclose(np.asarray(flat), np.asarray(run20.particles), rtol=1e-9, atol=1e-12)
