"""IDX reader / writer and the MNIST-format loader, on small files written in the real format."""

import gzip
import math
import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------ corrupt headers

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _header(code: int, shape) -> bytes:
    """An IDX header written by hand: magic 0x0000<code><ndim>, then big-endian uint32 sizes."""
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", s) for s in shape)


def test_sizes_overflowing_int64_are_a_corrupt_header(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    # (2**32 - 1)**3 bytes: about 7.9e28, far beyond int64 (which printed a negative byte count)
    p.write_bytes(_header(0x08, (2**32 - 1,) * 3))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: corrupt header") as exc:
        read_idx(p)
    assert str((2**32 - 1) ** 3) in str(exc.value) and "-" not in str(exc.value).split("would need")[1].split("bytes")[0]
    # 2**64 bytes wraps to 0 in int64, which let the empty data through to a bare reshape error
    p.write_bytes(_header(0x08, (2**16,) * 4))
    with pytest.raises(DataFormatError, match=rf"train-images-idx3-ubyte: corrupt header: shape \(65536, 65536, 65536, 65536\) .*{2**64}"):
        read_idx(p)
    # within int64 but more than the file holds: the exact byte count, positive
    p.write_bytes(_header(0x0E, (2**31, 2**28)))
    with pytest.raises(DataFormatError, match=rf"truncated data: shape \(2147483648, 268435456\) of float64 needs {2**62} bytes"):
        read_idx(p)


@settings(max_examples=30)
@given(
    shape=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6),
    dtype=st.sampled_from(sorted(_CODES, key=str)),
    extra=st.integers(0, 64),
)
@example(shape=[0, 2**32 - 1, 2**32 - 1, 2**32 - 1], dtype=np.dtype(np.float64), extra=0)  # found by hypothesis
def test_header_without_its_data_is_named_or_empty(tmp_path_factory, shape, dtype, extra):
    """Any header followed by ``extra`` bytes: the data must be exactly prod(shape) * itemsize bytes."""
    p = tmp_path_factory.mktemp("idx") / "x-idx"
    data = bytes(range(extra))
    p.write_bytes(_header(_CODES[dtype], shape) + data)
    need = math.prod(shape) * dtype.itemsize  # Python integers: exact
    if need == extra:
        try:
            np.empty(shape, dtype)  # numpy's own limit: an empty shape whose other dims overflow it
        except ValueError:
            with pytest.raises(DataFormatError, match=r"is empty but its other dimensions multiply past"):
                read_idx(p)
            return
        a = read_idx(p)
        assert a.shape == tuple(shape) and a.dtype == dtype
        assert a.tobytes() == np.frombuffer(data, dtype.newbyteorder(">")).astype(dtype).tobytes()
        return
    with pytest.raises(DataFormatError) as exc:
        read_idx(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}: ")
    if need > 2**63 - 1:
        assert "corrupt header" in msg and str(need) in msg
    elif need > extra:
        assert f"needs {need} bytes after the header, the IDX file has {extra}" in msg
    else:
        assert f"{extra - need} unexpected trailing bytes" in msg


def test_mnist_files_with_no_images_are_rejected(tmp_path):
    _write_split(tmp_path, "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz: the header declares shape \(0, 28, 28\), so the file holds no image"):
        load_mnist_like(tmp_path, "train")
    _write_split(tmp_path, "train", np.zeros((2, 0, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(DataFormatError, match=r"shape \(2, 0, 28\)"):
        load_mnist_like(tmp_path, "train")


def test_labels_outside_the_classes_are_rejected(tmp_path):
    labels = np.array([3, 9, 200, 12], np.uint8)
    _write_split(tmp_path, "t10k", np.zeros((4, 28, 28), np.uint8), labels)
    with pytest.raises(DataFormatError, match=r"t10k-labels-idx1-ubyte: label 200 at index 2 is outside \[0, 10\); expected 10 classes"):
        load_mnist_like(tmp_path, "test", num_classes=10)
    # without num_classes any uint8 label is a class (the loader serves other data sets too)
    np.testing.assert_array_equal(load_mnist_like(tmp_path, "test").labels, labels.astype(np.int32))
    assert load_mnist_like(tmp_path, "test", num_classes=201).labels.max() == 200
