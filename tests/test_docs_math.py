"""docs/algorithm.md: its formulas hold for the library, and references to it resolve.

Each numerical test writes the formula of the page out independently (numpy or plain jax
autodiff) and compares it with what the library computes. Tolerances are multiples of the
dtype's epsilon times the size of the terms being summed.
"""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mtsgd_jax
from mtsgd_jax import (
    gram_matrix,
    kernel_matrices,
    median_bandwidth,
    mgda,
    min_norm_weights,
    moo_svgd,
    mtsgd,
    pairwise_sq_dists,
    preference_vectors,
    project_box,
    rbf,
    imq,
    stein_directions,
    svgd,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "algorithm.md"
INDEX = ROOT / "docs" / "README.md"
DTYPES = [jnp.float32, jnp.float64]


def _eps(dtype):
    return float(jnp.finfo(dtype).eps)


def _doc():
    return DOC.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# structure of the page and references to it


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _headings(text):
    return [m.group(1) for m in re.finditer(r"^#{1,6} +(.+?) *$", text, flags=re.M)]


def _numbered_sections(text):
    """{N: title} for the level-2 headings '## N. Title'."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^## (\d+)\. +(.+?) *$", text, flags=re.M)}


# "docs/algorithm.md §3", "algorithm.md §§2-3", "algorithm.md §2–3", "algorithm.md sections 2-3",
# "algorithm.md section 4". Lower-case file name only: "ALGORITHM.md" is a different file.
_REF = re.compile(r"(?<![\w/])(?:docs/)?algorithm\.md\)?\s*(?:§+|sections?)\s*(\d+)(?:\s*(?:-|–|—|to|and|,)\s*§*\s*(\d+))?")
_LINK = re.compile(r"algorithm\.md#([\w\-]+)")


def _references(text):
    """Section numbers and anchors that ``text`` cites in docs/algorithm.md."""
    numbers = []
    for m in _REF.finditer(text):
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        numbers.extend(range(lo, hi + 1) if hi >= lo else [lo, hi])
    return numbers, _LINK.findall(text)


def _citing_files():
    files = [ROOT / "README.md", INDEX, DOC]
    for folder in ("mtsgd_jax", "examples"):
        files += sorted((ROOT / folder).rglob("*.py"))
        files += sorted((ROOT / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def test_sections_one_to_eight_in_order():
    text = _doc()
    sections = _numbered_sections(text)
    assert sorted(sections) == list(range(1, 9))
    order = [int(m.group(1)) for m in re.finditer(r"^## (\d+)\. ", text, flags=re.M)]
    assert order == sorted(order) and len(order) == len(set(order))
    anchors = {_slug(h) for h in _headings(text)}
    assert "1-kernels" in anchors and "3-the-gram-matrix-u" in anchors


def test_reference_parser_finds_and_rejects():
    numbers, links = _references(
        "see docs/algorithm.md §3, algorithm.md §§2-3, docs/algorithm.md §5–6, "
        "docs/algorithm.md section 8; [x](docs/algorithm.md#4-the-simplex-qp-and-the-descent-guarantee); "
        "ALGORITHM.md section 7"
    )
    assert numbers == [3, 2, 3, 5, 6, 8]
    assert links == ["4-the-simplex-qp-and-the-descent-guarantee"]
    sections = _numbered_sections(_doc())
    assert 12 not in sections and all(n in sections for n in numbers)
    assert "no-such-heading" not in {_slug(h) for h in _headings(_doc())}


def test_every_reference_to_the_page_resolves():
    sections = _numbered_sections(_doc())
    anchors = {_slug(h) for h in _headings(_doc())}
    bad = []
    for path in _citing_files():
        numbers, links = _references(path.read_text(encoding="utf-8", errors="replace"))
        rel = path.relative_to(ROOT)
        bad += [f"{rel}: §{n}" for n in numbers if n not in sections]
        bad += [f"{rel}: #{a}" for a in links if a not in anchors]
    assert not bad, f"references to docs/algorithm.md without a target: {bad}"


def test_index_links_exist():
    text = INDEX.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert "algorithm.md" in targets and "results/" in targets
    for t in targets:
        assert (INDEX.parent / t).exists(), t


def test_no_file_cites_the_private_reference():
    # users have docs/algorithm.md; the upper-case ALGORITHM.md is not in the repository
    cited = [str(p.relative_to(ROOT)) for p in _citing_files() if "ALGORITHM.md" in p.read_text(encoding="utf-8")]
    assert not cited, f"cite docs/algorithm.md instead of ALGORITHM.md in: {cited}"


def test_page_is_self_contained():
    text = _doc()
    for word in ("ALGORITHM.md", "shared/", "the seed", "seeds/", "supplementary"):
        assert word not in text, word
    assert "$" not in text  # formulas are plain text, no LaTeX


# ---------------------------------------------------------------------------
# §1 kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [lambda: rbf(0.7), lambda: imq(0.7, c=1.3, beta=-0.5)])
def test_kernel_derivative_formulas(make, dtype):
    kern = make()
    x = jax.random.normal(jax.random.key(1), (6, 3), dtype)
    m, d = x.shape
    km = jax.jit(lambda z: kernel_matrices(kern, z))(x)
    grad_a, grad_b, trace = _pair_derivatives(kern, x)
    diff = x[:, None, :] - x[None, :, :]
    tol = 200 * _eps(dtype)
    scale = float(jnp.max(jnp.abs(grad_a))) + 1.0
    np.testing.assert_allclose(grad_a, 2 * km.dk[..., None] * diff, atol=tol * scale)
    np.testing.assert_allclose(grad_b, -2 * km.dk[..., None] * diff, atol=tol * scale)
    formula = -2 * d * km.dk - 4 * km.r2 * km.d2k
    tscale = float(jnp.max(jnp.abs(trace))) + 1.0
    np.testing.assert_allclose(trace, formula, atol=tol * tscale)
    np.testing.assert_allclose(km.trace_sum, jnp.sum(trace), atol=tol * tscale * m * m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 5])
def test_median_heuristic_convention(m, dtype):
    x = jax.random.normal(jax.random.key(m), (m, 3), dtype)
    r2 = np.asarray(pairwise_sq_dists(x), np.float64)
    rows, cols = np.triu_indices(m, 1)
    expected = np.median(r2[rows, cols]) / math.log(m + 1)
    h = jax.jit(lambda z: kernel_matrices(rbf(), z).bandwidth)(x)
    assert float(h) == pytest.approx(expected, rel=8 * _eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_median_fallbacks(dtype):
    # 4 of 5 particles coincide: 6 of the 10 distinct pairs are 0, so the median is 0 and the
    # mean of the distinct-pair distances is used: 4 pairs at r2 = 9, mean 3.6.
    bandwidth = jax.jit(lambda z: median_bandwidth(pairwise_sq_dists(z)))
    x = jnp.zeros((5, 2), dtype).at[4].set(jnp.array([3.0, 0.0], dtype))
    assert float(bandwidth(x)) == pytest.approx(3.6 / math.log(6), rel=8 * _eps(dtype))
    assert float(bandwidth(jnp.ones((5, 2), dtype))) == pytest.approx(1.0, rel=8 * _eps(dtype))
    assert float(bandwidth(jnp.ones((1, 2), dtype))) == 1.0


# ---------------------------------------------------------------------------
# §2-3 directions and U


def _pairwise(fn, x):
    """[a, b] = fn(x_a, x_b) for all pairs."""
    return jax.vmap(jax.vmap(fn, (None, 0)), (0, None))(x, x)


def _pair_derivatives(kern, x):
    """∇_a k(x_a, x_b), ∇_b k(x_a, x_b) and tr(∇_a ∇_b k(x_a, x_b)) by autodiff of k itself."""

    def run(x):
        k = lambda a, b: kern(a, b)
        mixed = _pairwise(jax.jacfwd(jax.grad(k, 1), 0), x)
        return _pairwise(jax.grad(k, 0), x), _pairwise(jax.grad(k, 1), x), jnp.trace(mixed, axis1=-2, axis2=-1)

    return jax.jit(run)(x)


def _u_double_sum(x, scores, kern):
    """The four-term double sum of §3, every kernel derivative by autodiff; also the sum of |terms|."""

    def run(x, scores):
        kab = _pairwise(lambda a, b: kern(a, b), x)
        ga, gb, tr = _pair_derivatives(kern, x)
        t1 = jnp.einsum("ab,kad,lbd->klab", kab, scores, scores)
        t2 = jnp.einsum("kad,abd->kab", scores, gb)[:, None]  # ⟨s_k(θ_a), ∇_b k(θ_a, θ_b)⟩
        t3 = jnp.einsum("lbd,abd->lab", scores, ga)[None, :]  # ⟨s_l(θ_b), ∇_a k(θ_a, θ_b)⟩
        size = jnp.abs(t1) + jnp.abs(t2) + jnp.abs(t3) + jnp.abs(tr)[None, None]
        m2 = x.shape[0] ** 2
        return jnp.sum(t1 + t2 + t3 + tr[None, None], axis=(2, 3)) / m2, jnp.sum(size, axis=(2, 3)) / m2

    return jax.jit(run)(x, scores)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [lambda: rbf(1.5), lambda: imq(2.0)])
def test_gram_matrix_is_the_double_sum(make, dtype):
    kx, ks = jax.random.split(jax.random.key(3))
    m, d = 7, 3
    x = jax.random.normal(kx, (m, d), dtype)
    scores = jax.random.normal(ks, (3, m, d), dtype)
    expected, size = _u_double_sum(x, scores, make())
    tol = 64 * _eps(dtype) * float(jnp.max(size))
    u, phi, km = jax.jit(lambda x, s: (gram_matrix(x, s, make()), stein_directions(x, s, make()), kernel_matrices(make(), x)))(x, scores)
    np.testing.assert_allclose(u, expected, atol=tol)
    # decomposition U = G + c1ᵀ + 1cᵀ + t and Φ_k = (Kmat S_k + R)/M, written out in numpy
    xs, ss = np.asarray(x, np.float64), np.asarray(scores, np.float64)
    kmat, dk, d2k, r2 = (np.asarray(a, np.float64) for a in (km.k, km.dk, km.d2k, km.r2))
    rep = 2 * (dk @ xs - dk.sum(1)[:, None] * xs)  # R_m = 2 Σ_a κ'_am (θ_a − θ_m), κ' symmetric
    g = np.einsum("kmd,ma,lad->kl", ss, kmat, ss) / m**2
    c = np.einsum("kmd,md->k", ss, rep) / m**2
    t = np.sum(-2 * d * dk - 4 * r2 * d2k) / m**2
    np.testing.assert_allclose(u, g + c[:, None] + c[None, :] + t, atol=tol)
    expected_phi = (np.einsum("ma,kad->kmd", kmat, ss) + rep) / m
    np.testing.assert_allclose(phi, expected_phi, atol=64 * _eps(dtype) * (1 + np.abs(expected_phi).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_kernel_example(dtype):
    """The linear-kernel identity U_kl = tr(V_k V_lᵀ) against the §3 double sum, and φ_k(x) = V_k x."""
    rng = np.random.default_rng(4)
    m, d, kk = 5, 3, 3
    x = rng.normal(size=(m, d)).astype(dtype)
    s = rng.normal(size=(kk, m, d)).astype(dtype)
    # the double sum with ∇_a k(a, b) = b, ∇_b k(a, b) = a, tr(∇_a ∇_b k) = d
    u = (
        np.einsum("ab,kad,lbd->kl", x @ x.T, s, s)
        + m * np.einsum("kad,ad->k", s, x)[:, None]
        + m * np.einsum("lbd,bd->l", s, x)[None, :]
        + m * m * d
    ) / m**2
    v = np.einsum("kad,ae->kde", s, x) / m + np.eye(d, dtype=dtype)
    size = np.abs(v).sum(axis=(1, 2)).max() ** 2
    np.testing.assert_allclose(u, np.einsum("kde,lde->kl", v, v), atol=32 * np.finfo(dtype).eps * size)
    z = rng.normal(size=d).astype(dtype)  # φ_k(z) = (1/M) Σ_a [ (θ_aᵀz) s_k(θ_a) + z ]
    phi = (np.einsum("ad,d,kae->ke", x, z, s) + m * z) / m
    np.testing.assert_allclose(phi, np.einsum("kde,e->kd", v, z), atol=32 * np.finfo(dtype).eps * size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_worked_example(dtype):
    q = math.exp(-1.0)
    u11, u12 = 1.25 - 2 * q, 1 - 2.25 * q
    phi1, phi2 = (-1.5 * q, q - 0.5), (0.5 - q, 1.5 * q)
    star = 0.25 - 1.25 * q
    text = _doc()
    for value in (q, u11, u12, *phi1, *phi2, star):
        assert f"{abs(value):.6f}" in text, value

    x = jnp.array([[0.0], [1.0]], dtype)
    scores = jnp.stack([-x, 1.0 - x])
    opt = mtsgd(2, rbf(1.0))

    def run(x, scores):
        update, state = opt.update(-scores, opt.init(x), x)  # loss gradients g = −S
        return gram_matrix(x, scores, rbf(1.0)), stein_directions(x, scores, rbf(1.0)), update, state

    u, phi, update, state = jax.jit(run)(x, scores)
    tol = 32 * _eps(dtype)
    np.testing.assert_allclose(u, [[u11, u12], [u12, u11]], atol=tol)
    np.testing.assert_allclose(phi[:, :, 0], [phi1, phi2], atol=tol)
    np.testing.assert_allclose(update[:, 0], [-star, star], atol=tol)
    np.testing.assert_allclose(state.weights, [0.5, 0.5], atol=tol)
    np.testing.assert_allclose(state.ksd, [u11, u11], atol=tol)


# ---------------------------------------------------------------------------
# §4 the QP


_LEMMA_CASES = {}


def _lemma_case(k, method, dtype):
    """Jitted (key -> U, w) for random particles and scores: one compilation per case."""
    key = (k, method, dtype)
    if key not in _LEMMA_CASES:

        def run(rng):
            kx, ks = jax.random.split(rng)
            x = jax.random.normal(kx, (6, 2), dtype)
            scores = jax.random.normal(ks, (k, 6, 2), dtype) + 0.5
            u = gram_matrix(x, scores, rbf())
            return u, min_norm_weights(u, method=method)

        _LEMMA_CASES[key] = jax.jit(run)
    return _LEMMA_CASES[key]


@pytest.mark.x64
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 4))
def test_lemma_1_on_library_gram_matrices(seed, k):
    for dtype in DTYPES:
        u, w = _lemma_case(k, "enumerate", dtype)(jax.random.key(seed))
        uw, val = u @ w, w @ u @ w
        tol = 1e3 * k * _eps(dtype) * float(jnp.max(jnp.diagonal(u)))
        assert float(jnp.min(uw - val)) >= -tol  # ⟨φ*, φ_k⟩ ≥ ‖φ*‖²
        assert abs(float(jnp.sum(w)) - 1) <= 4 * k * _eps(dtype) and float(jnp.min(w)) >= 0
        on = w > 1e-3
        assert float(jnp.max(jnp.abs(jnp.where(on, uw - val, 0.0)))) <= tol  # equality on the support


@pytest.mark.parametrize("dtype", DTYPES)
def test_closed_form_and_constant_shift(dtype):
    a = np.random.default_rng(5).normal(size=(2, 4)).astype(dtype)
    u = a @ a.T
    w1 = float(np.clip((u[1, 1] - u[0, 1]) / (u[0, 0] + u[1, 1] - 2 * u[0, 1]), 0, 1))
    solve = jax.jit(min_norm_weights, static_argnames="method")
    np.testing.assert_allclose(solve(u, method="closed_form"), [w1, 1 - w1], atol=16 * _eps(dtype))
    # a constant added to every entry leaves the minimiser unchanged (enumeration is exact)
    b = np.random.default_rng(6).normal(size=(4, 3)).astype(dtype)  # rank 3: a unique minimiser
    u4 = b @ b.T
    diff = solve(u4 + dtype(0.3), method="enumerate") - solve(u4, method="enumerate")
    cond = np.linalg.cond(u4[:3, :3].astype(np.float64))
    assert float(jnp.max(jnp.abs(diff))) <= 64 * _eps(dtype) * cond


# ---------------------------------------------------------------------------
# §5 special cases and baselines


def _kernel_sums(x, vectors, h):
    """(Σ_a k(x_a, x_m) v_a, Σ_a ∇_{x_a} k(x_a, x_m)) for the RBF exp(−r²/h), by autodiff."""
    k = lambda a, b: jnp.exp(-jnp.sum((a - b) ** 2) / h)
    return jnp.einsum("am,ad->md", _pairwise(k, x), vectors), jnp.sum(_pairwise(jax.grad(k, 0), x), axis=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_k1_is_svgd(dtype):
    m = 9
    x = jax.random.normal(jax.random.key(7), (m, 2), dtype)
    grad = x - 1.0  # target N(1, I): loss gradient x − 1, score 1 − x
    r2 = np.asarray(pairwise_sq_dists(x), np.float64)
    h = np.median(r2[np.triu_indices(m, 1)]) / math.log(m + 1)
    kv, rep = jax.jit(_kernel_sums)(x, -grad, jnp.asarray(h, dtype))
    expected = -(kv + rep) / m  # −φ, φ(θ_m) = (1/M) Σ_a [k(θ_a, θ_m) s(θ_a) + ∇_{θ_a} k(θ_a, θ_m)]
    t, t1 = svgd(), mtsgd(1)
    upd, upd1 = jax.jit(lambda x, g: (t.update(g, t.init(x), x)[0], t1.update(g[None], t1.init(x), x)[0]))(x, grad)
    tol = 64 * _eps(dtype) * (1 + float(jnp.max(jnp.abs(expected))))
    np.testing.assert_allclose(upd, expected, atol=tol)
    np.testing.assert_allclose(upd1, expected, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mgda_and_moo_svgd_formulas(dtype):
    kx, kg = jax.random.split(jax.random.key(8))
    x = jax.random.normal(kx, (4, 3), dtype)
    g = jax.random.normal(kg, (2, 4, 3), dtype)
    gram = np.einsum("kmd,lmd->mkl", np.asarray(g, np.float64), np.asarray(g, np.float64))
    w1 = np.clip((gram[:, 1, 1] - gram[:, 0, 1]) / (gram[:, 0, 0] + gram[:, 1, 1] - 2 * gram[:, 0, 1]), 0, 1)
    gstar = jnp.asarray(w1[:, None] * np.asarray(g[0]) + (1 - w1)[:, None] * np.asarray(g[1]), dtype)
    h, alpha = 0.8, 0.5
    kv, rep = jax.jit(_kernel_sums)(x, gstar, jnp.asarray(h, dtype))
    expected = (kv - alpha * rep) / 4  # (1/M) Σ_a [k(θ_a, θ_m) g*_a − α ∇_{θ_a} k(θ_a, θ_m)]
    t, t2 = mgda(2), moo_svgd(2, rbf(h), repulsion=alpha)
    d_mgda, d_moo = jax.jit(lambda x, g: (t.update(g, t.init(x), x)[0], t2.update(g, t2.init(x), x)[0]))(x, g)
    # first-order sensitivity of the closed-form weight to rounding of the Gram entries
    denom = gram[:, 0, 0] + gram[:, 1, 1] - 2 * gram[:, 0, 1]
    sens = float(np.max((gram[:, 0, 0] + gram[:, 1, 1] + 2 * np.abs(gram[:, 0, 1])) / denom))
    tol = 64 * _eps(dtype) * (1 + float(jnp.max(jnp.abs(g)))) * max(1.0, sens)
    np.testing.assert_allclose(d_mgda, gstar, atol=tol)
    np.testing.assert_allclose(d_moo, expected, atol=tol)


@pytest.mark.x64
def test_preferences_and_box_projection():
    m = 5
    np.testing.assert_allclose(preference_vectors(m), [[i / (m - 1), 1 - i / (m - 1)] for i in range(m)])
    for dtype in DTYPES:
        p = jnp.array([[0.2, 0.9], [0.5, 0.1]], dtype)
        u = jnp.array([[-0.5, 0.3], [0.1, -0.05]], dtype)
        t = project_box(0.0, 1.0)
        upd, _ = t.update(u, t.init(p), p)
        np.testing.assert_allclose(p + upd, jnp.clip(p + u, 0.0, 1.0), atol=2 * _eps(dtype))


# ---------------------------------------------------------------------------
# §7 problems


def test_toy_constants_match_the_page():
    from mtsgd_jax.problems import toy

    text = _doc()
    rows = re.findall(r"k = (\d):\s+μ = \(([^)]*)\),\s+\(([^)]*)\)", text)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    means = np.array([[[float(v.replace("−", "-")) for v in c.split(",")] for c in r[1:]] for r in rows])
    np.testing.assert_array_equal(means, toy.TOY_MEANS)
    assert "0.7·N(μ_k1, 0.5 I) + 0.3·N(μ_k2, 0.5 I)" in text
    np.testing.assert_array_equal(toy.TOY_WEIGHTS, [0.7, 0.3])
    assert toy.TOY_VARIANCE == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_zdt3_formulas_and_segments(dtype):
    from mtsgd_jax.problems.zdt import ZDT3_SEGMENTS, zdt

    n = 30
    prob = zdt("zdt3", num_variables=n)
    theta = jax.random.uniform(jax.random.key(9), (16, n), dtype)
    f1 = theta[:, 0]
    g = 1 + 9 / (n - 1) * jnp.sum(theta[:, 1:], axis=1)
    f2 = g * (1 - jnp.sqrt(f1 / g) - (f1 / g) * jnp.sin(10 * jnp.pi * f1))
    np.testing.assert_allclose(jax.jit(jax.vmap(prob.objectives))(theta), jnp.stack([f1, f2], 1), atol=64 * _eps(dtype) * 10)
    line = re.search(r"\[0, 0\.0830\] ∪ .*", _doc()).group(0)
    intervals = np.array([[float(a), float(b)] for a, b in re.findall(r"\[([\d.]+), ([\d.]+)\]", line)])
    np.testing.assert_allclose(intervals, ZDT3_SEGMENTS, atol=5e-5 + 1e-12)


# ---------------------------------------------------------------------------
# §8 metrics


@pytest.mark.parametrize("dtype", DTYPES)
def test_classification_metrics(dtype):
    from mtsgd_jax.metrics import brier_score, expected_calibration_error

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 200)
    brier = np.mean(np.sum((np.eye(4)[y] - p) ** 2, axis=1))
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inb = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inb.any():
            ece += inb.mean() * abs(correct[inb].mean() - conf[inb].mean())
    pj, yj = jnp.asarray(p, dtype), jnp.asarray(y, jnp.int32)
    tol = 200 * _eps(dtype)
    got_brier, got_ece = jax.jit(lambda p, y: (brier_score(p, y), expected_calibration_error(p, y, 10)))(pj, yj)
    assert float(got_brier) == pytest.approx(brier, abs=tol)
    assert float(got_ece) == pytest.approx(ece, abs=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pareto_metrics(dtype):
    from mtsgd_jax.metrics import hypervolume_2d, igd, igd_plus

    pts = jnp.array([[1.0, 3.0], [2.0, 1.5], [3.5, 3.5], [5.0, 0.5]], dtype)  # last: outside r in f1
    r = jnp.array([4.0, 4.0], dtype)
    # union of [1,4]x[3,4] and [2,4]x[1.5,4]; [3.5,4]x[3.5,4] lies inside the second
    expected = 3 * 1 + 2 * 2.5 - 2 * 1
    assert float(hypervolume_2d(pts, r)) == pytest.approx(expected, abs=16 * _eps(dtype))
    front = jnp.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]], dtype)
    a = jnp.array([[0.5, 2.0], [2.0, 0.5]], dtype)
    d = np.linalg.norm(np.asarray(front, np.float64)[:, None] - np.asarray(a, np.float64)[None], axis=-1)
    dplus = np.linalg.norm(np.maximum(np.asarray(a, np.float64)[None] - np.asarray(front, np.float64)[:, None], 0), axis=-1)
    assert float(igd(a, front)) == pytest.approx(d.min(1).mean(), abs=16 * _eps(dtype))
    assert float(igd_plus(a, front)) == pytest.approx(dplus.min(1).mean(), abs=16 * _eps(dtype))


def test_public_names_cited_on_the_page_exist():
    text = _doc()
    for name in ("rbf", "imq", "radial_kernel", "stein_directions", "kernel_stein_discrepancy", "svgd", "mgda",
                 "moo_svgd", "linear_scalarization", "preference_vectors", "pareto_mtl", "project_box",
                 "clip_to_box"):
        assert f"`{name}" in text, name
        assert hasattr(mtsgd_jax, name), name
