"""IDX reader / writer and the MNIST-format loader, on small files written in the real format."""

import gzip
import struct

import numpy as np
import pytest

from mtsgd_jax.data import DataFormatError, load_mnist_like, read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _mnist_bytes(images: np.ndarray) -> bytes:
    """MNIST image file bytes written by hand (independently of write_idx)."""
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def _label_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    p = write_idx(tmp_path / "a", a, gzip=gz)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == gz


@pytest.mark.parametrize("shape", [(7,), (2, 3), (1, 1, 1, 1), (0, 28, 28)])
def test_roundtrip_shapes(tmp_path, shape):
    a = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x", a)), a)


def test_reads_hand_written_mnist_file_big_endian(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    (tmp_path / "raw").write_bytes(_mnist_bytes(images))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw"), images)
    # big-endian multi-byte values
    (tmp_path / "i4").write_bytes(struct.pack(">IIii", 0x00000C01, 2, 1, -2))
    np.testing.assert_array_equal(read_idx(tmp_path / "i4"), [1, -2])
    # the writer produces the same bytes as the hand-built file
    write_idx(tmp_path / "w", images)
    assert (tmp_path / "w").read_bytes() == _mnist_bytes(images)


def test_gzip_detected_by_content_not_extension(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "no-extension", a, gzip=True)
    write_idx(tmp_path / "looks.gz", a, gzip=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "no-extension"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks.gz"), a)


def _write_split(d, prefix, images, labels, gz_images=True, gz_labels=False):
    img = _mnist_bytes(images)
    lab = _label_bytes(labels)
    (d / f"{prefix}-images-idx3-ubyte{'.gz' if gz_images else ''}").write_bytes(gzip.compress(img) if gz_images else img)
    (d / f"{prefix}-labels-idx1-ubyte{'.gz' if gz_labels else ''}").write_bytes(gzip.compress(lab) if gz_labels else lab)


def test_load_mnist_like_train_and_test(tmp_path):
    rng = np.random.default_rng(2)
    tr_x, tr_y = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6, dtype=np.uint8) % 10
    te_x, te_y = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([9, 8, 7], np.uint8)
    _write_split(tmp_path, "train", tr_x, tr_y, gz_images=True, gz_labels=True)
    _write_split(tmp_path, "t10k", te_x, te_y, gz_images=False, gz_labels=False)
    tr, te = load_mnist_like(tmp_path, "train"), load_mnist_like(tmp_path, "test")
    np.testing.assert_array_equal(tr.images, tr_x)
    np.testing.assert_array_equal(te.images, te_x)
    assert tr.images.dtype == np.uint8 and tr.labels.dtype == np.int32
    np.testing.assert_array_equal(tr.labels, tr_y)
    np.testing.assert_array_equal(te.labels, te_y)
    images, labels = te  # a NamedTuple unpacks
    assert images.shape == (3, 28, 28) and labels.shape == (3,)


def test_load_mnist_like_dotted_mirror_names(tmp_path):
    x, y = np.zeros((2, 28, 28), np.uint8), np.array([1, 2], np.uint8)
    (tmp_path / "train-images.idx3-ubyte").write_bytes(_mnist_bytes(x))
    (tmp_path / "train-labels.idx1-ubyte").write_bytes(_label_bytes(y))
    np.testing.assert_array_equal(load_mnist_like(tmp_path, "train").labels, y)


def test_load_mnist_like_bad_split(tmp_path):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_mnist_like(tmp_path, "valid")


# ------------------------------------------------------------------ errors


def test_missing_file_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte(.|\n)*t10k-images-idx3-ubyte\.gz"):
        load_mnist_like(tmp_path, "test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte(.|\n)*0x00000801"):
        load_mnist_like(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


def test_wrong_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: bad magic number 0x89504E47"):
        read_idx(p)
    p.write_bytes(struct.pack(">I", 0x00000703) + bytes(16))  # unknown dtype code 0x07
    with pytest.raises(DataFormatError, match="bad magic number 0x00000703"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(DataFormatError, match="fewer than the 4-byte magic"):
        read_idx(p)


def test_truncated_header_and_data(tmp_path):
    images = np.ones((3, 28, 28), np.uint8)
    full = _mnist_bytes(images)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(full[:10])
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: truncated header"):
        read_idx(p)
    p.write_bytes(full[:-5])
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: truncated data: shape \(3, 28, 28\)"):
        read_idx(p)
    p.write_bytes(gzip.compress(full[:-5]))
    with pytest.raises(DataFormatError, match=r"gzipped IDX file has 2347"):
        read_idx(p)
    p.write_bytes(full + b"xx")
    with pytest.raises(DataFormatError, match="2 unexpected trailing bytes"):
        read_idx(p)


def test_truncated_gzip_stream(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(_label_bytes(np.arange(1000) % 10))[:40])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte\.gz: starts with the gzip magic"):
        read_idx(p)


def test_count_mismatch_and_wrong_kinds(tmp_path):
    _write_split(tmp_path, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(DataFormatError, match=r"5 images but .*train-labels-idx1-ubyte holds 4 labels"):
        load_mnist_like(tmp_path, "train")
    # labels file that holds images
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_mnist_bytes(np.zeros((5, 28, 28), np.uint8)))
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: expected uint8 labels of shape \(N,\)"):
        load_mnist_like(tmp_path, "train")
    # images file of the wrong dtype
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.float32), gzip=True)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz: expected uint8 images"):
        load_mnist_like(tmp_path, "train")


def test_write_idx_rejects_unsupported(tmp_path):
    with pytest.raises(TypeError, match="no IDX code"):
        write_idx(tmp_path / "a", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "a", np.float32(1.0))
