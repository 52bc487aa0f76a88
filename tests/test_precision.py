"""float32 kernel arithmetic against float64 on the same (float32-rounded) inputs.

Clusters far from the origin and tiny fixed bandwidths are where the Gram form
|x|^2 + |y|^2 - 2 x.y of the distances and the split form of the repulsion
2 (sum_a k'_a x_a - (sum_a k'_a) x_m) cancel. Every reference here is the same
computation in float64 on exactly the float32 values, so the differences are
float32 round-off only; tolerances are multiples of float32's epsilon scaled by
the quantity's conditioning (stated at each test).
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis.extra.numpy import arrays

import mtsgd_jax as mj
from mtsgd_jax import kernel_products, median_bandwidth, pairwise_sq_dists, rbf

EPS32 = float(np.finfo(np.float32).eps)

# (offset, spread): clusters of the given spread at the given distance from the origin
CLUSTERS = [(1e3, 1.0), (1e2, 0.01)]


def _cluster(offset, spread, m=30, d=2, seed=0):
    """float32 points and the same values in float64."""
    rng = np.random.default_rng(seed)
    x32 = (offset + spread * rng.normal(size=(m, d))).astype(np.float32)
    return x32, x32.astype(np.float64)


def _np_sq_dists(x):
    x = np.asarray(x, np.float64)
    return np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)


def _np_repulsion(x, h):
    """2 sum_a kappa'(r2_am) (x_a - x_m) for the RBF with bandwidth h, in float64."""
    x = np.asarray(x, np.float64)
    diff = x[:, None, :] - x[None, :, :]  # [a, m] = x_a - x_m
    dk = -np.exp(-np.sum(diff**2, -1) / h) / h
    return 2.0 * np.einsum("am,amd->md", dk, diff), 2.0 * np.einsum("am,amd->md", np.abs(dk), np.abs(diff))


def _scores(x, offset, spread):
    """Scores of three Gaussians around the cluster, (K, M, d): well conditioned weights."""
    c = np.asarray(x, np.float64) - offset
    s = -np.stack([c - spread * np.array([1.0, 0.0]), c + spread * np.array([0.0, 1.0]), 0.5 * c]) / spread**2
    return s


_sq = jax.jit(pairwise_sq_dists)
_h = jax.jit(lambda x: median_bandwidth(pairwise_sq_dists(x)))
_prod = jax.jit(kernel_products, static_argnums=0, static_argnames="block_size")
_gram = jax.jit(mj.gram_matrix, static_argnames="block_size")  # op by op, its row blocks would compile per call


@pytest.mark.x64
@pytest.mark.parametrize("offset,spread", CLUSTERS)
@pytest.mark.parametrize("d", [2, 16])
def test_pairwise_sq_dists_far_from_origin(offset, spread, d):
    x32, x64 = _cluster(offset, spread, d=d)
    ref = _np_sq_dists(x64)
    r2 = np.asarray(_sq(jnp.asarray(x32)))
    assert r2.dtype == np.float32 and np.all(np.diag(r2) == 0.0)
    if d <= 4:
        # direct differences of centred coordinates: every entry to a few ulps
        np.testing.assert_allclose(r2, ref, rtol=8 * d * EPS32, atol=0)
    else:
        # centred Gram form: absolute error a few eps times the centred squared norms
        xc = x64 - x64.mean(0)
        scale = np.max(np.sum(xc * xc, 1))
        np.testing.assert_allclose(r2, ref, rtol=0, atol=16 * d * EPS32 * scale)


@pytest.mark.x64
@pytest.mark.parametrize("offset,spread", CLUSTERS)
def test_median_bandwidth_far_from_origin(offset, spread):
    x32, x64 = _cluster(offset, spread)
    h32 = float(_h(jnp.asarray(x32)))
    h64 = float(_h(jnp.asarray(x64)))
    iu = np.triu_indices(30, 1)
    np.testing.assert_allclose(h64, np.median(_np_sq_dists(x64)[iu]) / np.log(31.0), rtol=1e-12)
    # an order statistic of entries that each carry a few ulps of error
    np.testing.assert_allclose(h32, h64, rtol=32 * EPS32)


REP_CASES = [(1e3, 1.0, None), (1e2, 0.01, None), (1.0, 1e-3, 1e-6), (1.0, 1e-4, 1e-8), (1e2, 1e-2, 1e-8)]


@pytest.mark.x64
@pytest.mark.parametrize("offset,spread,h", REP_CASES)
@pytest.mark.parametrize("block_size", [None, 7])
def test_repulsion_float32_matches_float64(offset, spread, h, block_size):
    x32, x64 = _cluster(offset, spread)
    kern = rbf() if h is None else rbf(h)
    p32 = _prod(kern, jnp.asarray(x32), jnp.ones((30, 1), jnp.float32), block_size=block_size)
    h64 = float(_prod(kern, jnp.asarray(x64), jnp.ones((30, 1)), block_size=block_size).bandwidth) if h is None else h
    ref, mag = _np_repulsion(x64, h64)
    # kappa' = -exp(-u)/h is evaluated at u carrying a relative error of a few ulps, so each
    # term carries ~ (u + 4) eps of itself; u > 40 terms vanish (exp(-40) < eps). The bound is
    # taken against sum_a |kappa'_am| |x_a - x_m|, the sum's own conditioning.
    err = np.abs(np.asarray(p32.repulsion, np.float64) - ref)
    assert np.all(err <= 64 * EPS32 * mag + 1e-30), float(np.max(err / np.maximum(mag, 1e-300)))


@pytest.mark.x64
@pytest.mark.parametrize("h", [1e-6, 1e-8])
def test_svgd_tiny_bandwidth_float32_matches_float64_and_eager_equals_jit(h):
    x32, x64 = _cluster(1.0, np.sqrt(h), m=20)
    t = mj.svgd(rbf(h))
    g32 = jnp.asarray(x32 - 1.0)  # target N(1, I)
    u_eager, _ = t.update(g32, t.init(jnp.asarray(x32)), jnp.asarray(x32))
    u_jit, _ = jax.jit(t.update)(g32, t.init(jnp.asarray(x32)), jnp.asarray(x32))
    u64, _ = jax.jit(t.update)(jnp.asarray(x64 - 1.0), t.init(jnp.asarray(x64)), jnp.asarray(x64))
    ref = np.asarray(u64)
    rep, mag = _np_repulsion(x64, h)
    # the update is (Kmat (x-1)... + R)/M: its conditioning is dominated by the repulsion's
    bound = 64 * EPS32 * (mag / 20 + np.abs(ref))
    for u in (u_eager, u_jit):
        assert np.all(np.abs(np.asarray(u, np.float64) - ref) <= bound)


_UPDATES: dict = {}


def _update(weighting="stein", block_size=None, kernel=None):
    """``(mj.mtsgd(3, kernel, ...), its jitted update)``, built once per options: cases of the same shapes
    and dtype share the compilation."""
    key = (weighting, block_size, kernel)
    if key not in _UPDATES:
        t = mj.mtsgd(3, kernel, weighting=weighting, block_size=block_size)
        _UPDATES[key] = (t, jax.jit(t.update))
    return _UPDATES[key]


@pytest.mark.x64
@pytest.mark.parametrize("offset,spread", CLUSTERS)
@pytest.mark.parametrize("block_size", [None, 8])
def test_mtsgd_update_and_gram_float32_match_float64(offset, spread, block_size):
    x32, x64 = _cluster(offset, spread)
    g64 = -_scores(x64, offset, spread)
    g32 = g64.astype(np.float32)
    g64 = g32.astype(np.float64)
    t, upd = _update(block_size=block_size)
    u32, s32 = upd(jnp.asarray(g32), t.init(jnp.asarray(x32)), jnp.asarray(x32))
    u64, s64 = upd(jnp.asarray(g64), t.init(jnp.asarray(x64)), jnp.asarray(x64))
    gram32 = np.asarray(_gram(jnp.asarray(x32), -jnp.asarray(g32), block_size=block_size), np.float64)
    gram64 = np.asarray(_gram(jnp.asarray(x64), -jnp.asarray(g64), block_size=block_size))
    # U: entries of size |S|^2 summed with kernel weights; relative to max|U| a few hundred ulps
    # (the kernel values exp(-u) carry u * eps with u up to ~ 30 over the cluster).
    scale = np.max(np.abs(gram64))
    np.testing.assert_allclose(gram32, gram64, rtol=0, atol=512 * EPS32 * scale)
    assert np.min(np.linalg.eigvalsh(gram32)) >= -512 * EPS32 * scale  # PSD to round-off
    # weights: the QP's solution moves by at most ||dU|| / (smallest eigenvalue on the face);
    # these problems have a well-separated interior optimum
    np.testing.assert_allclose(np.asarray(s32.weights), np.asarray(s64.weights), atol=2e-4)
    ref = np.asarray(u64)
    np.testing.assert_allclose(np.asarray(u32, np.float64), ref, rtol=0, atol=2e-4 * np.max(np.abs(ref)))
    np.testing.assert_allclose(np.asarray(s32.bandwidth), np.asarray(s64.bandwidth), rtol=32 * EPS32)


@pytest.mark.x64
@pytest.mark.parametrize("offset,spread", CLUSTERS)
def test_mtsgd_blocked_equals_unblocked_far_from_origin(offset, spread):
    x32, _ = _cluster(offset, spread)
    g32 = -_scores(x32, offset, spread).astype(np.float32)
    outs = []
    for block in (None, 8):
        t, upd = _update(block_size=block)
        outs.append(upd(jnp.asarray(g32), t.init(jnp.asarray(x32)), jnp.asarray(x32)))
    (ua, sa), (ub, sb) = outs
    np.testing.assert_allclose(np.asarray(ub), np.asarray(ua), rtol=0, atol=64 * EPS32 * float(jnp.max(jnp.abs(ua))))
    np.testing.assert_allclose(np.asarray(sb.weights), np.asarray(sa.weights), atol=1e-5)
    assert float(sb.bandwidth) == float(sa.bandwidth)


# ----------------------------------------------------------------------------- overflow-safe U


def _huge_grads(scale, m=20, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 2)).astype(np.float32)
    base = np.array([[1.0, 0.2], [-0.3, 1.0], [0.6, 0.6]])
    g = scale * (base[:, None, :] + 0.1 * rng.normal(size=(3, m, 2)))
    return x, g.astype(np.float32)


@pytest.mark.x64
@pytest.mark.parametrize("scale", [1e18, 3e18])
@pytest.mark.parametrize("weighting", ["stein", "normalized", "score"])
def test_huge_gradients_give_finite_simplex_weights(scale, weighting):
    x, g = _huge_grads(scale)
    t, upd = _update(weighting)
    u32, s32 = upd(jnp.asarray(g), t.init(jnp.asarray(x)), jnp.asarray(x))
    w = np.asarray(s32.weights)
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) <= 4 * EPS32
    # float64 on the same values has no overflow: the weights must agree
    u64, s64 = upd(jnp.asarray(g, jnp.float64), t.init(jnp.asarray(x, jnp.float64)), jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(w, np.asarray(s64.weights), atol=1e-4)
    assert np.all(np.isfinite(np.asarray(u32)))
    ref = np.asarray(u64)
    np.testing.assert_allclose(np.asarray(u32, np.float64), ref, rtol=0, atol=1e-4 * np.max(np.abs(ref)))
    # ksd is the true diag(U): +inf in float32 exactly where it exceeds float32's range
    k64 = np.asarray(s64.ksd)
    k32 = np.asarray(s32.ksd, np.float64)
    big = k64 > np.finfo(np.float32).max
    assert np.all(np.isinf(k32[big]))
    np.testing.assert_allclose(k32[~big], k64[~big], rtol=1e-4)


@pytest.mark.parametrize("weighting", ["stein", "normalized", "score"])
def test_tiny_gradients_give_finite_simplex_weights(weighting):
    x, g = _huge_grads(1e-30)
    t, upd = _update(weighting)
    u, s = upd(jnp.asarray(g), t.init(jnp.asarray(x)), jnp.asarray(x))
    w = np.asarray(s.weights)
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) <= 4 * EPS32
    assert np.all(np.isfinite(np.asarray(u)))


_G_MAX = float(np.float32(1e30))
_PROPERTY_UPDATES = {w: _update(w) for w in ("stein", "normalized", "score")}


@given(
    x=arrays(np.float32, (8, 2), elements=st.floats(-1000.0, 1000.0, width=32)),
    g=arrays(np.float32, (3, 8, 2), elements=st.floats(-_G_MAX, _G_MAX, width=32)),
    weighting=st.sampled_from(["stein", "normalized", "score"]),
)
def test_finite_inputs_give_finite_outputs_and_simplex_weights(x, g, weighting):
    t, upd = _PROPERTY_UPDATES[weighting]
    u, s = upd(jnp.asarray(g), t.init(jnp.asarray(x)), jnp.asarray(x))
    w = np.asarray(s.weights)
    assert w.dtype == np.float32
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(float(w.sum()) - 1) <= 4 * EPS32
    assert np.all(np.isfinite(np.asarray(u)))
    assert np.isfinite(float(s.bandwidth)) and float(s.bandwidth) > 0
    assert int(s.nonfinite) == 0
