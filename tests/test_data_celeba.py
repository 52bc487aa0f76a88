"""CelebA loader on small annotation files and JPEGs written in the real formats."""

import numpy as np
import pytest
from PIL import Image

from mtsgd_jax.data import (
    CELEBA_ATTRIBUTES,
    DataFormatError,
    batch_iterator,
    celeba_split,
    load_celeba,
    load_celeba_image,
    read_celeba_attributes,
    read_celeba_partition,
)

N = 9
PARTITION = [0, 0, 1, 0, 2, 0, 1, 2, 0]  # train rows 0, 1, 3, 5, 8; valid 2, 6; test 4, 7
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220),
          (220, 40, 220), (128, 128, 128), (250, 250, 250), (10, 10, 10)]


def _ids(n=N):
    return [f"{i + 1:06d}.jpg" for i in range(n)]


def _write_attr(path, values, names=CELEBA_ATTRIBUTES, count=None, ids=None):
    ids = ids or _ids(len(values))
    lines = [str(len(values) if count is None else count), " ".join(names) + " "]  # real file: trailing space
    for i, row in zip(ids, values):
        # the real file pads positive values with a space: "000001.jpg -1  1  1 -1 ..."
        lines.append(i + " " + " ".join(f"{v:2d}" for v in row))
    path.write_text("\n".join(lines) + "\n")


def _write_partition(path, parts, ids=None):
    ids = ids or _ids(len(parts))
    path.write_text("".join(f"{i} {p}\n" for i, p in zip(ids, parts)))


def _write_image(path, color, border=(0, 0, 0)):
    """A 178 x 218 aligned-CelebA-sized JPEG: ``color`` in the central 178 x 178 square, ``border`` above and below."""
    a = np.empty((218, 178, 3), np.uint8)
    a[:] = border
    a[20:198] = color
    Image.fromarray(a).save(path, format="JPEG", quality=95, subsampling=0)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    values = np.where(np.random.default_rng(0).random((N, 40)) < 0.4, 1, -1)
    _write_attr(root / "list_attr_celeba.txt", values)
    _write_partition(root / "list_eval_partition.txt", PARTITION)
    (root / "img_align_celeba").mkdir()
    for i, c in zip(_ids(), COLORS):
        _write_image(root / "img_align_celeba" / i, c)
    return root, (values == 1).astype(np.int32)


def test_attributes_file(celeba):
    root, attrs = celeba
    ids, a, names = read_celeba_attributes(root / "list_attr_celeba.txt")
    assert ids == _ids() and names == CELEBA_ATTRIBUTES and len(names) == 40
    assert a.dtype == np.int32 and a.shape == (N, 40)
    np.testing.assert_array_equal(a, attrs)
    assert read_celeba_partition(root / "list_eval_partition.txt") == dict(zip(_ids(), PARTITION))


@pytest.mark.parametrize("split,rows", [("train", [0, 1, 3, 5, 8]), ("valid", [2, 6]), ("test", [4, 7]),
                                        ("all", list(range(N)))])
def test_load_split(celeba, split, rows):
    root, attrs = celeba
    d = load_celeba(root, split)
    assert d.images.shape == (len(rows), 64, 64, 3) and d.images.dtype == np.float32
    assert d.attributes.shape == (len(rows), 40) and d.attributes.dtype == np.int32
    assert set(np.unique(d.attributes).tolist()) <= {0, 1}
    np.testing.assert_array_equal(d.attributes, attrs[rows])
    assert d.image_ids == [_ids()[r] for r in rows] and d.attribute_names == CELEBA_ATTRIBUTES
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0
    # each image is its solid colour (the black borders are cropped away), up to JPEG error
    expected = np.array(COLORS, np.float32)[rows] / 255.0
    np.testing.assert_allclose(d.images.mean(axis=(1, 2)), expected, atol=0.02)
    np.testing.assert_allclose(d.images, np.broadcast_to(expected[:, None, None], d.images.shape), atol=0.06)


def test_center_crop_then_bilinear_resize(celeba):
    root, _ = celeba
    p = root / "img_align_celeba" / "000001.jpg"
    with Image.open(p) as im:
        ref = np.asarray(im.convert("RGB").crop((0, 20, 178, 198)).resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(load_celeba_image(p), ref.astype(np.float32) / 255.0)
    assert load_celeba_image(p, image_size=32).shape == (32, 32, 3)
    # without the crop the black bands come back (squeezed)
    nocrop = load_celeba_image(p, center_crop=False)
    assert nocrop[0].max() < 0.1 and nocrop[32].min() > 0.05


def test_limit_and_select_attributes(celeba):
    root, attrs = celeba
    d = load_celeba(root, "train", attributes=["Smiling", "Male", 0], max_examples=3)
    assert d.attribute_names == ["Smiling", "Male", "5_o_Clock_Shadow"]
    cols = [CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Male"), 0]
    np.testing.assert_array_equal(d.attributes, attrs[[0, 1, 3]][:, cols])
    assert d.images.shape == (3, 64, 64, 3)
    assert load_celeba(root, "train", load_images=False).images is None
    with pytest.raises(ValueError, match="unknown attribute 'Happy'"):
        load_celeba(root, "train", attributes=["Happy"])
    with pytest.raises(ValueError, match="attribute index 40 out of range"):
        load_celeba(root, "train", attributes=[40])
    with pytest.raises(ValueError, match="split must be one of"):
        load_celeba(root, "validation")


def test_lazy_split_and_batches(celeba):
    root, _ = celeba
    eager = load_celeba(root, "train")
    lazy = celeba_split(root, "train", num_threads=3)
    assert len(lazy) == 5 and "n=5" in repr(lazy)
    np.testing.assert_array_equal(lazy.load_images([3, 0]), eager.images[[3, 0]])
    np.testing.assert_array_equal(lazy[1:3]["images"], eager.images[1:3])
    assert lazy.load_images([]).shape == (0, 64, 64, 3)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        lazy.load_images([5])
    batches = list(lazy.batches(2, seed=0, epoch=1))
    assert [len(b["images"]) for b in batches] == [2, 2, 1]
    # the same order as batch_iterator over in-memory arrays with the same (seed, epoch)
    ref = list(batch_iterator({"images": eager.images, "attributes": eager.attributes}, 2, seed=0, epoch=1))
    for b, r in zip(batches, ref):
        np.testing.assert_array_equal(b["images"], r["images"])
        np.testing.assert_array_equal(b["attributes"], r["attributes"])
    assert len(list(lazy.batches(2, seed=0, epoch=1, drop_last=True))) == 2


def test_official_layout_and_nested_image_folder(tmp_path):
    (tmp_path / "Anno").mkdir()
    (tmp_path / "Eval").mkdir()
    _write_attr(tmp_path / "Anno" / "list_attr_celeba.txt", -np.ones((2, 40), int))
    _write_partition(tmp_path / "Eval" / "list_eval_partition.txt", [2, 2])
    nested = tmp_path / "img_align_celeba" / "img_align_celeba"
    nested.mkdir(parents=True)
    for i in _ids(2):
        _write_image(nested / i, (90, 90, 90))
    d = load_celeba(tmp_path, "test")
    assert d.images.shape == (2, 64, 64, 3) and d.attributes.sum() == 0
    assert load_celeba(tmp_path, "train").images.shape == (0, 64, 64, 3)


# ------------------------------------------------------------------ errors


def _bad_attr(tmp_path, text):
    p = tmp_path / "list_attr_celeba.txt"
    p.write_text(text)
    return p


def test_malformed_attribute_lines(tmp_path):
    header = "2\n" + " ".join(CELEBA_ATTRIBUTES) + "\n"
    ok = "000001.jpg " + " ".join(["-1"] * 40) + "\n"
    p = _bad_attr(tmp_path, header + ok + "000002.jpg " + " ".join(["1"] * 39) + "\n")
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt, line 4: expected an image id and 40 values"):
        read_celeba_attributes(p)
    p = _bad_attr(tmp_path, header + ok + "\n000002.jpg " + " ".join(["1"] * 39 + ["0"]) + "\n")
    with pytest.raises(DataFormatError, match=r"line 5: value '0' for attribute 'Young' of 000002\.jpg; expected -1 or 1"):
        read_celeba_attributes(p)
    p = _bad_attr(tmp_path, header + ok)
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt, line 1: declares 2 images but the file lists 1"):
        read_celeba_attributes(p)
    p = _bad_attr(tmp_path, "two\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + ok)
    with pytest.raises(DataFormatError, match=r"line 1: expected the number of images"):
        read_celeba_attributes(p)
    p = _bad_attr(tmp_path, "1\n" + ok)  # names line missing
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt, line 2: expected the attribute names"):
        read_celeba_attributes(p)
    p = _bad_attr(tmp_path, header + ok + ok)
    with pytest.raises(DataFormatError, match=r"line 4: duplicate image id '000001\.jpg'"):
        read_celeba_attributes(p)
    p = _bad_attr(tmp_path, "1\n")
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt: 1 line"):
        read_celeba_attributes(p)


def test_malformed_partition_lines(tmp_path):
    p = tmp_path / "list_eval_partition.txt"
    p.write_text("000001.jpg 0\n000002.jpg 3\n")
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt, line 2: expected 'image_id partition'"):
        read_celeba_partition(p)
    p.write_text("000001.jpg 0 extra\n")
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt, line 1"):
        read_celeba_partition(p)


def test_missing_files_and_images(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"list_attr_celeba\.txt(.|\n)*Anno"):
        load_celeba(tmp_path, "train")
    _write_attr(tmp_path / "list_attr_celeba.txt", -np.ones((3, 40), int))
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition\.txt(.|\n)*Eval"):
        load_celeba(tmp_path, "train")
    _write_partition(tmp_path / "list_eval_partition.txt", [0, 0], ids=_ids(2))
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt: no partition for 1 image.*'000003\.jpg'"):
        load_celeba(tmp_path, "train")
    _write_partition(tmp_path / "list_eval_partition.txt", [0, 0, 1])
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_celeba(tmp_path, "train")
    (tmp_path / "img_align_celeba").mkdir()
    _write_image(tmp_path / "img_align_celeba" / "000001.jpg", (1, 2, 3))
    with pytest.raises(FileNotFoundError, match=r"img_align_celeba/000002\.jpg does not exist .*train split"):
        load_celeba(tmp_path, "train")
    # a corrupted JPEG is named
    (tmp_path / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataFormatError, match=r"000002\.jpg: not a readable image"):
        load_celeba(tmp_path, "train")
    # lazy splits can skip the existence check; the error then comes with the batch
    s = celeba_split(tmp_path, "valid", check_images=False)
    with pytest.raises(FileNotFoundError, match=r"000003\.jpg"):
        s.load_images([0])


def test_more_malformed_attribute_files(tmp_path):
    ok = "000001.jpg " + " ".join(["-1"] * 40) + "\n"
    names = list(CELEBA_ATTRIBUTES)
    names[5] = names[2]  # "Attractive" twice
    p = _bad_attr(tmp_path, "1\n" + " ".join(names) + "\n" + ok)
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt, line 2: attribute name\(s\) \['Attractive'\] appear more than once"):
        read_celeba_attributes(p)
    header = "1\n" + " ".join(CELEBA_ATTRIBUTES) + "\n"
    for bad_id in ("../000001.jpg", "img/000001.jpg", "..", "a\\b.jpg"):
        p = _bad_attr(tmp_path, header + bad_id + ok[len("000001.jpg"):])
        with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt, line 3: image id .* is not a file name"):
            read_celeba_attributes(p)
    p = _bad_attr(tmp_path, "0\n" + " ".join(CELEBA_ATTRIBUTES) + "\n\n")
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt: lists no images; expected one line 'image_id v1 \.\.\. v40'"):
        read_celeba_attributes(p)
    # a byte-order mark before the count is not an error
    p.write_bytes(b"\xef\xbb\xbf" + (header + ok).encode())
    ids, attrs, got_names = read_celeba_attributes(p)
    assert ids == ["000001.jpg"] and attrs.tolist() == [[0] * 40] and got_names == list(CELEBA_ATTRIBUTES)
    p.write_bytes(b"\xff\xfe" + "1\n".encode("utf-16-le"))
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt: not a text file"):
        read_celeba_attributes(p)


def test_partition_image_id_must_be_a_file_name(tmp_path):
    p = tmp_path / "list_eval_partition.txt"
    p.write_text("000001.jpg 0\n../../000002.jpg 1\n")
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt, line 2: image id '\.\./\.\./000002\.jpg' is not a file name"):
        read_celeba_partition(p)
