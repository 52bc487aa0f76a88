"""One linear classification head per task, stored as a single stacked kernel."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MultiHeadDense"]


class MultiHeadDense(nn.Module):
    """T independent linear heads on shared features: (N, D) -> (N, T, C).

    Head t is ``features @ kernel[:, t, :] + bias[t]``; the heads share nothing but
    their input. Storing them as one kernel of shape (D, T, C) (and a bias (T, C))
    is exactly T separate ``nn.Dense(C)`` layers, computed with one contraction.
    Each head's kernel is initialised like a ``nn.Dense`` kernel (LeCun normal,
    fan-in D); biases start at zero.

    Attributes:
      num_tasks: T >= 1.
      num_classes: C >= 1, outputs per head.
      dtype: computation dtype (``None``: inferred from the inputs and params).
      param_dtype: dtype of the parameters (float32, like ``nn.Dense``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> head = MultiHeadDense(num_tasks=3, num_classes=2)
      >>> variables = head.init(jax.random.key(0), jnp.ones((4, 5)))
      >>> variables["params"]["kernel"].shape, head.apply(variables, jnp.ones((4, 5))).shape
      ((5, 3, 2), (4, 3, 2))
    """

    num_tasks: int
    num_classes: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        if self.num_tasks < 1 or self.num_classes < 1:
            raise ValueError(
                f"MultiHeadDense needs num_tasks >= 1 and num_classes >= 1, got "
                f"num_tasks={self.num_tasks}, num_classes={self.num_classes}."
            )
        if features.ndim != 2:
            raise ValueError(
                f"MultiHeadDense: features must have shape (N, D), got shape {features.shape}."
            )
        d = features.shape[-1]
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=2, batch_axis=(1,)
        )
        kernel = self.param("kernel", init, (d, self.num_tasks, self.num_classes), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_tasks, self.num_classes), self.param_dtype)
        features, kernel, bias = nn.dtypes.promote_dtype(features, kernel, bias, dtype=self.dtype)
        return jnp.einsum("nd,dtc->ntc", features, kernel) + bias
