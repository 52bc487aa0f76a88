"""Multi-head LeNet for the Multi-MNIST / Multi-Fashion experiments (docs/algorithm.md §7).

Architecture (inputs NHWC, 36 x 36 x 1 in the experiments; "valid" convolutions):

====================  =====================  ===================  ===========
layer                 output (36 x 36 input)  parameters           count
====================  =====================  ===================  ===========
conv 5x5, 10 ch       (N, 32, 32, 10)         5*5*1*10 + 10        260
max-pool 2x2, ReLU    (N, 16, 16, 10)
conv 5x5, 20 ch       (N, 12, 12, 20)         5*5*10*20 + 20       5,020
max-pool 2x2, ReLU    (N, 6, 6, 20)
flatten               (N, 720)
dense 50, ReLU        (N, 50) = features      720*50 + 50          36,050
T heads, dense 10     (N, T, 10) = logits     T*(50*10 + 10)       T*510
====================  =====================  ===================  ===========

With T = 2 tasks: 41,330 encoder + 1,020 head parameters = 42,350 in all. This
is the shared-bottom "MultiLeNet" of the multi-task literature (Pareto MTL,
MOO-SVGD) with 5x5 first convolution; other square input sizes of at least
16 x 16 work too (the dense layer adapts to the flattened size).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mtsgd_jax.models.heads import MultiHeadDense

__all__ = ["LeNetEncoder", "MultiHeadLeNet"]


def _check_images(x: jax.Array, who: str, min_size: int = 1) -> None:
    if x.ndim != 4:
        hint = " (add a trailing channel axis: x[..., None])" if x.ndim == 3 else ""
        raise ValueError(f"{who}: x must have shape (N, H, W, C) (NHWC), got shape {x.shape}{hint}.")
    if x.shape[1] < min_size or x.shape[2] < min_size:
        raise ValueError(
            f"{who}: images must be at least {min_size} x {min_size}, got x of shape {x.shape}."
        )


class LeNetEncoder(nn.Module):
    """The shared LeNet trunk: (N, H, W, C) images -> (N, 50) features.

    conv 5x5 (10) -> max-pool 2 -> ReLU -> conv 5x5 (20) -> max-pool 2 -> ReLU ->
    flatten -> dense 50 -> ReLU (see the module docstring for shapes and counts).

    Attributes:
      features_dim: width of the final dense layer (50).
    """

    features_dim: int = 50

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_images(x, "LeNetEncoder", min_size=16)
        x = nn.Conv(10, (5, 5), padding="VALID", name="conv1")(x)
        x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = nn.Conv(20, (5, 5), padding="VALID", name="conv2")(x)
        x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = x.reshape((x.shape[0], -1))
        return nn.relu(nn.Dense(self.features_dim, name="fc")(x))


class MultiHeadLeNet(nn.Module):
    """Shared :class:`LeNetEncoder` + one ``num_classes``-way linear head per task.

    ``__call__(x)`` returns logits of shape (N, num_tasks, num_classes): batch
    first, one slice ``logits[:, t]`` per task, matching labels of shape
    (N, num_tasks) (``optax.softmax_cross_entropy_with_integer_labels(logits,
    labels).mean(0)`` gives the (T,) per-task losses). With
    ``return_features=True`` it returns ``(logits, features)``, features (N, 50)
    being the shared encoder output; :meth:`features` returns the features alone
    (use ``module.apply(variables, x, method="features")``).

    Parameters: ``params = {"encoder": {conv1, conv2, fc}, "heads": {kernel (50, T, C),
    bias (T, C)}}``; no other collections. Count for 36 x 36 x 1 inputs:
    41,330 + T * (50 * C + C), i.e. 42,350 for T = 2, C = 10.

    Attributes:
      num_tasks: T, number of heads (2 for Multi-MNIST).
      num_classes: C, classes per head (10).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtsgd_jax.models import MultiHeadLeNet, init_ensemble, apply_ensemble, param_count
      >>> model = MultiHeadLeNet()
      >>> x = jnp.zeros((4, 36, 36, 1))
      >>> ens = init_ensemble(model, jax.random.key(0), 3, x)
      >>> param_count(ens.params, stacked=True)
      42350
      >>> apply_ensemble(model, ens.params, x).shape  # (M, N, T, C)
      (3, 4, 2, 10)
      >>> apply_ensemble(model, ens.params, x, method="features").shape
      (3, 4, 50)
    """

    num_tasks: int = 2
    num_classes: int = 10

    def setup(self):
        self.encoder = LeNetEncoder()
        self.heads = MultiHeadDense(self.num_tasks, self.num_classes)

    def features(self, x: jax.Array) -> jax.Array:
        """Shared encoder output, shape (N, 50)."""
        return self.encoder(x)

    def __call__(self, x: jax.Array, return_features: bool = False):
        """Logits (N, T, C), or ``(logits, features)`` with ``return_features=True``."""
        h = self.encoder(x)
        logits = self.heads(h)
        return (logits, h) if return_features else logits
