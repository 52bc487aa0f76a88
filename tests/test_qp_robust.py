"""min_norm_weights on any finite U: exact power-of-two scaling, the K = 2 closed form on
indefinite U, the polish never worsening a certificate, option validation and "auto".

Tolerances are those of tests/test_qp.py: a Lemma-1 gap within 8 (K + 1) eps of U's largest
entry (see ``lemma1_tol`` there for the derivation), checked on the U the solver received.
"""

from __future__ import annotations

from functools import partial

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis.extra.numpy import arrays

import mtsgd_jax as mj
from mtsgd_jax import SOLVERS, min_norm_weights
from mtsgd_jax.qp import _auto_method

ITERATIVE = ("projected_gradient", "osqp", "frank_wolfe")
DTYPES = [np.float32, np.float64]


def lemma1_tol(k, dtype):
    return 8.0 * (k + 1) * float(np.finfo(dtype).eps)


def check_lemma1(u, w, tol, label=""):
    """Lemma 1 on U (float64 arithmetic), relative to max|U|: (U w)_i >= w^T U w - tol for all i,
    and equality on the support in the weighted form sum_i w_i |(U w)_i - w^T U w| <= 2 tol."""
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    scale = np.max(np.abs(u))
    if scale == 0.0:
        return
    uw = u @ w / scale
    f = w @ uw
    assert np.all(uw >= f - tol), (label, f - uw.min(), tol)
    assert np.sum(w * np.abs(uw - f)) <= 2 * tol, (label, np.sum(w * np.abs(uw - f)), tol)


def assert_simplex(w, k, dtype):
    w = np.asarray(w)
    assert w.shape == (k,) and w.dtype == dtype
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert abs(np.sum(w, dtype=np.float64) - 1.0) <= 4 * k * np.finfo(dtype).eps


def _methods(k):
    return ITERATIVE + ("enumerate", "auto") + (("closed_form",) if k <= 2 else ())


@partial(jax.jit, static_argnames="methods")
def _solve_jit(u, methods):
    return {m: min_norm_weights(u, method=m) for m in methods}


def _solve_eager(u, methods):
    return {m: min_norm_weights(u, method=m) for m in methods}


# ============================================================================ hypothesis, float32

_entries = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=False).map(
    lambda v: 0.0 if abs(v) < 1e-3 else v
)


@st.composite
def gram_matrices(draw):
    """(U float32, shift): U = A A^T, optionally made slightly indefinite, times 2^shift exactly."""
    k = draw(st.integers(2, 4))
    r = draw(st.integers(1, k + 1))
    a = draw(arrays(np.float64, (k, r), elements=_entries))
    u = a @ a.T
    if np.any(u != 0) and draw(st.booleans()):  # slightly indefinite: a perturbation of a few eps
        s = draw(arrays(np.float64, (k, k), elements=st.floats(-1.0, 1.0)))
        u = u + 2.0 * np.finfo(np.float32).eps * np.max(np.abs(u)) * (s + s.T) / 2
    u = u.astype(np.float32)
    # 2^shift must keep every nonzero entry normal (XLA flushes subnormals to zero, numpy does not)
    nonzero = np.abs(u[u != 0])
    tiny, huge = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    shifts = [s for s in (0, 100, -100)
              if nonzero.size == 0 or (nonzero.min() * 2.0**s >= tiny and nonzero.max() * 2.0**s <= huge)]
    return u, draw(st.sampled_from(shifts))


# Found by hypothesis: two equal rows of U made every KKT system on a support holding both
# singular, and projected gradient's polish cycled without certifying (gap 430 ulps).
_EQUAL_ROWS = np.array(
    [[49.0, 63.0, -45.290226, -45.290226],
     [63.0, 81.0, -58.230293, -58.230293],
     [-45.290226, -58.230293, 41.86132, 41.86132],
     [-45.290226, -58.230293, 41.86132, 41.86132]],
    np.float32,
)


# Found by hypothesis: a perturbation of a few eps made an entry of 7e-9, subnormal after 2^-100
# (the strategy now keeps every nonzero entry normal); pinned unshifted.
_TINY_OFF_DIAGONAL = np.array([[-2.3841858e-07, -7.4505806e-09], [-7.4505806e-09, 9.9999976e-01]], np.float32)


@given(gram_matrices())
@example(case=(_EQUAL_ROWS, 0))
@example(case=(_TINY_OFF_DIAGONAL, 0))
def test_float32_any_scale_finite_simplex_and_lemma1(case):
    u0, shift = case
    k = u0.shape[0]
    u = u0 * np.float32(2.0**shift)  # exact: a power of two, no entry leaves the normal range
    assert np.all(np.abs(u[u0 != 0]) >= np.finfo(np.float32).tiny) and np.all(np.isfinite(u))
    methods = _methods(k)
    got = _solve_jit(u, methods)
    base = _solve_jit(u0, methods)
    for m in methods:
        w = np.asarray(got[m])
        assert_simplex(w, k, np.float32)
        check_lemma1(u, w, lemma1_tol(k, np.float32), m)
        # the library rescales by a power of two: scaling U by 2^shift changes nothing, bit for bit
        np.testing.assert_array_equal(w, np.asarray(base[m]), err_msg=m)


# ============================================================================ huge and tiny finite U


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_huge_diagonal_gram(dtype, mode):
    # 1 / max|U| is subnormal, which XLA flushes to zero: dividing by the scale used to give
    # U = 0 under jit and the vertex [1, 0, 0]; the minimiser is the zero-norm direction.
    big = np.finfo(dtype).max / 6.8  # 5e37 in float32
    u = np.diag([big, big / 1000, 0.0]).astype(dtype)
    # eager: one exact and one polished iterative backend (eager while loops recompile per call)
    methods = ITERATIVE + ("enumerate", "auto") if mode == "jit" else ("enumerate", "frank_wolfe")
    solve = _solve_jit if mode == "jit" else _solve_eager
    for m, w in solve(u, methods).items():
        assert_simplex(w, 3, dtype)
        np.testing.assert_allclose(np.asarray(w), [0.0, 0.0, 1.0], atol=1e-5, err_msg=m)
        check_lemma1(u, w, lemma1_tol(3, dtype), m)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("mode", ["jit", "eager"])
@pytest.mark.parametrize("which", ["huge", "tiny"])
def test_extreme_magnitudes_match_the_unit_problem(dtype, mode, which):
    # U = c * V with c near the top or bottom of the normal range: the same weights as for V
    rng = np.random.default_rng(7)
    info = np.finfo(dtype)
    c = dtype(2.0 ** (info.maxexp - 8)) if which == "huge" else dtype(2.0 ** (info.minexp + 8))
    solve = _solve_jit if mode == "jit" else _solve_eager
    for k in [2, 3] if mode == "jit" else [2]:
        methods = _methods(k) if mode == "jit" else ("closed_form", "enumerate", "frank_wolfe")
        a = rng.normal(size=(k, k))
        v = (a @ a.T / np.max(np.abs(a @ a.T))).astype(dtype)
        u = v * c
        assert np.all(np.isfinite(u)) and np.all(np.abs(u[v != 0]) >= info.tiny)
        ref, got = solve(v, methods), solve(u, methods)
        for m in methods:
            np.testing.assert_array_equal(np.asarray(got[m]), np.asarray(ref[m]), err_msg=(m, k))
            check_lemma1(v, got[m], lemma1_tol(k, dtype), m)


# ============================================================================ K = 2 closed form, any symmetric U


def _segment_values(u, t):
    return t**2 * u[0, 0] + (1 - t) ** 2 * u[1, 1] + 2 * t * (1 - t) * u[0, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("mode", ["jit", "eager"])
@pytest.mark.parametrize(
    "u,expected",
    [
        ([[1.0, 2.0], [2.0, 1.5]], [1.0, 0.0]),  # concave along the segment: the smaller diagonal
        ([[1.5, 2.0], [2.0, 1.0]], [0.0, 1.0]),
        ([[1.0, 1.5], [1.5, 2.0]], [1.0, 0.0]),  # denominator exactly 0: linear, the smaller end
        ([[1.0, 1.0 + 2**-20], [1.0 + 2**-20, 1.0]], [1.0, 0.0]),  # equal ends, concave: a vertex
        ([[3.0, 3.0], [3.0, 3.0]], [0.5, 0.5]),  # constant objective
    ],
    ids=["concave", "concave-swapped", "linear", "concave-tie", "constant"],
)
def test_closed_form_any_symmetric(dtype, mode, u, expected):
    u = np.asarray(u, dtype)
    f = partial(min_norm_weights, method="closed_form")
    w = np.asarray((jax.jit(f) if mode == "jit" else f)(u))
    np.testing.assert_array_equal(w, expected)
    # never worse than any point of the segment (fine grid, float64)
    t = np.linspace(0.0, 1.0, 1001)
    u64 = u.astype(np.float64)
    assert _segment_values(u64, w[0]) <= _segment_values(u64, t).min() + 8 * np.finfo(np.float64).eps * np.abs(u64).max()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_closed_form_indefinite_by_rounding(dtype):
    # Two nearly identical directions whose rounded Gram has U11 + U22 - 2 U12 < 0: the
    # answer must be the vertex of smaller norm (the old formula gave [0.5, 0.5]).
    eps = np.finfo(dtype).eps
    u = np.array([[1.0, 1.0 + eps], [1.0 + eps, 1.0 + eps]], dtype)  # denominator -eps
    assert u[0, 0] + u[1, 1] - 2 * u[0, 1] < 0
    for f in [jax.jit(partial(min_norm_weights, method="closed_form")), partial(min_norm_weights, method="auto")]:
        np.testing.assert_array_equal(np.asarray(f(u)), [1.0, 0.0])


# ============================================================================ the polish never worsens


def _badly_scaled(seed=1234, ks=(5, 6), per_k=30):
    """The badly scaled battery of tests/test_qp.py, restricted to K in ``ks`` (same draws)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(2, 7):
        for _ in range(per_k):
            a = rng.normal(size=(k, rng.integers(1, k + 3)))
            a = a * 10.0 ** rng.uniform(-3, 1, size=(1, a.shape[1])) * 10.0 ** rng.uniform(-2, 1, size=(k, 1))
            if k in ks:
                out.append(a @ a.T)
    return out


@jax.jit
def _raw_and_polished(u):
    return {
        m: (min_norm_weights(u, method=m, polish=False), min_norm_weights(u, method=m, polish=True)) for m in ITERATIVE
    }


def gap(u, w):
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    uw = u @ w
    return (w @ uw - uw.min()) / np.max(np.abs(u))


def test_polish_never_worsens_the_certificate_float32():
    # Regression: the polish accepted any candidate whose float32 gap was below 64 K eps, and
    # replaced OSQP's near-exact answer (gap 4.5e-10) on one of these matrices by a vertex
    # with gap 3.5e-5 (objective 1.9e-5 too high); which matrix tripped it depended on the
    # CPU's rounding. It now keeps the best-certified point, the backend's answer included.
    for u64 in _badly_scaled():
        u = u64.astype(np.float32)
        k = u.shape[0]
        tol = lemma1_tol(k, np.float32)
        for m, (raw, pol) in _raw_and_polished(u).items():
            assert gap(u, pol) <= gap(u, raw) + tol / 2, m  # computed-gap comparisons err by < tol / 2
            assert gap(u, pol) <= tol, m


# ============================================================================ options


BAD_OPTIONS = [
    ({"maxiter": -1}, r"maxiter.*-1"),
    ({"maxiter": 2.5}, r"maxiter.*2\.5"),
    ({"maxiter": True}, r"maxiter.*True"),
    ({"tol": -1.0}, r"tol.*-1\.0"),
    ({"tol": float("nan")}, r"tol.*nan"),
    ({"tol": float("inf")}, r"tol.*inf"),
    ({"tol": "1e-6"}, r"tol.*1e-6"),
    ({"polish": 1}, r"polish.*1"),
    ({"polish": "yes"}, r"polish.*yes"),
]


@pytest.mark.parametrize("options,match", BAD_OPTIONS, ids=lambda o: str(o))
def test_min_norm_weights_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match="min_norm_weights: " + match):
        min_norm_weights(np.eye(2), method="projected_gradient", **options)


@pytest.mark.parametrize("options,match", BAD_OPTIONS + [({"bogus": 1}, "bogus"), ({"learning_rate": 0.1}, "learning_rate")])
@pytest.mark.parametrize("factory", [mj.mtsgd, mj.mgda, mj.moo_svgd], ids=lambda f: f.__name__)
def test_transformations_reject_bad_solver_options(factory, options, match):
    with pytest.raises(ValueError, match=r"solver_options.*" + match):
        factory(2, solver_options=options)


@pytest.mark.parametrize("factory", [mj.mtsgd, mj.mgda, mj.moo_svgd], ids=lambda f: f.__name__)
def test_solver_options_must_be_a_mapping(factory):
    with pytest.raises(ValueError, match="solver_options must be a dict"):
        factory(2, solver_options=[("maxiter", 3)])


def test_valid_options_including_numpy_scalars():
    u = np.diag([1.0, 2.0, 4.0]).astype(np.float32)
    expected = np.array([4.0, 2.0, 1.0]) / 7.0
    for opts in [{"maxiter": np.int64(50), "tol": np.float32(1e-6), "polish": np.bool_(True)}, {"maxiter": 0}, {"tol": 0}]:
        w = np.asarray(min_norm_weights(u, method="frank_wolfe", **opts))
        assert w.dtype == np.float32
        # the polished KKT point: a 3 x 3 solve in float32, a few ulps from 1/7 (2, 4)
        np.testing.assert_allclose(w, expected, rtol=0, atol=8 * float(np.finfo(np.float32).eps))


# ============================================================================ "auto"


def test_auto_method_thresholds():
    assert [_auto_method(k) for k in range(1, 9)] == ["closed_form"] * 2 + ["enumerate"] * 4 + ["projected_gradient"] * 2
    assert set(_auto_method(k) for k in range(1, 20)) <= set(SOLVERS)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_auto_is_the_backend_it_names(k):
    rng = np.random.default_rng(k)
    a = rng.normal(size=(k, k))
    u = a @ a.T
    # K > 2: one compilation of both (eager enumeration and while loops compile op by op, per call)
    both = (_solve_jit if k > 2 else _solve_eager)(u, ("auto", _auto_method(k)))
    np.testing.assert_array_equal(np.asarray(both["auto"]), np.asarray(both[_auto_method(k)]))
    if k > 3:
        return
    # the transformations' "auto" is the same backend: MGDA on one particle returns those weights
    g = jnp.asarray(np.linalg.cholesky(u + 1e-9 * np.eye(k)))[:, None, :]  # rows: K gradients of one particle
    t = mj.mgda(k, warm_start=False)
    _, st_ = t.update(g, t.init(jnp.zeros((1, k))), jnp.zeros((1, k)))
    gram = np.asarray(g[:, 0]) @ np.asarray(g[:, 0]).T
    w_ref = np.asarray(min_norm_weights(gram, method=_auto_method(k)))
    np.testing.assert_allclose(np.asarray(st_.weights[0]), w_ref, atol=1e-10)
