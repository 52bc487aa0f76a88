"""Checkpoints you can trust: SHA-256 of the record and of the arrays, fallback to the newest intact
epoch (with a warning naming the epoch and the reason) when files are flipped, truncated, deleted or
garbled, a clear error when none is intact, and a clear error (not damage) when the saved arrays do
not fit the requested state. Small pytrees, no training: each test saves a few steps with orbax."""

import glob
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtsgd_jax.training import checkpoint as ckpt
from mtsgd_jax.training.checkpoint import CheckpointDamagedWarning, CheckpointError, StateMismatchError


def _state(epoch: int, dtype=jnp.float32):
    """A training-state-like pytree whose values depend on ``epoch`` (float arrays of ``dtype``, a bfloat16 moment, an int count)."""
    rng = np.random.default_rng(epoch)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(16, 64)), dtype), "b": jnp.asarray(rng.normal(size=(64,)), dtype)},
        "model_state": {},
        "opt_state": {"count": jnp.asarray(epoch, jnp.int32), "mu": jnp.asarray(rng.normal(size=(16, 64)), jnp.bfloat16)},
    }


def _save_epochs(directory, epochs=(1, 2, 3), dtype=jnp.float32):
    for e in epochs:
        ckpt.save_checkpoint(directory, e, _state(e, dtype), {"epoch": e, "history": [{"loss": 1.0 / e}] * e})


def _assert_equal_trees(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_array_file(directory, epoch):
    files = [f for f in glob.glob(os.path.join(directory, str(epoch), "state", "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _flip(directory, epoch):
    path = _largest_array_file(directory, epoch)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(directory, epoch):
    path = _largest_array_file(directory, epoch)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _delete(directory, epoch):
    os.remove(_largest_array_file(directory, epoch))


def _garble_record(directory, epoch):
    path = os.path.join(directory, str(epoch), "meta", "metadata")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])  # no longer JSON


def _edit_record(directory, epoch):
    """Valid JSON, one value changed (what a stray edit or a flipped digit does)."""
    path = os.path.join(directory, str(epoch), "meta", "metadata")
    record = json.loads(open(path).read())
    record["meta"]["history"][0]["loss"] = 0.5
    open(path, "w").write(json.dumps(record))


DAMAGE = {
    "flipped array bytes": _flip,
    "truncated array file": _truncate,
    "deleted array file": _delete,
    "garbled JSON record": _garble_record,
    "edited JSON record": _edit_record,
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_round_trip_is_exact_and_keeps_two_epochs(tmp_path, dtype):
    d = str(tmp_path / "ck")
    _save_epochs(d, dtype=dtype)
    assert ckpt.latest_epoch(d) == 3
    assert sorted(int(s) for s in os.listdir(d) if s.isdigit()) == [2, 3]  # max_to_keep=2
    epoch, state, meta = ckpt.restore_checkpoint(d, _state(0, dtype))
    assert epoch == 3 and meta == {"epoch": 3, "history": [{"loss": 1.0 / 3}] * 3}
    _assert_equal_trees(state, _state(3, dtype))
    assert ckpt.read_checkpoint_meta(d) == (3, meta)
    assert ckpt.restore_checkpoint(str(tmp_path / "none"), _state(0, dtype)) is None


@pytest.mark.x64
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_epoch_falls_back_to_the_previous_intact_one(tmp_path, damage):
    d = str(tmp_path / "ck")
    _save_epochs(d)
    DAMAGE[damage](d, 3)
    with pytest.warns(CheckpointDamagedWarning, match=r"checkpoint epoch 3 in .* is damaged \(.+\); resuming from epoch 2") as rec:
        epoch, state, meta = ckpt.restore_checkpoint(d, _state(0))
    assert len(rec) == 1
    assert epoch == 2 and meta["epoch"] == 2
    _assert_equal_trees(state, _state(2))
    # the reason names what was wrong
    reason = str(rec[0].message)
    if damage == "flipped array bytes":
        assert "checksum mismatch in the arrays" in reason or "arrays unreadable" in reason
    elif damage in ("truncated array file", "deleted array file"):
        assert "arrays unreadable" in reason or "checksum mismatch" in reason
    elif damage == "garbled JSON record":
        assert "record unreadable" in reason
    else:
        assert "checksum mismatch in the JSON record" in reason


@pytest.mark.x64
def test_every_epoch_damaged_is_a_clear_error(tmp_path):
    d = str(tmp_path / "ck")
    _save_epochs(d)
    _flip(d, 3)
    _garble_record(d, 2)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as exc:
        ckpt.restore_checkpoint(d, _state(0))
    msg = str(exc.value)
    assert "epoch 3:" in msg and "epoch 2:" in msg and "record unreadable" in msg and d in msg
    assert ckpt.read_checkpoint_meta(d) == (3, {"epoch": 3, "history": [{"loss": 1.0 / 3}] * 3})  # record of 3 is intact


@pytest.mark.x64
def test_a_state_of_another_shape_is_a_mismatch_not_damage(tmp_path):
    d = str(tmp_path / "ck")
    _save_epochs(d, epochs=(1, 2))
    other = _state(0)
    other["params"]["w"] = jnp.zeros((16, 32), jnp.float32)
    with pytest.raises(StateMismatchError, match=r"\['params'\]\['w'\]: saved float32\[16, 64\], requested float32\[16, 32\]"):
        ckpt.restore_checkpoint(d, other)
    wider = _state(0, jnp.float64)
    with pytest.raises(StateMismatchError, match=r"saved float32\[16, 64\], requested float64\[16, 64\]"):
        ckpt.restore_checkpoint(d, wider)


@pytest.mark.x64
def test_check_sees_the_record_and_its_errors_propagate(tmp_path):
    d = str(tmp_path / "ck")
    _save_epochs(d, epochs=(1, 2))
    seen = []
    ckpt.restore_checkpoint(d, _state(0), check=lambda e, meta: seen.append((e, meta["epoch"])))
    assert seen == [(2, 2)]

    def refuse(epoch, meta):
        raise RuntimeError(f"refused {epoch}")

    with pytest.raises(RuntimeError, match="refused 2"):
        ckpt.restore_checkpoint(d, _state(0), check=refuse)


@pytest.mark.x64
def test_move_aside_keeps_the_damaged_files_and_lets_the_epoch_be_saved_again(tmp_path):
    d = str(tmp_path / "ck")
    _save_epochs(d)
    _flip(d, 3)
    with pytest.warns(CheckpointDamagedWarning):
        epoch, _, _ = ckpt.restore_checkpoint(d, _state(0))
    assert ckpt.move_aside(d, epoch) == [3]
    assert os.path.isdir(str(tmp_path / "ck.damaged" / "3"))
    assert ckpt.latest_epoch(d) == 2
    ckpt.save_checkpoint(d, 3, _state(3), {"epoch": 3})
    epoch, state, _ = ckpt.restore_checkpoint(d, _state(0))
    assert epoch == 3
    _assert_equal_trees(state, _state(3))


@pytest.mark.x64
def test_max_to_keep_below_two_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep must be >= 2"):
        ckpt.save_checkpoint(str(tmp_path / "ck"), 1, _state(1), {}, max_to_keep=1)


@pytest.mark.x64
@given(
    bit=st.integers(0, 8 * 4 * 6 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_state_digest_is_sha256_of_the_bytes_and_sees_any_flipped_bit(bit, dtype):
    a = np.arange(6, dtype=dtype).reshape(2, 3) / 7
    tree = {"a": a, "n": np.int32(3)}
    # independent computation of the documented definition: path, dtype, shape, bytes per leaf in pytree order
    h = hashlib.sha256()
    for path, leaf in (("['a']", a), ("['n']", np.asarray(np.int32(3)))):
        h.update(json.dumps([path, str(leaf.dtype), list(leaf.shape)], separators=(",", ":")).encode())
        h.update(leaf.tobytes())
    assert ckpt.state_digest(tree) == h.hexdigest()
    assert ckpt.state_digest({"a": jnp.asarray(a), "n": jnp.int32(3)}) == h.hexdigest()  # device arrays alike
    flipped = bytearray(a.tobytes())
    flipped[bit // 8] ^= 1 << (bit % 8)
    b = np.frombuffer(bytes(flipped), dtype=dtype).reshape(2, 3)
    assert ckpt.state_digest({"a": b, "n": np.int32(3)}) != h.hexdigest()
