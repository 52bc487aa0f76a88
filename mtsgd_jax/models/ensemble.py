"""Ensembles of flax modules as particle sets: M networks stacked on a leading axis.

:func:`init_ensemble` initialises M independent copies of a module (vmapped
``init`` over M keys) and splits the variables into the trainable particle set
``params`` and the remaining collections ``state`` (e.g. batch-norm
``batch_stats``), each with leading axis M. :func:`apply_ensemble` runs every
particle on the same inputs (vmapped ``apply``), giving outputs with a leading
axis M.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from mtsgd_jax._validation import num_particles
from mtsgd_jax.particles import init_flax_particles

PyTree = Any

__all__ = ["EnsembleVariables", "init_ensemble", "apply_ensemble", "param_count"]


class EnsembleVariables(NamedTuple):
    """Variables of M stacked networks.

    Attributes:
      params: the ``"params"`` collection, every leaf (M, ...): the particles.
      state: the other collections (e.g. ``{"batch_stats": ...}``), leaves
        (M, ...); ``{}`` for modules without state.
    """

    params: PyTree
    state: dict


@partial(jax.jit, static_argnums=(0, 2, 4, 5))
def _init_cached(module, key, m, sample_input, args, kwargs_items):
    return init_flax_particles(module, key, m, sample_input, *args, **dict(kwargs_items))


def _init(module, key, m, sample_input, args, kwargs):
    """Vmapped init as ONE compiled program (far faster than op-by-op dispatch for
    deep models), cached on (module, M, input shape, extra arguments) when they are
    hashable, so that initialising the same architecture again does not recompile."""
    static = (args, tuple(sorted(kwargs.items())))
    try:
        hash((module, static))
    except TypeError:  # e.g. array-valued extra arguments: compile for this call only
        return jax.jit(lambda k: init_flax_particles(module, k, m, sample_input, *args, **kwargs))(key)
    return _init_cached(module, key, m, sample_input, *static)


def init_ensemble(module, key: jax.Array, num_particles: int, sample_input, *args, **kwargs) -> EnsembleVariables:
    """Initialise M independent copies of ``module`` (one PRNG key each).

    Args:
      module: a ``flax.linen.Module``.
      key: a PRNG key; split into M keys.
      num_particles: M >= 1.
      sample_input: example input for ``module.init`` with a batch axis (not
        batched over M), e.g. ``jnp.zeros((1, 36, 36, 1))``; only its shape and
        dtype matter.
      *args, **kwargs: further arguments for ``module.init`` (e.g. ``train=False``).

    Returns:
      :class:`EnsembleVariables` ``(params, state)``, every leaf with leading axis M.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> ens = init_ensemble(nn.Dense(3), jax.random.key(0), 4, jnp.zeros((1, 2)))
      >>> ens.params["kernel"].shape, ens.state
      ((4, 2, 3), {})
    """
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}.")
    if np.ndim(sample_input) < 1:
        raise ValueError(
            f"sample_input must be an array with a leading batch axis, got shape {np.shape(sample_input)}."
        )
    variables = dict(_init(module, key, int(num_particles), sample_input, args, kwargs))
    if "params" not in variables:
        raise ValueError(f"{type(module).__name__} has no parameters: nothing to use as particles.")
    params = variables.pop("params")
    return EnsembleVariables(params, variables)


def apply_ensemble(
    module,
    params: PyTree,
    x,
    *args,
    state: dict | None = None,
    mutable: bool | str | Sequence[str] = False,
    method=None,
    per_particle_inputs: bool = False,
    **kwargs,
):
    """Apply each of the M networks to ``x``: ``module.apply`` vmapped over particles.

    Args:
      module: the ``flax.linen.Module`` the ensemble was initialised with.
      params: particle set, leaves (M, ...) (``EnsembleVariables.params``).
      x: inputs shared by all particles (e.g. (N, ...)); with
        ``per_particle_inputs=True`` one batch per particle, shape (M, N, ...).
      *args, **kwargs: further arguments of the module call (shared), e.g.
        ``train=True``, ``return_features=True``.
      state: the non-parameter collections (``EnsembleVariables.state``), leaves
        (M, ...); ``None`` or ``{}`` for stateless modules.
      mutable: as in ``flax.linen.Module.apply``; e.g. ``["batch_stats"]`` when
        training with batch norm, which makes the result ``(outputs, new_state)``.
      method: module method to call instead of ``__call__`` (e.g. ``"features"``).
      per_particle_inputs: whether ``x`` has a leading particle axis M.

    Returns:
      The module's outputs with a leading axis M (and, when ``mutable`` is set,
      the updated collections, also stacked over M).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> ens = init_ensemble(nn.Dense(3), jax.random.key(0), 4, jnp.zeros((1, 2)))
      >>> apply_ensemble(nn.Dense(3), ens.params, jnp.ones((5, 2))).shape
      (4, 5, 3)
    """
    m = num_particles(params, "params")
    state = {} if state is None else dict(state)
    if "params" in state:
        raise ValueError("state must not contain 'params': pass the parameters as the params argument.")
    if state:
        m_state = num_particles(state, "state")
        if m_state != m:
            raise ValueError(f"state has {m_state} particles (leading axis) but params has {m}.")
    if kwargs.get("train") is True and "batch_stats" in state and not mutable:
        raise ValueError(
            "train=True updates batch-norm statistics: pass mutable=['batch_stats'] "
            "(the result is then (outputs, new_state))."
        )
    if per_particle_inputs and (np.ndim(x) < 1 or np.shape(x)[0] != m):
        raise ValueError(
            f"per_particle_inputs=True: x must have shape (M, ...) with M = {m}, got shape {np.shape(x)}."
        )

    def one(p, s, xi):
        return module.apply({"params": p, **s}, xi, *args, mutable=mutable, method=method, **kwargs)

    return jax.vmap(one, in_axes=(0, 0, 0 if per_particle_inputs else None))(params, state, x)


def param_count(params: PyTree, *, stacked: bool = False) -> int:
    """Number of scalar entries in ``params``.

    Args:
      params: a pytree of arrays (pass the ``"params"`` collection to count
        trainable parameters only).
      stacked: if True, ``params`` has a leading particle axis M on every leaf
        and the count of ONE particle is returned.

    Example:
      >>> import jax.numpy as jnp
      >>> param_count({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
      16
      >>> param_count({"w": jnp.zeros((5, 3, 4))}, stacked=True)
      12
    """
    leaves = jax.tree_util.tree_leaves(params)
    total = int(sum(int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in leaves))
    if stacked:
        return total // num_particles(params, "params")
    return total
