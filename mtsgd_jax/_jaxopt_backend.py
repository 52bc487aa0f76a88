"""The only module that touches jaxopt (unmaintained): swap this file to change backend.

Both functions solve ``min_{w in simplex} w^T U w`` for a (K, K) symmetric PSD
``U`` that the caller has already rescaled by a power of two (largest entry in
[1, 2), so nothing here can overflow), and return raw iterates;
:mod:`mtsgd_jax.qp` projects them back onto the simplex and polishes them.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp


def _jaxopt():
    with warnings.catch_warnings():
        # jaxopt announces on import that it is no longer maintained; the
        # library pins a working version and keeps all uses in this file.
        warnings.filterwarnings("ignore", message=".*JAXopt is no longer maintained.*")
        import jaxopt

    return jaxopt


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def projected_gradient(u, init, maxiter: int, tol: float):
    """Accelerated projected gradient (FISTA) with Euclidean simplex projection.

    jaxopt stops FISTA when two consecutive iterates coincide, which momentum
    can produce on a vertex that is not optimal; :func:`mtsgd_jax.qp.min_norm_weights`
    repairs that with its certified active-set polish (which, from a wrong
    vertex, adds the most violating index), so the fast accelerated iteration
    is safe to use here.
    """
    jaxopt = _jaxopt()
    from jaxopt.projection import projection_simplex

    from mtsgd_jax.qp import _scale_by_power_of_two  # qp imports this module

    # Rescale (the minimiser is scale invariant) by the power of two that puts the
    # Gershgorin bound on lambda_max(U) in [1/2, 1): the gradient 2 U w is then at most
    # 2-Lipschitz and the static step 1/2 is safe without being needlessly short. A power
    # of two keeps the rescaled U exactly proportional to the caller's.
    bound = jnp.max(jnp.sum(jnp.abs(u), axis=1))
    u = 0.5 * _scale_by_power_of_two(u, bound)
    solver = jaxopt.ProjectedGradient(
        fun=lambda w, mat: w @ mat @ w,
        projection=projection_simplex,
        stepsize=0.5,
        maxiter=maxiter,
        tol=tol,
        implicit_diff=False,
        acceleration=True,
        # A true while loop: with implicit_diff=False jaxopt's "auto" would unroll into a
        # scan that runs all maxiter iterations (no-ops after convergence).
        unroll=False,
    )
    return solver.run(init, mat=u).params


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def osqp(u, init, maxiter: int, tol: float):
    """jaxopt's OSQP (ADMM) with constraints 1^T w = 1 and w >= 0."""
    jaxopt = _jaxopt()
    k = u.shape[0]
    out_dtype = u.dtype
    if jax.config.jax_enable_x64:
        # jaxopt builds some of OSQP's matrices in the default float dtype; with x64 on,
        # older jax refuses to mix them with a float32 U. The problem is K x K: solve it
        # in float64 and cast back.
        u = u.astype(jnp.float64)
    # The direct (LU) solve of OSQP's K x K linear systems is stable on the rank-deficient
    # U that MT-SGD meets; the default conjugate-gradient solve can diverge in float32.
    solver = jaxopt.OSQP(maxiter=maxiter, tol=tol, eq_qp_solve="lu", unroll=False)
    ones = jnp.ones((1, k), u.dtype)
    sol = solver.run(
        params_obj=(u, jnp.zeros(k, u.dtype)),
        params_eq=(ones, jnp.ones(1, u.dtype)),
        params_ineq=(-jnp.eye(k, dtype=u.dtype), jnp.zeros(k, u.dtype)),
    )
    return sol.params.primal.astype(out_dtype)
