"""The multi-objective baselines: MGDA, MOO-SVGD and linear scalarisation.

Each is checked against an independent computation written out here (MGDA's
closed form for K = 2, MOO-SVGD by hand for M = 2 and K = 2, the feature-space
repulsion by per-particle autodiff), plus the shared transformation contract.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtsgd_jax as mj


def _mgda_k2(g1, g2):
    """Closed-form min-norm point of the segment [g1, g2]: weight on g1 and the direction."""
    diff = g1 - g2
    denom = diff @ diff
    t = 0.5 if denom == 0 else float(np.clip(-(g2 @ diff) / denom, 0.0, 1.0))
    return t, t * g1 + (1 - t) * g2


def _random_grads(seed, k, m, d):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, m, d)) * rng.uniform(0.2, 3.0, size=(k, m, 1))


# ---------------------------------------------------------------------------
# MGDA
# ---------------------------------------------------------------------------


@pytest.mark.x64
@pytest.mark.parametrize("solver", ["auto", "projected_gradient", "frank_wolfe", "osqp"])
@pytest.mark.parametrize("normalize", [False, True])
def test_mgda_k2_matches_closed_form(solver, normalize):
    g = _random_grads(0, 2, 7, 4)
    g[:, 3] = g[:, 3] * 0 + np.array([1.0, 2.0, 0.0, 0.0])  # identical task gradients at one particle
    x = np.zeros((7, 4))
    t = mj.mgda(2, solver=solver, normalize_grads=normalize)
    d, st = jax.jit(t.update)(jnp.asarray(g), t.init(x), x)
    for m in range(7):
        g1, g2 = g[0, m], g[1, m]
        if normalize:
            g1, g2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)
        w1, ref = _mgda_k2(g1, g2)
        np.testing.assert_allclose(np.asarray(d[m]), ref, rtol=1e-6, atol=1e-8)
        if not np.allclose(g1, g2):  # weights are unique only when the gradients differ
            np.testing.assert_allclose(float(st.weights[m, 0]), w1, atol=1e-6)
    chex.assert_shape(st.weights, (7, 2))


@pytest.mark.x64
def test_mgda_k3_min_norm_optimality_per_particle():
    """Lemma 1 per particle: <d, g_k> >= |d|^2 for every task, with equality on the support."""
    g = _random_grads(1, 3, 16, 5)
    x = np.zeros((16, 5))
    t = mj.mgda(3)
    d, st = jax.jit(t.update)(jnp.asarray(g), t.init(x), x)
    d, w = np.asarray(d), np.asarray(st.weights)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    for m in range(16):
        inner = g[:, m] @ d[m]
        sq = d[m] @ d[m]
        assert (inner >= sq - 1e-8 * max(1.0, sq)).all()
        np.testing.assert_allclose(inner[w[m] > 1e-6], sq, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(d[m], w[m] @ g[:, m], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["jit", "eager"])
@pytest.mark.parametrize("solver", ["auto", "frank_wolfe"])
def test_mgda_and_moo_svgd_with_huge_and_tiny_gradients(dtype, mode, solver):
    """Per-particle Grams of gradients near the top or bottom of the range (squares overflow or
    flush to zero) still give the min-norm point: the gradients are rescaled by a power of two
    per particle before the Gram is formed."""
    info = np.finfo(dtype)
    big, small = 2.0 ** (info.maxexp // 2 + 4), 2.0 ** (info.minexp // 2 - 4)  # 1e21 / 1e-21 in float32
    # particle 0: opposite gradients -> direction 0; particle 1: orthogonal tiny ones -> midpoint;
    # particle 2: [b, 0] and [b, b] -> w = [1, 0], direction [b, 0]
    g = np.zeros((2, 3, 2))
    g[0, 0], g[1, 0] = [7 * big, 0.0], [-7 * big, 0.0]
    g[0, 1], g[1, 1] = [small, 0.0], [0.0, small]
    g[0, 2], g[1, 2] = [big, 0.0], [big, big]
    expected = np.array([[0.0, 0.0], [small / 2, small / 2], [big, 0.0]])
    g = jnp.asarray(g, dtype)
    x = jnp.zeros((3, 2), dtype)
    for name, t in [("mgda", mj.mgda(2, solver=solver)), ("moo_svgd", mj.moo_svgd(2, solver=solver, repulsion=0.0))]:
        if name == "moo_svgd":  # M = 1 (no kernel mixing): the direction is the min-norm point
            g_, x_, e_ = g[:, :1], x[:1], expected[:1]
        else:
            g_, x_, e_ = g, x, expected
        update = jax.jit(t.update) if mode == "jit" else t.update
        d, _ = update(g_, t.init(x_), x_)
        d = np.asarray(d, np.float64)
        assert np.all(np.isfinite(d)), name
        scale = np.abs(np.asarray(g_, np.float64)).max(axis=(0, 2))[:, None]
        np.testing.assert_allclose(d / scale, e_ / scale, atol=16 * info.eps, err_msg=name)


def test_mgda_descends_every_loss():
    """One small MGDA step on two convex quadratics decreases both at every particle (off the front)."""
    x = jax.random.normal(jax.random.key(3), (12, 2)) * 3
    losses = (lambda p: jnp.sum((p - 1.0) ** 2), lambda p: jnp.sum((p + 1.0) ** 2))
    vals, grads = mj.loss_value_and_grads(losses, x)
    t = mj.mgda(2)
    d, _ = t.update(grads, t.init(x), x)
    new_vals, _ = mj.loss_value_and_grads(losses, x - 1e-3 * d)
    assert bool(jnp.all(new_vals < vals))


# ---------------------------------------------------------------------------
# MOO-SVGD
# ---------------------------------------------------------------------------


def _moo_svgd_by_hand(theta, g, h, alpha):
    """M = 2, K = 2, k(a, b) = exp(-|a - b|^2 / h), every term written out."""
    g_star = np.stack([_mgda_k2(g[0, m], g[1, m])[1] for m in range(2)])
    out = np.zeros_like(theta)
    for m in range(2):
        for a in range(2):
            diff = theta[a] - theta[m]
            kam = np.exp(-(diff @ diff) / h)
            grad_a = -2.0 / h * diff * kam  # d/d theta_a of k(theta_a, theta_m)
            out[m] += kam * g_star[a] - alpha * grad_a
    return out / 2


@pytest.mark.x64
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bandwidth", [0.3, "median"])
def test_moo_svgd_two_particles_two_targets_by_hand(alpha, bandwidth):
    rng = np.random.default_rng(4)
    theta = rng.normal(size=(2, 3))
    g = rng.normal(size=(2, 2, 3))
    h = bandwidth if bandwidth != "median" else np.sum((theta[0] - theta[1]) ** 2) / np.log(3.0)
    t = mj.moo_svgd(2, mj.rbf(bandwidth), repulsion=alpha)
    d, st = t.update(jnp.asarray(g), t.init(theta), jnp.asarray(theta))
    np.testing.assert_allclose(np.asarray(d), _moo_svgd_by_hand(theta, g, h, alpha), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(st.bandwidth), h, rtol=1e-12)


def test_moo_svgd_identity_features_equal_parameter_kernel():
    x = jax.random.normal(jax.random.key(5), (9, 3))
    g = jnp.asarray(_random_grads(5, 3, 9, 3))
    a = mj.moo_svgd(3)
    b = mj.moo_svgd(3, features=lambda p: p)
    da, _ = a.update(g, a.init(x), x)
    db, _ = b.update(g, b.init(x), x)
    chex.assert_trees_all_close(da, db, rtol=1e-10, atol=1e-12)


@pytest.mark.x64
def test_moo_svgd_feature_repulsion_is_pulled_back_through_the_map():
    """Repulsion at m equals -grad_{theta_m} sum_a k(F(theta_m), F(theta_a)) (others fixed), by autodiff."""
    h = 0.8
    feat_one = lambda p: jnp.stack([jnp.sin(p[0]) + p[1] ** 2, p[0] * p[2]])  # noqa: E731
    feats = jax.vmap(feat_one)
    x = jax.random.normal(jax.random.key(6), (5, 3))
    g = jnp.zeros((2, 5, 3))  # no attraction: the update is -alpha/M * repulsion
    t = mj.moo_svgd(2, mj.rbf(h), features=lambda p: feats(p), repulsion=1.0)
    d, _ = t.update(g, t.init(x), x)
    fixed = feats(x)
    for m in range(5):

        def ksum(pm, m=m):
            fm = feat_one(pm)
            return jnp.sum(jnp.exp(-jnp.sum((fm[None] - fixed) ** 2, axis=1) / h))

        rep_m = -jax.grad(ksum)(x[m])
        np.testing.assert_allclose(np.asarray(d[m]), -np.asarray(rep_m) / 5, rtol=1e-9, atol=1e-12)


def test_moo_svgd_features_receive_extra_args():
    x = jax.random.normal(jax.random.key(7), (6, 2))
    g = jnp.asarray(_random_grads(7, 2, 6, 2))
    t = mj.moo_svgd(2, features=lambda p, scale: scale * p)
    d1, _ = t.update(g, t.init(x), x, scale=1.0)
    d2, _ = mj.moo_svgd(2).update(g, t.init(x), x)
    chex.assert_trees_all_close(d1, d2, rtol=1e-10, atol=1e-12)


def test_moo_svgd_bad_features_shape():
    x = jnp.zeros((4, 2))
    t = mj.moo_svgd(2, features=lambda p: p[:3])
    with pytest.raises(ValueError, match=r"features\(params\) must return an \(M, p\) array with M=4"):
        t.update(jnp.zeros((2, 4, 2)), t.init(x), x)


def test_moo_svgd_single_particle_is_mgda():
    """With M = 1 the kernel term is k(x, x) = 1 and the repulsion vanishes."""
    x = jnp.ones((1, 3))
    g = jnp.asarray(_random_grads(8, 3, 1, 3))
    a, b = mj.moo_svgd(3), mj.mgda(3)
    chex.assert_trees_all_close(a.update(g, a.init(x), x)[0], b.update(g, b.init(x), x)[0], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# linear scalarisation
# ---------------------------------------------------------------------------


@pytest.mark.x64
def test_linear_scalarization_shared_and_per_particle():
    g = jnp.asarray(_random_grads(9, 3, 4, 2))
    x = jnp.zeros((4, 2))
    t = mj.linear_scalarization(3)
    np.testing.assert_allclose(np.asarray(t.update(g, t.init(x), x)[0]), np.asarray(g).mean(0), rtol=1e-12)
    w = np.array([0.2, 0.0, 0.8])
    t = mj.linear_scalarization(3, w)
    np.testing.assert_allclose(np.asarray(t.update(g, t.init(x), x)[0]), np.tensordot(w, np.asarray(g), 1), rtol=1e-12)
    pref = mj.preference_vectors(4, 3)
    t = mj.linear_scalarization(3, pref)
    ref = np.stack([pref[m] @ np.asarray(g)[:, m] for m in range(4)])
    np.testing.assert_allclose(np.asarray(t.update(g, t.init(x), x)[0]), ref, rtol=1e-12)


def test_linear_scalarization_validates_weights():
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\) or \(M, 3\)"):
        mj.linear_scalarization(3, [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        mj.linear_scalarization(2, [1.5, -0.5])
    t = mj.linear_scalarization(2, mj.preference_vectors(5))
    with pytest.raises(ValueError, match="weights has 5 rows but params has M=3"):
        t.init(jnp.zeros((3, 2)))


@pytest.mark.parametrize("m,k", [(1, 2), (2, 2), (7, 2), (4, 3), (10, 3), (5, 4)])
def test_preference_vectors(m, k):
    p = mj.preference_vectors(m, k)
    assert p.shape == (m, k)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p >= 0).all()
    if m > 1:
        assert len({tuple(r) for r in np.round(p, 12)}) == m  # all distinct


# ---------------------------------------------------------------------------
# shared contract: optax chains, pytrees, jit, errors
# ---------------------------------------------------------------------------

BASELINES = {
    "mgda": lambda k: mj.mgda(k),
    "moo_svgd": lambda k: mj.moo_svgd(k),
    "moo_svgd_features": lambda k: mj.moo_svgd(k, features=lambda p: jnp.concatenate([p["w"], p["b"][:, None]], 1)),
    "linear_scalarization": lambda k: mj.linear_scalarization(k),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_on_dict_particles_in_a_jitted_chain(name):
    params = {"w": jax.random.normal(jax.random.key(0), (6, 2)), "b": jnp.zeros((6,), jnp.float32)}
    losses = (
        lambda p: jnp.sum((p["w"] - 1.0) ** 2) + p["b"] ** 2,
        lambda p: jnp.sum((p["w"] + 1.0) ** 2) + (p["b"] - 1.0) ** 2,
    )
    opt = optax.chain(optax.clip_by_global_norm(10.0), BASELINES[name](2), optax.adam(1e-2))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        _, grads = mj.loss_value_and_grads(losses, params)
        upd, state = opt.update(grads, state, params)
        return optax.apply_updates(params, upd), state

    p = params
    for _ in range(3):
        p, state = step(p, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(p, params)
    chex.assert_tree_all_finite(p)
    assert not np.allclose(np.asarray(p["w"]), np.asarray(params["w"]))


@pytest.mark.parametrize("name", ["mgda", "moo_svgd", "linear_scalarization"])
def test_baselines_name_the_mismatched_axis(name):
    t = BASELINES[name](3)
    x = jnp.zeros((4, 2))
    state = t.init(x)
    with pytest.raises(ValueError, match="K=3|num_targets"):
        t.update(jnp.zeros((2, 4, 2)), state, x)
    if name != "linear_scalarization":
        with pytest.raises(ValueError, match="params"):
            t.update(jnp.zeros((3, 5, 2)), state, x)


@pytest.mark.parametrize("factory", [mj.mgda, mj.moo_svgd, mj.linear_scalarization, mj.mtsgd, mj.pareto_mtl])
@pytest.mark.parametrize("k,error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_bad_num_targets(factory, k, error):
    with pytest.raises(error, match=r"num_targets must be a positive int \(K"):
        factory(k)


@pytest.mark.parametrize("factory", [mj.mgda, mj.moo_svgd, mj.linear_scalarization, mj.mtsgd, mj.pareto_mtl])
def test_numpy_integer_num_targets_are_accepted(factory):
    # e.g. K read from an array's shape or a config loaded with numpy
    state = factory(np.int64(2)).init(jnp.zeros((3, 2)))
    assert state is not None


def test_numpy_scalar_options_are_accepted_and_bad_ones_named():
    # numpy scalars (e.g. read from a config with numpy) are numbers; bools and non-finite values
    # are refused at init (tests/test_validation.py), negative or non-numbers at once
    x = jnp.zeros((3, 2))
    mj.moo_svgd(2, repulsion=np.float32(0.5)).init(x)
    mj.pareto_mtl(2, constraint_tol=np.float64(1e-3)).init(x)
    for bad in (-1.0, np.float32(-0.5), "1", None):
        with pytest.raises(ValueError, match=r"moo_svgd: repulsion must be a non-negative number, got"):
            mj.moo_svgd(2, repulsion=bad)
        with pytest.raises(ValueError, match=r"pareto_mtl: constraint_tol must be a non-negative number, got"):
            mj.pareto_mtl(2, constraint_tol=bad)


def test_moo_svgd_bad_repulsion():
    with pytest.raises(ValueError, match="repulsion"):
        mj.moo_svgd(2, repulsion=-1.0)


def _segment_distance(x, a):
    t = np.clip(x @ a / (a @ a), -1, 1)
    return np.linalg.norm(x - t[:, None] * a, axis=1)


def _min_pair_distance(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return d[np.triu_indices(len(x), 1)].min()


@pytest.mark.slow
def test_mgda_converges_to_the_pareto_set_and_moo_svgd_keeps_particles_apart():
    """Losses |x - a|^2 and |x + a|^2: the Pareto set is the segment [-a, a].

    MGDA puts every particle on it, several on the same end point; MOO-SVGD's
    repulsion keeps the particles apart while its attraction pulls them to the
    segment (they settle where the two balance)."""
    a = jnp.array([1.0, 0.5])
    losses = (lambda p: jnp.sum((p - a) ** 2), lambda p: jnp.sum((p + a) ** 2))
    log_probs = tuple(lambda p, f=f: -f(p) for f in losses)
    x0 = jax.random.normal(jax.random.key(11), (20, 2)) * 2.0
    an = np.asarray(a)
    x_mgda = np.asarray(mj.sample(log_probs, optax.chain(mj.mgda(2), optax.sgd(0.05)), x0, 1500).particles)
    x_moo = np.asarray(mj.sample(log_probs, optax.chain(mj.moo_svgd(2), optax.sgd(0.05)), x0, 1500).particles)
    assert _segment_distance(x_mgda, an).max() < 1e-3
    assert _min_pair_distance(x_mgda) < 1e-3  # collapsed onto the segment's end points
    d0, d1 = _segment_distance(np.asarray(x0), an), _segment_distance(x_moo, an)
    assert np.median(d1) < 0.5 * np.median(d0)
    assert _min_pair_distance(x_moo) > 0.05


def test_per_particle_min_norm_is_exactly_scale_invariant():
    """The shared per-particle MGDA helper prescales each particle's gradients by a power of two:
    scaling the gradients by 2^e leaves the weights bit-identical and scales the directions by 2^e."""
    from mtsgd_jax.transforms._common import _make_solver, _per_particle_min_norm

    g = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)  # (K, M, d)
    solve = _make_solver("auto", None, 3)
    run = jax.jit(lambda g: _per_particle_min_norm(g, solve))
    w, d = run(g)
    assert w.shape == (5, 3) and d.shape == (5, 4) and w.dtype == jnp.float32
    for e in (-60, -7, 9, 60):
        w2, d2 = run(g * 2.0**e)
        np.testing.assert_array_equal(np.asarray(w2), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(d2), np.asarray(d) * np.float32(2.0**e))
