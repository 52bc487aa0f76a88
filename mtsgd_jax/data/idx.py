"""IDX files (the MNIST / Fashion-MNIST format), raw or gzipped.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the data in C order, big-endian.
The dtype codes are

    0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

MNIST images are ``uint8`` with shape (N, 28, 28) (magic ``0x00000803``) and the
labels ``uint8`` with shape (N,) (magic ``0x00000801``). Gzip compression is
detected from the first two bytes (``1f 8b``), never from the file name, so a
gunzipped file still called ``.gz`` (or the reverse) reads fine.

>>> import tempfile, os, numpy as np
>>> with tempfile.TemporaryDirectory() as d:
...     p = os.path.join(d, "a-idx2-int")
...     _ = write_idx(p, np.arange(6, dtype=np.int32).reshape(2, 3), gzip=True)
...     read_idx(p)
array([[0, 1, 2],
       [3, 4, 5]], dtype=int32)
"""

from __future__ import annotations

import gzip as _gzip
import math
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mtsgd_jax.data._common import DataFormatError, find_first, missing_file_error

__all__ = ["IDX_DTYPES", "MnistLike", "read_idx", "write_idx", "load_mnist_like", "mnist_like_files"]

# IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_BYTES = 2**63 - 1


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """File contents, gunzipped when the file starts with the gzip magic; and whether it was gzipped."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw, False
    try:
        return _gzip.decompress(raw), True
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(
            f"{path}: starts with the gzip magic bytes 1f 8b but does not decompress ({e}); "
            "the download is probably truncated or corrupted."
        ) from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a native-byte-order numpy array.

    Args:
      path: the file. Gzip is detected from the content, not the extension.

    Returns:
      The array with the file's dtype (uint8 for MNIST) and shape (d_1, ..., d_ndim).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      DataFormatError: bad magic number, unknown dtype code, truncated header or
        data, or trailing bytes after the data. The message names the file.

    >>> import tempfile, os, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "x")
    ...     _ = write_idx(p, np.zeros((3, 28, 28), np.uint8))
    ...     read_idx(p).shape, read_idx(p).dtype
    ((3, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist (expected an IDX file, raw or gzipped).")
    data, gz = _read_bytes(path)
    kind = "gzipped IDX" if gz else "IDX"
    if len(data) < 4:
        raise DataFormatError(f"{path}: {kind} file has {len(data)} bytes, fewer than the 4-byte magic number.")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({IDX_DTYPES[c].newbyteorder('=').name})" for c in IDX_DTYPES)
        raise DataFormatError(
            f"{path}: bad magic number 0x{magic:08X}; an IDX file starts with 0x00 0x00, a dtype code "
            f"({known}) and the number of dimensions (e.g. 0x00000803 for MNIST images, "
            "0x00000801 for labels)."
        )
    if ndim == 0:
        raise DataFormatError(f"{path}: magic number 0x{magic:08X} declares 0 dimensions; expected at least 1.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(
            f"{path}: truncated header: {ndim} dimensions need {header} header bytes, the {kind} file has {len(data)}."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    # Python integers: a product of up to 255 sizes below 2**32 overflows int64 (and can wrap to 0).
    expected = math.prod(shape) * dtype.itemsize
    got = len(data) - header
    if expected > _MAX_BYTES:
        raise DataFormatError(
            f"{path}: corrupt header: shape {shape} of {dtype.newbyteorder('=').name} would need {expected} bytes "
            f"(more than 2**63); the {kind} file has {got} bytes after the header. Expected the sizes of the "
            "stored array, e.g. (N, 28, 28) for MNIST images."
        )
    if got < expected:
        raise DataFormatError(
            f"{path}: truncated data: shape {shape} of {dtype.newbyteorder('=').name} needs {expected} bytes "
            f"after the header, the {kind} file has {got}."
        )
    if got > expected:
        raise DataFormatError(
            f"{path}: {got - expected} unexpected trailing bytes after the data of shape {shape} "
            f"({expected} bytes of {dtype.newbyteorder('=').name})."
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    try:
        arr = arr.reshape(shape)
    except ValueError:
        # An empty array (a zero dimension) whose other dimensions multiply past what numpy can index.
        raise DataFormatError(
            f"{path}: shape {shape} is empty but its other dimensions multiply past numpy's largest "
            "array; expected the stored array's shape, e.g. (N, 28, 28) for MNIST images."
        ) from None
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array, gzip: bool = False) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``gzip``); the inverse of :func:`read_idx`.

    Args:
      path: destination (parent directories are created).
      array: array of 1 to 255 dimensions with dtype uint8, int8, int16, int32,
        float32 or float64; each dimension below 2**32.
      gzip: compress the file with gzip.

    Returns:
      ``path`` as a Path.

    >>> import tempfile, os, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_idx(os.path.join(d, "labels"), np.array([7, 2, 1], np.uint8))
    ...     p.read_bytes()[:4].hex()
    '00000801'
    """
    a = np.asarray(array)
    code = _CODE_OF.get(a.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(
            f"write_idx: dtype {a.dtype} has no IDX code; use one of uint8, int8, int16, int32, float32, float64."
        )
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"write_idx: arrays need 1 to 255 dimensions, got shape {a.shape}.")
    if any(s >= 2**32 for s in a.shape):
        raise ValueError(f"write_idx: every dimension must be below 2**32, got shape {a.shape}.")
    header = bytes([0, 0, code, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    payload = header + np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gzip:
        payload = _gzip.compress(payload, mtime=0)
    with open(path, "wb") as f:
        f.write(payload)
    return path


class MnistLike(NamedTuple):
    """One split of an MNIST-format data set.

    Attributes:
      images: (N, H, W) uint8 as stored (28 x 28 for MNIST and Fashion-MNIST).
      labels: (N,) int32 class labels.
    """

    images: np.ndarray
    labels: np.ndarray


_PREFIX = {"train": "train", "test": "t10k"}


def mnist_like_files(directory: str | os.PathLike, split: str) -> tuple[list[Path], list[Path]]:
    """Candidate paths of the image and label files of ``split``, in the order they are tried.

    The canonical names are ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]``
    and ``t10k-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]``; the dotted
    spelling ``train-images.idx3-ubyte`` of some mirrors is accepted too.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    d, pre = Path(directory), _PREFIX[split]

    def names(kind, nd):
        stems = [f"{pre}-{kind}-idx{nd}-ubyte", f"{pre}-{kind}.idx{nd}-ubyte"]
        return [d / (s + ext) for s in stems for ext in ("", ".gz")]

    return names("images", 3), names("labels", 1)


def load_mnist_like(directory: str | os.PathLike, split: str = "train", *, num_classes: int | None = None) -> MnistLike:
    """Load one split of MNIST, Fashion-MNIST or any data set in the same IDX files.

    Args:
      directory: folder holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
        ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` (raw or gzipped,
        detected from the content).
      split: ``"train"`` or ``"test"`` (the ``t10k`` files).
      num_classes: if given, every label must lie in ``[0, num_classes)`` (10 for
        MNIST and Fashion-MNIST).

    Returns:
      :class:`MnistLike` with ``images`` (N, H, W) uint8 and ``labels`` (N,) int32, N >= 1.

    Raises:
      FileNotFoundError: a file is missing (the message lists every name tried).
      DataFormatError: a file is not a valid IDX file, the images are not 3-D uint8
        with at least one non-empty image, the labels not 1-D uint8, their counts
        differ, or a label is outside ``[0, num_classes)``.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write_idx(f"{d}/t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8), gzip=True)
    ...     _ = write_idx(f"{d}/t10k-labels-idx1-ubyte", np.array([3, 9], np.uint8))
    ...     ds = load_mnist_like(d, "test")
    ...     ds.images.shape, ds.labels
    ((2, 28, 28), array([3, 9], dtype=int32))
    """
    image_candidates, label_candidates = mnist_like_files(directory, split)
    image_path = find_first(image_candidates)
    if image_path is None:
        raise missing_file_error(
            f"{split} images of the MNIST-format data set", image_candidates,
            "an IDX file (raw or gzipped) of uint8 images, magic 0x00000803, shape (N, 28, 28)",
        )
    label_path = find_first(label_candidates)
    if label_path is None:
        raise missing_file_error(
            f"{split} labels of the MNIST-format data set", label_candidates,
            "an IDX file (raw or gzipped) of uint8 labels, magic 0x00000801, shape (N,)",
        )
    images = read_idx(image_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFormatError(
            f"{image_path}: expected uint8 images of shape (N, H, W) (magic 0x00000803), "
            f"got {images.dtype} of shape {images.shape}."
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataFormatError(
            f"{image_path}: the header declares shape {images.shape}, so the file holds no image data; "
            "expected at least one image of at least 1 x 1 pixels (e.g. (60000, 28, 28))."
        )
    labels = read_idx(label_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(
            f"{label_path}: expected uint8 labels of shape (N,) (magic 0x00000801), "
            f"got {labels.dtype} of shape {labels.shape}."
        )
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"image/label count mismatch: {image_path} holds {images.shape[0]} images but "
            f"{label_path} holds {labels.shape[0]} labels."
        )
    if num_classes is not None and labels.size and int(labels.max()) >= num_classes:
        row = int(np.argmax(labels >= num_classes))
        raise DataFormatError(
            f"{label_path}: label {int(labels[row])} at index {row} is outside [0, {num_classes}); "
            f"expected {num_classes} classes (0..{num_classes - 1})."
        )
    return MnistLike(images=images, labels=labels.astype(np.int32))
