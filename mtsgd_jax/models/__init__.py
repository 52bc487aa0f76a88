"""Flax (linen) models of the experiments, usable as particle ensembles.

* :class:`MultiHeadLeNet`: Multi-MNIST / Multi-Fashion, 36 x 36 x 1 -> logits (N, T, 10).
* :class:`SarcosMLP`: SARCOS, 21-256-256-256-7 (139,015 parameters) -> (N, 7).
* :class:`ResNet18Encoder`, :class:`MultiHeadResNet18`: CelebA, 64 x 64 x 3 ->
  logits (N, 40, 2), with batch norm (``batch_stats``).

Classification models return batch-first logits (N, T, C), matching labels
(N, T), and expose their shared features with ``method="features"`` or
``return_features=True``. M networks form a particle set through
:func:`init_ensemble` / :func:`apply_ensemble`; :func:`ensemble_forward` gives
the fast all-particles forward pass of the models above (one batched GEMM per
layer, see :mod:`mtsgd_jax.models.fast`), :func:`register_ensemble_forward`
adds one for another module class.
"""

from mtsgd_jax.models.ensemble import EnsembleVariables, apply_ensemble, init_ensemble, param_count
from mtsgd_jax.models.fast import ensemble_conv2d, ensemble_forward, max_pool_2x2, register_ensemble_forward
from mtsgd_jax.models.heads import MultiHeadDense
from mtsgd_jax.models.lenet import LeNetEncoder, MultiHeadLeNet
from mtsgd_jax.models.mlp import SarcosMLP
from mtsgd_jax.models.resnet import STEMS, BasicBlock, MultiHeadResNet18, ResNet18Encoder

__all__ = [
    "BasicBlock",
    "EnsembleVariables",
    "LeNetEncoder",
    "MultiHeadDense",
    "MultiHeadLeNet",
    "MultiHeadResNet18",
    "ResNet18Encoder",
    "STEMS",
    "SarcosMLP",
    "apply_ensemble",
    "ensemble_conv2d",
    "ensemble_forward",
    "init_ensemble",
    "max_pool_2x2",
    "param_count",
    "register_ensemble_forward",
]
