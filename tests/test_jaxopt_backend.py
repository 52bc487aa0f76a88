"""The jaxopt seam (``mtsgd_jax/_jaxopt_backend.py``): raw solver iterates, in float32 (the default).

The backend's two functions return raw iterates that :func:`mtsgd_jax.min_norm_weights` then
projects and polishes; here they are checked on their own against the exact vertex/edge/face
enumeration, so a jaxopt upgrade that changed them would show up here first.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtsgd_jax import _jaxopt_backend as backend
from mtsgd_jax import min_norm_weights

EPS32 = float(np.finfo(np.float32).eps)


def _psd(seed, k, rank=None, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, rank or k))
    return (scale * a @ a.T).astype(np.float32)


def _objective(u, w):
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    return float(w @ u @ w)


@pytest.mark.parametrize("solver", [backend.projected_gradient, backend.osqp])
@pytest.mark.parametrize("k,rank,seed", [(2, 2, 0), (4, 2, 2), (6, 6, 3)])
def test_raw_iterate_is_near_the_exact_minimum(solver, k, rank, seed):
    u = _psd(seed, k, rank)
    # the library hands the backend U scaled by a power of two to a largest entry in [1, 2)
    u = u * np.float32(2.0 ** -np.floor(np.log2(np.max(np.abs(u)))))
    init = jnp.full((k,), 1.0 / k, jnp.float32)
    w = solver(jnp.asarray(u), init, maxiter=2000, tol=1e-7)
    assert w.shape == (k,) and w.dtype == jnp.float32
    exact = min_norm_weights(jnp.asarray(u), method="enumerate")
    # a raw iterate: close to the simplex and to the optimal value (the library's polish makes it exact)
    assert float(jnp.min(w)) >= -1e-3 and abs(float(jnp.sum(w)) - 1.0) <= 1e-3
    w = np.clip(np.asarray(w, np.float64), 0.0, None)
    w /= w.sum()
    assert _objective(u, w) <= _objective(u, exact) + 1e-3 * float(np.max(np.abs(u)))


def test_projected_gradient_is_scale_invariant_by_powers_of_two():
    # it rescales U internally by a power of two: 2^k U gives bit-identical iterates
    u = jnp.asarray(_psd(7, 3))
    init = jnp.full((3,), 1.0 / 3, jnp.float32)
    base = backend.projected_gradient(u, init, maxiter=500, tol=1e-6)
    for e in (-20, -3, 5, 30):
        np.testing.assert_array_equal(np.asarray(backend.projected_gradient(u * 2.0**e, init, maxiter=500, tol=1e-6)), np.asarray(base))


def test_backends_jit_vmap_and_stay_quiet():
    us = jnp.stack([jnp.asarray(_psd(s, 3)) for s in range(4)])
    init = jnp.full((4, 3), 1.0 / 3, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # jaxopt's "no longer maintained" notice never reaches users
        pg = jax.vmap(lambda u, w: backend.projected_gradient(u, w, maxiter=500, tol=1e-6))(us, init)
        qp = jax.vmap(lambda u, w: backend.osqp(u, w, maxiter=500, tol=1e-6))(us, init)
    for i in range(4):
        one = backend.projected_gradient(us[i], init[i], maxiter=500, tol=1e-6)
        np.testing.assert_allclose(np.asarray(pg[i]), np.asarray(one), rtol=0, atol=16 * EPS32)
    assert pg.shape == qp.shape == (4, 3) and pg.dtype == qp.dtype == jnp.float32
