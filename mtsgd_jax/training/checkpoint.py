"""Epoch-end checkpoints with orbax: the training state (arrays) plus a JSON record.

A checkpoint directory holds one orbax step per saved epoch (the last
``max_to_keep``), each with two items:

* ``state``: the pytree ``{"params", "model_state", "opt_state"}`` (standard
  orbax array checkpoint);
* ``meta``: JSON with the completed epoch count, the seed, the metrics log so
  far and the run's configuration.

Nothing random has to be stored: mini-batch orders are a function of
``(seed, epoch)`` (:func:`mtsgd_jax.data.batch_iterator`), and training uses
no random numbers after the initialisation, so restoring the state at epoch e
and replaying epochs e, e+1, ... repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

__all__ = ["save_checkpoint", "restore_checkpoint", "read_checkpoint_meta", "latest_epoch", "clear_checkpoints"]


def _manager(directory, create: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=create)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(directory, epoch: int, state: Any, meta: dict) -> None:
    """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as step ``epoch``."""
    import orbax.checkpoint as ocp

    mngr = _manager(directory, create=True)
    try:
        mngr.save(
            int(epoch),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        mngr.wait_until_finished()
    finally:
        mngr.close()


def latest_epoch(directory) -> int | None:
    """The last saved epoch in ``directory``, or None if there is no checkpoint."""
    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory, create=False)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def read_checkpoint_meta(directory):
    """``(epoch, meta)`` of the latest checkpoint (the JSON record only), or None when there is none."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory, create=False)
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return int(step), dict(restored.meta)


def restore_checkpoint(directory, target: Any):
    """Restore the latest checkpoint: ``(epoch, state, meta)``, or None when there is none.

    Args:
      directory: the checkpoint directory.
      target: a pytree with the structure, shapes and dtypes of the saved
        state (e.g. a freshly initialised one); the restored arrays take them.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory, create=False)
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
    finally:
        mngr.close()
    return int(step), restored.state, dict(restored.meta)


def clear_checkpoints(directory) -> None:
    """Remove a checkpoint directory written by :func:`save_checkpoint` (if present)."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
