"""Multi-MNIST / Multi-Fashion / Multi-Fashion+MNIST construction and caching, and Multi-Digits."""

import os

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mtsgd_jax.data import MULTI_VARIANTS, DataFormatError, digits_pools, multi_digits, multi_mnist, overlay_pairs, write_idx
from mtsgd_jax.data import multi as multi_mod
from mtsgd_jax.data.multi import pair_indices, resize_bilinear

SIZES = {"mnist": {"train": 40, "test": 12}, "fashion": {"train": 30, "test": 9}}


def _write_source(d, name, rng, gz):
    """Fake MNIST-format files; returns {split: (images, labels)}."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n = SIZES[name][split]
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, ::3] = 0  # some zeros so that the max on overlaps matters
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip=gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzip=gz)
        out[split] = (images, labels)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    rng = np.random.default_rng(0)
    data = {"mnist": _write_source(root / "mnist", "mnist", rng, gz=True),
            "fashion": _write_source(root / "fashion_mnist", "fashion", rng, gz=False)}
    return root, data


def _expected(first, second):
    canvas = np.zeros((len(first), 36, 36), np.uint8)
    for k in range(len(first)):
        canvas[k, :28, :28] = first[k]
        canvas[k, 8:, 8:] = np.maximum(canvas[k, 8:, 8:], second[k])
    return canvas.astype(np.float32)[..., None] / 255.0


@pytest.mark.parametrize("variant", sorted(MULTI_VARIANTS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_construction_matches_hand_overlay(sources, variant, split):
    root, data = sources
    n = 25
    ds = multi_mnist(root, split, variant, num_examples=n, seed=3)
    assert ds.images.shape == (n, 36, 36, 1) and ds.images.dtype == np.float32
    assert ds.labels.shape == (n, 2) and ds.labels.dtype == np.int32
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    first_src, second_src = MULTI_VARIANTS[variant]
    (x1, y1), (x2, y2) = data[first_src][split], data[second_src][split]
    i, j = ds.indices[:, 0], ds.indices[:, 1]
    assert i.max() < len(x1) and j.max() < len(x2)
    np.testing.assert_array_equal(ds.labels, np.stack([y1[i], y2[j]], 1))
    np.testing.assert_allclose(ds.images, _expected(x1[i], x2[j]), atol=1e-7)
    if first_src == second_src:
        assert np.all(i != j)


def test_fashion_mnist_variant_takes_first_from_mnist(sources):
    root, data = sources
    ds = multi_mnist({"mnist": root / "mnist", "fashion": root / "fashion_mnist"}, "train", "multi-fashion-mnist",
                     num_examples=60, seed=0)
    # the first pool is MNIST's 40 items (each used, evenly), the second Fashion's 30
    assert sorted(np.bincount(ds.indices[:, 0], minlength=40).tolist()) == [1] * 20 + [2] * 20
    assert ds.indices[:, 1].max() < 30
    np.testing.assert_array_equal(ds.images[:, :8, :8, 0] * 255, data["mnist"]["train"][0][ds.indices[:, 0], :8, :8])
    np.testing.assert_array_equal(ds.images[:, 28:, 28:, 0] * 255, data["fashion"]["train"][0][ds.indices[:, 1], 20:, 20:])


def test_deterministic_and_seed_dependent(sources):
    root, _ = sources
    a = multi_mnist(root, "train", "multi-mnist", num_examples=30, seed=5)
    b = multi_mnist(root, "train", "multi-mnist", num_examples=30, seed=5)
    c = multi_mnist(root, "train", "multi-mnist", num_examples=30, seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.indices, c.indices)
    # the first pass of top-left items is a permutation of the pool
    assert sorted(multi_mnist(root, "train", "multi-mnist", num_examples=40, seed=5).indices[:, 0]) == list(range(40))


def test_default_sizes_are_the_seeds(sources, monkeypatch):
    assert multi_mod.MULTI_SIZES == {"train": 120_000, "test": 20_000}
    monkeypatch.setitem(multi_mod.MULTI_SIZES, "train", 17)
    monkeypatch.setitem(multi_mod.MULTI_SIZES, "test", 4)
    root, _ = sources
    assert len(multi_mnist(root, "train", "multi-fashion").labels) == 17
    assert len(multi_mnist(root, "test", "multi-fashion").labels) == 4


def test_cache_built_once_then_loaded(sources, tmp_path, monkeypatch):
    root, _ = sources
    calls = []
    real_build = multi_mod._build

    def counting_build(*args, **kw):
        calls.append(1)
        return real_build(*args, **kw)

    monkeypatch.setattr(multi_mod, "_build", counting_build)
    cache = tmp_path / "cache"
    a = multi_mnist(root, "train", "multi-fashion-mnist", num_examples=20, seed=1, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(calls) == 1 and len(files) == 1
    assert files[0].name.startswith("multi-fashion-mnist_train_n20_seed1_")
    mtime = files[0].stat().st_mtime_ns
    b = multi_mnist(root, "train", "multi-fashion-mnist", num_examples=20, seed=1, cache_dir=cache)
    assert len(calls) == 1 and files[0].stat().st_mtime_ns == mtime
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    # any change of the key builds a new file
    multi_mnist(root, "train", "multi-fashion-mnist", num_examples=20, seed=2, cache_dir=cache)
    multi_mnist(root, "train", "multi-fashion-mnist", num_examples=21, seed=1, cache_dir=cache)
    multi_mnist(root, "test", "multi-fashion-mnist", num_examples=20, seed=1, cache_dir=cache)
    multi_mnist(root, "train", "multi-mnist", num_examples=20, seed=1, cache_dir=cache)
    assert len(calls) == 5 and len(list(cache.glob("*.npz"))) == 5
    assert not list(cache.glob("*.tmp"))


def test_corrupted_cache_is_rebuilt(sources, tmp_path, monkeypatch):
    root, _ = sources
    cache = tmp_path / "cache"
    a = multi_mnist(root, "test", "multi-mnist", num_examples=10, seed=0, cache_dir=cache)
    (path,) = cache.glob("*.npz")
    for garbage in (b"not a zip file", path.read_bytes()[:100]):
        path.write_bytes(garbage)
        b = multi_mnist(root, "test", "multi-mnist", num_examples=10, seed=0, cache_dir=cache)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    # the rebuilt file is valid again: no build on the next call
    monkeypatch.setattr(multi_mod, "_build", lambda *a, **k: pytest.fail("cache not used"))
    c = multi_mnist(root, "test", "multi-mnist", num_examples=10, seed=0, cache_dir=cache)
    np.testing.assert_array_equal(a.images, c.images)


def test_cache_invalidated_when_source_changes(tmp_path):
    rng = np.random.default_rng(0)
    _write_source(tmp_path / "mnist", "mnist", rng, gz=False)
    cache = tmp_path / "cache"
    multi_mnist(tmp_path, "test", "multi-mnist", num_examples=5, cache_dir=cache)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((13, 28, 28), np.uint8))
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(13, np.uint8))
    ds = multi_mnist(tmp_path, "test", "multi-mnist", num_examples=5, cache_dir=cache)
    assert ds.images.max() == 0.0 and len(list(cache.glob("*.npz"))) == 2


@pytest.mark.parametrize("variant, bad_source", [("multi-mnist", "mnist"), ("multi-fashion-mnist", "fashion")])
def test_label_outside_the_ten_classes_is_rejected(tmp_path, variant, bad_source):
    rng = np.random.default_rng(0)
    _write_source(tmp_path / "mnist", "mnist", rng, gz=False)
    _write_source(tmp_path / "fashion", "fashion", rng, gz=False)
    labels = np.arange(SIZES[bad_source]["test"], dtype=np.uint8) % 10
    labels[5] = 200
    write_idx(tmp_path / bad_source / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DataFormatError, match=rf"{bad_source}/t10k-labels-idx1-ubyte: label 200 at index 5 is outside \[0, 10\)"):
        multi_mnist(tmp_path, "test", variant, num_examples=4, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing cached from the bad file
    labels[5] = 9  # the largest valid class
    write_idx(tmp_path / bad_source / "t10k-labels-idx1-ubyte", labels)
    ds = multi_mnist(tmp_path, "test", variant, num_examples=40)
    col = 0 if (variant, bad_source) == ("multi-mnist", "mnist") else 1
    np.testing.assert_array_equal(ds.labels[:, col], labels[ds.indices[:, col]])


def test_cache_with_out_of_range_labels_is_rebuilt(sources, tmp_path):
    root, _ = sources
    cache = tmp_path / "cache"
    a = multi_mnist(root, "test", "multi-mnist", num_examples=6, seed=0, cache_dir=cache)
    (path,) = cache.glob("*.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][0, 0] = -1
    np.savez(path, **arrays)
    b = multi_mnist(root, "test", "multi-mnist", num_examples=6, seed=0, cache_dir=cache)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.labels.min() >= 0


def test_data_dir_layouts(sources, tmp_path):
    root, data = sources
    # the source folder itself, for single-source variants
    a = multi_mnist(root / "mnist", "test", "multi-mnist", num_examples=8)
    b = multi_mnist(root, "test", "multi-mnist", num_examples=8)
    np.testing.assert_array_equal(a.images, b.images)
    # torchvision layout
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_source(raw, "fashion", np.random.default_rng(1), gz=True)
    assert multi_mnist(tmp_path, "train", "multi-fashion", num_examples=3).labels.shape == (3, 2)
    # the mixed variant needs both sources in sub-folders (or a mapping)
    with pytest.raises(FileNotFoundError, match=r"no mnist IDX files(.|\n)*t10k-images-idx3-ubyte"):
        multi_mnist(root / "mnist", "test", "multi-fashion-mnist")
    with pytest.raises(ValueError, match="no entry for 'fashion'"):
        multi_mnist({"mnist": root / "mnist"}, "test", "multi-fashion-mnist")


def test_bad_arguments(sources):
    root, _ = sources
    with pytest.raises(ValueError, match="variant must be one of"):
        multi_mnist(root, "train", "multi-cifar")
    with pytest.raises(ValueError, match="split must be"):
        multi_mnist(root, "valid")
    with pytest.raises(ValueError, match="non-negative"):
        multi_mnist(root, "train", num_examples=-1)


def test_overlay_pairs_and_pair_indices():
    a = np.full((2, 28, 28), 0.25, np.float32)
    b = np.full((2, 28, 28), 0.5, np.float32)
    b[1, :, :] = 0.1
    out = overlay_pairs(a, b)
    assert out.shape == (2, 36, 36)
    assert out[0, 0, 0] == 0.25 and out[0, 35, 35] == 0.5 and out[0, 10, 10] == 0.5 and out[0, 0, 35] == 0
    assert out[1, 10, 10] == 0.25 and out[1, 30, 30] == np.float32(0.1)
    with pytest.raises(ValueError, match="leaves the 30-canvas"):
        overlay_pairs(a, b, canvas_size=30)
    with pytest.raises(ValueError, match="one shape and dtype"):
        overlay_pairs(a, b.astype(np.float64))
    idx = pair_indices(np.random.default_rng(0), 100, 10, 7, same_pool=False)
    assert np.bincount(idx[:, 0]).tolist() == [10] * 10 and idx[:, 1].max() < 7
    idx = pair_indices(np.random.default_rng(0), 1000, 3, 3, same_pool=True)
    assert np.all(idx[:, 0] != idx[:, 1]) and set(idx[:, 1].tolist()) == {0, 1, 2}
    assert pair_indices(np.random.default_rng(0), 0, 3, 3, True).shape == (0, 2)


# ------------------------------------------------------------------ Multi-Digits


def test_multi_digits_shapes_defaults_and_labels():
    digits = load_digits()
    tr, te = multi_digits("train"), multi_digits("test")
    assert tr.images.shape == (10_000, 36, 36, 1) and te.images.shape == (2_000, 36, 36, 1)
    assert tr.images.dtype == np.float32 and tr.labels.dtype == np.int32 and tr.labels.shape == (10_000, 2)
    assert 0.0 <= tr.images.min() and tr.images.max() <= 1.0 and tr.images.max() > 0.9
    np.testing.assert_array_equal(tr.labels, digits.target[tr.indices])
    np.testing.assert_array_equal(te.labels, digits.target[te.indices])
    assert np.all(tr.indices[:, 0] != tr.indices[:, 1])
    # every class appears in both positions
    assert set(tr.labels[:, 0].tolist()) == set(range(10)) == set(tr.labels[:, 1].tolist())


def test_multi_digits_pools_disjoint_and_complete():
    pools = digits_pools(seed=0, test_fraction=0.2)
    tr_ids, te_ids = pools["train"][2], pools["test"][2]
    assert len(te_ids) == 359 and len(tr_ids) == 1438
    assert not set(tr_ids.tolist()) & set(te_ids.tolist())
    assert sorted(tr_ids.tolist() + te_ids.tolist()) == list(range(1797))
    tr, te = multi_digits("train", 3000, seed=0), multi_digits("test", 800, seed=0)
    assert not set(tr.indices.ravel().tolist()) & set(te.indices.ravel().tolist())
    assert set(te.indices.ravel().tolist()) <= set(te_ids.tolist())
    # another seed gives another split, still disjoint
    other = digits_pools(seed=1)
    assert not np.array_equal(other["test"][2], te_ids)
    assert not set(other["train"][2].tolist()) & set(other["test"][2].tolist())


def test_multi_digits_images_are_the_upscaled_digits():
    images, labels, ids = digits_pools(seed=0)["test"]
    assert images.shape == (359, 28, 28) and images.dtype == np.float32
    # MNIST-like framing: a 20 x 20 digit with a 4-pixel margin
    assert np.all(images[:, :4] == 0) and np.all(images[:, 24:] == 0) and np.all(images[:, :, :4] == 0)
    raw = load_digits().images[ids] / 16.0
    # averaging the 20 x 20 digit back over an 8 x 8 grid stays close to the original
    np.testing.assert_allclose(images[:, 4:24, 4:24].mean(axis=(1, 2)), raw.mean(axis=(1, 2)), atol=0.03)
    ds = multi_digits("test", 50, seed=0)
    pos = {int(i): k for k, i in enumerate(ids)}
    first = images[[pos[i] for i in ds.indices[:, 0]]]
    second = images[[pos[i] for i in ds.indices[:, 1]]]
    np.testing.assert_array_equal(ds.images[..., 0], overlay_pairs(first, second))
    full = digits_pools(seed=0, digit_size=28)["test"][0]
    assert full[:, 0].max() > 0  # digit_size=28 fills the frame


def test_multi_digits_deterministic():
    a, b = multi_digits("train", 100, seed=4), multi_digits("train", 100, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, multi_digits("train", 100, seed=5).indices)
    with pytest.raises(ValueError, match="test_fraction"):
        multi_digits("train", 10, test_fraction=1.0)
    with pytest.raises(ValueError, match="split must be"):
        multi_digits("valid")


def test_resize_bilinear():
    const = np.full((2, 8, 8), 0.3)
    np.testing.assert_allclose(resize_bilinear(const, 20), 0.3)
    x = np.random.default_rng(0).random((1, 8, 8))
    np.testing.assert_allclose(resize_bilinear(x, 8), x)  # identity at the same size
    up = resize_bilinear(x, 28)
    assert up.shape == (1, 28, 28) and up.min() >= x.min() - 1e-12 and up.max() <= x.max() + 1e-12


def test_import_needs_only_numpy():
    # the data package imports scipy / sklearn / PIL lazily, inside the loaders
    import subprocess
    import sys

    code = (
        "import sys; import mtsgd_jax.data; "
        "print(any(m in sys.modules for m in ('sklearn', 'PIL', 'scipy.io')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True)
    assert out.stdout.strip() == "False"
