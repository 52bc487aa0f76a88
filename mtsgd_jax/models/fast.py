"""Fast particle-ensemble forward passes: all M networks in one computation.

:func:`~mtsgd_jax.models.apply_ensemble` runs a flax module vmapped over the
particle axis. That is always correct, but on CPU two of the resulting
operations are slow: a vmapped convolution becomes a grouped convolution
(``feature_group_count = M``) whose gradients run far below GEMM speed, and the
gradient of a vmapped ``max_pool`` becomes ``select_and_scatter_add``, which
XLA's CPU backend expands into index-carrying reduce-windows over the full
pre-pool shape.

:func:`ensemble_forward` returns, for a module with a registered fast path, a
function computing the SAME outputs as ``apply_ensemble(module, params, x)``
for every particle at once, written with

* :func:`ensemble_conv2d`: valid, stride-1 convolution of all particles as one
  batched GEMM over image patches (im2col + ``einsum``); when the input is shared
  by the particles (the first layer) it is a single GEMM;
* :func:`max_pool_2x2`: non-overlapping 2x2 max-pooling as reshape + max;
* ``einsum`` for dense layers and heads (batched over the particle axis).

Registered: :class:`~mtsgd_jax.models.MultiHeadLeNet` and
:class:`~mtsgd_jax.models.SarcosMLP`. Any other module (including a user's
own, and batch-norm models) returns ``None`` and the caller falls back to the
vmapped flax module. :func:`register_ensemble_forward` adds a fast path for
another module class.

Numerics: the outputs and gradients equal the vmapped flax computation up to
floating-point reassociation (a few ulps of the dtype times the depth of the
sums). Where several entries of a pooling window are exactly equal (e.g. a
constant image background), the gradient of :func:`max_pool_2x2` is shared
equally among them, where flax's ``max_pool`` gives it to the first; the
parameter gradients agree whenever the tied entries come from identical input
patches, as in a constant background.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mtsgd_jax.models.lenet import MultiHeadLeNet, _check_images
from mtsgd_jax.models.mlp import SarcosMLP

__all__ = [
    "ensemble_conv2d",
    "ensemble_forward",
    "max_pool_2x2",
    "register_ensemble_forward",
]

PyTree = Any
EnsembleForward = Callable[[PyTree, jax.Array], jax.Array]

_REGISTRY: dict[type, Callable[[Any], EnsembleForward | None]] = {}


def register_ensemble_forward(cls: type, builder: Callable[[Any], EnsembleForward | None]) -> None:
    """Register a fast all-particles forward pass for instances of ``cls``.

    Args:
      cls: a ``flax.linen.Module`` subclass.
      builder: ``builder(module) -> fn`` or ``None`` (no fast path for this
        instance, e.g. an unsupported option); ``fn(params, x)`` takes the
        stacked ``"params"`` collection (leaves (M, ...)) and inputs ``x`` (N, ...)
        shared by the particles, and returns what
        ``apply_ensemble(module, params, x)`` returns: outputs (M, N, ...).
        Optionally ``fn(params, x, return_features=True)`` returns ``(outputs,
        features (M, N, ...))`` like the module's ``return_features=True`` (the
        registered passes do; the split kernels of the trainer use it, and fall
        back to the vmapped module for a pass without that keyword).
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_ensemble_forward: cls must be a class, got {type(cls).__name__}.")
    if not callable(builder):
        raise TypeError(f"register_ensemble_forward: builder must be callable, got {type(builder).__name__}.")
    _REGISTRY[cls] = builder


def ensemble_forward(module) -> EnsembleForward | None:
    """The registered fast forward pass of ``module`` (exact class match), or ``None``.

    Returns ``fn(params, x) -> outputs (M, N, ...)`` equal to
    ``apply_ensemble(module, params, x)`` (see the module docstring), or ``None``
    when ``type(module)`` has no registered fast path.
    """
    builder = _REGISTRY.get(type(module))
    return None if builder is None else builder(module)


def _patches(h: jax.Array, kh: int, kw: int) -> jax.Array:
    """(..., H, W, C) -> (..., H-kh+1, W-kw+1, kh*kw*C), features ordered (kh, kw, C) like HWIO kernels."""
    oh, ow = h.shape[-3] - kh + 1, h.shape[-2] - kw + 1
    cols = [h[..., i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def ensemble_conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, shared_input: bool) -> jax.Array:
    """Valid, stride-1 2-D convolution of M particles as a batched GEMM over patches.

    Args:
      x: NHWC inputs, (N, H, W, C) shared by the particles (``shared_input=True``)
        or (M, N, H, W, C), one per particle.
      kernel: (M, kh, kw, C, O), flax's HWIO kernels stacked over particles.
      bias: (M, O) or ``None``.
      shared_input: whether ``x`` lacks the particle axis.

    Returns:
      (M, N, H-kh+1, W-kw+1, O): ``nn.Conv(O, (kh, kw), padding="VALID")`` of
      each particle.
    """
    m, kh, kw, c, o = kernel.shape
    if x.ndim != (4 if shared_input else 5) or x.shape[-1] != c:
        want = "(N, H, W, C)" if shared_input else "(M, N, H, W, C)"
        raise ValueError(f"ensemble_conv2d: x must have shape {want} with C = {c}, got shape {x.shape}.")
    p = _patches(x, kh, kw)
    w = kernel.reshape(m, kh * kw * c, o)
    spec = "nhwp,mpo->mnhwo" if shared_input else "mnhwp,mpo->mnhwo"
    out = jnp.einsum(spec, p, w)
    if bias is not None:
        out = out + bias[:, None, None, None, :]
    return out


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Max over non-overlapping 2x2 windows (stride 2, "VALID"): (..., H, W, C) -> (..., H//2, W//2, C).

    Equal to ``nn.max_pool(x, (2, 2), strides=(2, 2))`` (a trailing odd row or
    column is dropped, as there); see the module docstring for tied maxima.
    """
    *lead, h, w, c = x.shape
    x = x[..., : h // 2 * 2, : w // 2 * 2, :]
    return jnp.max(x.reshape(*lead, h // 2, 2, w // 2, 2, c), axis=(-4, -2))


def _dense(h: jax.Array, p: dict) -> jax.Array:
    """(M, N, D) with kernel (M, D, O), bias (M, O) -> (M, N, O)."""
    return jnp.einsum("mnd,mdo->mno", h, p["kernel"]) + p["bias"][:, None, :]


def _lenet_builder(module: MultiHeadLeNet) -> EnsembleForward | None:
    def forward(params, x, return_features: bool = False):
        _check_images(x, "LeNetEncoder", min_size=16)
        e = params["encoder"]
        dtype = jnp.result_type(x, *jax.tree_util.tree_leaves(params))
        x = x.astype(dtype)
        h = ensemble_conv2d(x, e["conv1"]["kernel"], e["conv1"]["bias"], shared_input=True)
        h = jax.nn.relu(max_pool_2x2(h))
        h = ensemble_conv2d(h, e["conv2"]["kernel"], e["conv2"]["bias"], shared_input=False)
        h = jax.nn.relu(max_pool_2x2(h))
        h = h.reshape(h.shape[0], h.shape[1], -1)
        h = jax.nn.relu(_dense(h, e["fc"]))
        heads = params["heads"]
        out = jnp.einsum("mnd,mdtc->mntc", h, heads["kernel"]) + heads["bias"][:, None]
        return (out, h) if return_features else out

    return forward


def _mlp_builder(module: SarcosMLP) -> EnsembleForward | None:
    def forward(params, x, return_features: bool = False):
        if x.ndim != 2 or (module.num_inputs is not None and x.shape[-1] != module.num_inputs):
            width = module.num_inputs if module.num_inputs is not None else "D"
            raise ValueError(f"SarcosMLP: x must have shape (N, {width}), got shape {x.shape}.")
        dtype = jnp.result_type(x, *jax.tree_util.tree_leaves(params))
        first = params["dense0"]
        h = jax.nn.relu(jnp.einsum("nd,mdo->mno", x.astype(dtype), first["kernel"]) + first["bias"][:, None, :])
        for i in range(1, len(module.hidden)):
            h = jax.nn.relu(_dense(h, params[f"dense{i}"]))
        out = _dense(h, params["out"])
        return (out, h) if return_features else out

    return forward


register_ensemble_forward(MultiHeadLeNet, _lenet_builder)
register_ensemble_forward(SarcosMLP, _mlp_builder)
