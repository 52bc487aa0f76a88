"""Deterministic shuffled mini-batches."""

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtsgd_jax.data import batch_iterator, epoch_permutation, num_batches


def _order(n, batch_size, **kw):
    return np.concatenate([b for b in batch_iterator(np.arange(n), batch_size, **kw)] or [np.zeros(0, int)])


def test_same_seed_and_epoch_same_order_different_epochs_differ():
    a = _order(100, 7, seed=3, epoch=2)
    np.testing.assert_array_equal(a, _order(100, 7, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, _order(100, 7, seed=3, epoch=3))
    assert not np.array_equal(a, _order(100, 7, seed=4, epoch=2))
    assert not np.array_equal(a, np.arange(100))
    np.testing.assert_array_equal(a, epoch_permutation(100, 3, 2))
    # the order does not depend on the batch size
    np.testing.assert_array_equal(a, _order(100, 32, seed=3, epoch=2))


def test_no_shuffle_and_drop_last():
    batches = list(batch_iterator(np.arange(10), 4, seed=0, epoch=0, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batches = list(batch_iterator(np.arange(10), 4, seed=0, epoch=0, drop_last=True))
    assert [len(b) for b in batches] == [4, 4]
    assert list(batch_iterator(np.arange(3), 4, seed=0, epoch=0, drop_last=True)) == []


class Pair(NamedTuple):
    x: np.ndarray
    y: np.ndarray


@pytest.mark.parametrize("container", ["tuple", "list", "dict", "namedtuple"])
def test_structure_is_kept_and_rows_stay_aligned(container):
    x = np.arange(20).reshape(10, 2)
    y = np.arange(10) * 10
    arrays = {"tuple": (x, y), "list": [x, y], "dict": {"x": x, "y": y}, "namedtuple": Pair(x, y)}[container]
    for b in batch_iterator(arrays, 3, seed=1, epoch=0):
        assert type(b) is type(arrays)
        bx, by = (b["x"], b["y"]) if container == "dict" else (b[0], b[1])
        np.testing.assert_array_equal(bx[:, 0] * 5, by)


@given(n=st.integers(0, 60), batch_size=st.integers(1, 70), drop_last=st.booleans(), epoch=st.integers(0, 5))
def test_batch_count_and_coverage(n, batch_size, drop_last, epoch):
    batches = list(batch_iterator((np.arange(n),), batch_size, seed=0, epoch=epoch, drop_last=drop_last))
    assert len(batches) == num_batches(n, batch_size, drop_last)
    assert len(batches) == (n // batch_size if drop_last else -(-n // batch_size))
    seen = np.concatenate([b[0] for b in batches]) if batches else np.zeros(0, int)
    assert len(set(seen.tolist())) == len(seen)
    assert len(seen) == (n - n % batch_size if drop_last else n)
    assert all(len(b[0]) == batch_size for b in batches[:-1])


def test_errors_are_raised_at_the_call():
    with pytest.raises(ValueError, match=r"arrays\['y'\]: 4"):
        batch_iterator({"x": np.zeros(5), "y": np.zeros(4)}, 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="scalar"):
        batch_iterator((np.zeros(5), 3.0), 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        batch_iterator(np.zeros(5), 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        batch_iterator(np.zeros(5), 2, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        batch_iterator(np.zeros(5), 2, seed=1.5, epoch=0)
    with pytest.raises(ValueError, match="empty"):
        batch_iterator({}, 2, seed=0, epoch=0)
    with pytest.raises(TypeError):
        batch_iterator(np.zeros(5), 2)  # seed and epoch are required keywords
