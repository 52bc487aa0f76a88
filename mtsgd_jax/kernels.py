"""Radial kernels k(a, b) = f(||a - b||^2 / h) and their closed-form derivatives.

A kernel here is described by two things:

* a **profile** ``f(u)``: an element-wise scalar function of the scaled squared
  distance ``u = r^2 / h`` (``exp(-u)`` for RBF, ``(c^2 + u)^beta`` for IMQ);
* a **bandwidth** ``h``: a fixed positive number or ``"median"`` for the median
  heuristic.

With ``kappa(r^2) = f(r^2 / h)`` every quantity the Stein algebra needs follows in
closed form (docs/algorithm.md section 1)::

    grad_a k(a, b)          =  2 kappa'(r^2) (a - b)
    grad_b k(a, b)          = -2 kappa'(r^2) (a - b)
    tr(grad_a grad_b k)     = -2 d kappa'(r^2) - 4 r^2 kappa''(r^2)

where ``kappa'(r^2) = f'(u) / h`` and ``kappa''(r^2) = f''(u) / h^2``. The
derivatives of a built-in profile are written out; those of a user profile come
from forward-mode autodiff of the element-wise function.

Median-heuristic convention: ``h = median{r^2_ab : a < b} / log(M + 1)``, the
median taken over distinct pairs only (the zero self-distances on the diagonal
would bias it downwards for small M). Dividing by ``log(M + 1)`` rather than
``log M`` (original SVGD) follows the MT-SGD reference code and stays finite for
M = 1. When the median is zero (more than half the pairs coincide) the mean of
the pairwise squared distances is used instead, and when every particle
coincides (or M = 1) the bandwidth falls back to 1, so coincident particles
never produce a zero or non-finite bandwidth.

Numerics: distances are taken between points centred on one of them, from the
coordinate differences themselves when d <= 4 (the Gram form
``|x|^2 + |y|^2 - 2 x.y`` of the centred points above), and the SVGD repulsion
``2 sum_a kappa'_am (x_a - x_m)`` is summed without splitting off the self
term, so neither cancels for a cluster far from the origin or a tiny
bandwidth. Particles can be excluded (``valid=``, or a non-finite row): they
then take no part in any sum, the median, or the count M.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Profile = Callable[[Array], Array]
Bandwidth = Union[float, str]

__all__ = [
    "RadialKernel",
    "KernelMatrices",
    "rbf",
    "imq",
    "radial_kernel",
    "median_bandwidth",
    "pairwise_sq_dists",
    "kernel_matrices",
    "KernelProducts",
    "kernel_products",
    "auto_block_size",
    "check_kernel",
]


class RadialKernel(NamedTuple):
    """A radial kernel ``k(a, b) = profile(||a - b||^2 / h)``.

    Attributes:
      profile: element-wise function ``f(u)`` of the scaled squared distance.
      bandwidth: positive float, or ``"median"`` for the median heuristic.
      profile_derivatives: optional element-wise function returning
        ``(f(u), f'(u), f''(u))``; when ``None`` they come from autodiff of
        ``profile``.
      name: a label used in reprs and benchmark tables.

    Build instances with :func:`rbf`, :func:`imq` or :func:`radial_kernel`.
    A kernel is also callable on two single points: ``kernel(a, b)`` with ``a``
    and ``b`` of shape ``(d,)`` returns ``k(a, b)`` for a given bandwidth
    (median bandwidths need a particle set, so call :func:`kernel_matrices`).
    """

    profile: Profile
    bandwidth: Bandwidth = "median"
    profile_derivatives: Callable[[Array], tuple[Array, Array, Array]] | None = None
    name: str = "radial"

    def __call__(self, a: Array, b: Array, bandwidth: float | Array | None = None) -> Array:
        h = self.bandwidth if bandwidth is None else bandwidth
        if isinstance(h, str):
            raise ValueError(
                "kernel(a, b) needs a numeric bandwidth: pass `bandwidth=` or build the "
                "kernel with a fixed bandwidth; the median heuristic needs a particle set "
                "(use kernel_matrices)."
            )
        r2 = jnp.sum((jnp.asarray(a) - jnp.asarray(b)) ** 2)
        return self.profile(r2 / h)

    def derivatives(self, u: Array) -> tuple[Array, Array, Array]:
        """Return ``(f(u), f'(u), f''(u))`` element-wise for an array ``u``."""
        if self.profile_derivatives is not None:
            return self.profile_derivatives(u)
        return _autodiff_derivatives(self.profile, u)


def _autodiff_derivatives(profile: Profile, u: Array) -> tuple[Array, Array, Array]:
    # The profile is element-wise, so a JVP with an all-ones tangent is its
    # element-wise derivative; nesting it gives the second derivative.
    ones = jnp.ones_like(u)

    def first(x):
        return jax.jvp(profile, (x,), (ones,))

    (f, df), (_, d2f) = jax.jvp(first, (u,), (ones,))
    return f, df, d2f


def _check_bandwidth(bandwidth: Bandwidth) -> Bandwidth:
    if bandwidth is None or isinstance(bandwidth, bool) or not isinstance(bandwidth, (str, int, float, np.ndarray, np.generic, jax.Array)):
        raise TypeError(
            f"bandwidth must be a positive float or 'median', got {bandwidth!r} ({type(bandwidth).__name__}); "
            "pass e.g. rbf() or rbf('median') for the median heuristic, or rbf(0.5) for a fixed bandwidth."
        )
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be a positive float or 'median', got {bandwidth!r}.")
        return bandwidth
    if np.ndim(bandwidth) != 0:
        raise ValueError(f"bandwidth must be a scalar (or 'median'), got shape {np.shape(bandwidth)}.")
    if isinstance(bandwidth, jax.core.Tracer):
        return bandwidth  # e.g. a hyper-parameter under jit: cannot be checked here
    value = float(bandwidth)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"bandwidth must be a positive finite float or 'median', got {bandwidth!r}.")
    return bandwidth


def _rbf_derivatives(u):
    f = jnp.exp(-u)
    return f, -f, f


def rbf(bandwidth: Bandwidth = "median") -> RadialKernel:
    """Gaussian (RBF) kernel ``k(a, b) = exp(-||a - b||^2 / h)``.

    Args:
      bandwidth: positive float ``h`` or ``"median"`` (the median heuristic,
        see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax import rbf
      >>> float(rbf(1.0)(jnp.zeros(2), jnp.ones(2)))  # exp(-2)
      0.1353352...
    """
    return RadialKernel(lambda u: jnp.exp(-u), _check_bandwidth(bandwidth), _rbf_derivatives, "rbf")


def imq(bandwidth: Bandwidth = "median", c: float = 1.0, beta: float = -0.5) -> RadialKernel:
    """Inverse multi-quadric kernel ``k(a, b) = (c^2 + ||a - b||^2 / h)^beta``.

    Args:
      bandwidth: positive float ``h`` or ``"median"``.
      c: positive offset; ``c = 1`` gives ``k(a, a) = 1``.
      beta: exponent in ``(-1, 0)``; ``-1/2`` is the usual choice for Stein
        discrepancies.
    """
    if not c > 0:
        raise ValueError(f"imq: c must be positive, got {c!r}.")
    if not -1.0 < beta < 0.0:
        raise ValueError(f"imq: beta must lie in (-1, 0), got {beta!r}.")
    c2 = float(c) ** 2

    def derivatives(u):
        base = c2 + u
        f = base**beta
        df = beta * base ** (beta - 1.0)
        d2f = beta * (beta - 1.0) * base ** (beta - 2.0)
        return f, df, d2f

    return RadialKernel(lambda u: (c2 + u) ** beta, _check_bandwidth(bandwidth), derivatives, "imq")


def radial_kernel(profile: Profile, bandwidth: Bandwidth = "median", name: str = "radial") -> RadialKernel:
    """A user-defined radial kernel from an element-wise profile ``f(u)``.

    ``f`` must be smooth and element-wise in ``u = r^2 / h`` (write it with
    ``jax.numpy`` operations); ``f'`` and ``f''`` are obtained by autodiff.

    Example:
      >>> from mtsgd_jax import radial_kernel
      >>> cauchy = radial_kernel(lambda u: 1.0 / (1.0 + u), bandwidth="median", name="cauchy")
    """
    if not callable(profile):
        raise TypeError(f"radial_kernel: profile must be callable, got {type(profile).__name__}.")
    return RadialKernel(profile, _check_bandwidth(bandwidth), None, name)


def check_kernel(kernel, name: str) -> RadialKernel:
    """``kernel`` or the default ``rbf()`` when ``None``; a clear error for anything but a :class:`RadialKernel`."""
    if kernel is None:
        return rbf()
    if not isinstance(kernel, RadialKernel):
        raise TypeError(
            f"{name}: kernel must be a RadialKernel, got {kernel!r} ({type(kernel).__name__}); "
            "pass kernel=rbf() or kernel=rbf('median') (or imq(), radial_kernel(...)), or leave it as None."
        )
    return kernel


# Up to this many coordinates the distances and the repulsion are summed from coordinate
# differences (no cancellation, and on CPU as fast as or faster than the Gram form: measured at
# M = 2000 it is 0.7 ms vs 1.8 ms for d = 2, 1.5 ms vs 1.7 ms for d = 4, 3x slower from d = 8).
# Above it the Gram form on centred points is used.
_DIRECT_MAX_DIM = 4


def _finite_rows(*arrays: Array) -> Array:
    """(M,) True where every entry of row m of every array is finite; arrays (M, ...) or (K, M, ...) with ``K`` first."""
    ok = None
    for a in arrays:
        axes = tuple(i for i in range(a.ndim) if i != (0 if a.ndim == 2 else 1))
        fin = jnp.all(jnp.isfinite(a), axis=axes)
        ok = fin if ok is None else ok & fin
    return ok


def _centre(z: Array, ok: Array) -> Array:
    """A reference point for centring ``z`` (M, p): its first row marked ``ok`` (M,), (p,); zeros when none is.

    A particle of the set rather than the mean: no rounding, so every use of it
    (in whichever fused kernel the compiler puts it) sees the same value, and
    equal points keep exactly equal centred coordinates. Within a cluster
    ``x_a - c`` is exact (Sterbenz) and at most the cluster's diameter.
    """
    first = jnp.argmax(ok)
    if z.shape[1] > _DIRECT_MAX_DIM:  # long rows (networks): index the row (a sum over M would read all of z)
        return jnp.where(jnp.any(ok), z[first], jnp.zeros((), z.dtype))
    # Short rows: selected by a masked sum (exact: one row plus zeros) rather than by indexing. The
    # sum is computed once, where an indexed row is re-read inside every fused pair loop that uses
    # the centred points, several times slower (one block of 300 points: 1.2 against 0.3 ms).
    pick = (jnp.arange(z.shape[0]) == first) & ok
    return jnp.sum(jnp.where(pick[:, None], z, jnp.zeros((), z.dtype)), axis=0)


def _prepare(z: Array, valid: Array | None = None) -> tuple[Array, Array]:
    """Centred points with excluded rows set to zero, and the row mask (M,).

    A row is excluded when it is not finite or ``valid`` is False there.
    Centring makes the distances independent of where the cluster sits.
    """
    ok = _finite_rows(z)
    if valid is not None:
        ok = ok & valid
    zc = jnp.where(ok[:, None], z - _centre(z, ok), 0)
    return zc, ok


# Fraction bits kept by each leading part of a split coordinate difference: 12 + 12 significant
# bits for float32 (24), 18 + 18 + 17 for float64 (53), so every product of two parts is exact.
_SPLIT_KEEP = {np.dtype(np.float32): (11,), np.dtype(np.float64): (17, 17)}


def _truncate(x: Array, keep: int) -> Array:
    """``x`` with all but the leading ``keep`` fraction bits cleared (integer masking, no rounding)."""
    itype, frac = (jnp.int32, 23) if x.dtype == jnp.float32 else (jnp.int64, 52)
    bits = jax.lax.bitcast_convert_type(x, itype)
    return jax.lax.bitcast_convert_type(bits & ~((1 << (frac - keep)) - 1), x.dtype)


def _square(d: Array) -> Array:
    """``d * d`` with a rounding no compiler can change.

    A compiler may contract ``r2 + d * d`` into a fused multiply-add in one fused loop
    (or vector lane) and not in another, which would give the same pair different
    distances in different programs (row blocks, devices, the dense path). So ``d`` is
    split into parts ``d = p_1 + ... + p_n`` by truncating bits, every product
    ``p_i p_j`` is exact, and the products are added in a fixed order: contracted or
    not, each addition rounds the same exact value. float32 and float64 only (others:
    ``d * d``); a difference too large for the parts' squares (``|d|`` above
    ``sqrt(max) / 8``) is squared plainly.
    """
    keeps = _SPLIT_KEEP.get(np.dtype(d.dtype))
    if keeps is None:
        return d * d
    small = jnp.abs(d) < float(np.sqrt(np.finfo(d.dtype).max)) / 8
    rest = jnp.where(small, d, jnp.zeros((), d.dtype))
    parts = []
    for keep in keeps:
        parts.append(_truncate(rest, keep))
        rest = rest - parts[-1]  # exact: the cleared bits
    parts.append(rest)
    total = jnp.where(small, jnp.zeros((), d.dtype), d * d)
    for i, u in enumerate(parts):
        total = total + u * u
        for v in parts[i + 1:]:
            total = total + (2 * u) * v
    return total


def _centred_sq_dists(a: Array, b: Array) -> Array:
    """Squared distances between rows of centred points ``a`` (B, p) and ``b`` (N, p): (B, N).

    Direct coordinate differences for p <= ``_DIRECT_MAX_DIM`` (each entry to a
    few ulps; exactly zero for equal rows; the same bits in every program, see
    :func:`_square`); above, the Gram form at the highest matmul precision,
    clipped at 0 (absolute error a few ulps of the centred squared norms).
    """
    p = a.shape[1]
    if p <= _DIRECT_MAX_DIM:
        r2 = jnp.zeros((a.shape[0], b.shape[0]), jnp.result_type(a, b))
        for j in range(p):
            r2 = r2 + _square(a[:, j, None] - b[None, :, j])
        return r2
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, axis=-1)[:, None] + jnp.sum(b * b, axis=-1)[None, :] - 2.0 * ab, 0.0)


def pairwise_sq_dists(x: Array, y: Array | None = None) -> Array:
    """Squared Euclidean distances between rows: ``x`` (M, d), ``y`` (N, d) -> (M, N).

    The points are first centred on ``x``'s first finite row, so the
    result does not depend on how far the set is from the origin. For d <= 4
    every entry is summed from coordinate differences (relative error a few
    ulps per entry); for larger d the Gram form ``|x|^2 + |y|^2 - 2 x y^T`` of
    the centred points is used (one matrix product, O(MNd), no (M, N, d)
    intermediate; absolute error a few ulps of the largest centred squared
    norm), clipped at 0. When ``y`` is omitted the diagonal is exactly zero. A
    non-finite row gives non-finite entries in its own row and column only.
    """
    same = y is None
    c = _centre(x, _finite_rows(x))
    xc = x - c
    if same:
        return _symmetric_sq_dists(xc)
    return _centred_sq_dists(xc, y - c)


def _symmetric_sq_dists(zc: Array) -> Array:
    """(M, M) squared distances of centred points, exactly zero diagonal.

    For p <= ``_DIRECT_MAX_DIM`` exactly symmetric on any compiler: ``r2[b, a]`` sums the same
    exact products as ``r2[a, b]`` (:func:`_square` of a negated difference). Above, the Gram
    form's upper triangle is mirrored, which is exact where the compiler materialises the distances
    and may leave an ulp where it recomputes them inside the fused mirror (XLA's CPU backend with
    ``--xla_cpu_use_fusion_emitters=false``, which also drops optimisation barriers). Nothing
    downstream needs more: the median reads the upper triangle only."""
    r2 = _centred_sq_dists(zc, zc)
    m = zc.shape[0]
    i = jnp.arange(m)
    r2 = jnp.where(i[:, None] <= i[None, :], r2, r2.T)
    return jnp.where(i[:, None] == i[None, :], jnp.zeros((), r2.dtype), r2)


# ----------------------------------------------------------------------------- exact selection
#
# Every median here is one radix selection on the bit patterns of non-negative floats (whose
# order as integers is their order as numbers): each pass histograms the next ``w`` bits of the
# values that share the bits already fixed, and the bucket holding the wanted rank fixes ``w``
# more bits. The counts are integers, summed over row blocks and (``psum``) devices, so every
# way of visiting the pairs selects the same value.


def _count_dtype(n_max: int):
    """Integer dtype for pair counts up to ``n_max``: int64 when jax's x64 mode is on, else int32 (checked)."""
    if jax.config.jax_enable_x64:
        return jnp.int64
    if n_max >= 2**31:
        raise ValueError(
            f"median bandwidth: {n_max} distinct pairs do not fit the int32 counts available without 64-bit "
            "mode (more than 46,341 particles); enable it with jax.config.update('jax_enable_x64', True) "
            "(float32 particles stay float32), or pass a fixed bandwidth, e.g. rbf(1.0)."
        )
    return jnp.int32


def _radix_widths(dtype, n_values: int) -> tuple[int, int]:
    """``(width, passes)``: bits histogrammed per pass, and passes to cover the 31 (float32) or
    63 (float64) value bits.

    A pass's fixed cost is its ``2^width`` bins, so the width grows with the number of values
    scanned (about ``log2(n) - 4``, between 6 and 16): 2 passes for float32 from about 10^6
    values, 3 from 3 10^4; float64 takes twice as many. All passes have the same width (the top
    one also reads bits above the value bits, which are zero), so they run as one compiled loop.
    """
    total = 63 if dtype == jnp.float64 else 31
    w = int(min(16, max(6, math.floor(math.log2(max(n_values, 2))) - 4)))
    passes = -(-total // w)
    return -(-total // passes), passes


def _histogram(bits: Array, include: Array, shift, width: int, prefix: Array, ctype):
    """One pass over some values: counts (2^width,) of the included ``bits`` whose bits above
    ``shift + width`` equal ``prefix``, by their next ``width`` bits (``shift`` may be traced)."""
    low = jax.lax.shift_right_logical(bits, jnp.asarray(shift, bits.dtype))
    # two shifts, each below the bit width, even where shift + width exceeds it (the top pass)
    hi = jax.lax.shift_right_logical(low, jnp.asarray(width, bits.dtype))
    nbins = 1 << width
    bucket = low & (nbins - 1)
    match = hi == prefix
    bucket = jnp.where(match if include is True else include & match, bucket, nbins)
    # one spare bin for the values not counted (an in-bounds scatter: no per-update bounds test);
    # int32 within one call (a block's pairs), ctype (int64 with x64) only for the total (an
    # int64 scatter is several times slower on CPU)
    counts = jnp.zeros(nbins + 1, jnp.int32).at[bucket.reshape(-1)].add(1, mode="promise_in_bounds")
    return counts[:nbins].astype(ctype)


def _min_above(bits: Array, include: Array, shift: int, prefix: Array) -> Array:
    """The smallest included bit pattern whose bits above ``shift`` exceed ``prefix`` (int max if none)."""
    hi = jax.lax.shift_right_logical(bits, jnp.asarray(shift, bits.dtype))
    return jnp.min(jnp.where(include & (hi > prefix), bits, jnp.iinfo(bits.dtype).max))


def _radix_select(
    histogram: Callable, min_above: Callable, k: Array, width: int, passes: int, itype, ctype, unroll: bool = False
):
    """The k-th smallest (0-based) of a multiset of non-negative float bit patterns.

    ``histogram(shift, width, prefix)`` returns :func:`_histogram`'s counts over the whole
    multiset and ``min_above(shift, prefix)`` :func:`_min_above`'s value (both combined over
    blocks and devices by the caller). ``passes`` passes of ``width`` bits, from the top, run as
    one ``fori_loop``: one copy of the pass in the program, and whatever a pass computes
    independently of the pass (one block's distances) is computed once; ``unroll`` unrolls it
    (faster where each pass loops over several blocks).

    Returns ``(lower, n_leq, upper)``: the k-th smallest pattern, how many values are <= it,
    and the smallest pattern above it (the int maximum when there is none). ``upper`` comes
    from the last histogram unless the k-th value is the largest of its last-pass range; only
    then (``lax.cond``) does one more pass run.
    """
    nbins = 1 << width

    def one_pass(p, carry):
        prefix, rem, below, _, _, _ = carry
        shift = (passes - 1 - p).astype(itype) * width
        counts = histogram(shift, width, prefix)
        cum = jnp.cumsum(counts)
        b = jnp.sum(cum <= rem).astype(itype)  # the bucket holding rank rem
        before = jnp.where(b > 0, cum[jnp.maximum(b - 1, 0)], 0).astype(ctype)
        return prefix << width | b, rem - before, below + before, prefix, counts, b

    zero_i, zero_c = jnp.zeros((), itype), jnp.zeros((), ctype)
    init = (zero_i, jnp.asarray(k, ctype), zero_c, zero_i, jnp.zeros((nbins,), ctype), zero_i)
    prefix, _, below, last_prefix, counts, b = jax.lax.fori_loop(0, passes, one_pass, init, unroll=unroll)
    idx = jnp.arange(nbins, dtype=itype)
    nxt = jnp.min(jnp.where((idx > b) & (counts > 0), idx, nbins))
    upper = jax.lax.cond(
        nxt < nbins,
        lambda: (last_prefix << width) | nxt,
        lambda: min_above(width, last_prefix).astype(itype),
    )
    return prefix, below + counts[b], upper


def _median_counts(nv, ctype):
    """Number of distinct pairs among ``nv`` particles and the 0-based index of the lower median."""
    nv = jnp.asarray(nv, ctype)
    n = nv * (nv - 1) // 2
    return nv, n, jnp.maximum(n - 1, 0) // 2


def _finish_median(lower, n_leq, upper, total: Callable[[], Array], n, nv, dtype):
    """Median (average of the two middle values for even n), fallbacks, and the division by log(nv + 1).

    ``total()`` gives the distinct pairs' distance sum for the mean fallback; it runs (``lax.cond``)
    only when the median is not positive, so the common case never pays its pass over the points."""
    med = jnp.where(n % 2 == 1, lower, 0.5 * (lower + jnp.where(n_leq > n // 2, lower, upper)))
    tiny = jnp.finfo(dtype).tiny * 1e3
    mean = jax.lax.cond(
        med > tiny,
        lambda: jnp.zeros((), dtype),
        lambda: (total() / jnp.maximum(n, 1).astype(dtype)).astype(dtype),
    )
    # the barrier keeps a compile-time-constant M from being folded with the compiler's own log,
    # which can differ from the run-time log by an ulp: every path then divides by the same value
    log_n = jnp.log(jax.lax.optimization_barrier(nv).astype(dtype) + 1.0)
    scale = jnp.where(med > tiny, med, jnp.where(mean > tiny, mean, log_n))
    return jnp.where(nv >= 2, scale / log_n, jnp.ones((), dtype))


def _select_median(
    histogram: Callable, min_above: Callable, nv, n_values: int, n_max: int, dtype, total, unroll: bool = False
) -> Array:
    """The median bandwidth from a pair histogram over ``nv`` particles' distinct pairs
    (``n_values`` scanned per pass, at most ``n_max`` pairs) and ``total()``, their distance sum."""
    itype = jnp.int64 if dtype == jnp.float64 else jnp.int32
    ctype = _count_dtype(n_max)
    nv, n, k = _median_counts(nv, ctype)
    lower, n_leq, upper = _radix_select(histogram, min_above, k, *_radix_widths(dtype, n_values), itype, ctype, unroll)
    as_float = lambda b: jax.lax.bitcast_convert_type(b, dtype)  # noqa: E731
    return _finish_median(as_float(lower), n_leq, as_float(upper), total, n, nv, dtype)


def _vector_histogram(bits: Array, include: Array, ctype):
    """(histogram, min_above) callables of :func:`_radix_select` over one array of values."""
    return (
        lambda shift, width, prefix: _histogram(bits, include, shift, width, prefix, ctype),
        lambda shift, prefix: _min_above(bits, include, shift, prefix),
    )


# Up to this M the distinct pairs are gathered once into a vector (half the entries, read
# contiguously); above it the passes run over the matrix with the lower triangle masked.
_TRIANGLE_MAX_M = 2048


def median_bandwidth(r2: Array, *, valid: Array | None = None) -> Array:
    """Median-heuristic bandwidth from an (M, M) matrix of squared distances.

    ``r2`` must hold the distances of distinct pairs in its upper triangle (as
    :func:`pairwise_sq_dists` returns; the rest is not read). Returns
    ``median{r2[a, b] : a < b} / log(M + 1)`` with the fallbacks of the module
    docstring (mean of distinct-pair distances if the median is 0; 1 if all
    particles coincide or M = 1). The median is exact: a radix selection on the
    float bit patterns, 2-6 histogram passes (see :func:`kernel_products`). The
    result carries no gradient.

    Args:
      r2: (M, M) squared distances.
      valid: optional (M,) bool: only pairs of valid particles count, and M is
        their number (1 when fewer than two are valid). Works under ``jit``
        and ``vmap`` (the count is traced).
    """
    m = r2.shape[0]
    dtype = r2.dtype
    if m < 2:
        return jnp.ones((), dtype)
    work = jax.lax.stop_gradient(r2)
    if dtype not in (jnp.float32, jnp.float64):
        work = work.astype(jnp.float32)
    wdtype = work.dtype
    itype = jnp.int64 if wdtype == jnp.float64 else jnp.int32
    ctype = _count_dtype(m * (m - 1) // 2)
    ok = jnp.ones((m,), bool) if valid is None else jnp.asarray(valid, bool)
    nv = jnp.sum(ok, dtype=ctype)
    if m <= _TRIANGLE_MAX_M:
        rows, cols = np.triu_indices(m, 1)
        pairs = work.reshape(-1)[jnp.asarray(rows * m + cols)]
        include = ok[jnp.asarray(rows)] & ok[jnp.asarray(cols)]
    else:
        i = jnp.arange(m)
        pairs = work
        include = (i[:, None] < i[None, :]) & ok[:, None] & ok[None, :]
    total = lambda: jnp.sum(jnp.where(include, pairs, 0))  # noqa: E731
    bits = jax.lax.bitcast_convert_type(pairs, itype)
    hist, above = _vector_histogram(bits, include, ctype)
    return _select_median(hist, above, nv, pairs.size, m * (m - 1) // 2, wdtype, total).astype(dtype)


class KernelMatrices(NamedTuple):
    """Kernel quantities on a particle set (all (M, M) unless noted).

    Attributes:
      r2: squared distances ``||x_a - x_b||^2``.
      k: kernel values ``kappa(r2)``.
      dk: ``kappa'(r2)``, derivative with respect to the squared distance.
      d2k: ``kappa''(r2)``.
      bandwidth: scalar bandwidth actually used.
      trace_sum: scalar ``sum_ab tr(grad_a grad_b k(x_a, x_b))
        = sum_ab (-2 d kappa'_ab - 4 r2_ab kappa''_ab)``, evaluated in the scaled
        variable ``u = r2 / h`` so that it stays finite for tiny bandwidths.
    """

    r2: Array
    k: Array
    dk: Array
    d2k: Array
    bandwidth: Array
    trace_sum: Array


def _masked_derivatives(kernel: RadialKernel, r2: Array, h: Array, pair_ok: Array | None):
    """``u = r2 / h`` and ``f, f', f''`` at u, all zero on excluded pairs (computed at u = 0 there)."""
    u = r2 / h
    if pair_ok is None:
        return (u,) + tuple(kernel.derivatives(u))
    u = jnp.where(pair_ok, u, 0)
    f, df, d2f = kernel.derivatives(u)
    return u, jnp.where(pair_ok, f, 0), jnp.where(pair_ok, df, 0), jnp.where(pair_ok, d2f, 0)


# ----------------------------------------------------------------------------- row blocks


# Automatic block size: a block's (B, M) intermediates are sized to about this many entries
# (measured on CPU: 2-3x faster than one (M, M) pass from M = 1000) ...
_BLOCK_TARGET_ENTRIES = 1 << 18
# ... with at least this many rows (fewer make the per-block GEMMs inefficient) ...
_BLOCK_MIN_ROWS = 32
# ... within this memory budget for the block's working set, in bytes.
_BLOCK_MEMORY_BUDGET = 256 << 20


def auto_block_size(m: int, p: int, n: int = 1, *, itemsize: int = 4, memory_budget: int | None = None) -> int:
    """The block size :func:`kernel_products` uses when given ``block_size=None``.

    The rule: ``B = 2^round(log2(2^18 / M))`` rows (about 262,000 entries
    per (B, M) intermediate), at least 32, then lowered to a power of two so
    that the block's working set, about ``(p + n + 4) B M itemsize`` bytes,
    fits ``memory_budget`` (default 256 MiB), at least 1 and at most M.
    E.g. d = 2, float32: B = M up to M = 512, 256 at 1,000, 128 at 2,000,
    32 at 20,000 and 100,000.

    Args:
      m: number of particles M (all devices together).
      p: point dimension.
      n: number of columns of the smoothed vectors.
      itemsize: bytes per entry (4 for float32).
      memory_budget: bytes for one block's intermediates.
    """
    budget = _BLOCK_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    m = max(int(m), 1)
    b = max(_BLOCK_MIN_ROWS, 1 << max(0, round(math.log2(_BLOCK_TARGET_ENTRIES / m))))
    per_row = (p + n + 4) * m * itemsize
    while b > 1 and b * per_row > budget:
        b //= 2
    return int(min(b, m))


class _Blocks(NamedTuple):
    """A particle set in row blocks: the centred points of ALL devices padded to whole blocks.

    ``z`` (NB B, p) and ``ok`` (NB B,) (False on padding and excluded rows);
    ``mine`` (nb,) are the global indices of the blocks whose rows this device
    owns, ``size`` B and ``count`` NB are static.
    """

    z: Array
    ok: Array
    mine: Array
    size: int
    count: int


def _make_blocks(z: Array, ok: Array, block_size: int, axis_name) -> tuple[_Blocks, Array]:
    """Pad this device's rows ``z`` (m, p), ``ok`` (m,) to whole blocks, gather all devices' rows,
    centre them on an included particle. Returns the blocks and the (m,) row mask."""
    m = z.shape[0]
    b = min(block_size, m)
    nb = -(-m // b)
    pad = nb * b - m
    if pad:
        z = jnp.concatenate([z, jnp.zeros((pad,) + z.shape[1:], z.dtype)])
        ok = jnp.concatenate([ok, jnp.zeros((pad,), bool)])
    if axis_name is None:
        first, n_dev = 0, 1
    else:
        z = jax.lax.all_gather(z, axis_name, tiled=True)
        ok = jax.lax.all_gather(ok, axis_name, tiled=True)
        n_dev = z.shape[0] // (nb * b)
        first = jax.lax.axis_index(axis_name) * nb
    zc, ok = _prepare(z, ok)
    mine = first + jnp.arange(nb)
    return _Blocks(zc, ok, mine, b, nb * n_dev), ok


def _block_rows(blocks: _Blocks, i) -> tuple[Array, Array]:
    b = blocks.size
    return jax.lax.dynamic_slice_in_dim(blocks.z, i * b, b), jax.lax.dynamic_slice_in_dim(blocks.ok, i * b, b)


def _pair_histogram(blocks: _Blocks, itype, ctype, axis_name):
    """:func:`_radix_select`'s callables over the distinct pairs of ``blocks``, each visited once.

    Row block i meets blocks i, i+1, ..., i + NB//2 (cyclically): block pairs at
    cyclic distance s < NB/2 are visited from one side only, the diagonal block
    through its upper triangle, and for even NB the pairs at distance NB/2 from
    the blocks i < NB/2. So the passes read about M^2 / 2 distances. Excluded
    and padding points get NaN coordinates: their distances are NaN, whose bit
    pattern lies above every finite or infinite distance and never matches a
    selected prefix, so the big off-diagonal part needs no mask.
    """
    b, nbt = blocks.size, blocks.count
    reach = nbt // 2
    z = jnp.where(blocks.ok[:, None], blocks.z, jnp.asarray(jnp.nan, blocks.z.dtype))
    zz = jnp.concatenate([z, z[: reach * b]])
    upper = jnp.arange(b)[:, None] < jnp.arange(b)[None, :]
    s_col = jnp.arange(reach * b) // b + 1  # cyclic block distance of each off-diagonal column
    nan = jnp.asarray(jnp.nan, z.dtype)

    def block_bits(i):
        zb = jax.lax.dynamic_slice_in_dim(z, i * b, b)
        diag = jax.lax.bitcast_convert_type(_centred_sq_dists(zb, zb), itype)
        if reach == 0:
            return diag, None
        zc = jax.lax.dynamic_slice_in_dim(zz, (i + 1) * b, reach * b)
        if 2 * reach == nbt:  # the blocks at distance NB/2 are met from the first half only
            zc = jnp.where(((s_col == reach) & (i >= reach))[:, None], nan, zc)
        return diag, jax.lax.bitcast_convert_type(_centred_sq_dists(zb, zc), itype)

    def histogram(shift, width, prefix):
        def one(i):
            diag, off = block_bits(i)
            counts = _histogram(diag, upper, shift, width, prefix, ctype)
            if off is not None:
                counts = counts + _histogram(off, True, shift, width, prefix, ctype)
            return counts

        # the first block starts the sum (a zero start would lack the device-varying type under shard_map)
        counts = jax.lax.fori_loop(1, blocks.mine.shape[0], lambda j, acc: acc + one(blocks.mine[j]), one(blocks.mine[0]))
        return counts if axis_name is None else jax.lax.psum(counts, axis_name)

    def min_above(shift, prefix):
        def number(bits):  # leaves out the NaN patterns (of either sign) of excluded points
            return (bits >= 0) & (bits < _INF_BITS[itype])

        def one(i):
            diag, off = block_bits(i)
            above = _min_above(diag, upper & number(diag), shift, prefix)
            if off is not None:
                above = jnp.minimum(above, _min_above(off, number(off), shift, prefix))
            return above

        above = jnp.min(jax.lax.map(one, blocks.mine))
        return above if axis_name is None else jax.lax.pmin(above, axis_name)

    return histogram, min_above, nbt * b * (reach * b + b) // 2


_INF_BITS = {jnp.int32: 0x7F800001, jnp.int64: 0x7FF0000000000001}  # first pattern above +inf (NaN)


def _local_rows(blocks: _Blocks) -> tuple[Array, Array]:
    """This device's points (M_local, p) and their mask (M_local,)."""
    p = blocks.z.shape[1]
    zl = blocks.z.reshape(blocks.count, blocks.size, p)[blocks.mine].reshape(-1, p)
    okl = blocks.ok.reshape(blocks.count, blocks.size)[blocks.mine].reshape(-1)
    return zl, okl


def _pair_count(blocks: _Blocks, ctype, axis_name=None) -> Array:
    """Number n of included points (over all devices)."""
    n = jnp.sum(_local_rows(blocks)[1], dtype=ctype)
    return n if axis_name is None else jax.lax.psum(n, axis_name)


def _pair_distance_sum(blocks: _Blocks, n: Array, axis_name=None) -> Array:
    """Sum of the ``n`` included points' distinct pairs' squared distances, from the points alone:
    ``sum_{a<b} |z_a - z_b|^2 = n sum_a |z_a - mean|^2``, each device summing its own rows."""
    zl, okl = _local_rows(blocks)
    psum = (lambda a: a) if axis_name is None else (lambda a: jax.lax.psum(a, axis_name))  # noqa: E731
    nf = n.astype(zl.dtype)
    mean = psum(jnp.sum(jnp.where(okl[:, None], zl, 0), axis=0)) / jnp.maximum(nf, 1)
    dev = jnp.where(okl[:, None], zl - mean, 0)
    return nf * psum(jnp.sum(dev * dev))


# Up to this many points (on one device) the median reads all pairs as one block whatever the
# kernel sums' block size: (M, M) distances, 8 MiB in float32 at the limit, computed once for all
# passes instead of once per pass.
_ONE_BLOCK_MEDIAN_MAX_M = 1024


def _blocks_median(blocks: _Blocks, axis_name=None) -> Array:
    """Median bandwidth of the included points of ``blocks`` (the module docstring's convention)."""
    z = jax.lax.stop_gradient(blocks.z)
    if z.dtype not in (jnp.float32, jnp.float64):
        z = z.astype(jnp.float32)
    blocks = blocks._replace(z=z)
    dtype = z.dtype
    m_total = blocks.count * blocks.size
    if m_total < 2:
        return jnp.ones((), dtype)
    if axis_name is None and blocks.count > 1 and m_total <= _ONE_BLOCK_MEDIAN_MAX_M:
        # one block: its distances do not depend on the pass, so they are computed once
        blocks = blocks._replace(mine=blocks.mine[:1] * 0, size=m_total, count=1)
    itype = jnp.int64 if dtype == jnp.float64 else jnp.int32
    n_max = m_total * (m_total - 1) // 2
    ctype = _count_dtype(n_max)
    nv = _pair_count(blocks, ctype, axis_name)
    total = lambda: _pair_distance_sum(blocks, nv, axis_name)  # noqa: E731
    hist, above, n_scanned = _pair_histogram(blocks, itype, ctype, axis_name)
    return _select_median(hist, above, nv, n_scanned, n_max, dtype, total, unroll=blocks.mine.shape[0] > 1)


# ----------------------------------------------------------------------------- kernel matrices


def _kernel_matrices(kernel: RadialKernel, zc: Array, ok: Array | None) -> KernelMatrices:
    """:func:`kernel_matrices` on points already prepared by :func:`_prepare` (``ok`` None: no exclusions)."""
    m = zc.shape[0]
    r2 = _centred_sq_dists(zc, zc)
    i = jnp.arange(m)
    r2 = jnp.where(i[:, None] == i[None, :], jnp.zeros((), r2.dtype), r2)
    if isinstance(kernel.bandwidth, str):
        okm = jnp.ones((m,), bool) if ok is None else ok
        blocks = _Blocks(zc, okm, jnp.zeros((1,), jnp.int32), m, 1)
        h = _blocks_median(blocks).astype(zc.dtype)
    else:
        h = jnp.asarray(kernel.bandwidth, dtype=zc.dtype)
    pair_ok = None if ok is None else ok[:, None] & ok[None, :]
    u, f, df, d2f = _masked_derivatives(kernel, r2, h, pair_ok)
    d = zc.shape[1]
    # -2 d kappa' - 4 r2 kappa'' = (-2 d f'(u) - 4 u f''(u)) / h: no h^2 that could overflow.
    trace_sum = jnp.sum(-2.0 * d * df - 4.0 * u * d2f) / h
    return KernelMatrices(r2=r2, k=f, dk=df / h, d2k=d2f / (h * h), bandwidth=h, trace_sum=trace_sum)


def kernel_matrices(kernel: RadialKernel, x: Array, *, valid: Array | None = None) -> KernelMatrices:
    """Evaluate ``kernel`` and its radial derivatives on a flat particle matrix.

    Args:
      kernel: a :class:`RadialKernel`.
      x: particles, shape (M, d).
      valid: optional (M,) bool. Particles with ``valid`` False or a
        non-finite row of ``x`` are excluded: ``k``, ``dk`` and ``d2k`` are
        zero in their rows and columns, they do not enter the median or the
        trace sum, and ``r2`` holds their distances to the centre of the
        others (finite, meaningless).

    Returns:
      :class:`KernelMatrices` with (M, M) entries and a scalar bandwidth
      (the same value :func:`kernel_products` selects). The distances are
      taken on points centred on an included particle (see
      :func:`pairwise_sq_dists` for their accuracy).
    """
    zc, ok = _prepare(x, valid)
    return _kernel_matrices(kernel, zc, ok)


def _kernel_matrices_and_repulsion(kernel: RadialKernel, z: Array, valid: Array | None = None):
    """(:class:`KernelMatrices`, repulsion (M, p), row mask (M,)) with the exclusions of :func:`kernel_matrices`."""
    zc, ok = _prepare(z, valid)
    km = _kernel_matrices(kernel, zc, ok)
    return km, _repulsion(km.dk, zc), ok


class KernelProducts(NamedTuple):
    """Kernel-weighted sums over a particle set, without the (M, M) matrices.

    For points ``z`` (M, p), vectors ``V`` (M, n) and ``kappa_ab = k(z_a, z_b)``:

    Attributes:
      kv: ``sum_b kappa_ab V_b`` for every a, (M, n) (``Kmat @ V``).
      repulsion: ``sum_a grad_{z_a} k(z_a, z_m)`` for every m, (M, p); the
        repulsive term of SVGD.
      trace_sum: scalar ``sum_ab tr(grad_a grad_b k(z_a, z_b))``.
      bandwidth: scalar bandwidth used.
    """

    kv: Array
    repulsion: Array
    trace_sum: Array
    bandwidth: Array


def _check_block_size(block_size):
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(
            f"block_size must be a positive int or None (automatic), got {block_size!r}; "
            "pass e.g. block_size=512, or None to let kernel_products choose."
        )
    return int(block_size)


def _difference_sums(w: Array, z: Array, z_rows: Array) -> Array:
    """``sum_a w_ma (z_a - z_m)`` for p <= 4: (B, p) from ``w`` (B, N), ``z`` (N, p), ``z_rows`` (B, p).

    Every term is a coordinate difference (no cancellation); the B p row sums
    are ONE matrix-vector product of the stacked weighted differences, so the
    differences are formed inside a single fused pass.
    """
    b, p = z_rows.shape
    if p == 0:
        return jnp.zeros((b, 0), jnp.result_type(w, z))
    stacked = jnp.concatenate([w * (z[None, :, j] - z_rows[:, j, None]) for j in range(p)], axis=0)
    sums = jnp.matmul(stacked, jnp.ones((z.shape[0], 1), stacked.dtype), precision=jax.lax.Precision.HIGHEST)
    return sums.reshape(p, b).T


def _repulsion(dk: Array, z: Array, z_rows: Array | None = None, rows: Array | None = None) -> Array:
    """The SVGD repulsion ``R_m = sum_a grad_{z_a} k(z_a, z_m) = 2 sum_a kappa'_am (z_a - z_m)``.

    Formed without cancelling: for p <= 4 as a sum of the coordinate
    differences themselves (each term exact to a few ulps; the self term is
    exactly zero); above, on centred points as ``2 (K' z - rowsum(K') z_m)``
    with the diagonal (self) terms of ``K'`` zeroed, whose error is a few ulps
    of ``sum_a |kappa'_am| |z_a|`` (small unless the points' spread around
    their centre is large compared with the distances at which ``kappa'`` is
    not negligible, i.e. the bandwidth).

    Args:
      dk: ``kappa'`` for the rows m (B, M), e.g. :attr:`KernelMatrices.dk`
        (the matrix is symmetric, so row m holds the column m needs).
      z: all M points, centred, (M, p).
      z_rows: the B points of those rows; default ``z`` (B = M).
      rows: their indices in ``z`` (B,); default ``0 .. M-1``.

    Returns:
      (B, p).
    """
    z_rows = z if z_rows is None else z_rows
    p = z.shape[1]
    if p <= _DIRECT_MAX_DIM:
        return 2.0 * _difference_sums(dk, z, z_rows)
    rows = jnp.arange(dk.shape[0]) if rows is None else rows
    dk0 = jnp.where(rows[:, None] == jnp.arange(z.shape[0])[None, :], jnp.zeros((), dk.dtype), dk)
    return 2.0 * (jnp.matmul(dk0, z, precision=jax.lax.Precision.HIGHEST) - jnp.sum(dk0, axis=1)[:, None] * z_rows)


def _block_sums(kernel: RadialKernel, h: Array, blocks: _Blocks, v: Array, i):
    """Row block ``i``: (``Kmat @ V`` rows (B, n), repulsion rows (B, p), trace partial sum).

    One pass per block: the (B, NB B) distances, the profile and its derivatives
    once, ``f @ V`` as a GEMM and the repulsion and trace row sums as one
    matrix-vector product of the stacked per-pair terms. Excluded columns are
    removed by zero weights (their rows of ``V`` are zero already), excluded rows
    at the end.
    """
    zb, okb = _block_rows(blocks, i)
    z = blocks.z
    p = z.shape[1]
    b = blocks.size
    rows = i * b + jnp.arange(b)
    r2 = _centred_sq_dists(zb, z)
    if p > _DIRECT_MAX_DIM:
        r2 = jnp.where(rows[:, None] == jnp.arange(z.shape[0])[None, :], jnp.zeros((), r2.dtype), r2)
    col = blocks.ok.astype(r2.dtype)[None, :]
    u = jnp.where(blocks.ok[None, :], r2 / h, 0)
    f, df, d2f = kernel.derivatives(u)
    kv = jnp.matmul(f.astype(v.dtype), v)
    dfc = df * col
    tr_terms = (-2.0 * p * dfc - 4.0 * u * (d2f * col))
    if p <= _DIRECT_MAX_DIM:
        stacked = jnp.concatenate([dfc * (z[None, :, j] - zb[:, j, None]) for j in range(p)] + [tr_terms], axis=0)
        sums = jnp.matmul(stacked, jnp.ones((z.shape[0], 1), stacked.dtype), precision=jax.lax.Precision.HIGHEST)
        sums = sums.reshape(p + 1, b)
        rep, tr_rows = sums[:p].T, sums[p]
    else:
        rep = 0.5 * _repulsion(dfc, z, zb, rows)  # sum_a df (z_a - z_m), like the branch above: 2 / h comes below
        tr_rows = jnp.sum(tr_terms, axis=1)
    zero = jnp.zeros((), kv.dtype)
    kv = jnp.where(okb[:, None], kv, zero)
    rep = jnp.where(okb[:, None], 2.0 * rep / h, jnp.zeros((), rep.dtype))
    tr = jnp.sum(jnp.where(okb, tr_rows, 0)) / h
    return kv, rep, tr


def kernel_products(
    kernel: RadialKernel,
    z: Array,
    vectors: Array,
    *,
    block_size: int | None = None,
    axis_name: str | None = None,
    valid: Array | None = None,
    memory_budget: int | None = None,
) -> KernelProducts:
    """``Kmat @ vectors``, the SVGD repulsion and the trace sum, in row blocks.

    Args:
      kernel: a :class:`RadialKernel`.
      z: points, (M, p).
      vectors: (M, n) rows to smooth with the kernel matrix.
      block_size: rows per block B: memory stays O(B M + M (n + p)), so M can
        reach 10^5 particles and more. ``None`` (default) chooses B by
        :func:`auto_block_size` (one block up to M = 1024 for small p; with
        ``axis_name`` from the global M). Every block size gives the same
        bandwidth (exactly; see Cost below) and the same sums to float round-off.
      axis_name: call inside ``shard_map`` with the particles split over this
        mesh axis: ``z`` and ``vectors`` are then this device's rows (M / D of
        them), the other rows are all-gathered, the median counts and the
        trace are summed across devices, and the outputs are this device's
        rows (``trace_sum`` and ``bandwidth`` are global).
      valid: optional (M,) bool (this device's rows when sharded). A particle
        with ``valid`` False, or a non-finite row of ``z`` or ``vectors``, is
        excluded from every sum: the results for the others equal those on
        the set without it (with the median taken over the included pairs
        and M their number), and its own rows of ``kv`` and ``repulsion`` are
        zero. Masking, not indexing: works under ``jit``, ``vmap``, in blocks
        and sharded.
      memory_budget: bytes for one block's intermediates when ``block_size``
        is None (default 256 MiB; see :func:`auto_block_size`).

    Returns:
      :class:`KernelProducts`.

    Cost: per ordered pair the distance, one profile evaluation (one ``exp``
    for the RBF) and ``2 n + 3 p + 4`` further flops, in one fused pass per
    block. The median heuristic adds an exact radix selection over the
    distinct pairs: 2 passes (float32) or 4-5 (float64) from about 10^6 pairs,
    each recomputing the distances of the M^2 / 2 distinct pairs once and
    histogramming the leading bits of their float patterns. Blocked, sharded
    and unblocked runs select exactly the same bandwidth (integer counts;
    identical distances for p <= 4, where each is a fixed-order sum of exact
    products of parts of the coordinate differences, so no fused multiply-add
    the compiler may form changes a rounding).

    Accuracy: the points are centred on an included particle before any
    distance is formed, so a cluster far from the origin loses
    nothing. Against float64 on the same inputs, float32 distances (p <= 4)
    and the median bandwidth are within a few ulps per entry; the repulsion
    within about ``64 eps sum_a |kappa'_am| |z_a - z_m|`` per entry (p <= 4, the
    kernel values carry ``u eps`` relative error at ``u = r^2 / h``), e.g. a
    relative error below 1e-5 for clusters of spread 1 at 1e3 or 0.01 at 1e2
    and fixed bandwidths down to 1e-8.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtsgd_jax import kernel_products, rbf
      >>> z = jax.random.normal(jax.random.key(0), (100, 2))
      >>> full = kernel_products(rbf(), z, z)
      >>> blocked = kernel_products(rbf(), z, z, block_size=32)
      >>> bool(jnp.allclose(full.kv, blocked.kv, atol=1e-5))
      True
    """
    block_size = _check_block_size(block_size)
    if z.ndim != 2 or vectors.ndim != 2 or vectors.shape[0] != z.shape[0]:
        raise ValueError(f"kernel_products: expected z (M, p) and vectors (M, n), got {z.shape} and {vectors.shape}.")
    if valid is not None and jnp.shape(valid) != (z.shape[0],):
        raise ValueError(f"kernel_products: valid must have shape (M,) = ({z.shape[0]},), got {jnp.shape(valid)}.")
    m_rows, p = z.shape
    if m_rows == 0:
        h = jnp.ones((), z.dtype) if isinstance(kernel.bandwidth, str) else jnp.asarray(kernel.bandwidth, z.dtype)
        return KernelProducts(jnp.zeros_like(vectors), jnp.zeros_like(z), jnp.zeros((), z.dtype), h)
    if block_size is None:
        m_global = m_rows if axis_name is None else m_rows * jax.lax.axis_size(axis_name)
        block_size = auto_block_size(
            m_global, p, vectors.shape[1], itemsize=jnp.dtype(z.dtype).itemsize, memory_budget=memory_budget
        )
    ok = _finite_rows(z, vectors)
    if valid is not None:
        ok = ok & jnp.asarray(valid, bool)
    blocks, ok_all = _make_blocks(z, ok, block_size, axis_name)
    v = jnp.concatenate([vectors, jnp.zeros((blocks.mine.shape[0] * blocks.size - m_rows, vectors.shape[1]), vectors.dtype)])
    v_all = v if axis_name is None else jax.lax.all_gather(v, axis_name, tiled=True)
    v_all = jnp.where(ok_all[:, None], v_all, jnp.zeros((), v_all.dtype))
    if isinstance(kernel.bandwidth, str):
        h = _blocks_median(blocks, axis_name).astype(z.dtype)
    else:
        h = jnp.asarray(kernel.bandwidth, dtype=z.dtype)

    one = lambda i: _block_sums(kernel, h, blocks, v_all, i)  # noqa: E731
    if blocks.mine.shape[0] == 1:  # no loop around a single block
        kv, rep, tr = jax.tree_util.tree_map(lambda a: a[None], one(blocks.mine[0]))
    else:
        kv, rep, tr = jax.lax.map(one, blocks.mine)
    kv = kv.reshape(-1, kv.shape[-1])[:m_rows]
    rep = rep.reshape(-1, p)[:m_rows]
    tr = jnp.sum(tr)
    if axis_name is not None:
        tr = jax.lax.psum(tr, axis_name)
    return KernelProducts(kv, rep, tr, h)
