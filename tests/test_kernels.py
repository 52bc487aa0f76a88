"""Radial kernels: values, profile derivatives, distances, median bandwidth, kernel matrices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given
from hypothesis.extra.numpy import arrays

from mtsgd_jax import imq, kernel_matrices, kernel_products, kernels, median_bandwidth, pairwise_sq_dists, radial_kernel, rbf

U_GRID = np.array([0.0, 1e-6, 1e-3, 0.1, 0.5, 1.0, 2.5, 7.0, 30.0])


def _cauchy(u):
    return 1.0 / (1.0 + u)


def _direct_sq_dists(x, y=None):
    x = np.asarray(x, np.float64)
    y = x if y is None else np.asarray(y, np.float64)
    return np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)


def _points(seed, m, d, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=(m, d))


# jit-compiled wrappers, shared by the tests so that each particle-set shape compiles once
# (eager op-by-op dispatch of the median would recompile a dozen primitives per shape).
_sq_dists = jax.jit(pairwise_sq_dists)
_bandwidth = jax.jit(lambda x: median_bandwidth(pairwise_sq_dists(x)))
_kernel_matrices = jax.jit(kernel_matrices, static_argnums=0)


# ----------------------------------------------------------------------------- values


@pytest.mark.x64
@pytest.mark.parametrize("h", [0.3, 1.0, 4.0])
def test_rbf_value(h):
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=3), rng.normal(size=3)
        expected = math.exp(-np.sum((a - b) ** 2) / h)
        np.testing.assert_allclose(float(rbf(h)(a, b)), expected, rtol=1e-14)
    # the docstring example
    np.testing.assert_allclose(float(rbf(1.0)(jnp.zeros(2), jnp.ones(2))), math.exp(-2.0), rtol=1e-14)


@pytest.mark.x64
@pytest.mark.parametrize("h,c,beta", [(1.0, 1.0, -0.5), (0.4, 2.0, -0.5), (3.0, 0.5, -0.2), (1.7, 1.3, -0.9)])
def test_imq_value(h, c, beta):
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.normal(size=4), rng.normal(size=4)
        expected = (c**2 + np.sum((a - b) ** 2) / h) ** beta
        np.testing.assert_allclose(float(imq(h, c=c, beta=beta)(a, b)), expected, rtol=1e-14)
    # k(a, a) = c^(2 beta)
    np.testing.assert_allclose(float(imq(h, c=c, beta=beta)(np.ones(4), np.ones(4))), c ** (2 * beta), rtol=1e-14)


@pytest.mark.x64
def test_radial_kernel_value_and_bandwidth_override():
    kern = radial_kernel(_cauchy, bandwidth=2.0, name="cauchy")
    assert kern.name == "cauchy" and kern.profile_derivatives is None
    a, b = np.array([0.3, -1.0]), np.array([1.1, 0.4])
    r2 = np.sum((a - b) ** 2)
    np.testing.assert_allclose(float(kern(a, b)), 1.0 / (1.0 + r2 / 2.0), rtol=1e-14)
    # an explicit bandwidth overrides the kernel's
    np.testing.assert_allclose(float(kern(a, b, bandwidth=0.5)), 1.0 / (1.0 + r2 / 0.5), rtol=1e-14)
    np.testing.assert_allclose(float(rbf("median")(a, b, bandwidth=0.5)), math.exp(-r2 / 0.5), rtol=1e-14)


def test_median_kernel_needs_numeric_bandwidth_for_point_evaluation():
    with pytest.raises(ValueError, match="bandwidth"):
        rbf("median")(np.zeros(2), np.ones(2))


# ----------------------------------------------------------------------------- profile derivatives


@pytest.mark.x64
@pytest.mark.parametrize(
    "kern",
    [rbf(1.0), imq(1.0), imq(1.0, c=0.5, beta=-0.3), imq(1.0, c=2.0, beta=-0.9)],
    ids=["rbf", "imq", "imq_c0.5_b-0.3", "imq_c2_b-0.9"],
)
def test_builtin_derivatives_match_autodiff(kern):
    u = jnp.asarray(U_GRID, jnp.float64)
    assert kern.profile_derivatives is not None  # the closed form is what is under test
    closed = kern.derivatives(u)
    auto = kernels._autodiff_derivatives(kern.profile, u)
    for got, want in zip(closed, auto):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
    # and against scalar jax.grad, independently of the jvp-based helper
    f = lambda s: kern.profile(s)  # noqa: E731
    for i, ui in enumerate(U_GRID):
        np.testing.assert_allclose(float(closed[1][i]), float(jax.grad(f)(ui)), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(closed[2][i]), float(jax.grad(jax.grad(f))(ui)), rtol=1e-12, atol=1e-12)


@pytest.mark.x64
def test_builtin_derivatives_hand_formulas():
    u = np.asarray(U_GRID)
    f, df, d2f = rbf(1.0).derivatives(jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(f), np.exp(-u), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(df), -np.exp(-u), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(d2f), np.exp(-u), rtol=1e-14)
    c, beta = 1.5, -0.5
    f, df, d2f = imq(1.0, c=c, beta=beta).derivatives(jnp.asarray(u))
    base = c**2 + u
    np.testing.assert_allclose(np.asarray(f), base**beta, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(df), beta * base ** (beta - 1), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(d2f), beta * (beta - 1) * base ** (beta - 2), rtol=1e-13)


@pytest.mark.x64
def test_user_profile_derivatives_cauchy():
    kern = radial_kernel(_cauchy, bandwidth=1.0)
    u = np.asarray(U_GRID)
    f, df, d2f = kern.derivatives(jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(f), 1.0 / (1.0 + u), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(df), -1.0 / (1.0 + u) ** 2, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(d2f), 2.0 / (1.0 + u) ** 3, rtol=1e-13)
    # element-wise on a 2-D input too
    u2 = jnp.asarray(u[:8].reshape(2, 4))
    _, df2, d2f2 = kern.derivatives(u2)
    np.testing.assert_allclose(np.asarray(df2), -1.0 / (1.0 + u[:8].reshape(2, 4)) ** 2, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(d2f2), 2.0 / (1.0 + u[:8].reshape(2, 4)) ** 3, rtol=1e-13)


# ----------------------------------------------------------------------------- distances

# Particle-set shapes used below (few distinct shapes keep compilation time down).
SHAPES = [(1, 2), (2, 2), (5, 2), (9, 3)]


@pytest.mark.x64
@pytest.mark.parametrize("m,d", SHAPES)
def test_pairwise_sq_dists_matches_direct(m, d):
    x = _points(m * 10 + d, m, d)
    r2 = np.asarray(_sq_dists(jnp.asarray(x)))
    assert r2.shape == (m, m)
    np.testing.assert_allclose(r2, _direct_sq_dists(x), rtol=1e-12, atol=1e-12)
    assert np.all(np.diag(r2) == 0.0)
    assert np.all(r2 >= 0.0)
    # exactly symmetric for d <= 4 on any code generator (exact squares, see kernels._square)
    np.testing.assert_array_equal(r2, r2.T)


@pytest.mark.x64
def test_pairwise_sq_dists_two_sets():
    x, y = _points(3, 5, 2), _points(4, 2, 2)
    r2 = np.asarray(pairwise_sq_dists(jnp.asarray(x), jnp.asarray(y)))
    assert r2.shape == (5, 2)
    np.testing.assert_allclose(r2, _direct_sq_dists(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairwise_sq_dists_cancellation_is_clipped(dtype):
    # far from the origin and nearly coincident: the Gram form |x|^2 + |y|^2 - 2 x.y cancels
    # catastrophically, but the result must stay >= 0 with an exactly zero diagonal.
    rng = np.random.default_rng(5)
    x = (1e4 + 1e-6 * rng.normal(size=(5, 2))).astype(dtype)
    x[3] = x[1]
    r2 = np.asarray(_sq_dists(jnp.asarray(x)))
    assert r2.dtype == dtype
    assert np.all(r2 >= 0.0)
    assert np.all(np.isfinite(r2))
    assert np.all(np.diag(r2) == 0.0)
    # absolute error bounded by the cancellation scale
    scale = float(np.max(np.sum(x.astype(np.float64) ** 2, axis=1)))
    np.testing.assert_allclose(r2, _direct_sq_dists(x), atol=64 * np.finfo(dtype).eps * scale)


# ----------------------------------------------------------------------------- median bandwidth


def _numpy_median_bandwidth(x):
    r2 = _direct_sq_dists(x)
    m = r2.shape[0]
    iu = np.triu_indices(m, k=1)
    return np.median(r2[iu]) / np.log(m + 1.0)


@pytest.mark.x64
@pytest.mark.parametrize("m,d", SHAPES[1:])
def test_median_bandwidth_matches_numpy(m, d):
    for seed in range(3):
        x = _points(100 * seed + m, m, d, scale=2.0)
        h = _bandwidth(jnp.asarray(x))
        assert h.shape == () and h.dtype == jnp.float64
        np.testing.assert_allclose(float(h), _numpy_median_bandwidth(x), rtol=1e-12)
        if m >= 5:
            # the median is over a < b pairs only: with the zero diagonal it would differ
            with_diag = np.median(_direct_sq_dists(x)) / np.log(m + 1.0)
            assert not np.isclose(float(h), with_diag, rtol=1e-6)


_median_from_r2 = jax.jit(median_bandwidth)

# values from a small grid (many tied distances) or anywhere in [-3, 3]
_coord = st.one_of(
    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
    st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@pytest.mark.x64
@given(
    shape=st.sampled_from([(3, 2), (4, 2), (5, 2), (9, 3)]),  # odd and even numbers of pairs
    dtype=st.sampled_from([np.float32, np.float64]),
    data=st.data(),
)
def test_median_bandwidth_selection_is_exact(shape, dtype, data):
    # The library selects the median without sorting; on the same r2 matrix it must agree
    # with numpy's sorted median of the distinct pairs (ties included), fallbacks included.
    x = data.draw(arrays(dtype, shape, elements=_coord))
    r2 = _sq_dists(jnp.asarray(x))
    m = shape[0]
    pairs = np.asarray(r2, np.float64)[np.triu_indices(m, k=1)]
    tiny = np.finfo(dtype).tiny * 1e3
    med, mean = np.median(pairs), np.mean(pairs)
    scale = med if med > tiny else (mean if mean > tiny else np.log(m + 1.0))
    h = _median_from_r2(r2)
    assert h.dtype == dtype and h.shape == ()
    np.testing.assert_allclose(float(h), scale / np.log(m + 1.0), rtol=1e-14 if dtype == np.float64 else 1e-6)


@pytest.mark.x64
def test_median_bandwidth_used_by_kernel_matrices():
    x = _points(7, 9, 3)
    km = _kernel_matrices(KERNELS["rbf_median"], jnp.asarray(x))
    np.testing.assert_allclose(float(km.bandwidth), _numpy_median_bandwidth(x), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_bandwidth_all_coincident_is_one(dtype):
    x = np.tile(np.array([[0.3, -2.0]], dtype), (5, 1))
    h = _bandwidth(jnp.asarray(x))
    assert h.dtype == dtype
    assert np.isfinite(float(h)) and float(h) > 0
    np.testing.assert_allclose(float(h), 1.0, rtol=1e-6)
    km = _kernel_matrices(KERNELS["rbf_median"], jnp.asarray(x))
    assert km.bandwidth.dtype == dtype
    np.testing.assert_allclose(np.asarray(km.k), 1.0)
    for leaf in km:
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_median_bandwidth_single_particle_is_one():
    x = jnp.asarray([[1.0, 2.0]])
    assert float(_bandwidth(x)) == 1.0
    assert float(median_bandwidth(jnp.zeros((1, 1)))) == 1.0
    assert float(_kernel_matrices(KERNELS["imq_median"], x).bandwidth) == 1.0


@pytest.mark.x64
def test_median_bandwidth_mostly_coincident_uses_mean():
    # 4 of 5 particles coincide: 6 of the 10 distinct pairs are at distance 0, so the median
    # is 0 and the mean of the distinct-pair distances is used instead.
    x = np.zeros((5, 2))
    x[4] = [1.0, 2.0]
    pairs = _direct_sq_dists(x)[np.triu_indices(5, k=1)]
    assert np.median(pairs) == 0.0
    h = float(_bandwidth(jnp.asarray(x)))
    assert h > 0 and np.isfinite(h)
    np.testing.assert_allclose(h, np.mean(pairs) / np.log(6.0), rtol=1e-12)


@pytest.mark.x64
def test_median_bandwidth_half_coincident_pairs_average():
    # 2 pairs coincide out of 10 (points 0=1 and 2=3): median of the distinct-pair distances,
    # which here includes zeros but is not zero.
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    pairs = _direct_sq_dists(x)[np.triu_indices(5, k=1)]
    h = float(_bandwidth(jnp.asarray(x)))
    np.testing.assert_allclose(h, np.median(pairs) / np.log(6.0), rtol=1e-12)
    assert h > 0


@pytest.mark.parametrize("coincident", [0, 2, 4])
def test_median_bandwidth_has_no_gradient(coincident):
    x = _points(11, 5, 2)
    x[:coincident] = x[0]
    x = jnp.asarray(x)
    g = np.asarray(_grad_bandwidth(x))
    np.testing.assert_array_equal(g, np.zeros(x.shape))
    g2 = np.asarray(_grad_km_bandwidth(x))
    np.testing.assert_array_equal(g2, np.zeros(x.shape))
    # while the kernel values themselves do depend on x
    g3 = np.asarray(_grad_km_sum(x))
    assert np.all(np.isfinite(g3)) and np.any(g3 != 0.0)


_grad_bandwidth = jax.jit(jax.grad(lambda x: median_bandwidth(pairwise_sq_dists(x))))


# ----------------------------------------------------------------------------- kernel matrices

KERNELS = {
    "rbf_fixed": rbf(0.7),
    "rbf_median": rbf("median"),
    "imq_fixed": imq(1.9, c=1.0, beta=-0.5),
    "imq_median": imq("median", c=0.6, beta=-0.35),
    "cauchy_fixed": radial_kernel(_cauchy, bandwidth=2.3),
    "cauchy_median": radial_kernel(_cauchy, bandwidth="median"),
}

_grad_km_bandwidth = jax.jit(jax.grad(lambda x: kernel_matrices(KERNELS["rbf_median"], x).bandwidth))
_grad_km_sum = jax.jit(jax.grad(lambda x: jnp.sum(kernel_matrices(KERNELS["rbf_median"], x).k)))


@pytest.mark.x64
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_matrices_match_autodiff_of_kappa(name):
    kern = KERNELS[name]
    m, d = 5, 2
    x = _points(31, m, d)
    x[-1] = x[0]  # one coincident pair
    km = _kernel_matrices(kern, jnp.asarray(x))
    h = float(km.bandwidth)
    if kern.bandwidth != "median":
        assert h == kern.bandwidth
    else:
        np.testing.assert_allclose(h, _numpy_median_bandwidth(x), rtol=1e-12)

    def kappa(r2):
        return kern.profile(r2 / h)

    r2 = np.asarray(km.r2)
    np.testing.assert_allclose(r2, _direct_sq_dists(x), rtol=1e-12, atol=1e-12)
    flat = jnp.asarray(r2.ravel())
    k_ref = jax.vmap(kappa)(flat)
    dk_ref = jax.vmap(jax.grad(kappa))(flat)
    d2k_ref = jax.vmap(jax.grad(jax.grad(kappa)))(flat)
    for got, want in [(km.k, k_ref), (km.dk, dk_ref), (km.d2k, d2k_ref)]:
        assert got.shape == (m, m) and got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got).ravel(), np.asarray(want), rtol=1e-12, atol=1e-14)


def test_kernel_matrices_float32_stays_float32():
    x = jnp.asarray(_points(2, 5, 2), jnp.float32)
    for name in ["rbf_median", "rbf_fixed", "imq_median", "cauchy_fixed"]:
        km = _kernel_matrices(KERNELS[name], x)
        for leaf in km:
            assert leaf.dtype == jnp.float32, (name, leaf.dtype)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("bad", ["foo", "Median", "", -1.0, 0.0, -3, 0, float("nan"), float("inf")])
def test_bad_bandwidth_raises(bad):
    with pytest.raises(ValueError, match="bandwidth"):
        rbf(bad)
    with pytest.raises(ValueError, match="bandwidth"):
        imq(bad)
    with pytest.raises(ValueError, match="bandwidth"):
        radial_kernel(_cauchy, bandwidth=bad)


@pytest.mark.parametrize("beta", [0.0, -1.0, 0.5, -1.5, float("nan")])
def test_imq_bad_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        imq(1.0, beta=beta)


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan")])
def test_imq_bad_c_raises(c):
    with pytest.raises(ValueError, match="c must be positive"):
        imq(1.0, c=c)


def test_good_arguments_accepted():
    assert rbf(2).bandwidth == 2
    assert imq("median", c=1e-3, beta=-0.999).bandwidth == "median"
    assert radial_kernel(_cauchy, 1e-8).bandwidth == 1e-8


def test_radial_kernel_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        radial_kernel(1.0)


@pytest.mark.parametrize("bad", [np.float32(-1.0), np.array(-1.0), jnp.asarray(0.0), np.array(np.inf)])
def test_array_bandwidths_are_validated(bad):
    with pytest.raises(ValueError, match="bandwidth"):
        rbf(bad)


def test_array_bandwidth_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="scalar"):
        imq(np.ones(2))


@pytest.mark.parametrize("dtype,spread", [(np.float32, 1e-10), (np.float64, 1e-78)])
def test_trace_term_stays_finite_for_tiny_bandwidths(dtype, spread):
    # h ~ spread^2 makes kappa'' = f''/h^2 overflow; the trace term is evaluated in u = r2/h instead.
    x = jnp.asarray(spread * np.random.default_rng(0).normal(size=(5, 2)), dtype)
    km = kernel_matrices(rbf(), x)
    assert float(km.bandwidth) < spread  # the regime that used to overflow
    assert np.isfinite(float(km.trace_sum))
    d = 2
    u = np.asarray(km.r2, np.float64) / float(km.bandwidth)
    expected = np.sum(-2 * d * (-np.exp(-u)) - 4 * u * np.exp(-u)) / float(km.bandwidth)
    np.testing.assert_allclose(float(km.trace_sum), expected, rtol=1e-4)


# ---------------------------------------------------------------------------
# kernel_products: blocked == unblocked
# ---------------------------------------------------------------------------

_products = jax.jit(kernel_products, static_argnums=0, static_argnames="block_size")


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-11), (jnp.float32, 2e-5)])
@pytest.mark.parametrize("m,block", [(2, 1), (7, 3), (33, 8), (64, 64), (50, 200), (101, 16)])
@pytest.mark.parametrize("kernel_name", ["rbf_median", "imq_median", "rbf_fixed"])
def test_kernel_products_blocked_equals_unblocked(dtype, tol, m, block, kernel_name):
    kernel = {"rbf_median": rbf(), "imq_median": imq(), "rbf_fixed": rbf(0.7)}[kernel_name]
    z = jax.random.normal(jax.random.key(m), (m, 3), dtype)
    v = jax.random.normal(jax.random.key(m + 1), (m, 5), dtype)
    full = _products(kernel, z, v)
    blocked = _products(kernel, z, v, block_size=block)
    for a, b in zip(full, blocked):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=tol, atol=tol)


@pytest.mark.x64
def test_kernel_products_matches_kernel_matrices():
    z = jax.random.normal(jax.random.key(0), (20, 2))
    v = jax.random.normal(jax.random.key(1), (20, 4))
    km = _kernel_matrices(rbf(), z)
    p = _products(rbf(), z, v)
    np.testing.assert_allclose(np.asarray(p.kv), np.asarray(km.k @ v), rtol=1e-12)
    rep = np.einsum("am,amd->md", 2 * np.asarray(km.dk), np.asarray(z)[:, None] - np.asarray(z)[None])
    np.testing.assert_allclose(np.asarray(p.repulsion), rep, rtol=1e-10, atol=1e-12)


@pytest.mark.x64
@pytest.mark.parametrize("m", [4, 5, 30, 31])
def test_blocked_median_with_ties_and_duplicates(m):
    """Even and odd pair counts, repeated distances and coincident particles."""
    rng = np.random.default_rng(m)
    x = rng.integers(0, 3, size=(m, 2)).astype(np.float64)  # many exact ties, some coincident points
    z = jnp.asarray(x)
    full = _products(rbf(), z, z)
    for block in (1, 3, 7):
        np.testing.assert_allclose(float(_products(rbf(), z, z, block_size=block).bandwidth), float(full.bandwidth), rtol=1e-15)
    np.testing.assert_allclose(float(full.bandwidth), _numpy_median_bandwidth(x), rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_kernel_products_bad_block_size(bad):
    z = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="block_size"):
        kernel_products(rbf(), z, z, block_size=bad)


def test_kernel_products_shape_errors():
    with pytest.raises(ValueError, match=r"z \(M, p\) and vectors \(M, n\)"):
        kernel_products(rbf(), jnp.zeros((4, 2)), jnp.zeros((5, 2)))


# ---------------------------------------------------------------------------
# exact median selection: one radix selection on every path
# ---------------------------------------------------------------------------


def _np_pair_sq_dists(x, dtype):
    """The distinct pairs' squared distances as the library forms them for d <= 4: points centred
    on the first row, coordinate differences squared and summed in order, in ``dtype``."""
    x = np.asarray(x, dtype)
    zc = x - x[0]
    diff = zc[:, None, :] - zc[None, :, :]
    r2 = np.zeros(diff.shape[:2], dtype)
    for j in range(x.shape[1]):
        r2 = r2 + diff[..., j] * diff[..., j]
    return r2[np.triu_indices(len(x), k=1)]


def _np_median_bandwidth_sorted(pairs, m, dtype):
    """(bandwidth, exact): the convention by a full sort; ``exact`` False where the mean fallback
    (a sum, whose rounding depends on the order) decides."""
    if m < 2:
        return dtype(1.0), True
    log_n = np.asarray(jnp.log(jnp.asarray(m, dtype) + 1.0))  # the library's log (not under test)
    s = np.sort(pairs)
    n = len(s)
    med = s[(n - 1) // 2] if n % 2 else dtype(0.5) * (s[n // 2 - 1] + s[n // 2])
    tiny = np.finfo(dtype).tiny * 1e3
    if med > tiny:
        return dtype(med) / log_n, True
    mean = np.mean(pairs.astype(np.float64))
    return (dtype(mean) / log_n if mean > tiny else dtype(1.0)), False


_km_bandwidth = jax.jit(lambda x: kernel_matrices(rbf(), x).bandwidth)
_sq_dists = jax.jit(pairwise_sq_dists)
_products_h = jax.jit(lambda x, b: kernel_products(rbf(), x, x[:, :1], block_size=b).bandwidth, static_argnums=1)

# ties (a small integer grid), duplicated points, zero distances, a few arbitrary values
_grid_coord = st.one_of(st.sampled_from([0.0, 0.0, 1.0, 2.0, -1.0, 3.0]), st.floats(-4.0, 4.0, width=32))


def _check_all_paths_select(x, dtype, blocks):
    m = x.shape[0]
    xj = jnp.asarray(x, dtype)
    # The selection is under test, so the reference sorts the library's own distances: XLA may
    # contract a*a + b*b into a fused multiply-add on one CPU and not on another, so distances formed
    # in numpy can differ by an ulp from any compiled path's.
    pairs = np.asarray(_sq_dists(xj))[np.triu_indices(m, k=1)]
    expected, exact = _np_median_bandwidth_sorted(pairs, m, dtype)
    got = {"median_bandwidth(r2)": _bandwidth(xj), "kernel_matrices": _km_bandwidth(xj)}
    for b in blocks:
        got[f"kernel_products(block_size={b})"] = _products_h(xj, b)
    for name, h in got.items():
        assert h.dtype == dtype, name
        if exact:
            assert float(h) == float(expected), (name, float(h), float(expected))
        else:  # the mean of the pairs: a few ulps of summation order
            np.testing.assert_allclose(float(h), float(expected), rtol=8 * m * np.finfo(dtype).eps, err_msg=name)
    values = {float(h) for h in got.values()}
    assert len(values) == 1 or not exact, got


@pytest.mark.x64
@given(
    m=st.sampled_from([2, 3, 4, 7]),
    dtype=st.sampled_from([np.float32, np.float64]),
    data=st.data(),
)
def test_radix_median_equals_sorted_median_on_every_path(m, dtype, data):
    x = data.draw(arrays(dtype, (m, 2), elements=_grid_coord))
    _check_all_paths_select(x, dtype, blocks=(None, 1))


# Found by hypothesis (HYPOTHESIS_PROFILE=dev): when the distances were formed as r2 + d*d, the
# compiler contracted that into a fused multiply-add in some programs and not in others, and with
# XLA's older CPU code generator (scripts/test.sh) the paths selected bandwidths one ulp apart
# (4.479673143102577 against ...578). Squares formed exactly (kernels._square) leave no rounding
# for contraction to change.
@pytest.mark.x64
def test_median_identity_across_paths_does_not_depend_on_contraction():
    x = np.array([[0.04009169, 2.0], [1.0, 0.0]], np.float32).astype(np.float64)
    _check_all_paths_select(x, np.float64, blocks=(None, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_radix_median_tiny_sets(m, dtype):
    # M = 1: no pair (h = 1); M = 2: one pair; M = 3: three pairs (odd), distinct or coincident
    for x in (np.arange(2 * m, dtype=dtype).reshape(m, 2), np.zeros((m, 2), dtype), np.array([[0.5, 0.0]] * m, dtype)):
        _check_all_paths_select(x, dtype, blocks=(None, 1))
    if m >= 2:
        h = _products_h(jnp.asarray(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]][:m], dtype)), None)
        assert float(h) == float(np.asarray(dtype(25.0)) / np.asarray(jnp.log(jnp.asarray(m, dtype) + 1.0)))


@pytest.mark.parametrize(
    "m,dtype,blocks",
    [(60, np.float32, (None, 7, 16)), (61, np.float64, (None, 8)), (300, np.float32, (None, 64)), (1500, np.float32, (None, 256))],
)
def test_radix_median_many_pairs_with_ties(m, dtype, blocks):
    # 1770 .. 1.1e6 pairs: 6 down to 2 passes of 5 .. 16 bits; half the points on a grid (ties, duplicates)
    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, 2))
    x[::2] = rng.integers(-2, 3, size=x[::2].shape)
    _check_all_paths_select(x.astype(dtype), dtype, blocks)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_radix_median_with_excluded_particles(dtype):
    # valid=False and non-finite rows leave the median of the others' pairs, M their number
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, size=(23, 2)).astype(dtype)
    keep = np.ones(23, bool)
    keep[[0, 4, 9]] = False
    x_bad = x.copy()
    x_bad[9] = np.nan
    expected, exact = _np_median_bandwidth_sorted(_np_pair_sq_dists(x[keep], dtype), int(keep.sum()), dtype)
    assert exact
    valid = jnp.asarray(np.arange(23) != 4) & jnp.asarray(np.arange(23) != 0)
    for b in (None, 2, 5):
        h = jax.jit(lambda z, v: kernel_products(rbf(), z, z, block_size=b, valid=v).bandwidth)(jnp.asarray(x_bad), valid)
        assert float(h) == float(expected), b
    assert float(jax.jit(lambda z, v: kernel_matrices(rbf(), z, valid=v).bandwidth)(jnp.asarray(x_bad), valid)) == float(expected)


@pytest.mark.x64
def test_radix_widths_cover_the_value_bits():
    for dtype, total in ((jnp.float32, 31), (jnp.float64, 63)):
        for n in (1, 10, 5000, 10**6, 2 * 10**8):
            w, passes = kernels._radix_widths(dtype, n)
            # the passes cover the value bits, no pass is wasted, and no wider than 16 bits
            assert w * passes >= total > w * (passes - 1) and 6 <= w <= 16
    assert kernels._radix_widths(jnp.float32, 2 * 10**8)[1] == 2  # 2 passes at M = 20,000
    assert kernels._radix_widths(jnp.float64, 2 * 10**8)[1] == 4


def test_radix_select_ranks_on_raw_values():
    # every rank of a multiset with ties, zeros and +inf (excluded pairs' marker) against a sort
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.choice([0.0, 1.0, 2.5, 1e-30, 3e5], 300), rng.exponential(size=200), [np.inf] * 5]).astype(np.float32)
    bits = jax.lax.bitcast_convert_type(jnp.asarray(vals), jnp.int32)
    hist, above = kernels._vector_histogram(bits, jnp.ones(vals.shape, bool), jnp.int32)
    width, passes = kernels._radix_widths(jnp.float32, vals.size)
    select = jax.jit(lambda k: kernels._radix_select(hist, above, k, width, passes, jnp.int32, jnp.int32))
    s = np.sort(vals)
    for k in list(range(0, 500, 37)) + [499, 500, 504]:
        lower, n_leq, upper = (np.asarray(a) for a in select(k))
        assert np.asarray(lower).view(np.float32) == s[k]
        assert int(n_leq) == int(np.sum(vals <= s[k]))
        above = s[s > s[k]]
        if above.size:
            assert np.asarray(upper).view(np.float32) == above[0]


def test_auto_block_size_rule():
    assert kernels.auto_block_size(100, 2, 6) == 100
    assert kernels.auto_block_size(512, 2, 6) == 512
    assert kernels.auto_block_size(1000, 2, 6) == 256
    assert kernels.auto_block_size(2000, 2, 6) == 128
    assert kernels.auto_block_size(20000, 2, 6) == 32
    assert kernels.auto_block_size(100000, 2, 6) == 32
    # the memory budget lowers it: (p + n + 4) B M itemsize <= budget
    b = kernels.auto_block_size(10**6, 2, 6, memory_budget=64 << 20)
    assert b * 12 * 10**6 * 4 <= 64 << 20 < 2 * b * 12 * 10**6 * 4


def test_kernel_products_default_blocks_equal_explicit_ones():
    # block_size=None picks auto_block_size; the result is the explicit call's, bit for bit
    z = jax.random.normal(jax.random.key(3), (600, 2), jnp.float32)
    v = jax.random.normal(jax.random.key(4), (600, 3), jnp.float32)
    b = kernels.auto_block_size(600, 2, 3)
    assert b < 600
    auto = _products(rbf(), z, v)
    explicit = _products(rbf(), z, v, block_size=b)
    for a, e in zip(auto, explicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
