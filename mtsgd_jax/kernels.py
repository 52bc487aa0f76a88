"""Radial kernels k(a, b) = f(||a - b||^2 / h) and their closed-form derivatives.

A kernel here is described by two things:

* a **profile** ``f(u)``: an element-wise scalar function of the scaled squared
  distance ``u = r^2 / h`` (``exp(-u)`` for RBF, ``(c^2 + u)^beta`` for IMQ);
* a **bandwidth** ``h``: a fixed positive number or ``"median"`` for the median
  heuristic.

With ``kappa(r^2) = f(r^2 / h)`` every quantity the Stein algebra needs follows in
closed form (ALGORITHM.md section 1)::

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


def pairwise_sq_dists(x: Array, y: Array | None = None) -> Array:
    """Squared Euclidean distances between rows: ``x`` (M, d), ``y`` (N, d) -> (M, N).

    Uses the Gram form ``|x|^2 + |y|^2 - 2 x y^T`` (one matrix product, O(MNd),
    no (M, N, d) intermediate) at the highest matmul precision, clipped at 0;
    when ``y`` is omitted the diagonal is exactly zero.
    """
    same = y is None
    y = x if same else y
    xx = jnp.sum(x * x, axis=-1)
    yy = xx if same else jnp.sum(y * y, axis=-1)
    xy = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
    r2 = jnp.maximum(xx[:, None] + yy[None, :] - 2.0 * xy, 0.0)
    if same:
        r2 = r2 * (1.0 - jnp.eye(x.shape[0], dtype=r2.dtype))
    return r2


def _kth_smallest_pair(r2: Array, k: int) -> Array:
    """k-th smallest (0-based) of the distinct-pair entries {r2[a, b] : a < b}.

    Exact selection without a sort: non-negative IEEE floats are ordered like
    their bit patterns read as integers, so a bisection over the integer range
    finds the k-th smallest value in ``bits`` passes (31 for float32, 63 for
    float64), each one fused count over the matrix. The count over distinct
    pairs is ``(count over the full matrix - M) / 2`` because ``r2`` is
    symmetric with an exactly zero diagonal.
    """
    m = r2.shape[0]
    itype = jnp.int64 if r2.dtype == jnp.float64 else jnp.int32
    bits = jax.lax.bitcast_convert_type(r2, itype)
    nbits = jnp.iinfo(itype).bits - 1
    hi0 = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, r2.dtype), itype)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        count = (jnp.sum(bits <= mid, dtype=itype) - m) // 2
        above = count > k
        return jnp.where(above, lo, mid + 1), jnp.where(above, mid, hi)

    _, hi = jax.lax.fori_loop(0, nbits, body, (jnp.zeros((), itype), hi0), unroll=4)
    return jax.lax.bitcast_convert_type(hi, r2.dtype)


def median_bandwidth(r2: Array) -> Array:
    """Median-heuristic bandwidth from an (M, M) matrix of squared distances.

    ``r2`` must be symmetric with a zero diagonal (as returned by
    :func:`pairwise_sq_dists`). Returns ``median{r2[a, b] : a < b} / log(M + 1)``
    with the fallbacks of the module docstring (mean of distinct-pair distances
    if the median is 0; 1 if all particles coincide or M = 1). The median is
    exact, found by a sort-free bisection (much faster than ``jnp.median`` on
    CPU). The result carries no gradient.
    """
    m = r2.shape[0]
    if m < 2:
        return jnp.ones((), r2.dtype)
    dtype = r2.dtype
    work = jax.lax.stop_gradient(r2)
    if dtype not in (jnp.float32, jnp.float64):
        work = work.astype(jnp.float32)
    n = m * (m - 1) // 2
    lower = _kth_smallest_pair(work, (n - 1) // 2)
    if n % 2:
        med = lower
    else:
        # The next order statistic: ``lower`` again if it repeats, else the next larger value.
        repeats = (jnp.sum(work <= lower) - m) // 2 > n // 2
        upper = jnp.min(jnp.where(work > lower, work, jnp.inf))
        med = 0.5 * (lower + jnp.where(repeats, lower, upper))
    mean = jnp.sum(work) / (m * (m - 1))
    tiny = jnp.finfo(work.dtype).tiny * 1e3
    scale = jnp.where(med > tiny, med, jnp.where(mean > tiny, mean, jnp.log(m + 1.0)))
    return (scale / jnp.log(m + 1.0)).astype(dtype)


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


def kernel_matrices(kernel: RadialKernel, x: Array) -> KernelMatrices:
    """Evaluate ``kernel`` and its radial derivatives on a flat particle matrix.

    Args:
      kernel: a :class:`RadialKernel`.
      x: particles, shape (M, d).

    Returns:
      :class:`KernelMatrices` with (M, M) entries and a scalar bandwidth.
    """
    r2 = pairwise_sq_dists(x)
    if isinstance(kernel.bandwidth, str):
        h = median_bandwidth(r2)
    else:
        h = jnp.asarray(kernel.bandwidth, dtype=x.dtype)
    u = r2 / h
    f, df, d2f = kernel.derivatives(u)
    d = x.shape[1]
    # -2 d kappa' - 4 r2 kappa'' = (-2 d f'(u) - 4 u f''(u)) / h: no h^2 that could overflow.
    trace_sum = jnp.sum(-2.0 * d * df - 4.0 * u * d2f) / h
    return KernelMatrices(r2=r2, k=f, dk=df / h, d2k=d2f / (h * h), bandwidth=h, trace_sum=trace_sum)
