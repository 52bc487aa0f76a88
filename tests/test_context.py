"""The kernel execution context and the one Stein system behind every path to U.

* option misuse is an error when a transformation is built (or, for the mesh
  axis, before ``sample`` compiles), naming the option;
* every option is honoured on every path: ``block_size`` on the function-space
  (features=) path and in ``kernel_stein_discrepancy`` gives the unblocked
  results;
* the core identities in float32 as well as float64: U against a brute-force
  double sum, and MT-SGD with K = 1 against SVGD (the library's and an
  independent one).
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from jax.sharding import Mesh

import mtsgd_jax as mj
from mtsgd_jax import stein as _stein

DTYPES = [jnp.float32, jnp.float64]
H = 1.3  # fixed bandwidth of the brute-force references


def _eps(dtype):
    return float(jnp.finfo(dtype).eps)


def _one_device_mesh(*names):
    return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(names)), names)


# ---------------------------------------------------------------------------
# option misuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, where",
    [
        (lambda kernel: mj.mtsgd(2, kernel), "mtsgd"),
        (lambda kernel: mj.svgd(kernel), "svgd"),
        (lambda kernel: mj.moo_svgd(2, kernel), "moo_svgd"),
        (lambda kernel: _stein.kernel_context(kernel), "kernel_context"),
    ],
)
def test_string_kernel_is_refused_at_construction(build, where):
    with pytest.raises(TypeError, match=rf"{where}: kernel must be a RadialKernel, got 'rbf' \(str\); pass kernel=rbf\(\)"):
        build("rbf")


@pytest.mark.parametrize("fn", [mj.stein_quantities, mj.gram_matrix, mj.kernel_stein_discrepancy, mj.stein_directions])
def test_string_kernel_is_refused_by_the_functions(fn):
    x = jnp.zeros((3, 2))
    with pytest.raises(TypeError, match=rf"{fn.__name__}: kernel must be a RadialKernel"):
        fn(x, jnp.stack([x]), "rbf")


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True, "8"])
@pytest.mark.parametrize(
    "build, where",
    [
        (lambda b: mj.mtsgd(2, block_size=b), "mtsgd"),
        (lambda b: mj.mtsgd(2, block_size=b, features=lambda p: p), "mtsgd"),
        (lambda b: mj.svgd(block_size=b), "svgd"),
        (lambda b: mj.moo_svgd(2, block_size=b), "moo_svgd"),
    ],
)
def test_bad_block_size_is_refused_at_construction(build, where, block_size):
    with pytest.raises(ValueError, match=rf"{where}: block_size must be a positive int .* got {block_size!r}"):
        build(block_size)


def test_bad_block_size_is_refused_by_kernel_stein_discrepancy():
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match=r"kernel_stein_discrepancy: block_size must be a positive int .* got 0"):
        mj.kernel_stein_discrepancy(x, jnp.stack([x]), block_size=0)


@pytest.mark.parametrize("axis_name", [0, ("particles",), b"particles"])
def test_non_string_axis_name_is_refused_at_construction(axis_name):
    for build, where in [
        (lambda: mj.mtsgd(2, axis_name=axis_name), "mtsgd"),
        (lambda: mj.svgd(axis_name=axis_name), "svgd"),
        (lambda: mj.moo_svgd(2, axis_name=axis_name), "moo_svgd"),
    ]:
        with pytest.raises(TypeError, match=rf"{where}: axis_name must be the name \(str\) of the mesh axis"):
            build()


def test_weighting_errors_name_the_valid_values():
    with pytest.raises(ValueError, match=r"weighting must be one of \('stein', 'normalized', 'score'\), got 'scores'"):
        mj.mtsgd(2, weighting="scores")
    with pytest.raises(ValueError, match=r"weighting must be one of .* got \['stein'\]"):
        mj.mtsgd(2, weighting=["stein"])
    with pytest.raises(ValueError, match=r"weighting='normalized' needs diag\(U\) exactly.*\('stein', 'score'\)"):
        mj.mtsgd(2, weighting="normalized", features=lambda p: p)
    assert mj.WEIGHTINGS == ("stein", "normalized", "score")


def test_inner_products_with_block_size_or_axis_is_refused():
    x = jnp.zeros((4, 64))
    s = jnp.zeros((1, 4, 64))
    for ctx in (_stein.kernel_context(block_size=2), _stein.kernel_context(axis_name="particles")):
        with pytest.raises(ValueError, match="inner_products=True needs block_size=None and axis_name=None"):
            _stein.stein_system(x, s, ctx, inner_products=True)
        assert not _stein.use_inner_products(1, 4, 64, ctx)
    assert _stein.use_inner_products(1, 4, 64, _stein.kernel_context())


LOGPS = (lambda t: -0.5 * jnp.sum((t - 1.0) ** 2), lambda t: -0.5 * jnp.sum((t + 1.0) ** 2))
X0 = jax.random.normal(jax.random.key(0), (8, 2), jnp.float32)


def test_sample_axis_disagreeing_with_the_transformation_is_an_error():
    mesh = _one_device_mesh("particles")
    opt = optax.chain(mj.mtsgd(2, mj.rbf(H), solver="closed_form", axis_name="particles"), optax.sgd(0.1))
    match = r"sample: axis_name='other' but the optimiser's Stein stage was built with axis_name='particles'"
    with pytest.raises(ValueError, match=match):
        mj.sample(LOGPS, opt, X0, 2, mesh=mesh, axis_name="other")
    # a stage built for a mesh axis, run without a mesh
    with pytest.raises(ValueError, match=r"Stein stage was built for particles split over the mesh axis 'particles'.*pass mesh="):
        mj.sample(LOGPS, opt, X0, 2)
    # an axis without a mesh
    plain = optax.chain(mj.mtsgd(2, mj.rbf(H), solver="closed_form"), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"axis_name='particles' names a mesh axis, but no mesh was given"):
        mj.sample(LOGPS, plain, X0, 2, axis_name="particles")
    with pytest.raises(TypeError, match="sample: axis_name must be a mesh axis name"):
        mj.sample(LOGPS, plain, X0, 2, axis_name=1)


def test_sampler_axis_disagreeing_with_the_transformation_is_an_error_before_any_collective():
    opt = optax.chain(mj.moo_svgd(2, mj.rbf(H), axis_name="particles"), optax.sgd(0.1))
    algo = mj.mtsgd_sampler(LOGPS, opt, axis_name="devices")
    with pytest.raises(ValueError, match=r"mtsgd_sampler: axis_name='devices' but .* axis_name='particles'"):
        jax.eval_shape(lambda x: algo.step(algo.init(x)), X0)


def test_sample_takes_the_axis_from_the_transformation():
    """On a two-axis mesh (no single axis to fall back on) the stage's axis is used: the run equals the plain one."""
    mesh = _one_device_mesh("data", "particles")
    plain = mj.sample(LOGPS, optax.chain(mj.mtsgd(2, mj.rbf(H), solver="closed_form"), optax.sgd(0.1)), X0, 5, trace_every=5)
    opt = optax.chain(mj.mtsgd(2, mj.rbf(H), solver="closed_form", axis_name="particles"), optax.sgd(0.1))
    sharded = mj.sample(LOGPS, opt, mj.shard_particles(X0, mesh), 5, trace_every=5, mesh=mesh)
    # the same arithmetic in another program: equal up to float32 reassociation over 5 steps
    tol = 64 * float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(np.asarray(sharded.particles), np.asarray(plain.particles), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(sharded.trace.ksd), np.asarray(plain.trace.ksd), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(sharded.trace.weights), np.asarray(plain.trace.weights), rtol=tol, atol=tol)
    # without a Stein stage and without axis_name, a two-axis mesh is ambiguous
    with pytest.raises(ValueError, match=r"the mesh has the axes \('data', 'particles'\) and the optimiser names none"):
        mj.sample(LOGPS, optax.chain(mj.mgda(2), optax.sgd(0.1)), X0, 2, mesh=mesh)


def test_observe_contexts_reports_every_stage_once_per_trace():
    kernel = mj.rbf(H)
    ctx_a = _stein.kernel_context(kernel, block_size=4)
    opt = optax.chain(mj.mtsgd(2, kernel, block_size=4), optax.adam(1e-2))
    grads = jnp.stack([X0 - 1.0, X0 + 1.0])
    with _stein.observe_contexts() as seen:
        jax.eval_shape(opt.update, grads, opt.init(X0), X0)
    assert seen == [ctx_a]
    with _stein.observe_contexts(stop=True), pytest.raises(_stein.ContextFound) as found:
        opt.update(grads, opt.init(X0), X0)
    assert found.value.context == ctx_a


# ---------------------------------------------------------------------------
# every option honoured on every path
# ---------------------------------------------------------------------------


def _feature_one(p):
    return jnp.stack([jnp.tanh(p[0] + p[1]), p[2] ** 2, p[0] * p[1]])


@functools.lru_cache(maxsize=None)
def _feature_updates(weighting, block_size, bandwidth):
    t = mj.mtsgd(2, mj.rbf(bandwidth), weighting=weighting, block_size=block_size, features=lambda p: jax.vmap(_feature_one)(p))
    return t, jax.jit(t.update)


@pytest.mark.parametrize(
    "dtype, weighting, bandwidth",
    [(jnp.float32, "stein", 0.7), (jnp.float64, "stein", 0.7), (jnp.float32, "score", 0.7), (jnp.float64, "score", "median")],
)
def test_feature_path_with_block_size_equals_without(dtype, weighting, bandwidth):
    m = 11  # blocks of 4 rows: the last one padded
    x = jax.random.normal(jax.random.key(32), (m, 3), dtype)
    g = jax.random.normal(jax.random.key(33), (2, m, 3), dtype) + jnp.asarray([[[1.0]], [[-1.0]]], dtype)
    ta, ua = _feature_updates(weighting, None, bandwidth)
    tb, ub = _feature_updates(weighting, 4, bandwidth)
    upd_a, st_a = ua(g, ta.init(x), x)
    upd_b, st_b = ub(g, tb.init(x), x)
    assert upd_b.dtype == dtype
    # inner products S S^T contracted with Kmat vs Kmat S: sums of M-term products in another order
    scale = float(np.max(np.abs(np.asarray(upd_a))))
    tol = 16 * m * _eps(dtype)
    np.testing.assert_allclose(np.asarray(upd_b), np.asarray(upd_a), rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(np.asarray(st_b.weights), np.asarray(st_a.weights), rtol=tol * 100, atol=tol * 100)
    ksd_scale = float(np.max(np.abs(np.asarray(st_a.ksd))))
    np.testing.assert_allclose(np.asarray(st_b.ksd), np.asarray(st_a.ksd), rtol=tol, atol=tol * ksd_scale)
    assert float(st_b.bandwidth) == float(st_a.bandwidth)


def test_block_size_reaches_the_kernel_products_on_every_path(monkeypatch):
    calls = []
    real = _stein._kernels.kernel_products

    def spy(kernel, z, vectors, **kw):
        calls.append(kw.get("block_size"))
        return real(kernel, z, vectors, **kw)

    monkeypatch.setattr(_stein._kernels, "kernel_products", spy)
    x = jnp.zeros((6, 3))
    g = jnp.ones((2, 6, 3))
    feats = lambda p: jax.vmap(_feature_one)(p)  # noqa: E731
    for t in (mj.mtsgd(2, block_size=4, features=feats), mj.moo_svgd(2, block_size=4, features=feats), mj.mtsgd(2, block_size=4)):
        calls.clear()
        jax.eval_shape(t.update, g, t.init(x), x)
        assert calls == [4], (t, calls)
    calls.clear()
    jax.eval_shape(mj.svgd(block_size=4).update, g[0], mj.svgd().init(x), x)
    assert calls == [4]
    calls.clear()
    jax.eval_shape(functools.partial(mj.kernel_stein_discrepancy, block_size=4), x, g)
    assert calls == [4]


def test_feature_path_with_axis_name_equals_unsharded():
    mesh = _one_device_mesh("particles")
    feats = lambda p: jax.vmap(_feature_one)(p)  # noqa: E731
    x = jax.random.normal(jax.random.key(34), (8, 3))
    g = jax.random.normal(jax.random.key(35), (2, 8, 3))
    plain = mj.mtsgd(2, mj.rbf(0.7), features=feats)
    sharded = mj.mtsgd(2, mj.rbf(0.7), features=feats, axis_name="particles")
    ua, sa = jax.jit(plain.update)(g, plain.init(x), x)
    from jax.sharding import PartitionSpec as P

    from mtsgd_jax.sampling import _shard_map

    state_spec = mj.MTSGDState(P(), P(), P(), P(), P())
    in_specs = (P(None, "particles"), state_spec, P("particles"))
    fn = _shard_map(lambda g, s, x: sharded.update(g, s, x), mesh, in_specs, (P("particles"), state_spec))
    ub, sb = jax.jit(fn)(g, sharded.init(x), x)
    np.testing.assert_allclose(np.asarray(ub), np.asarray(ua), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.asarray(sb.ksd), np.asarray(sa.ksd), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, kernel", [(jnp.float32, mj.rbf(H)), (jnp.float64, mj.rbf())])
def test_kernel_stein_discrepancy_blocked_equals_unblocked(dtype, kernel):
    m = 10  # blocks of 3 rows: the last one padded
    x = jax.random.normal(jax.random.key(40), (m, 2), dtype) * 2.0
    scores = jnp.stack([-x, 1.0 - x, -(x - jnp.asarray([0.0, 3.0], dtype))])
    full = np.asarray(jax.jit(functools.partial(mj.kernel_stein_discrepancy, kernel=kernel))(x, scores))
    blocked = np.asarray(jax.jit(functools.partial(mj.kernel_stein_discrepancy, kernel=kernel, block_size=3))(x, scores))
    assert blocked.dtype == dtype
    # the same terms, summed per row block: a few ulps per term of the M^2-term sums
    bound = 16 * m * _eps(dtype) * np.max(np.abs(full))
    np.testing.assert_allclose(blocked, full, rtol=0, atol=bound)


# ---------------------------------------------------------------------------
# core identities in float32 and float64
# ---------------------------------------------------------------------------


def _brute_force_u(x, s, h):
    """U_kl = 1/M^2 sum_ab <k(., x_a) s_k(x_a) + grad_a k(., x_a), k(., x_b) s_l(x_b) + grad_b k(., x_b)>_H
    for k(a, b) = exp(-|a - b|^2 / h), one pair at a time in float64; also the sum of |terms| (error scale)."""
    x = np.asarray(x, np.float64)
    s = np.asarray(s, np.float64)
    kk, m, d = s.shape
    u = np.zeros((kk, kk))
    mag = np.zeros((kk, kk))
    for a in range(m):
        for b in range(m):
            diff = x[a] - x[b]
            r2 = diff @ diff
            kab = np.exp(-r2 / h)
            grad_b = 2.0 * diff / h * kab  # grad_{x_b} k(x_a, x_b)
            grad_a = -grad_b
            trace = kab * (2.0 * d / h - 4.0 * r2 / h**2)
            for k in range(kk):
                for l in range(kk):
                    terms = np.array([kab * s[k, a] @ s[l, b], s[k, a] @ grad_b, s[l, b] @ grad_a, trace])
                    u[k, l] += terms.sum()
                    mag[k, l] += np.abs(terms).sum()
    return u / m**2, mag / m**2


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([0.3, 1.0, 3.0]))
def test_gram_against_brute_force_double_sum(dtype, seed, spread):
    m, d, k = 7, 3, 3
    kx, ks = jax.random.split(jax.random.key(seed))
    x = (spread * jax.random.normal(kx, (m, d))).astype(dtype)
    s = jax.random.normal(ks, (k, m, d)).astype(dtype)
    u = np.asarray(_gram_fixed_h(x, s))
    assert u.dtype == dtype
    ref, mag = _brute_force_u(x, s, H)  # from the same (rounded) inputs
    # float32: each of the M^2 terms carries a few ulps (kernel values, products), summed: M^2-term bound
    np.testing.assert_allclose(u, ref, rtol=0, atol=float(8 * m * _eps(dtype) * mag.max()) + 0.0)
    np.testing.assert_allclose(u, u.T, rtol=0, atol=0)


_gram_fixed_h = jax.jit(functools.partial(mj.gram_matrix, kernel=mj.rbf(H)))


def _svgd_reference(x, score, h):
    """phi(x_b) = 1/M sum_a [k(x_a, x_b) s(x_a) + grad_{x_a} k(x_a, x_b)] in float64, and sum |terms| / M."""
    x = np.asarray(x, np.float64)
    score = np.asarray(score, np.float64)
    m = x.shape[0]
    phi = np.zeros_like(x)
    mag = np.zeros_like(x)
    for b in range(m):
        for a in range(m):
            diff = x[a] - x[b]
            kab = np.exp(-(diff @ diff) / h)
            t1, t2 = kab * score[a], -2.0 * diff / h * kab
            phi[b] += t1 + t2
            mag[b] += np.abs(t1) + np.abs(t2)
    return phi / m, mag / m


@functools.lru_cache(maxsize=None)
def _single_target_updates():
    one = mj.mtsgd(1, mj.rbf(H))
    plain = mj.svgd(mj.rbf(H))
    return one, jax.jit(one.update), plain, jax.jit(plain.update)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [2, 40])  # d = 40 >= 4 (K + 1) M: the inner-product path
def test_one_target_mtsgd_equals_svgd(dtype, d):
    m = 5
    x = jax.random.normal(jax.random.key(d), (m, d), dtype)
    g = x - 0.5  # loss gradient of N(0.5, I)
    one, one_update, plain, plain_update = _single_target_updates()
    u1, s1 = one_update(g[None], one.init(x), x)
    us, ss = plain_update(g, plain.init(x), x)
    assert u1.dtype == us.dtype == dtype
    np.testing.assert_array_equal(np.asarray(u1), np.asarray(us))  # the same system, weight 1
    np.testing.assert_array_equal(np.asarray(s1.weights), [1.0])
    np.testing.assert_array_equal(np.asarray(s1.ksd)[0], np.asarray(ss.ksd))
    phi, mag = _svgd_reference(x, -g, H)
    np.testing.assert_allclose(np.asarray(us, np.float64), -phi, rtol=0, atol=8 * m * _eps(dtype) * mag.max())
    ref_u, ref_mag = _brute_force_u(x, -g[None], H)
    np.testing.assert_allclose(float(ss.ksd), ref_u[0, 0], rtol=0, atol=8 * m * _eps(dtype) * ref_mag.max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_in_pieces_give_the_system_of_the_whole_scores(dtype):
    """Scores passed as (K, M, d_l) pieces (a network's layers) give U, the directions and the
    combined direction of the concatenated scores, on both paths, with an excluded particle."""
    m, k, widths = 5, 3, (7, 1, 56, 16)
    d = sum(widths)
    x = jax.random.normal(jax.random.key(60), (m, d), dtype)
    s = jax.random.normal(jax.random.key(61), (k, m, d), dtype) * 3.0
    s = s.at[1, 2, 45].set(jnp.nan)  # particle 2 drops out (a NaN in the third piece)
    pieces = tuple(jnp.split(s, np.cumsum(widths)[:-1], axis=2))
    w = jnp.asarray([0.2, 0.5, 0.3], dtype)
    ctx = _stein.kernel_context(mj.rbf())
    assert _stein.use_inner_products(k, m, d, ctx)

    @jax.jit
    def run(x, s, pieces, w):
        out = []
        for inner in (True, False):
            whole = _stein.stein_system(x, s, ctx, inner_products=inner)
            split = _stein.stein_system(x, pieces, ctx, inner_products=inner)
            assert isinstance(split.scaled_scores, tuple) == inner
            out.append([(a.gram(), a.direction(w), a.directions(), a.valid) for a in (whole, split)])
        return out

    scale = None
    for whole, split in run(x, s, pieces, w):
        for a, b in zip(whole, split):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            fin = np.isfinite(a)
            scale = np.abs(a[fin]).max() if a.dtype != bool else 1.0
            # the pieces' partial sums are added in a different order: a few ulps of the largest term
            np.testing.assert_allclose(b[fin], a[fin], rtol=0, atol=4 * d * _eps(dtype) * scale)
        assert not whole[3][2] and whole[3].sum() == m - 1
    with pytest.raises(ValueError, match=r"tuple of \(K, M, d_l\) pieces"):
        _stein.stein_system(x, (s, s[:, :3]), ctx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combined_direction_is_the_weighted_sum_of_the_directions(dtype):
    """SteinSystem.direction(w) = sum_k w_k Phi_k on both paths, and U = <Phi_k, Phi_l>'s pieces agree across paths."""
    m, d, k = 4, 64, 2
    x = jax.random.normal(jax.random.key(50), (m, d), dtype)
    s = jax.random.normal(jax.random.key(51), (k, m, d), dtype)
    w = jnp.asarray([0.3, 0.7], dtype)
    ctx = _stein.kernel_context(mj.rbf(H * d))

    @jax.jit
    def run(x, s, w):
        dense = _stein.stein_system(x, s, ctx, inner_products=False)
        inner = _stein.stein_system(x, s, ctx, inner_products=True)
        assert dense.kernel_matrix is None and inner.kernel_scores is None
        return dense.directions(), dense.direction(w), inner.direction(w), dense.gram(), inner.gram()

    phis, dir_dense, dir_inner, u_dense, u_inner = (np.asarray(a) for a in run(x, s, w))
    expected = np.einsum("k,kmd->md", np.asarray(w, np.float64), phis.astype(np.float64))
    tol = 16 * m * _eps(dtype) * np.abs(phis).max()
    for direction in (dir_dense, dir_inner):
        assert direction.dtype == dtype
        np.testing.assert_allclose(direction, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(u_inner, u_dense, rtol=0, atol=16 * m * d * _eps(dtype) * np.abs(u_dense).max())
