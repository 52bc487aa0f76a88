"""SARCOS loader on .mat files written with scipy.io.savemat."""

import numpy as np
import pytest
import scipy.io

from mtsgd_jax.data import SARCOS_SPLIT, DataFormatError, load_sarcos, read_mat_matrix

SMALL = dict(num_train=30, num_valid=5, num_test=6)


def _write(d, n_train_file=35, n_test=6, cols=28, train_var="sarcos_inv", test_var="sarcos_inv_test", seed=0):
    rng = np.random.default_rng(seed)
    # columns with different offsets and scales, so standardisation is visible
    scale = np.arange(1, cols + 1)
    tr = rng.normal(size=(n_train_file, cols)) * scale + 10 * scale
    te = rng.normal(size=(n_test, cols)) * scale + 10 * scale
    scipy.io.savemat(d / "sarcos_inv.mat", {train_var: tr})
    scipy.io.savemat(d / "sarcos_inv_test.mat", {test_var: te})
    return tr, te


def test_split_shapes_and_rows(tmp_path):
    tr, te = _write(tmp_path)
    s = load_sarcos(tmp_path, standardize=False, dtype=np.float64, **SMALL)
    assert s.x_train.shape == (30, 21) and s.y_train.shape == (30, 7)
    assert s.x_valid.shape == (5, 21) and s.y_valid.shape == (5, 7)
    assert s.x_test.shape == (6, 21) and s.y_test.shape == (6, 7)
    # validation = the LAST num_valid rows of the training file; inputs = columns 0..20
    assert s.valid_rows.tolist() == [30, 31, 32, 33, 34]
    np.testing.assert_array_equal(s.x_train, tr[:30, :21])
    np.testing.assert_array_equal(s.y_train, tr[:30, 21:])
    np.testing.assert_array_equal(s.x_valid, tr[30:, :21])
    np.testing.assert_array_equal(s.y_valid, tr[30:, 21:])
    np.testing.assert_array_equal(s.x_test, te[:, :21])
    np.testing.assert_array_equal(s.y_test, te[:, 21:])


def test_standardisation_uses_training_statistics(tmp_path):
    tr, te = _write(tmp_path)
    s = load_sarcos(tmp_path, **SMALL)
    assert s.x_train.dtype == np.float32 and s.y_test.dtype == np.float32
    np.testing.assert_allclose(s.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.x_train.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(s.y_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.stats.x_mean, tr[:30, :21].mean(0))
    np.testing.assert_allclose(s.stats.y_scale, tr[:30, 21:].std(0))
    # validation and test use the same (training) statistics
    np.testing.assert_allclose(s.x_valid * s.stats.x_scale + s.stats.x_mean, tr[30:, :21], rtol=1e-5)
    np.testing.assert_allclose(s.stats.unstandardize_targets(s.y_test), te[:, 21:], rtol=1e-5)


def test_random_validation_rows(tmp_path):
    tr, _ = _write(tmp_path)
    a = load_sarcos(tmp_path, valid_seed=3, standardize=False, dtype=np.float64, **SMALL)
    b = load_sarcos(tmp_path, valid_seed=3, standardize=False, dtype=np.float64, **SMALL)
    np.testing.assert_array_equal(a.valid_rows, b.valid_rows)
    assert a.valid_rows.tolist() != [30, 31, 32, 33, 34] and np.all(np.diff(a.valid_rows) > 0)
    np.testing.assert_array_equal(a.x_valid, tr[a.valid_rows, :21])
    rest = np.setdiff1d(np.arange(35), a.valid_rows)
    np.testing.assert_array_equal(a.x_train, tr[rest, :21])


def test_constant_column_keeps_unit_scale(tmp_path):
    tr = np.random.default_rng(0).normal(size=(35, 28))
    tr[:, 3] = 7.0
    scipy.io.savemat(tmp_path / "sarcos_inv.mat", {"sarcos_inv": tr})
    scipy.io.savemat(tmp_path / "sarcos_inv_test.mat", {"sarcos_inv_test": tr[:6]})
    s = load_sarcos(tmp_path, **SMALL)
    assert s.stats.x_scale[3] == 1.0 and np.all(np.isfinite(s.x_train)) and np.all(s.x_train[:, 3] == 0)


def test_default_split_is_the_seeds(tmp_path):
    assert SARCOS_SPLIT == {"train": 40_036, "valid": 4_448, "test": 4_449}
    _write(tmp_path, n_train_file=44_484, n_test=4_449)
    s = load_sarcos(tmp_path)
    assert len(s.x_train) == 40_036 and len(s.x_valid) == 4_448 and len(s.x_test) == 4_449
    assert s.valid_rows[0] == 40_036 and s.valid_rows[-1] == 44_483


def test_inferred_sizes(tmp_path):
    _write(tmp_path, n_train_file=20, n_test=4)
    s = load_sarcos(tmp_path, num_train=None, num_valid=3, num_test=None)
    assert (len(s.x_train), len(s.x_valid), len(s.x_test)) == (17, 3, 4)


# ------------------------------------------------------------------ errors


def test_wrong_row_counts_for_the_default_split(tmp_path):
    _write(tmp_path)
    with pytest.raises(DataFormatError, match=r"sarcos_inv\.mat: has 35 rows, expected .* 44484 .*44,484"):
        load_sarcos(tmp_path)
    with pytest.raises(DataFormatError, match=r"sarcos_inv_test\.mat: has 6 rows, expected num_test = 4449"):
        load_sarcos(tmp_path, num_train=30, num_valid=5)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sarcos_inv\.mat(.|\n)*'sarcos_inv' of shape \(rows, 28\)"):
        load_sarcos(tmp_path, **SMALL)
    _write(tmp_path)
    (tmp_path / "sarcos_inv_test.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"sarcos_inv_test\.mat"):
        load_sarcos(tmp_path, **SMALL)


def test_missing_variable(tmp_path):
    _write(tmp_path, test_var="X")
    with pytest.raises(DataFormatError, match=r"sarcos_inv_test\.mat: no variable 'sarcos_inv_test'.*\['X'\]"):
        load_sarcos(tmp_path, **SMALL)


def test_wrong_column_count(tmp_path):
    _write(tmp_path, cols=27)
    with pytest.raises(DataFormatError, match=r"sarcos_inv\.mat: variable 'sarcos_inv' has 27 columns, expected 28"):
        load_sarcos(tmp_path, **SMALL)


def test_not_a_mat_file_and_non_finite(tmp_path):
    _write(tmp_path)
    (tmp_path / "sarcos_inv.mat").write_text("this is not MATLAB\n")
    with pytest.raises(DataFormatError, match=r"sarcos_inv\.mat: not a readable MATLAB \.mat file"):
        load_sarcos(tmp_path, **SMALL)
    bad = np.ones((35, 28))
    bad[4, 2] = np.nan
    scipy.io.savemat(tmp_path / "sarcos_inv.mat", {"sarcos_inv": bad})
    with pytest.raises(DataFormatError, match="non-finite value at row 4, column 2"):
        load_sarcos(tmp_path, **SMALL)


def test_complex_matrix_is_rejected_not_truncated(tmp_path):
    tr, _ = _write(tmp_path)
    bad = tr.astype(np.complex128)
    bad[7, 21] += 0.5j
    scipy.io.savemat(tmp_path / "sarcos_inv.mat", {"sarcos_inv": bad})
    with pytest.raises(
        DataFormatError,
        match=r"sarcos_inv\.mat: variable 'sarcos_inv' is complex \(complex128\) with a nonzero imaginary part, "
        r"first at row 7, column 21 .*expected a real matrix",
    ):
        load_sarcos(tmp_path, **SMALL)
    # a complex matrix whose imaginary parts are all zero holds real data: read as the real part, exactly
    scipy.io.savemat(tmp_path / "sarcos_inv.mat", {"sarcos_inv": tr.astype(np.complex128)})
    a = read_mat_matrix(tmp_path / "sarcos_inv.mat", "sarcos_inv", num_columns=28)
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, tr)


def test_sparse_matrix_reads_dense(tmp_path):
    import scipy.sparse

    tr, _ = _write(tmp_path)
    tr[:, 3] = 0.0
    scipy.io.savemat(tmp_path / "sarcos_inv.mat", {"sarcos_inv": scipy.sparse.csc_matrix(tr)})
    np.testing.assert_array_equal(read_mat_matrix(tmp_path / "sarcos_inv.mat", "sarcos_inv", num_columns=28), tr)


def test_shapes_and_kinds_that_are_not_a_matrix(tmp_path):
    tr, _ = _write(tmp_path)
    p = tmp_path / "sarcos_inv.mat"
    scipy.io.savemat(p, {"sarcos_inv": tr.T})  # one column per sample
    with pytest.raises(DataFormatError, match=r"has 35 columns, expected 28 \(shape \(28, 35\)\) \(it looks transposed"):
        load_sarcos(tmp_path, **SMALL)
    scipy.io.savemat(p, {"sarcos_inv": np.zeros((0, 28))})
    with pytest.raises(DataFormatError, match=r"sarcos_inv\.mat: variable 'sarcos_inv' has no rows \(shape \(0, 28\)\)"):
        load_sarcos(tmp_path, **SMALL)
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0], cell[0, 1] = tr[:, :21], tr[:, 21:]
    scipy.io.savemat(p, {"sarcos_inv": cell})
    with pytest.raises(DataFormatError, match=r"should be a 2-D real numeric matrix, got a cell array of shape \(1, 2\)"):
        load_sarcos(tmp_path, **SMALL)
    scipy.io.savemat(p, {"sarcos_inv": {"x": tr[:, :21], "y": tr[:, 21:]}})
    with pytest.raises(DataFormatError, match=r"should be a 2-D real numeric matrix, got a struct array"):
        load_sarcos(tmp_path, **SMALL)
    scipy.io.savemat(p, {"sarcos_inv": "torques"})
    with pytest.raises(DataFormatError, match=r"should be a 2-D real numeric matrix, got a char array"):
        load_sarcos(tmp_path, **SMALL)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_target_is_named(tmp_path, value):
    _, te = _write(tmp_path)
    te[5, 27] = value
    scipy.io.savemat(tmp_path / "sarcos_inv_test.mat", {"sarcos_inv_test": te})
    with pytest.raises(DataFormatError, match=r"sarcos_inv_test\.mat: variable 'sarcos_inv_test' has a non-finite value at row 5, column 27"):
        load_sarcos(tmp_path, **SMALL)
