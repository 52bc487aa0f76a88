"""Pareto multi-task learning (Lin, Zhen, Li, Zhang & Kwong, NeurIPS 2019) as an optax transformation.

Pareto MTL splits the objective (loss) space into sub-regions with a set of
preference vectors ``u_1, ..., u_M`` (rows of ``preferences``): particle m
looks for a Pareto-optimal solution whose loss vector ``L(theta_m)`` lies in
its own cone

    Omega_m = {v : (u_j - u_m)^T v <= 0 for every j != m},

i.e. ``L(theta_m)`` is closer in angle to ``u_m`` than to any other preference
vector (for unit-norm ``u``). Each particle is one run of the paper's
algorithm; the particles do not interact.

**Main phase** (the paper's Eq. (14)-(15)). With the constraint functions
``G_j(theta) = (u_j - u_m)^T L(theta)`` and the active set
``I = {j != m : G_j > -eps}``, the descent direction solves

    min_{d, a} a + ||d||^2 / 2   s.t.  grad L_k^T d <= a (all k),  grad G_j^T d <= a (j in I),

whose dual is the min-norm problem over the convex hull of the K task
gradients and the active constraint gradients
``grad G_j = sum_k (u_j - u_m)_k grad L_k``: with simplex weights
``(lambda, beta)`` the direction is ``d = sum_k lambda_k g_k + sum_j beta_j grad G_j
= sum_k alpha_k g_k``, ``alpha = lambda + sum_j beta_j (u_j - u_m)``. The update
returned is ``d`` (a "gradient": a following optimiser descends it), so every
loss and every active constraint decreases to first order.

**Initial phase** (the paper's Section 3.2 / its published code). A particle
that starts outside its region first descends the violated constraints only:
``d = min-norm element of conv{grad G_j : G_j > 0}``, until no constraint is
violated (the particle then switches to the main phase for good) or
``warmup_steps`` updates have passed. A feasible particle takes the main
phase's step at once (the published code likewise stops the initial phase as
soon as the point is feasible).

As in the published code the constraint values are computed on the
normalised loss vector ``L / ||L||`` (only their signs matter to the active
set, unless ``constraint_tol > 0``).

The loss values are needed as well as the gradients: pass them as an extra
argument, ``update(grads, state, params, losses=values)`` with ``values`` of
shape (K, M) (e.g. from :func:`mtsgd_jax.targets.loss_value_and_grads`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax._validation import check_init_inputs, check_target_grads, check_update_inputs, num_particles
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles
from mtsgd_jax.transforms._common import _check_num_targets, _float_dtype, _is_real_number, _make_solver
from mtsgd_jax.transforms._scalarization import preference_vectors

Array = jax.Array

__all__ = ["ParetoMTLState", "pareto_mtl", "pareto_mtl_preferences"]

# Above this many QP variables "auto" switches from exact enumeration to projected gradient.
_ENUMERATE_MAX = 10


class ParetoMTLState(NamedTuple):
    """State of :func:`pareto_mtl`.

    Attributes:
      weights: (M, K) the task weights ``alpha_m`` of the last update
        (direction ``d_m = sum_k alpha_mk g_km``); zeros before the first.
      main_phase: (M,) bool, True once particle m has left the initial
        (feasible-point-finding) phase.
      num_active: (M,) int32 number of active constraints at the last update.
      count: () int32 number of updates performed.
    """

    weights: Array
    main_phase: Array
    num_active: Array
    count: Array


def pareto_mtl_preferences(num_particles: int, num_targets: int = 2) -> np.ndarray:
    """Evenly spread unit-norm preference vectors in the positive orthant: (M, K).

    K = 2: the paper's ``(cos t_i, sin t_i)`` with ``t_i = i pi / (2 (M - 1))``
    (i = 0..M-1), from ``(1, 0)`` to ``(0, 1)``. K > 2: the simplex lattice of
    :func:`~mtsgd_jax.transforms.preference_vectors`, each row scaled to unit
    norm. M = 1: the uniform direction.

    Example:
      >>> np.round(pareto_mtl_preferences(3), 4).tolist()
      [[1.0, 0.0], [0.7071, 0.7071], [0.0, 1.0]]
    """
    if num_particles < 1 or num_targets < 1:
        raise ValueError(f"pareto_mtl_preferences: need M >= 1 and K >= 1, got M={num_particles}, K={num_targets}.")
    if num_targets == 2 and num_particles > 1:
        t = np.arange(num_particles) * (np.pi / 2) / (num_particles - 1)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    p = preference_vectors(num_particles, num_targets)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _check_preferences(preferences, num_targets):
    p = np.asarray(preferences, dtype=float)
    if p.ndim != 2 or p.shape[1] != num_targets or p.shape[0] < 1:
        raise ValueError(f"pareto_mtl: preferences must have shape (M, K={num_targets}), got {p.shape}.")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("pareto_mtl: preferences must be finite and non-negative.")
    if np.any(np.linalg.norm(p, axis=1) == 0):
        raise ValueError("pareto_mtl: every preference vector must be non-zero.")
    return p


def pareto_mtl(
    num_targets: int,
    preferences=None,
    *,
    warmup_steps: int = 100,
    constraint_tol: float = 0.0,
    solver: str | Callable = "auto",
    solver_options: dict | None = None,
    normalize_grads: bool = False,
    normalize_weights: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Pareto MTL: each particle finds a Pareto-optimal point in its own preference region.

    Args:
      num_targets: K.
      preferences: (M, K) preference vectors ``u_m`` (one per particle,
        non-negative, non-zero; any scale, but the regions are the angular
        Voronoi cells only for equal norms), or ``None`` for
        :func:`pareto_mtl_preferences` (evenly spread, unit norm) with M taken
        from ``params`` at ``init``. Particles with identical preference
        vectors do not constrain each other.
      warmup_steps: length (in updates) of the initial phase; a particle
        leaves it earlier as soon as it is feasible. 0 skips it.
      constraint_tol: ``eps >= 0``: constraint j counts as active when
        ``G_j > -eps`` (G on the normalised loss vector; 0, the default,
        matches the published code: only violated constraints are active).
      solver: QP backend of :func:`~mtsgd_jax.qp.min_norm_weights` for the
        min-norm problems (K + M variables each; the initial phase's problem
        is padded to that size with repeated rows); ``"auto"`` (default) is
        exact enumeration up to 10 variables and projected gradient above.
      solver_options: ``{"maxiter", "tol", "polish"}`` for the backend.
      normalize_grads: scale each task gradient of each particle to unit norm
        before building the directions (the returned direction combines the
        scaled gradients).
      normalize_weights: rescale ``alpha_m`` so that ``sum_k |alpha_mk| = K``
        (the published code's normalisation; the direction is unchanged, its
        length is not). Off by default: the paper's algorithm returns the
        min-norm direction itself.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(grads, state, params, losses=values)`` takes loss gradients with
      leaves (K, M, ...), the particles (leaves (M, ...)) and the loss values
      (K, M), and returns ``d`` shaped like the particles, with
      :class:`ParetoMTLState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> x = jnp.array([[0.2, 0.0], [0.5, 0.0], [0.8, 0.0]])   # 3 particles
      >>> losses = jnp.stack([jnp.sum(x**2, 1), jnp.sum((x - 1) ** 2, 1)])
      >>> grads = jnp.stack([2 * x, 2 * (x - 1)])
      >>> t = pareto_mtl(2, warmup_steps=0)
      >>> d, state = t.update(grads, t.init(x), x, losses=losses)
      >>> d.shape, state.main_phase.tolist()
      ((3, 2), [True, True, True])
    """
    _check_num_targets("pareto_mtl", num_targets)
    k = num_targets
    pref_fixed = None if preferences is None else _check_preferences(preferences, k)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
        raise ValueError(f"pareto_mtl: warmup_steps must be a non-negative int, got {warmup_steps!r}.")
    if not (_is_real_number(constraint_tol) and constraint_tol >= 0):
        raise ValueError(f"pareto_mtl: constraint_tol must be a non-negative number, got {constraint_tol!r}.")
    warmup_steps = int(warmup_steps)
    tol = float(constraint_tol)

    def solver_for(size):
        if isinstance(solver, str) and solver == "auto":
            return _make_solver("enumerate" if size <= _ENUMERATE_MAX else "projected_gradient", solver_options)
        return _make_solver(solver, solver_options, size)

    def prefs_for(m):
        if pref_fixed is None:
            return pareto_mtl_preferences(m, k)
        if pref_fixed.shape[0] != m:
            raise ValueError(f"pareto_mtl: preferences has {pref_fixed.shape[0]} rows but params has M={m} particles.")
        return pref_fixed

    def init_fn(params):
        check_init_inputs(params, "pareto_mtl.init", constraint_tol=constraint_tol, normalize_grads=normalize_grads, normalize_weights=normalize_weights)
        m = num_particles(params, "params")
        prefs_for(m)
        dtype = _float_dtype(params)
        return ParetoMTLState(
            weights=jnp.zeros((m, k), dtype),
            main_phase=jnp.full((m,), warmup_steps == 0),
            num_active=jnp.zeros((m,), jnp.int32),
            count=jnp.zeros((), jnp.int32),
        )

    def update_fn(grads, state, params=None, **extra_args):
        check_update_inputs(grads, state, params, ParetoMTLState, "pareto_mtl.update", losses=extra_args.get("losses"))
        losses = extra_args.get("losses")
        if losses is None:
            raise ValueError(
                "pareto_mtl needs the per-task loss values: call "
                "update(grads, state, params, losses=values) with values of shape (K, M) "
                "(e.g. from mtsgd_jax.targets.loss_value_and_grads)."
            )
        check_target_grads(grads, params, k)
        x, spec = flatten_particles(params, dtype=_float_dtype(params))
        m = x.shape[0]
        losses = jnp.asarray(losses)
        if losses.shape != (k, m):
            raise ValueError(f"pareto_mtl: losses must have shape (K, M) = ({k}, {m}), got {losses.shape}.")
        losses = losses.astype(x.dtype)
        g = flatten_target_grads(grads, dtype=x.dtype)  # (K, M, d)
        if normalize_grads:
            sq = jnp.sum(g * g, axis=-1, keepdims=True)
            g = g / jnp.sqrt(jnp.maximum(sq, jnp.finfo(g.dtype).tiny))
        gram_tasks = jnp.einsum("kmd,lmd->mkl", g, g)  # (M, K, K)
        prefs = jnp.asarray(prefs_for(m), x.dtype)
        solve = solver_for(k + m)
        eye = jnp.eye(k, dtype=x.dtype)
        tiny = jnp.finfo(x.dtype).tiny

        def one(gram_m, loss_m, idx):
            diffs = prefs - prefs[idx]  # (M, K): row j is the gradient coefficients of G_j
            distinct = jnp.any(diffs != 0, axis=1)  # excludes j = m and duplicate preferences
            value = diffs @ (loss_m / jnp.maximum(jnp.linalg.norm(loss_m), tiny))
            violated = distinct & (value > 0)
            active = distinct & (value > -tol)
            # Main phase: conv{g_1..g_K, grad G_j (j active)}; inactive rows replaced by g_1
            # (already in the set, so the hull is unchanged).
            rows_main = jnp.concatenate([eye, jnp.where(active[:, None], diffs, eye[0][None, :])])
            # Initial phase: conv{grad G_j : j violated}; every other row replaced by the first
            # violated one, so that both problems have K + M rows and are solved in one batch.
            first = diffs[jnp.argmax(violated)]
            rows_init = jnp.concatenate([jnp.tile(first, (k, 1)), jnp.where(violated[:, None], diffs, first[None, :])])
            coeffs = jnp.stack([rows_main, rows_init])  # (2, K + M, K)
            grams = jnp.einsum("pik,kl,pjl->pij", coeffs, gram_m, coeffs)
            lam = jax.vmap(lambda u: solve(u, None))(grams).astype(coeffs.dtype)
            alpha_main, alpha_init = jnp.einsum("pik,pi->pk", coeffs, lam)
            n_active = jnp.sum(active).astype(jnp.int32)
            return alpha_main, alpha_init, jnp.any(violated), n_active

        alpha_main, alpha_init, infeasible, n_active = jax.vmap(one)(gram_tasks, losses.T, jnp.arange(m))
        # Initial phase while infeasible during the warm-up; once feasible (or after the warm-up)
        # a particle stays in the main phase for good.
        main = state.main_phase | (~infeasible) | (state.count >= warmup_steps)
        alpha = jnp.where(main[:, None], alpha_main, alpha_init)
        if normalize_weights:
            total = jnp.sum(jnp.abs(alpha), axis=1, keepdims=True)
            alpha = jnp.where(total > 0, alpha * (k / jnp.maximum(total, tiny)), alpha)
        direction = jnp.einsum("mk,kmd->md", alpha, g)
        new_state = ParetoMTLState(
            weights=alpha.astype(state.weights.dtype),
            main_phase=main,
            num_active=n_active,
            count=optax.safe_int32_increment(state.count),
        )
        return unflatten_particles(direction, spec), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
