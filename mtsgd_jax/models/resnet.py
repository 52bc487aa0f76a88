"""ResNet-18 encoder and the 40-head CelebA model (docs/algorithm.md §7).

:class:`ResNet18Encoder` is ResNet-18 without its final fully connected layer:
a stem, four stages of two :class:`BasicBlock` each (widths 64, 128, 256, 512;
the first block of stages 2-4 has stride 2 and a 1x1-conv + batch-norm
projection shortcut), then global average pooling to a (N, 512) feature vector.
Convolutions have no bias (each is followed by batch norm), use PyTorch-style
symmetric padding and He (fan-out) normal initialisation; batch norm uses
momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5.

Stem (``stem`` attribute):

* ``"cifar"`` (default): 3x3 conv, stride 1, 64 channels, BN, ReLU, no max-pool,
  the usual choice for small images (and the one of the Sener & Koltun
  multi-task CelebA code). A 64 x 64 input keeps 64 x 64 resolution in stage 1
  and reaches 8 x 8 in stage 4.
* ``"imagenet"``: the standard 7x7 conv stride 2 + BN + ReLU + 3x3 max-pool
  stride 2 (a 64 x 64 input reaches 2 x 2 in stage 4; about 16x fewer FLOPs).

Parameter counts (3 input channels; trainable ``params`` only, batch-norm
running statistics excluded): stem conv 3*3*3*64 = 1,728 (``"cifar"``) or
7*7*3*64 = 9,408 (``"imagenet"``), stem BN 128; stages 147,968 + 525,568 +
2,099,712 + 8,393,728. Encoder total 11,168,832 (``"cifar"``) or 11,176,512
(``"imagenet"``, torchvision's resnet18 minus its 513,000-parameter FC layer).
:class:`MultiHeadResNet18` adds T * (512 * C + C) = 41,040 for 40 two-way heads.

Batch norm: the variables are ``{"params": ..., "batch_stats": ...}``. Call with
``train=True, mutable=["batch_stats"]`` while training (normalise with the batch
statistics and get the updated running averages back) and with ``train=False``
for evaluation (normalise with the running averages). ``train`` has no default,
so it cannot be forgotten.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtsgd_jax.models.heads import MultiHeadDense
from mtsgd_jax.models.lenet import _check_images

__all__ = ["BasicBlock", "ResNet18Encoder", "MultiHeadResNet18", "STEMS"]

STEMS = ("cifar", "imagenet")
_STAGE_WIDTHS = (64, 128, 256, 512)
_BLOCKS_PER_STAGE = (2, 2, 2, 2)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv (stride ``strides``) + BN when
    the width or resolution changes.

    Attributes:
      features: output channels.
      strides: stride of the first 3x3 conv (and of the projection shortcut).
      dtype: computation dtype (``None``: inferred).
    """

    features: int
    strides: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = partial(nn.Conv, use_bias=False, kernel_init=_conv_init, dtype=self.dtype)
        y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")(x)
        y = nn.relu(_norm(train, self.dtype, "bn1")(y))
        y = conv(self.features, (3, 3), padding=1, name="conv2")(y)
        y = _norm(train, self.dtype, "bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
            x = _norm(train, self.dtype, "shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet18Encoder(nn.Module):
    """ResNet-18 without its FC layer: (N, H, W, C) images -> (N, 512) features.

    See the module docstring for the architecture, stems and parameter counts.

    Attributes:
      stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; default) or ``"imagenet"``
        (7x7 stride-2 conv + 3x3 stride-2 max-pool).
      dtype: computation dtype, e.g. ``jnp.bfloat16`` (params stay float32).

    ``init(key, x, train=False)`` gives ``{"params", "batch_stats"}``; see
    :class:`MultiHeadResNet18` for an example.
    """

    stem: str = "cifar"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.stem not in STEMS:
            raise ValueError(f"ResNet18Encoder: stem must be one of {STEMS}, got {self.stem!r}.")
        _check_images(x, "ResNet18Encoder")
        if self.stem == "cifar":
            x = nn.Conv(64, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init, dtype=self.dtype,
                        name="stem_conv")(x)
            x = nn.relu(_norm(train, self.dtype, "stem_bn")(x))
        else:
            x = nn.Conv(64, (7, 7), strides=2, padding=3, use_bias=False, kernel_init=_conv_init,
                        dtype=self.dtype, name="stem_conv")(x)
            x = nn.relu(_norm(train, self.dtype, "stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (width, blocks) in enumerate(zip(_STAGE_WIDTHS, _BLOCKS_PER_STAGE)):
            for b in range(blocks):
                strides = 2 if (stage > 0 and b == 0) else 1
                x = BasicBlock(width, strides, self.dtype, name=f"stage{stage + 1}_block{b + 1}")(x, train)
        return jnp.mean(x, axis=(1, 2))


class MultiHeadResNet18(nn.Module):
    """:class:`ResNet18Encoder` + one ``num_classes``-way linear head per task.

    For CelebA: 40 binary attributes, 2-way heads, 64 x 64 x 3 inputs.
    ``__call__(x, train)`` returns logits (N, num_tasks, num_classes) (batch
    first, ``logits[:, t]`` for attribute t, matching labels (N, T)); with
    ``return_features=True`` it returns ``(logits, features)``, features the
    (N, 512) encoder output; :meth:`features` returns them alone
    (``method="features"``).

    Variables: ``{"params": {"encoder": ..., "heads": {kernel (512, T, C), bias (T, C)}},
    "batch_stats": {"encoder": ...}}``. Train with
    ``apply(variables, x, train=True, mutable=["batch_stats"])`` -> ``(logits,
    {"batch_stats": new})``; evaluate with ``train=False``.

    Attributes:
      num_tasks: T (40).
      num_classes: C (2).
      stem: see :class:`ResNet18Encoder`.
      dtype: computation dtype.

    Example (wrapped in ``jax.eval_shape`` to get shapes without computing
    anything; call the functions directly to get arrays):

      >>> import jax, jax.numpy as jnp
      >>> from mtsgd_jax.models import MultiHeadResNet18, init_ensemble, apply_ensemble, param_count
      >>> model = MultiHeadResNet18(num_tasks=40, num_classes=2)
      >>> x = jnp.zeros((8, 64, 64, 3))
      >>> ens = jax.eval_shape(lambda k: init_ensemble(model, k, 2, x[:1], train=False), jax.random.key(0))
      >>> param_count(ens.params, stacked=True), sorted(ens.state)
      (11209872, ['batch_stats'])
      >>> def train_forward(params, state):  # -> (logits, {"batch_stats": updated})
      ...     return apply_ensemble(model, params, x, state=state, train=True, mutable=["batch_stats"])
      >>> logits, new_state = jax.eval_shape(train_forward, ens.params, ens.state)
      >>> logits.shape  # (M, N, T, C)
      (2, 8, 40, 2)
      >>> jax.eval_shape(lambda p, s: apply_ensemble(model, p, x, state=s, train=False,
      ...                                            method="features"), ens.params, ens.state).shape
      (2, 8, 512)
    """

    num_tasks: int = 40
    num_classes: int = 2
    stem: str = "cifar"
    dtype: Any = None

    def setup(self):
        self.encoder = ResNet18Encoder(stem=self.stem, dtype=self.dtype)
        self.heads = MultiHeadDense(self.num_tasks, self.num_classes, dtype=self.dtype)

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """Encoder output, shape (N, 512)."""
        return self.encoder(x, train)

    def __call__(self, x: jax.Array, train: bool, return_features: bool = False):
        """Logits (N, T, C), or ``(logits, features)`` with ``return_features=True``."""
        h = self.encoder(x, train)
        logits = self.heads(h)
        return (logits, h) if return_features else logits
