"""The SARCOS regression MLP (docs/algorithm.md §7): 21-256-256-256-7, ReLU.

====================  ================  ===================
layer                 output            parameters
====================  ================  ===================
dense 256, ReLU       (N, 256)          21*256 + 256 = 5,632
dense 256, ReLU       (N, 256)          256*256 + 256 = 65,792
dense 256, ReLU       (N, 256)          256*256 + 256 = 65,792
dense 7               (N, 7)            256*7 + 7 = 1,799
====================  ================  ===================

Total 139,015 parameters. Output column t is the prediction for task t (one
joint torque per task), so per-task squared errors are
``((model(x) - y) ** 2).mean(0)`` with targets y of shape (N, 7).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

__all__ = ["SarcosMLP"]


class SarcosMLP(nn.Module):
    """MLP 21-256-256-256-7 with ReLU; (N, 21) -> (N, 7), one column per task.

    Attributes:
      num_inputs: expected input width (21); checked eagerly so that a wrong
        feature count fails with a clear error instead of silently changing the
        parameter count. ``None`` accepts any width.
      hidden: hidden widths (256, 256, 256).
      num_outputs: number of tasks / outputs (7).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtsgd_jax.models import SarcosMLP, init_ensemble, apply_ensemble, param_count
      >>> x = jnp.zeros((8, 21))
      >>> ens = init_ensemble(SarcosMLP(), jax.random.key(0), 5, x)
      >>> param_count(ens.params, stacked=True)
      139015
      >>> apply_ensemble(SarcosMLP(), ens.params, x).shape
      (5, 8, 7)
    """

    num_inputs: int | None = 21
    hidden: Sequence[int] = (256, 256, 256)
    num_outputs: int = 7

    @nn.compact
    def __call__(self, x: jax.Array, return_features: bool = False):
        """Predictions (N, num_outputs), or ``(predictions, features)`` with ``return_features=True``,
        features (N, hidden[-1]) the last hidden layer (the input of the output layer)."""
        if x.ndim != 2 or (self.num_inputs is not None and x.shape[-1] != self.num_inputs):
            width = self.num_inputs if self.num_inputs is not None else "D"
            raise ValueError(f"SarcosMLP: x must have shape (N, {width}), got shape {x.shape}.")
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
        out = nn.Dense(self.num_outputs, name="out")(x)
        return (out, x) if return_features else out
