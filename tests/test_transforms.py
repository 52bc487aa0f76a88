"""The MT-SGD / SVGD optax transformations.

Compiling the transformation (and its QP solver) dominates the run time, so
the problems below share a few array shapes and transformation objects, and
their jitted ``update`` functions are cached (``_jit_update``).
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtsgd_jax as mj
from _x64 import enable_x64

# Reference identities at float64 precision; the float32 runs of the same identities are in
# tests/test_float32.py.
pytestmark = pytest.mark.x64

# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------

_JITTED = {}


def _jit_update(opt):
    """One jitted ``update`` per transformation object, so compiled programs are reused."""
    key = id(opt)
    if key not in _JITTED:
        _JITTED[key] = (opt, jax.jit(opt.update))  # keep opt alive so the id stays unique
    return _JITTED[key][1]


def _gaussian_logp(mu, cov):
    mu = np.asarray(mu, np.float64)
    prec = np.linalg.inv(np.asarray(cov, np.float64))

    def logp(x):
        diff = x - jnp.asarray(mu, x.dtype)
        return -0.5 * diff @ jnp.asarray(prec, x.dtype) @ diff

    return logp


def _gaussian_kl(m, s, mu, sigma):
    """KL(N(m, s) || N(mu, sigma)) in closed form."""
    d = len(m)
    si = np.linalg.inv(sigma)
    diff = np.asarray(mu) - np.asarray(m)
    return 0.5 * (np.trace(si @ s) + diff @ si @ diff - d + np.log(np.linalg.det(sigma)) - np.log(np.linalg.det(s)))


def _rbf_svgd_reference(x, score, h):
    """Independent SVGD step and KSD for k(a, b) = exp(-|a - b|^2 / h), plain numpy double loop.

    phi(x_b) = 1/M sum_a [k(x_a, x_b) s(x_a) + grad_{x_a} k(x_a, x_b)]
    KSD^2    = 1/M^2 sum_ab [k s_a.s_b + s_a.grad_b k + s_b.grad_a k + tr(grad_a grad_b k)]
    """
    x = np.asarray(x, np.float64)
    score = np.asarray(score, np.float64)
    m, d = x.shape
    phi = np.zeros_like(x)
    ksd = 0.0
    for b in range(m):
        for a in range(m):
            diff = x[a] - x[b]
            r2 = diff @ diff
            k = np.exp(-r2 / h)
            grad_a = -2.0 / h * diff * k  # d/dx_a exp(-|x_a - x_b|^2 / h)
            grad_b = 2.0 / h * diff * k
            trace = k * (2.0 * d / h - 4.0 * r2 / h**2)
            phi[b] += k * score[a] + grad_a
            ksd += k * score[a] @ score[b] + score[a] @ grad_b + score[b] @ grad_a + trace
    return phi / m, ksd / m**2


def _median_h(x):
    """Median heuristic over distinct pairs a < b, divided by log(M + 1)."""
    x = np.asarray(x, np.float64)
    m = len(x)
    pairs = [np.sum((x[a] - x[b]) ** 2) for a in range(m) for b in range(a + 1, m)]
    return float(np.median(pairs) / np.log(m + 1.0))


def _loss_grads(logps, particles):
    return mj.log_prob_value_and_loss_grads(logps, particles)[1]


# The common small problem: M = 12 particles in d = 3, K = 2 Gaussian targets.
LOGP_D3 = [_gaussian_logp([1.0, 0.0, -1.0], np.eye(3)), _gaussian_logp([-1.0, 1.0, 0.0], np.diag([2.0, 1.0, 0.5]))]
_grads_d3 = jax.jit(lambda x: _loss_grads(LOGP_D3, x))
with enable_x64():
    X12 = jax.random.normal(jax.random.key(4), (12, 3), jnp.float64)
    G12 = _grads_d3(X12)
OPT2 = mj.mtsgd(2)  # default kernel and solver
OPT2_CF = mj.mtsgd(2, solver="closed_form")


# ---------------------------------------------------------------------------
# K = 1 is SVGD
# ---------------------------------------------------------------------------


def _banana_logp(t):
    return -0.25 * jnp.sum(t**4) - 0.5 * (t[1] - t[0] ** 2) ** 2 + jnp.sin(t[2])


with enable_x64():
    _K1_X = 1.3 * X12[:9]
    _K1_G = jax.jit(lambda x: _loss_grads([_banana_logp], x))(_K1_X)  # grads (1, M, d)


def _k1_problem():
    return _K1_X, _K1_G


_K1_PROGRAMS = {}


def _k1_updates(bandwidth):
    """(svgd update, svgd state, mtsgd(1) update, mtsgd(1) state) for rbf(bandwidth), jitted once."""
    if bandwidth not in _K1_PROGRAMS:
        sv, mt = mj.svgd(mj.rbf(bandwidth)), mj.mtsgd(1, mj.rbf(bandwidth))

        @jax.jit
        def run(x, g):
            return sv.update(g[0], sv.init(x), x) + mt.update(g, mt.init(x), x)

        _K1_PROGRAMS[bandwidth] = run
    return _K1_PROGRAMS[bandwidth]


@pytest.mark.parametrize("bandwidth", [0.7, "median"])
def test_k1_equals_independent_svgd(bandwidth):
    x, grads = _k1_problem()
    h = _median_h(x) if bandwidth == "median" else bandwidth
    phi_ref, ksd_ref = _rbf_svgd_reference(x, -grads[0], h)
    u_sv, s_sv, u_mt, s_mt = _k1_updates(bandwidth)(x, grads)
    np.testing.assert_allclose(np.asarray(s_mt.weights), [1.0])
    for upd, st, ksd in ((u_sv, s_sv, s_sv.ksd), (u_mt, s_mt, s_mt.ksd[0])):
        assert upd.shape == x.shape and upd.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(upd), -phi_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(st.bandwidth), h, rtol=1e-12)
        np.testing.assert_allclose(float(ksd), ksd_ref, rtol=1e-10)
        assert int(st.count) == 1


def test_svgd_reference_has_teeth():
    # the comparison above is sensitive: a 1% bandwidth change is visible
    x, grads = _k1_problem()
    b, _ = _rbf_svgd_reference(x, -grads[0], 0.7 * 1.01)
    upd = _k1_updates(0.7)(x, grads)[0]
    assert np.max(np.abs(np.asarray(upd) + b)) > 1e-5


class SVGDVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_svgd_and_mtsgd1_match_reference(self):
        x, grads = _k1_problem()
        phi_ref, ksd_ref = _rbf_svgd_reference(x, -grads[0], 0.7)
        svgd = mj.svgd(mj.rbf(0.7))

        @self.variant
        def step(x, g):
            return svgd.update(g, svgd.init(x), x)

        upd, st = step(x, grads[0])
        chex.assert_shape(upd, x.shape)
        chex.assert_trees_all_close(upd, -phi_ref, rtol=1e-10, atol=1e-12)
        chex.assert_trees_all_close(st.ksd, ksd_ref, rtol=1e-10)


# ---------------------------------------------------------------------------
# K > 1 on three conflicting 2-D Gaussians: U, weights, Lemma 1, Theorem 2
# ---------------------------------------------------------------------------

GAUSS_MUS = [np.array([3.0, 0.0]), np.array([-1.0, 3.0]), np.array([1.0, 2.0])]
GAUSS_COVS = [np.eye(2), np.eye(2), 0.5 * np.eye(2)]
GAUSS_LOGPS = [_gaussian_logp(mu, c) for mu, c in zip(GAUSS_MUS, GAUSS_COVS)]
OPT3 = mj.mtsgd(3)  # default kernel and solver
_grads_gauss = jax.jit(lambda x: _loss_grads(GAUSS_LOGPS, x))


@pytest.fixture(scope="module")
def gauss():
    """M = 400 particles from N(0, I), one MT-SGD update against three Gaussians."""
    x = jax.random.normal(jax.random.key(0), (400, 2), jnp.float64)
    grads = _grads_gauss(x)
    upd, st = _jit_update(OPT3)(grads, OPT3.init(x), x)
    # Stein quantities with the same (fixed) bandwidth the update used
    kernel = mj.rbf(float(st.bandwidth))
    q = jax.jit(mj.stein_quantities, static_argnums=2)(x, -grads, kernel)
    return dict(x=x, grads=grads, upd=upd, state=st, phis=q.directions, gram=np.asarray(q.gram), quantities=q)


def test_mtsgd_update_is_weighted_stein_direction(gauss):
    upd, st, phis = gauss["upd"], gauss["state"], gauss["phis"]
    chex.assert_shape(phis, (3, 400, 2))
    ref = -np.einsum("k,kmd->md", np.asarray(st.weights), np.asarray(phis))
    chex.assert_trees_all_close(upd, ref, rtol=1e-10, atol=1e-12)
    # the weights are not a vertex here, so the combination is really exercised
    assert np.sum(np.asarray(st.weights) > 1e-3) >= 2
    assert np.max(np.abs(np.asarray(upd) + np.asarray(phis).mean(0))) > 1e-3


def test_state_ksd_and_bandwidth(gauss):
    x, st, u = gauss["x"], gauss["state"], gauss["gram"]
    chex.assert_shape(u, (3, 3))
    np.testing.assert_allclose(np.asarray(st.ksd), np.diag(u), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(gauss["quantities"].ksd), np.diag(u), rtol=1e-12)
    # the fixed-bandwidth kernel reproduces the median-heuristic update's bandwidth
    np.testing.assert_allclose(float(gauss["quantities"].bandwidth), float(st.bandwidth), rtol=0)
    np.testing.assert_allclose(float(st.bandwidth), _median_h(x), rtol=1e-10)
    assert int(st.count) == 1
    assert np.all(np.asarray(st.ksd) > 0)


def _lemma1_violation(u, w):
    uw = u @ w
    return float(np.max(w @ uw - uw))


def test_weights_on_simplex_and_satisfy_lemma1(gauss):
    st, u, phis, upd = gauss["state"], gauss["gram"], np.asarray(gauss["phis"]), np.asarray(gauss["upd"])
    w = np.asarray(st.weights)
    assert w.shape == (3,)
    assert np.all(w >= 0.0)
    np.testing.assert_allclose(w.sum(), 1.0, atol=1e-12)
    scale = np.max(np.diag(u))
    tol = 1e-6 * scale
    uw = u @ w
    vv = w @ uw
    # Lemma 1: (U w)_k >= w^T U w for every k, with equality on the support
    assert np.all(uw >= vv - tol), (uw, vv)
    for k in range(3):
        if w[k] > 1e-3:
            assert abs(uw[k] - vv) <= 1e-4 * scale, (k, uw, vv)
    # w is (nearly) the minimiser: no point of a fine simplex grid does better
    n = 200
    grid = np.array([(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)], float) / n
    assert vv <= np.min(np.einsum("nk,kl,nl->n", grid, u, grid)) + tol
    # the check has teeth: uniform weights violate Lemma 1 on this problem
    assert _lemma1_violation(u, np.full(3, 1 / 3)) > 1e-3 * scale
    # the update is the direction built from these very weights
    np.testing.assert_allclose(-upd, np.einsum("k,kmd->md", w, phis), rtol=1e-10, atol=1e-12)


def _fit_kls(particles):
    p = np.asarray(particles)
    m, s = p.mean(0), np.cov(p.T)
    return np.array([_gaussian_kl(m, s, mu, c) for mu, c in zip(GAUSS_MUS, GAUSS_COVS)])


def test_theorem2_small_step_decreases_every_kl(gauss):
    x, upd, phis = np.asarray(gauss["x"]), np.asarray(gauss["upd"]), np.asarray(gauss["phis"])
    eps = 1e-2
    kl0 = _fit_kls(x)
    kl_mt = _fit_kls(x + eps * (-upd))
    assert np.all(kl_mt < kl0 - 1e-3), kl_mt - kl0
    # teeth: the plain SVGD direction of target 1 alone helps target 1 but hurts target 2
    kl_svgd1 = _fit_kls(x + eps * phis[0])
    assert kl_svgd1[0] < kl0[0] - 1e-3
    assert np.any(kl_svgd1 > kl0 + 1e-3), kl_svgd1 - kl0


# ---------------------------------------------------------------------------
# optax composition under jit
# ---------------------------------------------------------------------------


def _run_jitted(opt, n=5, x=X12):
    """n steps of a jitted step; asserts it was traced and compiled exactly once."""
    counter = [0]

    @jax.jit
    def step(x, s):
        counter[0] += 1  # Python side effect: runs once per trace
        _, g = mj.log_prob_value_and_loss_grads(LOGP_D3, x)
        u, s = opt.update(g, s, x)
        return optax.apply_updates(x, u), s

    s = opt.init(x)
    xs = []
    for _ in range(n):
        x, s = step(x, s)
        xs.append(x)
    assert counter[0] == 1, f"step was traced {counter[0]} times"
    assert step._cache_size() == 1
    return xs, s, step


def _run_manual(ref_update, opt_state, n=5, x=X12, extra=()):
    """Reference loop with a hand-composed (jitted) update."""
    xs = []
    for t in range(n):
        g = _grads_d3(x)
        u, opt_state = ref_update(g, opt_state, x, jnp.asarray(t), *extra)
        x = x + u
        xs.append(x)
    return xs


def test_chain_clip_mtsgd_adam_under_jit():
    mt, adam = OPT2, optax.adam(1e-2)  # default QP solver inside the jitted chain
    xs, s, _ = _run_jitted(optax.chain(optax.clip_by_global_norm(1.0), mt, adam))
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(G12)))) > 2.0  # clipping is active

    def ref_update(g, st, x, t, max_norm):
        # clip by hand, then MT-SGD, then Adam, composed by hand
        smt, sad = st
        g = g * jnp.minimum(1.0, max_norm / jnp.sqrt(jnp.sum(g**2)))
        u, smt = mt.update(g, smt, x)
        u, sad = adam.update(u, sad, x)
        return u, (smt, sad)

    st0 = (mt.init(X12), adam.init(X12))
    ref_update = jax.jit(ref_update)
    ref = _run_manual(ref_update, st0, extra=(jnp.asarray(1.0),))
    for a, b in zip(xs, ref):
        chex.assert_trees_all_close(a, b, rtol=1e-9, atol=1e-12)
    chex.assert_tree_all_finite(xs[-1])
    assert np.max(np.abs(np.asarray(xs[-1]) - np.asarray(X12))) > 1e-2
    # the MT-SGD state inside the chain is carried under jit
    stein = mj.find_stein_state(s)
    assert int(stein.count) == 5
    np.testing.assert_allclose(float(jnp.sum(stein.weights)), 1.0, atol=1e-12)
    # teeth: without clipping the trajectory is different
    unclipped = _run_manual(ref_update, st0, n=2, extra=(jnp.asarray(1e9),))
    assert not np.allclose(np.asarray(unclipped[1]), np.asarray(xs[1]), rtol=1e-6)


_ADAM_REF = optax.chain(OPT2_CF, optax.scale_by_adam())


@jax.jit
def _adam_ref_update(g, st, x, t, lrs):
    """MT-SGD then Adam's scaling, then the step size lrs[t], composed by hand."""
    u, st = _ADAM_REF.update(g, st, x)
    return -lrs[t] * u, st


def test_chain_with_inject_hyperparams():
    opt = optax.chain(OPT2_CF, optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
    xs, s, step = _run_jitted(opt)
    ref = _run_manual(_adam_ref_update, _ADAM_REF.init(X12), extra=(jnp.full(5, 1e-2),))
    for a, b in zip(xs, ref):
        chex.assert_trees_all_close(a, b, rtol=1e-9, atol=1e-12)
    # the injected learning rate is live state: set it to 0 and nothing moves, no recompile
    inj = s[1]
    assert "learning_rate" in inj.hyperparams
    lr0 = jnp.zeros_like(inj.hyperparams["learning_rate"])
    frozen = (s[0], inj._replace(hyperparams={**inj.hyperparams, "learning_rate": lr0}))
    x_next, _ = step(xs[-1], frozen)
    np.testing.assert_array_equal(np.asarray(x_next), np.asarray(xs[-1]))
    assert step._cache_size() == 1


def test_chain_with_learning_rate_schedule():
    sched = optax.exponential_decay(init_value=2e-2, transition_steps=1, decay_rate=0.5)
    xs, s, _ = _run_jitted(optax.chain(OPT2_CF, optax.adam(sched)))
    lrs = jnp.asarray([sched(t) for t in range(5)], jnp.float64)
    np.testing.assert_allclose(np.asarray(lrs), 2e-2 * 0.5 ** np.arange(5), rtol=1e-6)
    ref = _run_manual(_adam_ref_update, _ADAM_REF.init(X12), extra=(lrs,))
    for a, b in zip(xs, ref):
        chex.assert_trees_all_close(a, b, rtol=1e-7, atol=1e-10)
    # the schedule matters here: step sizes halve, so late steps are much shorter than early ones
    steps = [float(np.max(np.abs(np.asarray(b) - np.asarray(a)))) for a, b in zip([X12] + xs[:-1], xs)]
    assert steps[-1] < 0.25 * steps[0]


# ---------------------------------------------------------------------------
# pytrees
# ---------------------------------------------------------------------------


def _split(x):
    """(M, 3) -> a dict pytree {"b": (M, 1), "w": (M, 2)} (tree order: b, w)."""
    return {"w": x[:, :2], "b": x[:, 2:]}


@jax.jit
def _dict_vs_flat(x):
    params = _split(x)
    # targets defined on the dict, equal to LOGP_D3 on the original vector layout
    logps = [lambda p, f=f: f(jnp.concatenate([p["w"], p["b"]])) for f in LOGP_D3]
    grads = _loss_grads(logps, params)
    upd, st = OPT2_CF.update(grads, OPT2_CF.init(params), params)
    upd_flat, st_flat = OPT2_CF.update(_loss_grads(LOGP_D3, x), OPT2_CF.init(x), x)
    phis = mj.stein_directions(params, jax.tree_util.tree_map(jnp.negative, grads))
    return params, upd, st, upd_flat, st_flat, phis


def test_dict_particles():
    params, upd, st, upd_flat, st_flat, phis = _dict_vs_flat(X12)
    chex.assert_trees_all_equal_shapes_and_dtypes(upd, params)
    chex.assert_tree_all_finite(upd)
    # the kernel acts on the concatenated particle vector: same as the flat problem
    chex.assert_trees_all_close(upd, _split(upd_flat), rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(st.weights, st_flat.weights, rtol=1e-10, atol=1e-12)
    # and equals -sum_k w_k phi_k computed on the pytree
    ref = jax.tree_util.tree_map(lambda p: -np.einsum("k,k...->...", np.asarray(st.weights), np.asarray(p)), phis)
    chex.assert_trees_all_close(upd, ref, rtol=1e-10, atol=1e-12)
    assert 1e-3 < float(st.weights[0]) < 1 - 1e-3


class _TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(4)(x)))


_MLP = _TinyMLP()
_DATA_X = jnp.linspace(-2.0, 2.0, 8)[:, None]
_DATA_Y = [jnp.sin(_DATA_X), 0.5 * _DATA_X]


def _mlp_logp(k):
    def logp(params):
        pred = _MLP.apply({"params": params}, _DATA_X)
        sq = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(params))
        return -jnp.sum((pred - _DATA_Y[k].astype(pred.dtype)) ** 2) / 0.1 - 0.5 * sq

    return logp


def test_flax_particles():
    params = mj.init_flax_particles(_MLP, jax.random.key(0), 6, _DATA_X)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    logps = [_mlp_logp(0), _mlp_logp(1)]
    chain = optax.chain(OPT2_CF, optax.adam(2e-2))

    @jax.jit
    def step(p, s):
        v, g = mj.log_prob_value_and_loss_grads(logps, p)
        u, s = chain.update(g, s, p)
        mt_u, _ = OPT2_CF.update(g, OPT2_CF.init(p), p)
        return optax.apply_updates(p, u), s, v, mt_u

    s = chain.init(params)
    p = params
    values = []
    for i in range(40):
        p, s, v, mt_u = step(p, s)
        values.append(np.asarray(v))
        if i == 0:
            # the MT-SGD update is shaped and typed like the flax params
            chex.assert_trees_all_equal_shapes_and_dtypes(mt_u, params)
            chex.assert_tree_all_finite(mt_u)
    chex.assert_trees_all_equal_shapes_and_dtypes(p, params)
    first, last = values[0].mean(1), values[-1].mean(1)  # mean log p_k over particles
    assert np.all(last > first + 1.0), (first, last)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


def test_float32_and_float64():
    x32, g32 = X12.astype(jnp.float32), G12.astype(jnp.float32)
    update = _jit_update(OPT2)
    u64, s64 = update(G12, OPT2.init(X12), X12)
    u32, s32 = update(g32, OPT2.init(x32), x32)
    assert u64.dtype == jnp.float64 and u32.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(s32):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert s64.weights.dtype == jnp.float64 and s64.ksd.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(u32), np.asarray(u64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s32.weights), np.asarray(s64.weights), atol=1e-4)
    np.testing.assert_allclose(np.asarray(s32.ksd), np.asarray(s64.ksd), rtol=1e-4)


@jax.jit
def _mixed_dtypes(x):
    params = {"a": x[:, :2].astype(jnp.float32), "b": x[:, 2:]}
    logps = [lambda p, f=f: f(jnp.concatenate([p["a"].astype(jnp.float64), p["b"]])) for f in LOGP_D3]
    grads = _loss_grads(logps, params)
    u, st = OPT2_CF.update(grads, OPT2_CF.init(params), params)
    return params, u, st


def test_mixed_dtype_pytree_keeps_leaf_dtypes():
    params, u, st = _mixed_dtypes(X12)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    assert st.weights.dtype == jnp.float64  # promoted dtype of the particles
    u_flat, _ = _jit_update(OPT2_CF)(G12, OPT2_CF.init(X12), X12)
    np.testing.assert_allclose(np.asarray(u["b"]), np.asarray(u_flat[:, 2:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(u["a"]), np.asarray(u_flat[:, :2]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# vmap over independent particle sets
# ---------------------------------------------------------------------------

with enable_x64():
    X20 = jax.random.normal(jax.random.key(9), (20, 2), jnp.float64)
    G20 = _grads_gauss(X20)


def test_vmap_over_particle_sets():
    b = 3
    xs = jnp.stack([X20 * (1.0 + 0.3 * i) + 0.5 * i for i in range(b)])
    gs = jax.vmap(_grads_gauss)(xs)

    @jax.jit
    @jax.vmap
    def batched(x, g):
        return OPT3.update(g, OPT3.init(x), x)

    ub, sb = batched(xs, gs)
    chex.assert_shape(ub, (b, 20, 2))
    chex.assert_shape(sb.weights, (b, 3))
    update = _jit_update(OPT3)
    for i in range(b):
        ui, si = update(gs[i], OPT3.init(xs[i]), xs[i])
        chex.assert_trees_all_close(ub[i], ui, rtol=1e-8, atol=1e-10)
        chex.assert_trees_all_close(sb.weights[i], si.weights, rtol=1e-8, atol=1e-10)
        chex.assert_trees_all_close(sb.bandwidth[i], si.bandwidth, rtol=1e-12)
    # the sets really are different problems
    assert not np.allclose(np.asarray(sb.weights[0]), np.asarray(sb.weights[2]), atol=1e-3)


# ---------------------------------------------------------------------------
# QP backends
# ---------------------------------------------------------------------------

_OPT3_OSQP = mj.mtsgd(3, solver="osqp")
_OPT3_FW = mj.mtsgd(3, solver="frank_wolfe", solver_options={"maxiter": 500, "tol": 1e-10})


def test_backends_agree_k3():
    ref, sref = _jit_update(OPT3)(G20, OPT3.init(X20), X20)
    assert np.sum(np.asarray(sref.weights) > 1e-3) >= 2  # a non-trivial QP
    scale = float(np.max(np.abs(np.asarray(ref))))
    for opt in (_OPT3_OSQP, _OPT3_FW):
        u, s = _jit_update(opt)(G20, opt.init(X20), X20)
        np.testing.assert_allclose(np.asarray(s.weights), np.asarray(sref.weights), atol=2e-3)
        np.testing.assert_allclose(np.asarray(u), np.asarray(ref), rtol=1e-3, atol=1e-3 * scale)


def test_backends_agree_k2_including_closed_form():
    ref, sref = _jit_update(OPT2)(G12, OPT2.init(X12), X12)
    u, s = _jit_update(OPT2_CF)(G12, OPT2_CF.init(X12), X12)
    assert 1e-3 < float(s.weights[0]) < 1 - 1e-3
    np.testing.assert_allclose(np.asarray(s.weights), np.asarray(sref.weights), atol=1e-4)
    np.testing.assert_allclose(np.asarray(u), np.asarray(ref), rtol=1e-4, atol=1e-6)
    # closed form is exact: compare with the formula on U
    um = np.asarray(mj.gram_matrix(X12, -G12))
    w1 = np.clip((um[1, 1] - um[0, 1]) / (um[0, 0] + um[1, 1] - 2 * um[0, 1]), 0, 1)
    np.testing.assert_allclose(np.asarray(s.weights), [w1, 1 - w1], atol=1e-12)


def test_custom_callable_solver():
    def uniform(u, init, maxiter, tol):
        assert maxiter == 3  # solver_options reach the callable
        return jnp.full(u.shape[:1], 1.0 / u.shape[0], u.dtype)

    opt = mj.mtsgd(2, solver=uniform, solver_options={"maxiter": 3})
    u, st = _jit_update(opt)(G12, opt.init(X12), X12)
    phis = mj.stein_directions(X12, -G12)
    chex.assert_trees_all_close(u, -np.mean(np.asarray(phis), 0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(st.weights), [0.5, 0.5], atol=1e-12)


@pytest.mark.parametrize("options", [{"maxiter": 10}, {"tol": 1e-3}, {"maxiter": 50, "tol": 1e-9}, None, {}])
def test_solver_options_accepted(options):
    # every backend takes the options and still returns optimal weights (exact up to the
    # iterative backends' tolerance: the closed form's for this K = 2 problem)
    _, s_ref = _jit_update(OPT2_CF)(G12, OPT2_CF.init(X12), X12)
    for solver in mj.SOLVERS:
        opt = mj.mtsgd(2, solver=solver, solver_options=options)
        _, s = opt.update(G12, opt.init(X12), X12)
        np.testing.assert_allclose(np.asarray(s.weights), np.asarray(s_ref.weights), atol=1e-6, err_msg=solver)


def test_solver_options_take_effect():
    _, s_ref = _jit_update(OPT2_CF)(G12, OPT2_CF.init(X12), X12)
    # one projected-gradient iteration from uniform weights cannot reach the optimum ...
    raw = mj.mtsgd(2, solver="projected_gradient", solver_options={"maxiter": 1, "polish": False}, warm_start=False)
    _, s1 = raw.update(G12, raw.init(X12), X12)
    assert np.max(np.abs(np.asarray(s1.weights) - np.asarray(s_ref.weights))) > 1e-4
    # ... but the active-set polish finishes the job from there
    polished = mj.mtsgd(2, solver="projected_gradient", solver_options={"maxiter": 1}, warm_start=False)
    _, s2 = polished.update(G12, polished.init(X12), X12)
    np.testing.assert_allclose(np.asarray(s2.weights), np.asarray(s_ref.weights), atol=1e-10)


def test_unknown_solver_or_option_raises():
    with pytest.raises(ValueError, match="solver"):
        mj.mtsgd(2, solver="newton")
    with pytest.raises(ValueError, match="learning_rate"):
        mj.mtsgd(2, solver_options={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="bogus"):
        mj.mtsgd(2, solver_options={"maxiter": 10, "bogus": 1})


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_grads_without_target_axis():
    with pytest.raises(ValueError) as err:
        OPT2.update(X12, OPT2.init(X12), X12)
    assert "grads" in str(err.value) and "K" in str(err.value)
    s = mj.svgd()
    with pytest.raises(ValueError):  # svgd wants exactly the params shape
        s.update(G12, s.init(X12), X12)


def test_k_mismatch_names_num_targets():
    g3 = jnp.stack([X12, X12, X12])
    with pytest.raises(ValueError, match="num_targets"):
        OPT2.update(g3, OPT2.init(X12), X12)


def test_m_mismatch_names_params():
    with pytest.raises(ValueError) as err:
        OPT2.update(G12[:, :5], OPT2.init(X12), X12)
    msg = str(err.value)
    assert "params" in msg and "M" in msg


def test_structure_mismatch():
    params = {"a": X12, "b": X12}
    with pytest.raises(ValueError, match="structure"):
        OPT2.update({"a": G12}, OPT2.init(params), params)


def test_empty_particle_set():
    with pytest.raises(ValueError, match="empty"):
        OPT2.init(jnp.zeros((0, 3)))
    st = OPT2.init(X12)
    with pytest.raises(ValueError, match="empty"):
        OPT2.update(jnp.zeros((2, 0, 3)), st, jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="empty"):
        mj.svgd().init({})


def test_params_none():
    with pytest.raises(ValueError, match="params"):
        OPT2.update(G12, OPT2.init(X12))
    s = mj.svgd()
    with pytest.raises(ValueError, match="params"):
        s.update(X12, s.init(X12), None)


# ---------------------------------------------------------------------------
# coincident particles and M = 1
# ---------------------------------------------------------------------------


def _min_norm_pair(s1, s2):
    diff = s1 - s2
    w1 = np.clip((s2 @ s2 - s1 @ s2) / (diff @ diff), 0.0, 1.0)
    return np.array([w1, 1.0 - w1])


@pytest.mark.parametrize("m", [1, 12])
def test_coincident_particles_reduce_to_weighted_gradient_step(m):
    point = jnp.array([0.0, 0.5, -0.5])  # between the two means: conflicting scores
    x = jnp.tile(point, (m, 1))
    g = _grads_d3(x)  # loss grads, identical across particles
    u, st = _jit_update(OPT2)(g, OPT2.init(x), x)
    chex.assert_tree_all_finite((u, st))
    scores = -np.asarray(g[:, 0])  # (K, d)
    w = np.asarray(st.weights)
    assert 1e-3 < w[0] < 1 - 1e-3  # a genuine mixture of the two scores
    # no repulsion: every particle moves along -(sum_k w_k s_k) * k(x, x), k(x, x) = 1
    ref = -(w @ scores)
    np.testing.assert_allclose(np.asarray(u), np.tile(ref, (m, 1)), rtol=1e-10, atol=1e-12)
    # the weights solve the min-norm problem of the two scores at the single point
    np.testing.assert_allclose(w, _min_norm_pair(scores[0], scores[1]), atol=1e-5)
    h = float(st.bandwidth)
    assert h > 0 and np.isfinite(h)


# ---------------------------------------------------------------------------
# weighting="normalized" / "score"
# ---------------------------------------------------------------------------


def _weighting_setup(seed=3, m=30, k=3):
    x = jax.random.normal(jax.random.key(seed), (m, 2), dtype=jnp.float64) * 2.0
    mus = jnp.array([[3.0, 0.0], [-1.0, 3.0], [1.0, -2.0]])[:k]
    scales = jnp.array([1.0, 10.0, 0.1])[:k]  # very different score magnitudes
    grads = jnp.stack([scales[i] * (x - mus[i]) for i in range(k)])  # loss grads of N(mu_i, I/scale_i)
    return x, grads


@pytest.mark.parametrize("weighting", ["normalized", "score"])
def test_weightings_give_simplex_weights_and_matching_update(weighting):
    x, grads = _weighting_setup()
    opt = mj.mtsgd(3, mj.rbf(1.5), weighting=weighting, solver="frank_wolfe", solver_options={"tol": 1e-12, "maxiter": 5000})
    upd, st = jax.jit(opt.update)(grads, opt.init(x), x)
    w = np.asarray(st.weights)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-10
    phi = np.asarray(mj.stein_directions(x, -grads, mj.rbf(1.5)))
    np.testing.assert_allclose(np.asarray(upd), -np.einsum("k,kmd->md", w, phi), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(st.ksd), np.diag(np.asarray(mj.gram_matrix(x, -grads, mj.rbf(1.5)))), rtol=1e-10)


def test_normalized_weighting_is_min_norm_of_unit_directions():
    """KKT of the QP on the correlation matrix: with c the applied weights and d_k = ||phi_k||_H,
    (U c)_k / d_k is equal on the support of c and no smaller off it; so <phi*, phi_k> > 0 for all k."""
    x, grads = _weighting_setup()
    kern = mj.rbf(1.5)
    opt = mj.mtsgd(3, kern, weighting="normalized", solver="frank_wolfe", solver_options={"tol": 1e-13, "maxiter": 20000})
    _, st = opt.update(grads, opt.init(x), x)
    u = np.asarray(mj.gram_matrix(x, -grads, kern))
    c = np.asarray(st.weights)
    d = np.sqrt(np.diag(u))
    r = (u @ c) / d
    assert np.all(u @ c > 0)
    support = c > 1e-8
    level = r[support].min()
    np.testing.assert_allclose(r[support], level, rtol=1e-6)
    assert np.all(r >= level * (1 - 1e-6))
    # differs from the exact weighting here (scores of very different scale)
    _, st_exact = mj.mtsgd(3, kern, solver="frank_wolfe").update(grads, mj.mtsgd(3).init(x), x)
    assert np.max(np.abs(np.asarray(st_exact.weights) - c)) > 1e-2


def test_score_weighting_matches_reference_formula():
    """weights = map back of argmin over the simplex of w^T G' w, G'_kl = <S_k/|S_k|, Kmat S_l/|S_l|> / M^2."""
    x, grads = _weighting_setup(m=12)
    h = 1.5
    s = -np.asarray(grads)
    r2 = ((np.asarray(x)[:, None] - np.asarray(x)[None]) ** 2).sum(-1)
    kmat = np.exp(-r2 / h)
    n = np.linalg.norm(s.reshape(3, -1), axis=1)
    sn = s / n[:, None, None]
    g = np.einsum("kad,ab,lbd->kl", sn, kmat, sn) / 12**2
    w_ref = np.asarray(mj.min_norm_weights(jnp.asarray(g), method="frank_wolfe", tol=1e-13, maxiter=20000))
    c_ref = (w_ref / n) / (w_ref / n).sum()
    opt = mj.mtsgd(3, mj.rbf(h), weighting="score", solver="frank_wolfe", solver_options={"tol": 1e-13, "maxiter": 20000})
    _, st = opt.update(grads, opt.init(x), x)
    np.testing.assert_allclose(np.asarray(st.weights), c_ref, atol=1e-6)


@pytest.mark.parametrize("weighting", ["stein", "normalized", "score"])
def test_every_weighting_is_svgd_for_one_target(weighting):
    x, grads = _weighting_setup(k=1)
    upd, _ = mj.mtsgd(1, mj.rbf(0.8), weighting=weighting).update(grads, mj.mtsgd(1).init(x), x)
    ref, _ = mj.svgd(mj.rbf(0.8)).update(grads[0], mj.svgd().init(x), x)
    np.testing.assert_allclose(np.asarray(upd), np.asarray(ref), rtol=1e-12)


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting"):
        mj.mtsgd(2, weighting="bogus")


# ---------------------------------------------------------------------------
# blocked kernel interactions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["stein", "normalized"])
def test_mtsgd_blocked_equals_unblocked(weighting):
    x = jax.random.normal(jax.random.key(21), (37, 2))
    grads = jnp.stack([x - 1.0, x + 1.0, 0.5 * x])
    a = mj.mtsgd(3, weighting=weighting)
    b = mj.mtsgd(3, weighting=weighting, block_size=8)
    ua, sa = jax.jit(a.update)(grads, a.init(x), x)
    ub, sb = jax.jit(b.update)(grads, b.init(x), x)
    chex.assert_trees_all_close(ub, ua, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(sb, sa, rtol=1e-10, atol=1e-12)


def test_svgd_and_stein_quantities_blocked():
    x = jax.random.normal(jax.random.key(22), (19, 3))
    ua, sa = jax.jit(mj.svgd().update)(x, mj.svgd().init(x), x)
    ub, sb = jax.jit(mj.svgd(block_size=4).update)(x, mj.svgd().init(x), x)
    chex.assert_trees_all_close((ub, sb), (ua, sa), rtol=1e-10, atol=1e-12)
    scores = jnp.stack([-x, 1.0 - x])
    qa = jax.jit(mj.stein_quantities)(x, scores)
    qb = jax.jit(functools.partial(mj.stein_quantities, block_size=5))(x, scores)
    chex.assert_trees_all_close(qb, qa, rtol=1e-10, atol=1e-12)


def test_moo_svgd_blocked_equals_unblocked():
    x = jax.random.normal(jax.random.key(23), (25, 2))
    grads = jnp.stack([x - 1.0, x + 1.0, 0.5 * x])
    ua, _ = jax.jit(mj.moo_svgd(3).update)(grads, mj.moo_svgd(3).init(x), x)
    ub, _ = jax.jit(mj.moo_svgd(3, block_size=6).update)(grads, mj.moo_svgd(3).init(x), x)
    chex.assert_trees_all_close(ub, ua, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# the two exact paths: Kmat @ S (small d) and inner products (d >> K M)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["stein", "normalized", "score"])
@pytest.mark.parametrize("k,m,d", [(1, 3, 64), (3, 4, 200), (7, 5, 400)])
def test_gram_path_equals_direct_path(monkeypatch, weighting, k, m, d):
    from mtsgd_jax import stein as _stein

    ctx = _stein.kernel_context()
    assert _stein.use_inner_products(k, m, d, ctx) and not _stein.use_inner_products(k, m, d, ctx._replace(block_size=8))
    x = jax.random.normal(jax.random.key(k), (m, d))
    g = jax.random.normal(jax.random.key(d), (k, m, d))
    t = mj.mtsgd(k, weighting=weighting)
    u_gram, s_gram = jax.jit(t.update)(g, t.init(x), x)
    monkeypatch.setattr(_stein, "use_inner_products", lambda *a: False)
    u_direct, s_direct = jax.jit(t.update)(g, t.init(x), x)
    chex.assert_trees_all_close(u_gram, u_direct, rtol=1e-9, atol=1e-12)
    chex.assert_trees_all_close(s_gram, s_direct, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------
# function-space kernel (features=)
# ---------------------------------------------------------------------------


def test_mtsgd_identity_features_equal_parameter_kernel():
    """U differs only by the constant trace term, so the weights and the update are the same."""
    x = jax.random.normal(jax.random.key(31), (9, 2))
    g = jnp.stack([x - 1.0, x + 1.0, 0.3 * x + jnp.array([0.0, 2.0])])
    a, b = mj.mtsgd(3), mj.mtsgd(3, features=lambda p: p)
    ua, sa = jax.jit(a.update)(g, a.init(x), x)
    ub, sb = jax.jit(b.update)(g, b.init(x), x)
    chex.assert_trees_all_close(ub, ua, rtol=1e-8, atol=1e-10)
    chex.assert_trees_all_close(sb.weights, sa.weights, rtol=1e-7, atol=1e-9)
    t = float(np.mean(np.asarray(sa.ksd) - np.asarray(sb.ksd)))
    np.testing.assert_allclose(np.asarray(sa.ksd) - np.asarray(sb.ksd), t, rtol=1e-9)  # the constant t
    assert t > 0


def test_mtsgd_feature_kernel_against_independent_computation():
    h = 0.7
    feat_one = lambda p: jnp.stack([jnp.tanh(p[0] + p[1]), p[2] ** 2, p[0] * p[1]])  # noqa: E731
    x = jax.random.normal(jax.random.key(32), (6, 3))
    g = jax.random.normal(jax.random.key(33), (2, 6, 3))
    t = mj.mtsgd(2, mj.rbf(h), features=lambda p, scale=1.0: scale * jax.vmap(feat_one)(p))
    upd, st = jax.jit(t.update)(g, t.init(x), x, scale=1.0)
    f = np.asarray(jax.vmap(feat_one)(x))
    kmat = np.exp(-np.sum((f[:, None] - f[None]) ** 2, -1) / h)
    rep = np.zeros((6, 3))
    for m in range(6):
        rep[m] = -np.asarray(jax.grad(lambda pm: jnp.sum(jnp.exp(-jnp.sum((feat_one(pm)[None] - f) ** 2, 1) / h)))(x[m]))
    s = -np.asarray(g)
    gram = np.einsum("kad,ab,lbd->kl", s, kmat, s) / 36
    c = np.einsum("kmd,md->k", s, rep) / 36
    u = gram + c[:, None] + c[None, :]
    w = np.asarray(st.weights)
    uw = u @ w
    assert np.all(uw >= w @ uw - 1e-9 * np.abs(u).max())  # Lemma 1 for this U
    phi = (kmat @ np.einsum("k,kmd->md", w, s) + rep) / 6
    np.testing.assert_allclose(np.asarray(upd), -phi, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.ksd), np.diag(u), rtol=1e-8, atol=1e-12)


def test_mtsgd_features_errors():
    with pytest.raises(ValueError, match="normalized"):
        mj.mtsgd(2, features=lambda p: p, weighting="normalized")
    x = jnp.zeros((4, 2))
    t = mj.mtsgd(2, features=lambda p: p[:2])
    with pytest.raises(ValueError, match=r"features\(params\) must return an \(M, p\) array with M=4"):
        t.update(jnp.zeros((2, 4, 2)), t.init(x), x)


# ---------------------------------------------------------------------------
# normalize_target_grads
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_normalize_target_grads_against_numpy(dtype):
    """Each (target, particle) gradient divided by its norm over every leaf together; a zero one stays zero."""
    rng = np.random.default_rng(41)
    a = rng.normal(size=(3, 4, 2)) * np.array([1e-3, 1.0, 1e3, 7.0])[None, :, None]
    b = rng.normal(size=(3, 4, 2, 2))
    a[1, 2], b[1, 2] = 0.0, 0.0  # target 1, particle 2: zero gradient
    grads = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
    a32, b32 = np.asarray(grads["a"], np.float64), np.asarray(grads["b"], np.float64)  # the values as given
    norm = np.sqrt(np.sum(a32**2, axis=2) + np.sum(b32**2, axis=(2, 3)))  # (K, M)
    safe = np.where(norm > 0, norm, 1.0)
    t = mj.transforms.normalize_target_grads()
    out, state = jax.jit(t.update)(grads, t.init(None))
    assert state == optax.EmptyState()
    eps = float(jnp.finfo(dtype).eps)
    assert out["a"].dtype == dtype and out["b"].dtype == dtype and out["b"].shape == (3, 4, 2, 2)
    # a few roundings per entry: the sum of d = 6 squares, the square root, one division
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), a32 / safe[..., None], rtol=8 * eps, atol=0)
    np.testing.assert_allclose(np.asarray(out["b"], np.float64), b32 / safe[..., None, None], rtol=8 * eps, atol=0)
    assert not np.any(np.asarray(out["a"][1, 2])) and not np.any(np.asarray(out["b"][1, 2]))
    got = np.sqrt(np.sum(np.asarray(out["a"], np.float64) ** 2, 2) + np.sum(np.asarray(out["b"], np.float64) ** 2, (2, 3)))
    expect = np.where(norm > 0, 1.0, 0.0)
    np.testing.assert_allclose(got, expect, rtol=0, atol=8 * eps)


def test_normalize_target_grads_extreme_magnitudes_float32():
    """Gradients near float32's overflow and underflow give unit vectors; a non-finite one stays in its own row."""
    g = jnp.array(
        [[[3e38, -3e38], [2e-38, 2e-38], [jnp.inf, 1.0]], [[2.0, 0.0], [0.0, -1e-30], [1.0, 1.0]]], jnp.float32
    )  # (K=2, M=3, 2); squares of 3e38 overflow, of 2e-38 underflow (XLA's CPU flushes subnormals to 0)
    t = mj.transforms.normalize_target_grads()
    out = np.asarray(jax.jit(t.update)(g, t.init(None))[0], np.float64)
    h = np.sqrt(0.5)
    eps = float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(out[0, 0], [h, -h], rtol=4 * eps)
    np.testing.assert_allclose(out[0, 1], [h, h], rtol=4 * eps)
    np.testing.assert_allclose(out[1], [[1.0, 0.0], [0.0, -1.0], [h, h]], rtol=4 * eps, atol=0)
    assert not np.all(np.isfinite(out[0, 2]))  # the infinite gradient: non-finite, and only there


def test_normalize_target_grads_makes_mtsgd_invariant_to_gradient_scale():
    """Before MT-SGD: rescaling any (target, particle) gradient by a power of two changes nothing."""
    x = jax.random.normal(jax.random.key(42), (7, 3))
    g = jnp.stack([x - 1.0, 2.0 * x + 1.0])
    scales = 2.0 ** jax.random.randint(jax.random.key(43), (2, 7, 1), -20, 20).astype(x.dtype)
    t = mj.transforms.normalize_target_grads()
    norm = jax.jit(t.update)
    n1, n2 = norm(g, t.init(None))[0], norm(g * scales, t.init(None))[0]
    np.testing.assert_array_equal(np.asarray(n1), np.asarray(n2))  # powers of two: bit for bit
    step = _jit_update(OPT2)
    u1, s1 = step(5.0 * n1, OPT2.init(x), x)
    # MT-SGD fed the unit gradients (times 5) computed independently
    unit = np.asarray(g) / np.linalg.norm(np.asarray(g), axis=-1, keepdims=True)
    u3, s3 = step(jnp.asarray(5.0 * unit), OPT2.init(x), x)
    np.testing.assert_allclose(np.asarray(u1), np.asarray(u3), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.asarray(s1.weights), np.asarray(s3.weights), rtol=1e-12, atol=1e-13)


def test_normalize_target_grads_errors():
    t = mj.transforms.normalize_target_grads()
    with pytest.raises(ValueError, match=r"grads\['b'\] has shape \(3,\); expected \(K, M, \.\.\.\)"):
        t.update({"a": jnp.zeros((2, 3, 1)), "b": jnp.zeros(3)}, t.init(None))
    with pytest.raises(ValueError, match=r"disagree on \(K, M\).*\[\(2, 3\), \(2, 4\)\]"):
        t.update([jnp.zeros((2, 3, 1)), jnp.zeros((2, 4))], t.init(None))
    with pytest.raises(ValueError, match="expected floats"):
        t.update(jnp.zeros((2, 3, 1), jnp.int32), t.init(None))
    with pytest.raises(ValueError, match="grads has no leaves"):
        t.update({}, t.init(None))
