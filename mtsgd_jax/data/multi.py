"""Multi-MNIST, Multi-Fashion, Multi-Fashion+MNIST and Multi-Digits: two items on one canvas.

Each example overlays two 28 x 28 items on a 36 x 36 canvas: the first at offset
(0, 0) (shifted towards the top-left), the second at offset (8, 8) (towards the
bottom-right); where they overlap the pixel-wise maximum is kept. The two tasks
are the two items' classes, so the labels have shape (N, 2): column 0 the
top-left item's class, column 1 the bottom-right item's.

* ``multi-mnist``: both items from MNIST; ``multi-fashion``: both from
  Fashion-MNIST; ``multi-fashion-mnist``: the top-left item from MNIST, the
  bottom-right one from Fashion-MNIST (docs/algorithm.md §7; the paper uses
  120,000 training and 20,000 test pairs).
* :func:`multi_digits`: the same construction from scikit-learn's bundled 8 x 8
  handwritten digits, upscaled; it needs no download, so it is the data set that
  runs everywhere.

Pairing (deterministic given the seed, through ``numpy.random.Generator``): the
top-left items go through the source pool in shuffled order, pass after pass
(a fresh permutation per pass), so every source item is used about equally
often; each bottom-right item is drawn uniformly from the second pool, never
the same item as its top-left partner when both come from the same pool.

Images are float32 in [0, 1] with shape (N, 36, 36, 1) (NHWC, as flax expects);
labels are int32 (N, 2).

>>> ds = multi_digits("train", num_examples=5, seed=0)
>>> ds.images.shape, ds.images.dtype, ds.labels.shape, ds.labels.dtype
((5, 36, 36, 1), dtype('float32'), (5, 2), dtype('int32'))
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from mtsgd_jax.data._common import DataFormatError
from mtsgd_jax.data.idx import load_mnist_like, mnist_like_files

__all__ = [
    "CANVAS_SIZE",
    "ITEM_SIZE",
    "OFFSETS",
    "NUM_CLASSES",
    "MULTI_VARIANTS",
    "MULTI_SIZES",
    "MultiDataset",
    "overlay_pairs",
    "pair_indices",
    "multi_mnist",
    "multi_digits",
    "digits_pools",
    "resize_bilinear",
]

CANVAS_SIZE = 36
ITEM_SIZE = 28
OFFSETS = ((0, 0), (8, 8))
# Classes of MNIST and of Fashion-MNIST; the labels of every source file must lie in [0, NUM_CLASSES).
NUM_CLASSES = 10
# variant -> (source of the top-left item, source of the bottom-right item)
MULTI_VARIANTS = {
    "multi-mnist": ("mnist", "mnist"),
    "multi-fashion": ("fashion", "fashion"),
    "multi-fashion-mnist": ("mnist", "fashion"),
}
# The paper's sizes (docs/algorithm.md §7).
MULTI_SIZES = {"train": 120_000, "test": 20_000}
# Sub-folders tried for each source when ``data_dir`` is one path.
_SOURCE_SUBDIRS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw"),
    "fashion": ("fashion", "fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
}
_CACHE_VERSION = 1


class MultiDataset(NamedTuple):
    """Pairs of items on one canvas.

    Attributes:
      images: (N, 36, 36, 1) float32 in [0, 1].
      labels: (N, 2) int32: the classes of the top-left and of the bottom-right item.
      indices: (N, 2) int64: which source items were paired (indices into the
        first and the second source pool of the split).
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def overlay_pairs(first, second, canvas_size: int = CANVAS_SIZE, offsets=OFFSETS) -> np.ndarray:
    """Place ``first[i]`` at ``offsets[0]`` and ``second[i]`` at ``offsets[1]``; keep the max on overlaps.

    Args:
      first, second: (N, h, w) arrays of the same dtype (uint8 or float).
      canvas_size: side of the square canvas.
      offsets: ((row, col), (row, col)) top-left corners of the two items.

    Returns:
      (N, canvas_size, canvas_size) array of the inputs' dtype, zero off the items.

    >>> a = np.ones((1, 2, 2), np.uint8); b = 2 * np.ones((1, 2, 2), np.uint8)
    >>> overlay_pairs(a, b, canvas_size=3, offsets=((0, 0), (1, 1)))[0]
    array([[1, 1, 0],
           [1, 2, 2],
           [0, 2, 2]], dtype=uint8)
    """
    first, second = np.asarray(first), np.asarray(second)
    if first.ndim != 3 or first.shape != second.shape or first.dtype != second.dtype:
        raise ValueError(
            "overlay_pairs: first and second must be (N, h, w) arrays of one shape and dtype, "
            f"got {first.shape} {first.dtype} and {second.shape} {second.dtype}."
        )
    n, h, w = first.shape
    for r, c in offsets:
        if r < 0 or c < 0 or r + h > canvas_size or c + w > canvas_size:
            raise ValueError(f"overlay_pairs: an item of {h}x{w} at offset {(r, c)} leaves the {canvas_size}-canvas.")
    out = np.zeros((n, canvas_size, canvas_size), first.dtype)
    (r0, c0), (r1, c1) = offsets
    out[:, r0 : r0 + h, c0 : c0 + w] = first
    region = out[:, r1 : r1 + h, c1 : c1 + w]
    np.maximum(region, second, out=region)
    return out


def pair_indices(rng: np.random.Generator, n: int, size_first: int, size_second: int, same_pool: bool) -> np.ndarray:
    """(n, 2) indices of the paired items (see the module docstring for the scheme).

    >>> idx = pair_indices(np.random.default_rng(0), 10, 4, 4, same_pool=True)
    >>> idx.shape, bool(np.all(idx[:, 0] != idx[:, 1])), sorted(np.bincount(idx[:, 0]).tolist())
    ((10, 2), True, [2, 2, 3, 3])
    """
    if size_first < 1 or size_second < 1:
        raise ValueError(f"pair_indices: empty source pool (sizes {size_first}, {size_second}).")
    if same_pool and size_first < 2:
        raise ValueError("pair_indices: pairing distinct items from one pool needs at least 2 items.")
    passes = -(-n // size_first)
    first = np.concatenate([rng.permutation(size_first) for _ in range(passes)])[:n] if n else np.zeros(0, np.int64)
    if same_pool:
        # uniform over the other size_first - 1 items
        second = rng.integers(0, size_first - 1, size=n)
        second = second + (second >= first)
    else:
        second = rng.integers(0, size_second, size=n)
    return np.stack([first, second], axis=1).astype(np.int64)


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return (images.astype(np.float32) / np.float32(255.0))[..., None]
    return images.astype(np.float32)[..., None]


def _build(first_pool, second_pool, n, rng, same_pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8/float canvases (N, 36, 36), labels (N, 2) int32, indices (N, 2) for two (images, labels) pools."""
    idx = pair_indices(rng, n, len(first_pool[0]), len(second_pool[0]), same_pool)
    canvases = overlay_pairs(first_pool[0][idx[:, 0]], second_pool[0][idx[:, 1]])
    labels = np.stack([first_pool[1][idx[:, 0]], second_pool[1][idx[:, 1]]], axis=1).astype(np.int32)
    return canvases, labels, idx


def _source_dir(data_dir, source: str, split: str, allow_root: bool) -> Path:
    """The folder holding ``source``'s IDX files for ``split`` (see :func:`multi_mnist`)."""
    if isinstance(data_dir, Mapping):
        if source not in data_dir:
            raise ValueError(
                f"data_dir has no entry for {source!r}: pass a mapping with keys {sorted(_SOURCE_SUBDIRS)} "
                f"(got keys {sorted(data_dir)})."
            )
        return Path(data_dir[source])
    root = Path(data_dir)
    dirs = [root / s for s in _SOURCE_SUBDIRS[source]] + ([root] if allow_root else [])
    for d in dirs:
        images, labels = mnist_like_files(d, split)
        if any(p.is_file() for p in images) and any(p.is_file() for p in labels):
            return d
    tried = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"no {source} IDX files for the {split} split found; expected "
        f"{mnist_like_files('.', split)[0][0].name}[.gz] and {mnist_like_files('.', split)[1][0].name}[.gz] "
        f"in one of:\n  {tried}\n(or pass data_dir as a mapping {{'mnist': dir, 'fashion': dir}})."
    )


def _fingerprint(directory: Path, split: str) -> list:
    """Names and sizes of the source files, so a changed source invalidates the cache."""
    out = []
    for group in mnist_like_files(directory, split):
        for p in group:
            if p.is_file():
                out.append([str(p.resolve()), p.stat().st_size])
                break
    return out


def _cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def _load_cache(path: Path, meta_json: str, n: int):
    """The cached arrays, or None when the file is missing, unreadable or not for ``meta_json``."""
    if not path.is_file():
        return None
    try:
        # open the file here: np.load leaks its own handle when the content is not an archive
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            if str(z["meta"]) != meta_json:
                return None
            canvases, labels, indices = z["canvases"], z["labels"], z["indices"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if canvases.shape != (n, CANVAS_SIZE, CANVAS_SIZE) or labels.shape != (n, 2) or indices.shape != (n, 2):
        return None
    if canvases.dtype != np.uint8 or (labels.size and not (labels.min() >= 0 and labels.max() < NUM_CLASSES)):
        return None
    return canvases, labels, indices


def _save_cache(path: Path, meta_json: str, canvases, labels, indices) -> None:
    """Write atomically (temporary file, fsync, rename) so an interrupted write never leaves a half cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(meta_json), canvases=canvases, labels=labels, indices=indices)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def multi_mnist(
    data_dir,
    split: str = "train",
    variant: str = "multi-mnist",
    num_examples: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> MultiDataset:
    """Build (or load from the cache) one split of Multi-MNIST, Multi-Fashion or Multi-Fashion+MNIST.

    Args:
      data_dir: where the IDX files are (see :func:`mtsgd_jax.data.load_mnist_like`).
        Either a mapping ``{"mnist": dir, "fashion": dir}`` or one folder. For one
        folder, each source is looked for in its sub-folders (``mnist/``, ``MNIST/raw/``;
        ``fashion/``, ``fashion_mnist/``, ``fashion-mnist/``, ``FashionMNIST/raw/``)
        and, for ``multi-mnist`` and ``multi-fashion`` only, in the folder itself.
      split: ``"train"`` (pairs from the 60,000 training items) or ``"test"`` (from the 10,000 test items).
      variant: ``"multi-mnist"``, ``"multi-fashion"`` or ``"multi-fashion-mnist"``
        (top-left from MNIST, bottom-right from Fashion-MNIST).
      num_examples: number of pairs; default the paper's 120,000 (train) / 20,000 (test).
      seed: pairing seed; the same arguments give the same data set.
      cache_dir: if given, the pairs are stored there as ``<variant>_<split>_n<N>_seed<S>_<hash>.npz``
        (uint8 canvases) and loaded on later calls. The key covers the variant, split,
        size, seed, canvas geometry and the source files' paths and sizes; a cache
        file that does not load or does not match is rebuilt.

    Returns:
      :class:`MultiDataset`: images (N, 36, 36, 1) float32 in [0, 1], labels (N, 2)
      int32, indices (N, 2) into the source split(s). At the paper's size the training
      images take 622 MB as float32 (the cache file stores uint8: 156 MB).

    Raises:
      FileNotFoundError: no IDX files for a source (the message lists the folders tried).
      DataFormatError: a source file is malformed (see :func:`~mtsgd_jax.data.load_mnist_like`),
        its items are not 28 x 28, or a label is outside 0..9.
    """
    if variant not in MULTI_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(MULTI_VARIANTS)}, got {variant!r}.")
    if split not in MULTI_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    n = MULTI_SIZES[split] if num_examples is None else int(num_examples)
    if n < 0:
        raise ValueError(f"num_examples must be non-negative, got {num_examples}.")
    first_src, second_src = MULTI_VARIANTS[variant]
    same_pool = first_src == second_src
    dirs = {s: _source_dir(data_dir, s, split, allow_root=same_pool) for s in dict.fromkeys((first_src, second_src))}

    cache_path = meta_json = None
    if cache_dir is not None:
        meta = {
            "version": _CACHE_VERSION,
            "variant": variant,
            "split": split,
            "num_examples": n,
            "seed": int(seed),
            "canvas": CANVAS_SIZE,
            "offsets": [list(o) for o in OFFSETS],
            "sources": {s: _fingerprint(d, split) for s, d in sorted(dirs.items())},
        }
        meta_json = json.dumps(meta, sort_keys=True)
        cache_path = Path(cache_dir) / f"{variant}_{split}_n{n}_seed{int(seed)}_{_cache_key(meta)}.npz"
        cached = _load_cache(cache_path, meta_json, n)
        if cached is not None:
            canvases, labels, indices = cached
            return MultiDataset(_to_unit_float(canvases), labels.astype(np.int32), indices.astype(np.int64))

    pools = {s: load_mnist_like(d, split, num_classes=NUM_CLASSES) for s, d in dirs.items()}
    for s, pool in pools.items():
        if pool.images.shape[1:] != (ITEM_SIZE, ITEM_SIZE):
            raise DataFormatError(
                f"{s} {split} images in {dirs[s]} have shape {pool.images.shape[1:]}; expected {ITEM_SIZE}x{ITEM_SIZE}."
            )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), list(MULTI_SIZES).index(split)]))
    canvases, labels, indices = _build(pools[first_src], pools[second_src], n, rng, same_pool)
    if cache_path is not None:
        _save_cache(cache_path, meta_json, canvases, labels, indices)
    return MultiDataset(_to_unit_float(canvases), labels, indices)


# ----------------------------------------------------------------------------- Multi-Digits


def resize_bilinear(images, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) images to (N, size, size), pixel centres aligned (as PIL does for upscaling).

    >>> resize_bilinear(np.array([[[0.0, 1.0]]]), 4)[0, 0].tolist()
    [0.0, 0.25, 0.75, 1.0]
    """

    def weights(n_in, n_out):
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = x - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m

    images = np.asarray(images, np.float64)
    rows, cols = weights(images.shape[1], size), weights(images.shape[2], size)
    return np.einsum("ij,njk,lk->nil", rows, images, cols)


def digits_pools(seed: int = 0, test_fraction: float = 0.2, digit_size: int = 20):
    """The scikit-learn digits as 28 x 28 items, split into disjoint train / test pools.

    Args:
      seed: seed of the split (a permutation of the 1,797 digits).
      test_fraction: fraction of the digits in the test pool.
      digit_size: side of the upscaled digit, centred in the 28 x 28 frame (20, the
        default, mimics MNIST's 20 x 20 box with a 4-pixel margin; 28 fills the frame).

    Returns:
      ``{"train": (images, labels, ids), "test": (...)}`` with images (n, 28, 28) float32
      in [0, 1], labels (n,) int32 and ids (n,) the digits' row indices in
      ``sklearn.datasets.load_digits()``; the train and test ids are disjoint.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if not 1 <= digit_size <= ITEM_SIZE:
        raise ValueError(f"digit_size must be in [1, {ITEM_SIZE}], got {digit_size}.")
    digits = load_digits()
    raw = digits.images / 16.0  # values 0..16 -> [0, 1]
    small = np.clip(resize_bilinear(raw, digit_size), 0.0, 1.0).astype(np.float32)
    items = np.zeros((len(raw), ITEM_SIZE, ITEM_SIZE), np.float32)
    m = (ITEM_SIZE - digit_size) // 2
    items[:, m : m + digit_size, m : m + digit_size] = small
    labels = digits.target.astype(np.int32)
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0])).permutation(len(raw))
    n_test = int(round(test_fraction * len(raw)))
    if n_test < 2 or len(raw) - n_test < 2:
        raise ValueError(f"test_fraction {test_fraction} leaves fewer than 2 digits in a pool.")
    ids = {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}
    return {s: (items[i], labels[i], i.astype(np.int64)) for s, i in ids.items()}


def multi_digits(
    split: str = "train",
    num_examples: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    digit_size: int = 20,
) -> MultiDataset:
    """Multi-Digits: the Multi-MNIST construction on scikit-learn's bundled 8 x 8 digits (no download).

    The 1,797 digits (values 0..16) are scaled to [0, 1], upscaled bilinearly to
    ``digit_size`` (20 by default) and centred in a 28 x 28 frame like MNIST's digits.
    They are split into disjoint train / test pools (``test_fraction`` of them, chosen
    by ``seed``) BEFORE pairing, so no test pair reuses a training digit; then pairs
    are built within each pool as in :func:`multi_mnist`.

    Args:
      split: ``"train"`` or ``"test"``.
      num_examples: number of pairs; default 10,000 (train) / 2,000 (test).
      seed: seed of both the pool split and the pairing.
      test_fraction: fraction of the digits in the test pool (default 0.2: 359 test, 1,438 train).
      digit_size: side of the upscaled digit in its 28 x 28 frame.

    Returns:
      :class:`MultiDataset` with images (N, 36, 36, 1) float32 in [0, 1], labels (N, 2)
      int32 and indices (N, 2): row indices into ``sklearn.datasets.load_digits()``.

    >>> tr, te = multi_digits("train", 200), multi_digits("test", 50)
    >>> bool(np.isin(te.indices, tr.indices).any())
    False
    """
    sizes = {"train": 10_000, "test": 2_000}
    if split not in sizes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    n = sizes[split] if num_examples is None else int(num_examples)
    if n < 0:
        raise ValueError(f"num_examples must be non-negative, got {num_examples}.")
    images, labels, ids = digits_pools(seed, test_fraction, digit_size)[split]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, list(sizes).index(split)]))
    canvases, pair_labels, idx = _build((images, labels), (images, labels), n, rng, same_pool=True)
    return MultiDataset(canvases[..., None], pair_labels, ids[idx])
