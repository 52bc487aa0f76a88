"""Multi-task training of particle sets of networks (MT-SGD and the baselines).

* :mod:`~mtsgd_jax.training.tasks`: :class:`Task` (data + model + per-task
  losses + evaluation type) and the registry :func:`make_task` / :data:`TASKS`
  (``multi-digits``, ``multi-mnist``, ``multi-fashion``, ``multi-fashion-mnist``,
  ``sarcos``, ``celeba``);
* :mod:`~mtsgd_jax.training.methods`: :func:`make_method` (``mtsgd``,
  ``moo_svgd``, ``mgda``, ``linear_scalarization``, ``pareto_mtl``,
  ``single_task``; parameter- or function-space kernels) and
  :func:`make_optimizer`;
* :mod:`~mtsgd_jax.training.trainer`: :class:`Trainer` (one jitted train
  step, evaluation, the epoch loop with JSON-lines metrics and orbax
  checkpoints / resume, an optional linear-scalarisation warm-up) and
  :func:`train`;
* :mod:`~mtsgd_jax.training.recipe`: the MT-SGD reference code's network
  recipe (``train(..., recipe="published")``): split kernels
  (:func:`split_mtsgd`, ``kernel_space="split"``: encoder MT-SGD on latent
  features, per-head SVGD on head outputs), the warm-up preferences
  (:func:`warmup_preferences`) and SGD.

Example (a few seconds of training on Multi-Digits; no download needed)::

    from mtsgd_jax.training import train, summary_table
    trainer, result = train("multi-digits", "mtsgd", num_particles=3, epochs=2,
                            num_train=512, num_eval=256, batch_size=64,
                            optimizer="adam", lr=1e-3, out_dir="outputs/md")
    print(summary_table(trainer.task, result.metrics))
"""

from mtsgd_jax.training.checkpoint import clear_checkpoints, latest_epoch, restore_checkpoint, save_checkpoint
from mtsgd_jax.training.methods import KERNEL_SPACES, METHODS, OPTIMIZERS, Method, make_method, make_optimizer
from mtsgd_jax.training.recipe import RECIPES, Head, register_head_layout, split_mtsgd, warmup_preferences
from mtsgd_jax.training.tasks import KINDS, TASKS, ArrayDataset, CelebADataset, Task, TaskDefaults, make_task
from mtsgd_jax.training.trainer import (
    Trainer,
    TrainResult,
    TrainState,
    build_method,
    function_features,
    summary_rows,
    summary_table,
    train,
)

__all__ = [
    "KERNEL_SPACES",
    "KINDS",
    "METHODS",
    "OPTIMIZERS",
    "RECIPES",
    "TASKS",
    "ArrayDataset",
    "CelebADataset",
    "Head",
    "Method",
    "Task",
    "TaskDefaults",
    "TrainResult",
    "TrainState",
    "Trainer",
    "build_method",
    "clear_checkpoints",
    "function_features",
    "latest_epoch",
    "make_method",
    "make_optimizer",
    "make_task",
    "register_head_layout",
    "restore_checkpoint",
    "save_checkpoint",
    "split_mtsgd",
    "summary_rows",
    "summary_table",
    "train",
    "warmup_preferences",
]
