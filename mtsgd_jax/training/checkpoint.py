"""Epoch-end checkpoints with orbax: the training state (arrays) plus a verified JSON record.

A checkpoint directory holds one orbax step per saved epoch (the last
``max_to_keep``), each with two items:

* ``state``: the pytree ``{"params", "model_state", "opt_state"}`` (standard
  orbax array checkpoint);
* ``meta``: a JSON record ``{"format", "epoch", "meta", "state", "sha256"}``:
  the caller's ``meta`` (e.g. the run's settings and the metrics log so far),
  the state's leaf signature (path, dtype, shape of every array) and the
  SHA-256 digest of its bytes, and a SHA-256 digest of the record itself.

:func:`restore_checkpoint` verifies both digests, so flipped bytes, truncated
or deleted array files and a garbled record are detected (by the digest or by
orbax failing to read them). It walks the saved epochs from the newest to the
oldest, skips damaged ones with a :class:`CheckpointDamagedWarning` naming the
epoch and the reason, and raises :class:`CheckpointError` when none is intact.

Nothing random has to be stored: mini-batch orders are a function of
``(seed, epoch)`` (:func:`mtsgd_jax.data.batch_iterator`), and training uses
no random numbers after the initialisation, so restoring the state at epoch e
and replaying epochs e, e+1, ... repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import warnings
from typing import Any, Callable

import jax
import numpy as np

__all__ = [
    "CheckpointDamagedWarning",
    "CheckpointError",
    "StateMismatchError",
    "clear_checkpoints",
    "latest_epoch",
    "move_aside",
    "read_checkpoint_meta",
    "restore_checkpoint",
    "save_checkpoint",
    "state_digest",
    "state_signature",
]

_FORMAT = 2


class CheckpointError(ValueError):
    """No intact checkpoint could be restored (every saved epoch is damaged or unreadable)."""


class StateMismatchError(ValueError):
    """The saved state's arrays (paths, dtypes, shapes) do not fit the requested state."""


class CheckpointDamagedWarning(UserWarning):
    """A saved epoch was damaged and skipped; an older one was restored."""


def _manager(directory, create: bool, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=create)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _sha256(obj) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def state_signature(state: Any) -> list:
    """``[[path, dtype, shape], ...]`` of every array leaf of ``state`` (in pytree order)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [[jax.tree_util.keystr(path), str(np.dtype(leaf.dtype)), list(np.shape(leaf))] for path, leaf in leaves]


def state_digest(state: Any) -> str:
    """SHA-256 (hex) over every leaf's path, dtype, shape and bytes, in pytree order.

    Copies the arrays to the host once (what saving does anyway).
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = np.asarray(leaf)
        h.update(_canonical([jax.tree_util.keystr(path), str(a.dtype), list(a.shape)]))
        h.update(a.tobytes(order="C"))
    return h.hexdigest()


def save_checkpoint(directory, epoch: int, state: Any, meta: dict, *, max_to_keep: int = 2) -> None:
    """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as step ``epoch``.

    Args:
      directory: the checkpoint directory (created if missing).
      epoch: the step number (completed epochs); must not be saved already.
      state: pytree of arrays.
      meta: JSON-serialisable dict; :func:`restore_checkpoint` returns it as saved.
      max_to_keep: keep only the newest this many steps (>= 2, so that a damaged
        newest one leaves an intact older one to fall back on).
    """
    import orbax.checkpoint as ocp

    if int(max_to_keep) < 2:
        raise ValueError(
            f"max_to_keep must be >= 2 (a damaged newest checkpoint needs an older one to fall back on), got {max_to_keep}."
        )
    meta = json.loads(json.dumps(meta))  # what reading it back gives (tuples -> lists)
    record = {
        "format": _FORMAT,
        "epoch": int(epoch),
        "meta": meta,
        "state": {"signature": state_signature(state), "sha256": state_digest(state)},
    }
    record["sha256"] = _sha256(record)
    mngr = _manager(directory, create=True, max_to_keep=int(max_to_keep))
    try:
        mngr.save(
            int(epoch),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)),
            force=True,
        )
        mngr.wait_until_finished()
    finally:
        mngr.close()


def _steps(directory) -> list[int]:
    """Saved steps, newest first (an unreadable directory reads as a damaged whole)."""
    if not os.path.isdir(directory):
        return []
    try:
        mngr = _manager(directory, create=False)
        try:
            return sorted((int(s) for s in mngr.all_steps()), reverse=True)
        finally:
            mngr.close()
    except Exception as e:  # noqa: BLE001 - orbax raises many types on a damaged tree
        raise CheckpointError(f"cannot list the checkpoints in {directory}: {_reason(e)}") from e


def latest_epoch(directory) -> int | None:
    """The last saved epoch in ``directory`` (intact or not), or None if there is no checkpoint."""
    steps = _steps(directory)
    return steps[0] if steps else None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _read_record(mngr, step: int) -> dict:
    """The verified JSON record of ``step``; raises ``_Damaged`` with the reason."""
    import orbax.checkpoint as ocp

    try:
        record = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:  # noqa: BLE001
        raise _Damaged(f"record unreadable, {_reason(e)}") from e
    if "sha256" not in record or not isinstance(record.get("state"), dict):
        raise _Damaged("record has no checksum (not written by this version, or garbled)")
    digest = record.pop("sha256")
    if _sha256(record) != digest:
        raise _Damaged("checksum mismatch in the JSON record")
    if record.get("epoch") != step:
        raise _Damaged(f"the record says epoch {record.get('epoch')!r}")
    return record


class _Damaged(Exception):
    pass


@contextlib.contextmanager
def _quiet_orbax_coroutines():
    """Silence the "Exception ignored in <coroutine>" reports of orbax's other array reads
    after one read failed (the failure itself is reported as the damage reason)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def read_checkpoint_meta(directory):
    """``(epoch, meta)`` of the newest checkpoint whose JSON record is intact, or None when there is none.

    Only the record is checked (the arrays are not read).
    """
    steps = _steps(directory)
    if not steps:
        return None
    mngr = _manager(directory, create=False)
    try:
        for step in steps:
            try:
                return step, _read_record(mngr, step)["meta"]
            except _Damaged:
                continue
    finally:
        mngr.close()
    return None


def _describe_mismatch(saved: list, wanted: list) -> str:
    saved_d = {p: (d, tuple(s)) for p, d, s in saved}
    wanted_d = {p: (d, tuple(s)) for p, d, s in wanted}
    lines = []
    for p in sorted(set(saved_d) | set(wanted_d)):
        a, b = saved_d.get(p), wanted_d.get(p)
        if a != b:
            fmt = lambda v: "absent" if v is None else f"{v[0]}{list(v[1])}"  # noqa: E731
            lines.append(f"  {p or '<root>'}: saved {fmt(a)}, requested {fmt(b)}")
    more = f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else ""
    return "\n".join(lines[:8]) + more


def restore_checkpoint(
    directory,
    target: Any,
    *,
    check: Callable[[int, dict], None] | None = None,
):
    """Restore the newest intact checkpoint: ``(epoch, state, meta)``, or None when there is none.

    Saved epochs are tried from the newest to the oldest. One is damaged when
    its JSON record or arrays cannot be read, or a SHA-256 digest (of the
    record, or of the restored arrays' bytes) does not match the one saved;
    each damaged epoch newer than the restored one is reported by a
    :class:`CheckpointDamagedWarning` ("checkpoint epoch 3 in DIR is damaged
    (checksum mismatch in the arrays); resuming from epoch 2").

    Args:
      directory: the checkpoint directory.
      target: a pytree with the structure, shapes and dtypes of the saved
        state (e.g. a freshly initialised one); the restored arrays take them.
      check: called as ``check(epoch, meta)`` with the record of the epoch about
        to be restored, before its arrays are read; exceptions it raises
        propagate (e.g. a settings mismatch: not damage).

    Raises:
      CheckpointError: checkpoints exist but none is intact (the message lists
        each epoch and why).
      StateMismatchError: an intact checkpoint's arrays have other paths, dtypes
        or shapes than ``target``.
    """
    import orbax.checkpoint as ocp

    steps = _steps(directory)
    if not steps:
        return None
    wanted = state_signature(target)
    damaged: list[tuple[int, str]] = []
    mngr = _manager(directory, create=False)
    try:
        for step in steps:
            try:
                record = _read_record(mngr, step)
            except _Damaged as e:
                damaged.append((step, str(e)))
                continue
            if check is not None:
                check(step, record["meta"])
            if record["state"].get("signature") != wanted:
                raise StateMismatchError(
                    f"the training state saved at epoch {step} in {directory} does not fit the requested one "
                    f"(another method, optimiser, number of particles, model or dtype):\n"
                    f"{_describe_mismatch(record['state'].get('signature') or [], wanted)}"
                )
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
            try:
                with _quiet_orbax_coroutines():
                    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
                digest = state_digest(state)
            except Exception as e:  # noqa: BLE001
                damaged.append((step, f"arrays unreadable, {_reason(e)}"))
                continue
            if digest != record["state"].get("sha256"):
                damaged.append((step, "checksum mismatch in the arrays"))
                continue
            for bad, why in damaged:
                warnings.warn(
                    f"checkpoint epoch {bad} in {directory} is damaged ({why}); resuming from epoch {step}",
                    CheckpointDamagedWarning,
                    stacklevel=2,
                )
            return step, state, record["meta"]
    finally:
        mngr.close()
    listing = "\n".join(f"  epoch {s}: {why}" for s, why in damaged)
    raise CheckpointError(
        f"no intact checkpoint in {directory}; every saved epoch is damaged:\n{listing}\n"
        "Start afresh without resuming (this replaces them), or restore the directory from a backup."
    )


def move_aside(directory, after: int) -> list[int]:
    """Move the saved steps newer than ``after`` to ``<directory>.damaged/<step>[-n]``; returns them.

    Used after falling back to an older epoch, so that training can save those
    epochs again (a step number can only be saved once) while the damaged
    files stay available for inspection.
    """
    moved = []
    for step in sorted(s for s in _steps(directory) if s > after):
        dest_root = os.path.abspath(os.fspath(directory)).rstrip(os.sep) + ".damaged"
        os.makedirs(dest_root, exist_ok=True)
        dest, n = os.path.join(dest_root, str(step)), 1
        while os.path.exists(dest):
            dest, n = os.path.join(dest_root, f"{step}-{n}"), n + 1
        shutil.move(os.path.join(directory, str(step)), dest)
        moved.append(step)
    return moved


def clear_checkpoints(directory) -> None:
    """Remove a checkpoint directory written by :func:`save_checkpoint` (if present)."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
