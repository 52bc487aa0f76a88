"""Deterministic shuffled mini-batches over numpy arrays that share their leading axis.

The order of epoch ``e`` under seed ``s`` is the permutation drawn by
``numpy.random.default_rng(SeedSequence([s, e]))``: the same ``(seed, epoch)``
always gives the same batches, and different epochs give different orders, with
no state to carry between epochs (resuming at epoch ``e`` replays it exactly).

>>> x, y = np.arange(5), np.arange(5) * 10
>>> [b[0].tolist() for b in batch_iterator((x, y), 2, seed=0, epoch=0, shuffle=False)]
[[0, 1], [2, 3], [4]]
>>> num_batches(5, 2), num_batches(5, 2, drop_last=True)
(3, 2)
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["batch_iterator", "num_batches", "epoch_permutation"]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches of ``batch_size`` from ``n`` examples (the last one partial unless ``drop_last``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}.")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The (n,) int64 permutation used for ``(seed, epoch)``.

    >>> bool(np.array_equal(epoch_permutation(10, 0, 1), epoch_permutation(10, 0, 1)))
    True
    """
    for name, v in (("seed", seed), ("epoch", epoch)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return rng.permutation(n).astype(np.int64)


def _leaves(arrays) -> list[tuple[str, np.ndarray]]:
    if isinstance(arrays, Mapping):
        return [(f"[{k!r}]", v) for k, v in arrays.items()]
    if isinstance(arrays, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(arrays)]
    return [("", arrays)]


def _take(arrays, idx):
    if isinstance(arrays, Mapping):
        return {k: np.asarray(v)[idx] for k, v in arrays.items()}
    if isinstance(arrays, tuple) and hasattr(arrays, "_fields"):  # NamedTuple
        return type(arrays)(*(np.asarray(v)[idx] for v in arrays))
    if isinstance(arrays, (tuple, list)):
        return type(arrays)(np.asarray(v)[idx] for v in arrays)
    return np.asarray(arrays)[idx]


def batch_iterator(
    arrays: Any,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[Any]:
    """Yield mini-batches of ``arrays`` for one epoch.

    Args:
      arrays: a numpy array, a tuple / list / NamedTuple or a dict of arrays, all with
        the same leading length N.
      batch_size: examples per batch (the last batch may be smaller unless ``drop_last``).
      seed, epoch: non-negative integers selecting the order (see the module docstring).
      shuffle: False keeps the original order (seed and epoch are then still validated).
      drop_last: drop the final partial batch.

    Returns:
      An iterator (the arguments are checked at the call, not at the first ``next``) over
      batches with the structure of ``arrays`` (same container type and keys), each
      leaf indexed by the batch's rows; ``num_batches(N, batch_size, drop_last)`` of them.

    >>> data = {"x": np.arange(6).reshape(6, 1), "y": np.arange(6)}
    >>> batches = list(batch_iterator(data, 4, seed=1, epoch=0))
    >>> [b["y"].shape for b in batches], sorted(np.concatenate([b["y"] for b in batches]).tolist())
    ([(4,), (2,)], [0, 1, 2, 3, 4, 5])
    """
    leaves = _leaves(arrays)
    if not leaves:
        raise ValueError("batch_iterator: arrays is empty; pass an array or a tuple/dict of arrays.")
    lengths = {}
    for path, v in leaves:
        shape = np.shape(v)
        if len(shape) == 0:
            raise ValueError(f"batch_iterator: arrays{path} is a scalar; every array needs a leading example axis.")
        lengths[path] = shape[0]
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"arrays{p}: {n}" for p, n in lengths.items())
        raise ValueError(f"batch_iterator: arrays disagree on the leading (example) axis: {detail}.")
    n = next(iter(lengths.values()))
    count = num_batches(n, batch_size, drop_last)
    order = epoch_permutation(n, seed, epoch)
    if not shuffle:
        order = np.arange(n)
    return (_take(arrays, order[b * batch_size : (b + 1) * batch_size]) for b in range(count))
