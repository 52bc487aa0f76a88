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
  batched GEMM, each row a tile of output pixels (im2col for one-pixel tiles;
  wider tiles against a banded kernel move fewer bytes); when the input is
  shared by the particles (the first layer) it is a single GEMM;
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
import numpy as np

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


_MIN_TILE_COLUMNS = 64  # output columns of one tile's GEMM below which it runs far under GEMM speed


def _default_tile_width(out_width: int, out_channels: int, shared_input: bool) -> int:
    """Output columns per row tile of :func:`ensemble_conv2d` (see there)."""
    if shared_input:  # the patches are formed once for all particles: the extra flops would not pay
        return 1
    for tw in range(1, out_width + 1):  # the narrowest divisor of the width giving a wide-enough GEMM
        if out_width % tw == 0 and tw * out_channels >= _MIN_TILE_COLUMNS:
            return tw
    return out_width


def _row_tiles(h: jax.Array, kh: int, kw: int, tw: int) -> tuple[jax.Array, int]:
    """(..., N, H, W, C) -> ((..., N*oh*nt, kh*(tw+kw-1)*C), nt): the input rows under each tile of tw outputs."""
    n, height, width, c = h.shape[-4:]
    oh, ow = height - kh + 1, width - kw + 1
    nt, wl = -(-ow // tw), tw + kw - 1
    if nt * tw + kw - 1 > width:  # the last tile reaches past the image: zero columns, sliced off after
        h = jnp.pad(h, [(0, 0)] * (h.ndim - 2) + [(0, nt * tw + kw - 1 - width), (0, 0)])
    tiles = [
        jnp.stack([h[..., i : i + oh, t * tw : t * tw + wl, :] for i in range(kh)], axis=-3) for t in range(nt)
    ]
    a = jnp.stack(tiles, axis=-4)  # (..., N, oh, nt, kh, wl, C)
    return a.reshape(*a.shape[:-6], n * oh * nt, kh * wl * c), nt


def _banded_kernel(kernel: jax.Array, tw: int) -> jax.Array:
    """(M, kh, kw, C, O) -> (M, kh*(tw+kw-1)*C, tw*O): entry ((i, p, c), (x, o)) is kernel[:, i, p-x, c, o] when 0 <= p-x < kw, else 0."""
    m, kh, kw, c, o = kernel.shape
    wl = tw + kw - 1
    band = np.arange(wl)[:, None, None] - np.arange(tw)[None, :, None] == np.arange(kw)[None, None, :]
    t = jnp.einsum("pxj,mijco->mipcxo", band.astype(kernel.dtype), kernel)
    return t.reshape(m, kh * wl * c, tw * o)


def ensemble_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    shared_input: bool,
    tile_width: int | None = None,
) -> jax.Array:
    """Valid, stride-1 2-D convolution of M particles as one batched GEMM.

    The output is cut into row tiles of ``tile_width`` pixels. Each tile is one
    row of a GEMM: the ``kh x (tile_width + kw - 1) x C`` input values under
    it, times a banded matrix holding every particle's kernel once per output
    pixel of the tile (zeros off the band). ``tile_width = 1`` is the classic
    im2col (patches of ``kh*kw*C`` values); wider tiles read and write fewer
    bytes (the input under a tile is shared by its pixels) for more flops
    (the band's zeros), which pays when the channel counts are small, as in
    LeNet: on a 2-core CPU, 4-pixel tiles in its second convolution make the
    forward pass with the K per-task backward passes (M = 5, batch 256) about
    1.6x faster than im2col (530 -> 335 ms on one thread).

    Args:
      x: NHWC inputs, (N, H, W, C) shared by the particles (``shared_input=True``)
        or (M, N, H, W, C), one per particle.
      kernel: (M, kh, kw, C, O), flax's HWIO kernels stacked over particles.
      bias: (M, O) or ``None``.
      shared_input: whether ``x`` lacks the particle axis.
      tile_width: output pixels per tile, ``>= 1``; default: 1 (im2col) for a
        shared input, whose patches are formed once for all particles; else the
        narrowest divisor of the output width whose tile gives a GEMM at least
        64 columns wide (``tile_width * O >= 64``), or the whole width.

    Returns:
      (M, N, H-kh+1, W-kw+1, O): ``nn.Conv(O, (kh, kw), padding="VALID")`` of
      each particle, equal up to the order of the sums (a band's zeros add
      exact zeros; a non-finite input may turn an output that is ``inf`` in the
      plain convolution into ``nan``).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtsgd_jax.models import ensemble_conv2d
      >>> x = jnp.ones((3, 2, 16, 16, 10))  # M = 3 particles, N = 2 images
      >>> ensemble_conv2d(x, jnp.ones((3, 5, 5, 10, 20)), shared_input=False).shape
      (3, 2, 12, 12, 20)
    """
    m, kh, kw, c, o = kernel.shape
    if x.ndim != (4 if shared_input else 5) or x.shape[-1] != c:
        want = "(N, H, W, C)" if shared_input else "(M, N, H, W, C)"
        raise ValueError(f"ensemble_conv2d: x must have shape {want} with C = {c}, got shape {x.shape}.")
    n, height, width = x.shape[-4:-1]
    if height < kh or width < kw:
        raise ValueError(
            f"ensemble_conv2d: images ({height} x {width}) must be at least as large as the kernel ({kh} x {kw})."
        )
    oh, ow = height - kh + 1, width - kw + 1
    if tile_width is None:
        tw = _default_tile_width(ow, o, shared_input)
    elif isinstance(tile_width, (bool, np.bool_)) or not isinstance(tile_width, (int, np.integer)) or tile_width < 1:
        raise ValueError(f"ensemble_conv2d: tile_width must be a positive int or None, got {tile_width!r}.")
    else:
        tw = min(int(tile_width), ow)
    if tw == 1:
        p = _patches(x, kh, kw)
        w = kernel.reshape(m, kh * kw * c, o)
        spec = "nhwp,mpo->mnhwo" if shared_input else "mnhwp,mpo->mnhwo"
        out = jnp.einsum(spec, p, w)
    else:
        a, nt = _row_tiles(x, kh, kw, tw)
        out = jnp.einsum("rk,mkq->mrq" if shared_input else "mrk,mkq->mrq", a, _banded_kernel(kernel, tw))
        out = out.reshape(m, n, oh, nt * tw, o)[:, :, :, :ow]
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
