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
X0 = 1.5 * jax.random.normal(jax.random.key(0), (16, 2), jnp.float32)  # float32, the default users run
KERNEL = mj.rbf()  # median heuristic; the same kernel object for every use below
OPT = optax.chain(mj.mtsgd(2, KERNEL, solver="closed_form"), optax.adam(5e-2))
N = 20
# Float32 runs: two programs doing the same arithmetic agree up to reassociation.
EPS = float(jnp.finfo(jnp.float32).eps)
TOL = 64 * EPS
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
    assert run20.particles.shape == X0.shape and run20.particles.dtype == jnp.float32


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
    np.testing.assert_allclose(np.asarray(tr.log_prob), ref, rtol=TOL, atol=TOL)
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
    np.testing.assert_allclose(np.asarray(res.trace.particles), xs[:5], rtol=TOL, atol=TOL)

    @jax.jit
    def gram(x):
        _, g = mj.log_prob_value_and_loss_grads(LOGPS, x)
        return mj.gram_matrix(x, -g, KERNEL)

    for t in range(1, 5):
        u = np.asarray(gram(jnp.asarray(xs[t - 1])))
        np.testing.assert_allclose(np.asarray(res.trace.ksd[t]), np.diag(u), rtol=TOL)
        w1 = np.clip((u[1, 1] - u[0, 1]) / (u[0, 0] + u[1, 1] - 2 * u[0, 1]), 0.0, 1.0)
        np.testing.assert_allclose(np.asarray(res.trace.weights[t]), [w1, 1 - w1], atol=TOL)


def test_sample_equals_manual_jitted_steps(run20, manual20):
    xs, s = manual20
    np.testing.assert_allclose(np.asarray(run20.particles), xs[-1], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(run20.trace.particles), xs[::EVERY], rtol=TOL, atol=TOL)
    # opt states agree too
    for a, b in zip(jax.tree_util.tree_leaves(run20.opt_state), jax.tree_util.tree_leaves(s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)
    # and the run is not trivially short: the particles moved
    assert np.max(np.abs(xs[-1] - xs[0])) > 0.1


def test_resume_equals_one_call(run20):
    half = mj.sample(LOGPS, OPT, X0, N // 2, trace_every=EVERY)
    size = _sampling._run._cache_size()
    rest = mj.sample(LOGPS, OPT, half.particles, N // 2, opt_state=half.opt_state, trace_every=EVERY)
    assert _sampling._run._cache_size() == size  # the second half reuses the program
    np.testing.assert_allclose(np.asarray(rest.particles), np.asarray(run20.particles), rtol=TOL, atol=TOL)
    # the resumed trace starts where the first one stopped, with the carried diagnostics
    np.testing.assert_array_equal(np.asarray(rest.trace.particles[0]), np.asarray(half.particles))
    np.testing.assert_allclose(np.asarray(rest.trace.weights[0]), np.asarray(half.trace.weights[-1]))
    np.testing.assert_allclose(np.asarray(rest.trace.weights[-1]), np.asarray(run20.trace.weights[-1]), atol=TOL)
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
    np.testing.assert_allclose(np.asarray(res.particles), np.asarray(ref.particles), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(tr.ksd), np.asarray(ref.trace.ksd), rtol=TOL, atol=TOL)
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
    np.testing.assert_allclose(np.asarray(flat), np.asarray(run20.particles), rtol=TOL, atol=TOL)


# ---------------------------------------------------------------------------
# non-finite particles: counted in the loop, reported after it
# ---------------------------------------------------------------------------

import warnings  # noqa: E402

LINE_LR = 0.1
LINE_OPT = optax.chain(_sum_over_targets(), optax.sgd(LINE_LR))


def _line_logp(x):
    # log p = -(x - 5)^2 / 2 on one coordinate, NaN (with zero gradient) past x = 2
    return jnp.where(x[0] > 2.0, jnp.nan, -0.5 * (x[0] - 5.0) ** 2)


LINE_STARTS = np.array([-3.0, -2.2, -1.5, -0.7, 0.1, 0.9, 1.6, 1.2])
LINE_STEPS = 12


def _line_counts(dtype):
    """Independent simulation: per step t the particles whose log-density at x_t is NaN (x_t > 2)."""
    x = LINE_STARTS.astype(dtype)
    counts = []
    for _ in range(LINE_STEPS):
        bad = x > 2.0
        counts.append(int(bad.sum()))
        assert np.min(np.abs(x - 2.0)) > 1e-3  # no near-ties with the threshold: counts are float-exact
        x = np.where(bad, x, x + dtype(LINE_LR) * (dtype(5.0) - x))  # NaN value, zero gradient: the particle stays
    return np.array(counts), x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_nonfinite_report_counts_every_step(dtype):
    x0 = jnp.asarray(LINE_STARTS, dtype)[:, None]
    counts, x_end = _line_counts(np.dtype(dtype).type)
    with pytest.warns(mj.NonFiniteWarning) as rec:
        res = mj.sample([_line_logp], LINE_OPT, x0, LINE_STEPS, trace_every=3)
    rep = res.nonfinite
    assert isinstance(rep, mj.NonFiniteReport)
    assert int(rep.steps) == int((counts > 0).sum())
    assert int(rep.first_step) == int(np.argmax(counts > 0))
    assert int(rep.max_particles) == int(counts.max())
    assert int(rep.final_particles) == 0  # positions stay finite here: only log-densities are NaN
    # snapshot 0: non-finite initial positions (none); snapshot t: the count of the last step before it
    np.testing.assert_array_equal(np.asarray(res.trace.nonfinite), np.concatenate([[0], counts[2::3]]))
    np.testing.assert_allclose(np.asarray(res.particles[:, 0]), x_end, rtol=8 * float(jnp.finfo(dtype).eps))
    msg = str(rec[0].message)
    assert f"at {int(rep.steps)} of {LINE_STEPS} steps" in msg and f"first at step {int(rep.first_step)}" in msg
    assert "smaller step size" in msg and "log-density" in msg


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_nan_everywhere_is_reported(dtype):
    x0 = X0.astype(dtype)

    def nan_logp(x):
        return jnp.nan * jnp.sum(x)

    with pytest.warns(mj.NonFiniteWarning, match=r"at 6 of 6 steps, first at step 0"):
        res = mj.sample([nan_logp, _logp_b], OPT, x0, 6, trace_every=3)
    m = x0.shape[0]
    assert tuple(int(v) for v in res.nonfinite)[:3] == (6, 0, m)  # every log-density is NaN at every step
    # the returned positions may or may not be finite, depending on how the transformation treats NaN scores
    assert int(res.nonfinite.final_particles) == int((~np.isfinite(np.asarray(res.particles)).all(1)).sum())
    np.testing.assert_array_equal(np.asarray(res.trace.nonfinite), [0, m, m])


def test_one_nan_gradient_entry_is_counted_per_particle():
    # without a kernel (per-particle plain ascent) only the poisoned particle goes bad, at every step
    def logp(x):
        return -0.5 * jnp.sum(x**2) + jnp.where(jnp.all(x == X0[3]), jnp.nan, 0.0) * x[1]

    with pytest.warns(mj.NonFiniteWarning):
        res = mj.sample([logp], LINE_OPT, X0, 5)
    assert tuple(int(v) for v in res.nonfinite) == (5, 0, 1, 1)
    bad = ~np.isfinite(np.asarray(res.particles)).all(1)
    np.testing.assert_array_equal(np.flatnonzero(bad), [3])
    # the other particles did the same steps as without the NaN: x <- x - 0.1 x, 5 times
    np.testing.assert_allclose(np.asarray(res.particles)[~bad], np.asarray(X0)[~bad] * 0.9**5, rtol=8 * EPS)


def test_nan_gradient_through_mtsgd_is_reported():
    # with a kernel, a NaN score reaches the others through the kernel sums (or the particle is left out of
    # them, depending on the transformation): either way every step is flagged
    def logp(x):
        return _logp_a(x) + jnp.where(jnp.all(x == X0[3]), jnp.nan, 0.0) * x[1]

    res = mj.sample([logp, _logp_b], OPT, X0, 4, on_nonfinite="ignore")
    assert int(res.nonfinite.steps) == 4 and int(res.nonfinite.first_step) == 0
    assert 1 <= int(res.nonfinite.max_particles) <= X0.shape[0]


def test_on_nonfinite_modes():
    def nan_logp(x):
        return jnp.nan * jnp.sum(x)

    with pytest.raises(mj.NonFiniteError, match="first at step 0") as err:
        mj.sample([nan_logp], LINE_OPT, X0, 3, on_nonfinite="raise")
    assert isinstance(err.value, FloatingPointError)
    assert isinstance(err.value.result, mj.SampleResult) and int(err.value.result.nonfinite.steps) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = mj.sample([nan_logp], LINE_OPT, X0, 3, on_nonfinite="ignore")
        clean = mj.sample(LOGPS, OPT, X0, 3)  # a clean run warns nothing by default
    assert int(quiet.nonfinite.steps) == 3
    assert tuple(int(v) for v in clean.nonfinite) == (0, -1, 0, 0)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        mj.sample(LOGPS, OPT, X0, 3, on_nonfinite="silent")


def test_nonfinite_initial_particles_and_zero_steps():
    x0 = X0.at[2, 0].set(jnp.inf)
    with pytest.warns(mj.NonFiniteWarning, match="1 of the returned particles"):
        res = mj.sample([_logp_a], LINE_OPT, x0, 0)
    assert tuple(int(v) for v in res.nonfinite) == (0, -1, 0, 1)


def test_nonfinite_under_progress_bar(capsys):
    def nan_logp(x):
        return jnp.nan * jnp.sum(x)

    with pytest.warns(mj.NonFiniteWarning):
        res = mj.sample([nan_logp], LINE_OPT, X0, 4, progress_bar=True)
    assert int(res.nonfinite.steps) == 4
    assert "4/4" in capsys.readouterr().err
    assert not _sampling._BARS


def test_sample_traced_inside_jit():
    def nan_logp(x):
        return jnp.nan * jnp.sum(x)

    run = jax.jit(lambda x: mj.sample([nan_logp], LINE_OPT, x, 3).nonfinite)
    with pytest.warns(mj.NonFiniteWarning, match="at 3 of 3 steps"):
        rep = jax.block_until_ready(run(X0))
        jax.effects_barrier()
    assert int(rep.steps) == 3
    with pytest.raises(ValueError, match="inside jax.jit"):
        jax.jit(lambda x: mj.sample([nan_logp], LINE_OPT, x, 3, on_nonfinite="raise").particles)(X0)


# ---------------------------------------------------------------------------
# early, clear argument errors
# ---------------------------------------------------------------------------


def test_adam_before_mtsgd_is_caught_before_compiling():
    wrong = optax.chain(optax.adam(1e-2), mj.mtsgd(2, KERNEL, solver="closed_form"))
    size = _sampling._run._cache_size()
    with pytest.raises(ValueError, match="FIRST in optax.chain") as err:
        mj.sample(LOGPS, wrong, X0, 10)
    assert "opt_state[0][0].mu" in str(err.value) and "(2, 16, 2)" in str(err.value)
    assert _sampling._run._cache_size() == size  # nothing was compiled
    with pytest.raises(ValueError, match="updates shaped like the particles"):
        mj.sample(LOGPS, optax.adam(1e-2), X0, 10)


def test_mismatched_opt_state_is_caught():
    other = OPT.init(X0[:8])  # a state for 8 particles, resumed with 16
    with pytest.raises(ValueError, match="opt_state"):
        mj.sample(LOGPS, OPT, X0, 2, opt_state=other)


def test_argument_checks():
    with pytest.raises(ValueError, match="num_steps must be a non-negative int, got 2.5"):
        mj.sample(LOGPS, OPT, X0, 2.5)
    with pytest.raises(ValueError, match="num_steps"):
        mj.sample(LOGPS, OPT, X0, True)
    with pytest.raises(ValueError, match="trace_every"):
        mj.sample(LOGPS, OPT, X0, 4, trace_every=2.0)
    with pytest.raises(ValueError, match=r"trace_every=2 or num_steps=6"):
        mj.sample(LOGPS, OPT, X0, 4, trace_every=6)
    with pytest.raises(ValueError, match=r"jnp.asarray\(particles\)"):
        mj.sample(LOGPS, OPT, [[0.0, 1.0], [1.0, 2.0]], 2)
    with pytest.raises(ValueError, match="floating point"):
        mj.sample(LOGPS, OPT, jnp.zeros((4, 2), jnp.int32), 2)
    with pytest.raises(TypeError, match="GradientTransformation"):
        mj.sample(LOGPS, optax.adam, X0, 2)
    # numpy integers are accepted
    res = mj.sample(LOGPS, OPT, X0, np.int64(N), trace_every=np.int32(EVERY))
    assert res.trace.step.shape == (N // EVERY + 1,)


def test_adam_before_mtsgd_is_caught_on_a_mesh():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("particles",))
    wrong = optax.chain(optax.adam(1e-2), mj.mtsgd(2, KERNEL, solver="closed_form", axis_name="particles"))
    with pytest.raises(ValueError, match="FIRST in optax.chain"):
        mj.sample(LOGPS, wrong, mj.shard_particles(X0, mesh), 10, mesh=mesh)
