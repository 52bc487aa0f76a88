"""The only module that touches jaxopt (unmaintained): swap this file to change backend.

Both functions solve ``min_{w in simplex} w^T U w`` for a (K, K) PSD ``U`` that
the caller has already rescaled to unit maximum diagonal, and return raw
iterates; :mod:`mtsgd_jax.qp` projects them back onto the simplex.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp


def _jaxopt():
    with warnings.catch_warnings():
        # jaxopt announces on import that it is no longer maintained; the
        # library pins a working version and keeps all uses in this file.
        warnings.filterwarnings("ignore", message=".*JAXopt is no longer maintained.*")
        import jaxopt

    return jaxopt


def projected_gradient(u, init, maxiter: int, tol: float):
    """Accelerated projected gradient (FISTA) with Euclidean simplex projection."""
    jaxopt = _jaxopt()
    from jaxopt.projection import projection_simplex

    # grad of w^T U w is 2 U w with Lipschitz constant 2 lambda_max(U) <= 2 trace(U) <= 2K
    # because U arrives scaled to unit maximum diagonal: a static step size 1 / (2K).
    lipschitz = 2.0 * u.shape[0]
    solver = jaxopt.ProjectedGradient(
        fun=lambda w, mat: w @ mat @ w,
        projection=projection_simplex,
        stepsize=1.0 / lipschitz,
        maxiter=maxiter,
        tol=tol,
        implicit_diff=False,
        acceleration=True,
    )
    return solver.run(init, mat=u).params


def osqp(u, init, maxiter: int, tol: float):
    """jaxopt's OSQP (ADMM) with constraints 1^T w = 1 and w >= 0."""
    jaxopt = _jaxopt()
    k = u.shape[0]
    # The direct (LU) solve of OSQP's K x K linear systems is stable on the rank-deficient
    # U that MT-SGD meets; the default conjugate-gradient solve can diverge in float32.
    solver = jaxopt.OSQP(maxiter=maxiter, tol=tol, eq_qp_solve="lu")
    ones = jnp.ones((1, k), u.dtype)
    sol = solver.run(
        params_obj=(u, jnp.zeros(k, u.dtype)),
        params_eq=(ones, jnp.ones(1, u.dtype)),
        params_ineq=(-jnp.eye(k, dtype=u.dtype), jnp.zeros(k, u.dtype)),
    )
    return sol.params.primal
