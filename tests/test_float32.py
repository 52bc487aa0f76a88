"""The core identities in JAX's default float32 mode (x64 off), against float64 numpy references.

Everything here runs the way users run the library: ``jax_enable_x64`` off, float32 particles.
The references are written in numpy float64 from the same float32 inputs, with the RBF kernel's
derivatives in closed form (no library code), so the only differences are the library's float32
rounding. Tolerances: a few hundred float32 ulps of the scale of the summands (an entry of U or of
a Stein direction is a mean of M or M^2 terms, each of the size of |s|^2 or |s|).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtsgd_jax as mj

EPS32 = float(np.finfo(np.float32).eps)


def test_suite_runs_in_float32_mode():
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(2).dtype == jnp.float32


def _problem(seed, m, d, k):
    """float32 particles (M, d) and scores (K, M, d) of K shifted Gaussians plus noise."""
    rng = np.random.default_rng(seed)
    x = 1.5 * rng.normal(size=(m, d))
    shifts = rng.normal(size=(k, 1, d))
    s = -(x[None] - shifts) + 0.5 * rng.normal(size=(k, m, d))
    return x.astype(np.float32), s.astype(np.float32)


def _median_h(x):
    x = np.asarray(x, np.float64)
    m = x.shape[0]
    r2 = np.sum((x[:, None] - x[None]) ** 2, -1)[np.triu_indices(m, 1)]
    return float(np.median(r2) / np.log(m + 1.0))


def _rbf_reference(x, s, h):
    """float64 numpy Stein directions (K, M, d) and U (K, K) for k(a, b) = exp(-|a - b|^2 / h)."""
    x, s = np.asarray(x, np.float64), np.asarray(s, np.float64)
    m, d = x.shape
    diff = x[:, None, :] - x[None, :, :]  # [a, b] = x_a - x_b
    r2 = np.sum(diff**2, -1)
    kab = np.exp(-r2 / h)
    grad_a = -2.0 / h * kab[..., None] * diff  # d k(x_a, x_b) / d x_a
    # phi_k(x_b) = (1/M) sum_a [k(x_a, x_b) s_k(x_a) + grad_a k(x_a, x_b)]
    phi = (np.einsum("ab,kad->kbd", kab, s) + grad_a.sum(0)[None]) / m
    # U_kl = (1/M^2) sum_ab [k <s_k(a), s_l(b)> + <s_k(a), grad_b k> + <s_l(b), grad_a k> + tr(grad_a grad_b k)]
    t1 = np.einsum("ab,kad,lbd->kl", kab, s, s)
    t2 = np.einsum("kad,abd->k", s, -grad_a)[:, None]  # grad_b k = -grad_a k
    t3 = np.einsum("lbd,abd->l", s, grad_a)[None, :]
    t4 = np.sum(kab * (2.0 * d / h - 4.0 * r2 / h**2))
    return phi, (t1 + t2 + t3 + t4) / m**2


def _assert_close(got, want, scale, ulps):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps * EPS32 * scale)


@pytest.mark.parametrize("d", [3, 7])  # d <= 4: coordinate differences; d > 4: the centred Gram form
@pytest.mark.parametrize("bandwidth", ["fixed", "median"])
def test_gram_and_directions_match_float64_reference(bandwidth, d):
    x, s = _problem(0, 24, d, 3)
    if bandwidth == "fixed":
        bandwidth = 2.0 * d  # of the order of the squared distances: every pair interacts
    q = jax.jit(lambda x, s: mj.stein_quantities(x, s, mj.rbf(bandwidth)))(x, s)
    assert q.gram.dtype == q.directions.dtype == q.bandwidth.dtype == jnp.float32
    h = _median_h(x) if bandwidth == "median" else bandwidth
    np.testing.assert_allclose(float(q.bandwidth), h, rtol=16 * EPS32)
    phi, u = _rbf_reference(x, s, float(q.bandwidth))
    s_scale = float(np.max(np.abs(s)))
    _assert_close(q.directions, phi, scale=s_scale + float(np.max(np.abs(x))) / h, ulps=256)
    _assert_close(q.gram, u, scale=s_scale**2 + 1.0 / h, ulps=256)
    # U is a Gram matrix: symmetric, PSD up to its own rounding
    g = np.asarray(q.gram, np.float64)
    np.testing.assert_array_equal(g, g.T)
    assert np.min(np.linalg.eigvalsh(g)) >= -256 * EPS32 * np.max(np.abs(g))


@pytest.mark.parametrize("bandwidth", [0.7, "median"])
def test_k1_mtsgd_equals_svgd_and_the_reference(bandwidth):
    x, s = _problem(1, 16, 2, 1)
    grads = -s  # the transformations take loss gradients
    sv, mt = mj.svgd(mj.rbf(bandwidth)), mj.mtsgd(1, mj.rbf(bandwidth))
    run = jax.jit(lambda x, g: sv.update(g[0], sv.init(x), x) + mt.update(g, mt.init(x), x))
    u_sv, st_sv, u_mt, st_mt = run(x, grads)
    assert u_sv.dtype == u_mt.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(st_mt.weights), [1.0])
    phi, u = _rbf_reference(x, s, float(st_sv.bandwidth))
    scale = float(np.max(np.abs(s))) + float(np.max(np.abs(x)))
    for upd in (u_sv, u_mt):
        _assert_close(upd, -phi[0], scale=scale, ulps=256)
    _assert_close(st_sv.ksd, u[0, 0], scale=float(np.max(np.abs(s))) ** 2 + 2.0, ulps=256)


@pytest.mark.parametrize("num_targets", [2, 3])
def test_mtsgd_update_is_the_min_norm_combination(num_targets):
    """Weights on the simplex satisfying Lemma 1 at float32 tolerance; update = -sum_k w_k phi_k."""
    x, s = _problem(2 + num_targets, 20, 2, num_targets)
    opt = mj.mtsgd(num_targets)
    upd, st = jax.jit(lambda g, x: opt.update(g, opt.init(x), x))(-s, x)
    w = np.asarray(st.weights, np.float64)
    assert upd.dtype == st.weights.dtype == jnp.float32
    assert np.all(w >= 0) and abs(w.sum() - 1.0) <= 4 * num_targets * EPS32
    phi, u = _rbf_reference(x, s, float(st.bandwidth))
    # Lemma 1: (U w)_k >= w^T U w for every k, with equality where w_k > 0
    uw, wuw = u @ w, w @ u @ w
    gap_tol = 256 * EPS32 * np.max(np.abs(u))
    assert np.all(uw >= wuw - gap_tol)
    assert np.all(np.abs(uw[w > 1e-3] - wuw) <= gap_tol)
    # the objective is within float32 rounding of the best vertex or edge it could have picked
    best_vertex = np.min(np.diag(u))
    assert wuw <= best_vertex + gap_tol
    scale = float(np.max(np.abs(s))) + float(np.max(np.abs(x)))
    _assert_close(upd, -np.einsum("k,kmd->md", w, phi), scale=scale, ulps=256)


def test_sample_in_float32_keeps_dtype_and_moves_towards_the_joint_region():
    means = [jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])]
    logps = [lambda x, mu=mu: -0.5 * jnp.sum((x - mu) ** 2) for mu in means]
    x0 = 3.0 * jax.random.normal(jax.random.key(0), (32, 2))
    res = mj.sample(logps, optax.chain(mj.mtsgd(2), optax.adam(5e-2)), x0, 200)
    assert res.particles.dtype == jnp.float32
    assert int(res.nonfinite.steps) == 0 and int(res.nonfinite.first_step) == -1
    # the product of the two targets has its mode at (0.5, 0.5); the particles gather around it
    centre = np.mean(np.asarray(res.particles), axis=0)
    np.testing.assert_allclose(centre, [0.5, 0.5], atol=0.15)
    assert np.mean(np.sum((np.asarray(res.particles) - 0.5) ** 2, -1)) < np.mean(np.sum((np.asarray(x0) - 0.5) ** 2, -1)) / 4
