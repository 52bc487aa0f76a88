"""The toy problem of the seed (three two-component Gaussian mixtures in 2-D), and MT-SGD on it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtsgd_jax as mj

PROB = mj.toy_problem()
_in_joint = jax.jit(PROB.in_joint_region)
MEANS = np.array(
    [
        [[4.0, -4.0], [0.0, 0.5]],
        [[-4.0, 4.0], [0.5, 0.0]],
        [[-3.0, -3.0], [0.0, 0.0]],
    ]
)
WEIGHTS = np.array([0.7, 0.3])
VAR = 0.5


def _mixture_logp(x):
    """log sum_c w_c N(x; mu_kc, 0.5 I) for each target k, written out in numpy."""
    x = np.asarray(x, np.float64)
    out = []
    for k in range(3):
        terms = [
            np.log(WEIGHTS[c]) - np.log(2 * np.pi * VAR) - np.sum((x - MEANS[k, c]) ** 2) / (2 * VAR) for c in range(2)
        ]
        out.append(np.logaddexp(*terms))
    return np.array(out)


HAND_POINTS = [(0.0, 0.0), (4.0, -4.0), (-4.0, 4.0), (-3.0, -3.0), (1.3, -0.7), (0.25, 0.25), (10.0, 10.0)]


def test_problem_constants():
    np.testing.assert_array_equal(PROB.means, MEANS)
    np.testing.assert_array_equal(PROB.weights, WEIGHTS)
    assert PROB.variance == VAR
    assert len(PROB.log_probs) == 3


@pytest.mark.x64
@pytest.mark.parametrize("point", HAND_POINTS)
def test_log_prob_matches_mixture_formula(point):
    prob = mj.toy_problem()  # built in x64 mode: float64 constants (the module's PROB has float32 ones)
    x = jnp.asarray(point, jnp.float64)
    lp = prob.log_prob(x)
    assert lp.shape == (3,)
    np.testing.assert_allclose(np.asarray(lp), _mixture_logp(point), rtol=1e-12, atol=1e-12)
    for k in range(3):
        np.testing.assert_allclose(float(prob.log_probs[k](x)), _mixture_logp(point)[k], rtol=1e-12)


@pytest.mark.parametrize("point", HAND_POINTS)
def test_log_prob_in_float32_matches_the_float64_formula(point):
    lp = PROB.log_prob(jnp.asarray(point, jnp.float32))
    assert lp.dtype == jnp.float32
    ref = _mixture_logp(point)
    # a handful of float32 roundings of terms of the size of |ref|, and a log-sum-exp
    np.testing.assert_allclose(np.asarray(lp), ref, rtol=0, atol=16 * float(np.finfo(np.float32).eps) * (np.max(np.abs(ref)) + 1))


@pytest.mark.x64
def test_log_prob_dtype_follows_input():
    assert PROB.log_prob(jnp.zeros(2, jnp.float32)).dtype == jnp.float32
    assert PROB.log_prob(jnp.zeros(2, jnp.float64)).dtype == jnp.float64
    np.testing.assert_allclose(
        np.asarray(PROB.log_prob(jnp.asarray([1.3, -0.7], jnp.float32))), _mixture_logp((1.3, -0.7)), rtol=1e-5
    )


def test_log_prob_max_against_fine_grid():
    step = 0.01
    g = np.arange(-6.0, 6.0 + step / 2, step)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1))
    grid = np.asarray(jax.jit(jax.vmap(PROB.log_prob))(pts))  # (G, 3)
    grid_max = grid.max(0)
    lmax = np.asarray(PROB.log_prob_max)
    assert lmax.shape == (3,)
    # a true maximum is never below a grid value ...
    assert np.all(lmax >= grid_max - 1e-9), lmax - grid_max
    # ... and the grid comes within its resolution (curvature 1/VAR, half-step offsets)
    assert np.all(lmax - grid_max < 2 * (step / 2) ** 2 / VAR + 1e-9), lmax - grid_max
    # the maxima sit at the major components, near (4,-4), (-4,4), (-3,-3)
    argmax = np.asarray(pts)[grid.argmax(0)]
    np.testing.assert_allclose(argmax, MEANS[:, 0], atol=0.1)


@pytest.mark.x64
def test_in_joint_region():
    pts = jnp.asarray([[0.0, 0.0], [4.0, -4.0], [-4.0, 4.0], [-3.0, -3.0], [0.2, 0.2]], jnp.float64)
    inside = np.asarray(_in_joint(pts))
    np.testing.assert_array_equal(inside, [True, False, False, False, True])
    # the threshold argument is honoured: with a tiny fraction (4,-4) qualifies too
    assert bool(_in_joint(pts[1:2], fraction=1e-20)[0])
    assert not bool(_in_joint(pts[1:2], fraction=0.01)[0])
    assert not bool(_in_joint(pts[:1], fraction=0.999)[0])
    # and equals the definition: every log p_k >= log p_k,max + log(fraction)
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(200, 2))
    lp = np.stack([_mixture_logp(p) for p in x])
    ref = np.all(lp >= np.asarray(PROB.log_prob_max) + np.log(0.01), axis=1)
    np.testing.assert_array_equal(np.asarray(_in_joint(jnp.asarray(x))), ref)
    assert 0 < ref.sum() < len(ref)


@pytest.mark.x64
def test_init_particles():
    x = PROB.init_particles(jax.random.key(0), 4000)
    assert x.shape == (4000, 2) and x.dtype == jnp.float32
    x = np.asarray(x)
    assert np.all(np.abs(x) <= 10.0)
    # clipping happens (|5 z| > 10 about 4.6% of the time) and lands exactly on the box
    clipped = np.abs(x) == 10.0
    assert 0.02 < clipped.mean() < 0.08
    # the unclipped draws look like 5 N(0, 1)
    inner = x[~clipped]
    assert abs(inner.mean()) < 0.3 and 4.0 < inner.std() < 5.0
    # deterministic given the key, different for another key, dtype argument respected
    np.testing.assert_array_equal(x, np.asarray(PROB.init_particles(jax.random.key(0), 4000)))
    assert not np.allclose(x[:50], np.asarray(PROB.init_particles(jax.random.key(1), 50)))
    assert PROB.init_particles(jax.random.key(0), 7, jnp.float64).dtype == jnp.float64


# ---------------------------------------------------------------------------
# end to end: MT-SGD gathers the particles where all three targets are likely
# ---------------------------------------------------------------------------

SEEDS = 8
OPT_EXACT = optax.chain(mj.mtsgd(3), optax.adam(3e-2))
OPT_NORMALIZED = optax.chain(mj.mtsgd(3, weighting="normalized"), optax.adam(3e-2))
OPT_SCORE = optax.chain(mj.mtsgd(3, weighting="score"), optax.adam(3e-2))


def _run_seeds(opt, seeds):
    """The issue's configuration for several seeds in ONE compiled program (vmap over seeds)."""
    x0 = jax.vmap(lambda k: PROB.init_particles(k, 50))(jax.random.split(jax.random.key(2024), seeds))
    run = jax.vmap(lambda x: mj.sample(PROB.log_prob, opt, x, 1000, trace_every=1000))
    res = run(x0)
    share0 = np.asarray(jax.vmap(_in_joint)(x0)).mean(axis=1)
    share = np.asarray(jax.vmap(_in_joint)(res.particles)).mean(axis=1)
    return res, share0, share


def _check_run(res, share0):
    assert np.all(share0 <= 0.3), share0  # the initial spread is far from the goal: the test has teeth
    assert np.all(np.isfinite(np.asarray(res.particles)))
    ksd = np.asarray(res.trace.ksd)  # (seeds, 2, K): snapshot 0 is NaN (fresh state), 1 = last step
    assert np.all(np.isnan(ksd[:, 0])) and np.all(np.isfinite(ksd[:, 1]))
    w = np.asarray(res.trace.weights[:, 1])
    assert np.all(w >= 0) and np.allclose(w.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_end_to_end_toy_problem_score_weighting():
    """The issue's criterion: 50 particles from 5 N(0, I), Adam 3e-2, 1000 steps, >= 90% of particles
    end where every target is >= 1% of its maximum -- on every seed (64 seeds measured: min 0.94)."""
    res, share0, share = _run_seeds(OPT_SCORE, SEEDS)
    print("score-weighted MT-SGD joint-region share per seed:", share0.round(2), "->", share.round(2))
    _check_run(res, share0)
    assert np.all(share >= 0.9 - 1e-6), share


@pytest.mark.slow
def test_end_to_end_toy_problem_normalized():
    """Normalized weighting, same set-up. 64 seeds measured: mean 0.92, >= 0.9 on 88% of seeds at 1000
    steps; all seeds >= 0.9 after 2000 steps."""
    res, share0, share = _run_seeds(OPT_NORMALIZED, SEEDS)
    print("normalized MT-SGD joint-region share per seed:", share0.round(2), "->", share.round(2))
    _check_run(res, share0)
    assert share.mean() >= 0.88 and np.all(share >= 0.75), share
    assert np.sum(share >= 0.9 - 1e-6) >= SEEDS // 2, share


@pytest.mark.slow
def test_end_to_end_toy_problem_exact():
    """The paper's exact weighting (the default). 64 seeds measured: mean share 0.77 (min 0.58), >= 0.9
    on only 14% of seeds: most runs stop at another Pareto-stationary set, where a cluster of
    particles stays at one target's major mode with phi* ~ 0. This guards that behaviour."""
    res, share0, share = _run_seeds(OPT_EXACT, SEEDS)
    print("exact MT-SGD joint-region share per seed:", share0.round(2), "->", share.round(2))
    _check_run(res, share0)
    assert share.mean() >= 0.7 and np.all(share >= 0.5), share


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_end_to_end_toy_problem_trace(seed):
    OPT = OPT_SCORE
    x0 = PROB.init_particles(jax.random.key(seed), 50)
    res = mj.sample(PROB.log_prob, OPT, x0, 1000, trace_every=1)
    tr = res.trace
    assert tr.particles.shape == (1001, 50, 2)
    share0 = float(np.mean(np.asarray(_in_joint(tr.particles[0]))))
    share = float(np.mean(np.asarray(_in_joint(res.particles))))
    print(f"seed {seed}: joint-region share {share0:.2f} -> {share:.2f}")
    assert share0 <= 0.3, share0  # the initial spread is far from the goal: the test has teeth
    assert share >= 0.9, share
    # diag(U) (the per-target KSD^2) of the first step vs the last step
    ksd = np.asarray(tr.ksd)
    assert np.all(ksd[-1] < ksd[1]), (ksd[1], ksd[-1])
    assert np.all(np.isfinite(np.asarray(res.particles)))
    w = np.asarray(tr.weights[1:])
    assert np.all(w >= 0) and np.allclose(w.sum(-1), 1.0, atol=1e-5)
