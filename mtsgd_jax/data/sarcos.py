"""SARCOS inverse dynamics: 21 inputs, 7 joint torques (7 regression tasks).

The standard files are ``sarcos_inv.mat`` (MATLAB variable ``sarcos_inv``,
44,484 x 28) and ``sarcos_inv_test.mat`` (variable ``sarcos_inv_test``,
4,449 x 28). Columns 0..20 are the inputs (7 joint positions, 7 velocities,
7 accelerations), columns 21..27 the 7 torques.

The paper's split (docs/algorithm.md §7) is 40,036 train / 4,448 validation /
4,449 test. The validation rows come from the training file: by default its
LAST 4,448 rows (rows 40,036..44,483, 0-based), the training set being rows
0..40,035; pass ``valid_seed`` to draw them uniformly at random instead. The test
set is the whole test file. Inputs and targets are standardised with the mean
and standard deviation of the training part only (a constant column keeps
standard deviation 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mtsgd_jax.data._common import DataFormatError, find_first, missing_file_error

__all__ = [
    "SARCOS_SPLIT",
    "SARCOS_NUM_INPUTS",
    "SARCOS_NUM_TASKS",
    "SarcosStats",
    "Sarcos",
    "load_sarcos",
    "read_mat_matrix",
]

SARCOS_NUM_INPUTS = 21
SARCOS_NUM_TASKS = 7
SARCOS_SPLIT = {"train": 40_036, "valid": 4_448, "test": 4_449}
_TRAIN_FILE, _TEST_FILE = ("sarcos_inv.mat", "sarcos_inv"), ("sarcos_inv_test.mat", "sarcos_inv_test")


class SarcosStats(NamedTuple):
    """Training statistics used for the standardisation: ``x_std = (x - x_mean) / x_scale``.

    Attributes:
      x_mean, x_scale: (21,) float64 input mean and standard deviation (1 where constant).
      y_mean, y_scale: (7,) float64 target mean and standard deviation (1 where constant).
    """

    x_mean: np.ndarray
    x_scale: np.ndarray
    y_mean: np.ndarray
    y_scale: np.ndarray

    def unstandardize_targets(self, y):
        """Map standardised targets (..., 7) back to torques: ``y * y_scale + y_mean``."""
        return np.asarray(y) * self.y_scale + self.y_mean


class Sarcos(NamedTuple):
    """SARCOS split into train / validation / test.

    Attributes:
      x_train, x_valid, x_test: (n, 21) inputs (standardised unless ``standardize=False``).
      y_train, y_valid, y_test: (n, 7) torques (likewise).
      stats: :class:`SarcosStats` of the training part.
      valid_rows: (n_valid,) int64 rows of ``sarcos_inv`` that form the validation set.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    stats: SarcosStats
    valid_rows: np.ndarray


def read_mat_matrix(path: str | os.PathLike, variable: str, num_columns: int | None = None) -> np.ndarray:
    """One 2-D numeric variable of a MATLAB (v4 to v7.2) ``.mat`` file, as float64.

    Args:
      path: the ``.mat`` file.
      variable: the MATLAB variable to read.
      num_columns: if given, the number of columns the matrix must have.

    Returns:
      (rows, columns) float64, at least one row; a sparse variable is returned dense.

    Raises FileNotFoundError for a missing file and DataFormatError (naming the file) for
    an unreadable file, a missing variable (listing those present), a non-2-D or non-numeric
    variable (cell and struct arrays included), a complex matrix with a nonzero imaginary
    part, a matrix with no rows, a wrong column count (saying so when the matrix looks
    transposed) or non-finite values (naming the first one's row and column).

    >>> import tempfile, os, numpy as np, scipy.io
    >>> with tempfile.TemporaryDirectory() as d:
    ...     scipy.io.savemat(os.path.join(d, "m.mat"), {"a": np.ones((3, 2))})
    ...     read_mat_matrix(os.path.join(d, "m.mat"), "a", num_columns=2).shape
    (3, 2)
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a MATLAB .mat file with variable {variable!r}).")
    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5)
        raise DataFormatError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported by scipy.io.loadmat ({e}); "
            "re-save it with save(..., '-v7') or use the standard SARCOS files."
        ) from None
    except Exception as e:  # scipy raises ValueError / MatReadError / TypeError for non-MAT content
        raise DataFormatError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e}).") from None
    present = sorted(k for k in contents if not k.startswith("__"))
    if variable not in contents:
        raise DataFormatError(f"{path}: no variable {variable!r} in the .mat file (variables present: {present}).")
    value = contents[variable]
    if hasattr(value, "toarray"):  # a MATLAB sparse matrix loads as scipy.sparse
        value = value.toarray()
    a = np.asarray(value)
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        kind = {"O": "a cell array", "V": "a struct array", "U": "a char array"}.get(a.dtype.kind, str(a.dtype))
        raise DataFormatError(
            f"{path}: variable {variable!r} should be a 2-D real numeric matrix, got {kind} of shape {a.shape}."
        )
    if np.iscomplexobj(a):
        nonreal = np.argwhere(a.imag != 0)
        if len(nonreal):
            r, c = nonreal[0]
            raise DataFormatError(
                f"{path}: variable {variable!r} is complex ({a.dtype}) with a nonzero imaginary part, first at "
                f"row {r}, column {c} ({a[r, c]}); expected a real matrix."
            )
        a = a.real
    if a.shape[0] == 0:
        raise DataFormatError(f"{path}: variable {variable!r} has no rows (shape {a.shape}); expected at least one.")
    if num_columns is not None and a.shape[1] != num_columns:
        hint = " (it looks transposed: save the matrix with one row per sample)" if a.shape[0] == num_columns else ""
        raise DataFormatError(
            f"{path}: variable {variable!r} has {a.shape[1]} columns, expected {num_columns} (shape {a.shape}){hint}."
        )
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise DataFormatError(f"{path}: variable {variable!r} has a non-finite value at row {bad[0]}, column {bad[1]}.")
    return a


def _scale(a: np.ndarray) -> np.ndarray:
    s = a.std(axis=0)
    return np.where(s > 0, s, 1.0)


def load_sarcos(
    data_dir: str | os.PathLike,
    *,
    num_train: int | None = SARCOS_SPLIT["train"],
    num_valid: int = SARCOS_SPLIT["valid"],
    num_test: int | None = SARCOS_SPLIT["test"],
    valid_seed: int | None = None,
    standardize: bool = True,
    dtype=np.float32,
) -> Sarcos:
    """Load SARCOS with the paper's 40,036 / 4,448 / 4,449 split (see the module docstring).

    Args:
      data_dir: folder holding ``sarcos_inv.mat`` and ``sarcos_inv_test.mat``.
      num_train: training rows; the training file must hold exactly ``num_train + num_valid``
        rows (None: whatever is left after the validation rows).
      num_valid: validation rows, taken from the training file.
      num_test: rows the test file must hold (None: any number).
      valid_seed: None: the validation set is the last ``num_valid`` rows of the training
        file; an int: ``num_valid`` rows drawn without replacement by
        ``numpy.random.default_rng(valid_seed)`` (both parts keep the file's row order).
      standardize: standardise inputs and targets with the training statistics.
      dtype: dtype of the returned arrays (the statistics stay float64).

    Returns:
      :class:`Sarcos` with x (n, 21), y (n, 7) for train / valid / test, the statistics
      and the validation row indices.

    >>> import tempfile, os, numpy as np, scipy.io
    >>> rng = np.random.default_rng(0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     scipy.io.savemat(os.path.join(d, "sarcos_inv.mat"), {"sarcos_inv": rng.normal(size=(12, 28))})
    ...     scipy.io.savemat(os.path.join(d, "sarcos_inv_test.mat"), {"sarcos_inv_test": rng.normal(size=(3, 28))})
    ...     s = load_sarcos(d, num_train=10, num_valid=2, num_test=3)
    >>> s.x_train.shape, s.y_train.shape, s.x_valid.shape, s.y_test.shape, s.valid_rows.tolist()
    ((10, 21), (10, 7), (2, 21), (3, 7), [10, 11])
    """
    d = Path(data_dir)
    ncol = SARCOS_NUM_INPUTS + SARCOS_NUM_TASKS
    arrays = []
    for fname, var in (_TRAIN_FILE, _TEST_FILE):
        candidates = [d / fname, d / fname[: -len(".mat")]]
        path = find_first(candidates)
        if path is None:
            raise missing_file_error(
                f"SARCOS file {fname}", candidates, f"a MATLAB .mat file with a variable {var!r} of shape (rows, {ncol})"
            )
        arrays.append((path, read_mat_matrix(path, var, num_columns=ncol)))
    (train_path, train), (test_path, test) = arrays

    if num_valid < 0 or (num_train is not None and num_train < 1):
        raise ValueError(f"num_train must be >= 1 and num_valid >= 0, got {num_train} and {num_valid}.")
    n_train = len(train) - num_valid if num_train is None else num_train
    if n_train < 1 or len(train) != n_train + num_valid:
        raise DataFormatError(
            f"{train_path}: has {len(train)} rows, expected num_train + num_valid = "
            f"{n_train} + {num_valid} = {n_train + num_valid}"
            + (" (the standard sarcos_inv.mat has 44,484)" if num_train == SARCOS_SPLIT["train"] else "")
            + "; pass num_train / num_valid to use another split."
        )
    if num_test is not None and len(test) != num_test:
        raise DataFormatError(
            f"{test_path}: has {len(test)} rows, expected num_test = {num_test}"
            + (" (the standard sarcos_inv_test.mat)" if num_test == SARCOS_SPLIT["test"] else "")
            + "; pass num_test to use another size."
        )

    if valid_seed is None:
        valid_rows = np.arange(n_train, n_train + num_valid, dtype=np.int64)
    else:
        valid_rows = np.sort(np.random.default_rng(valid_seed).choice(len(train), num_valid, replace=False)).astype(np.int64)
    is_valid = np.zeros(len(train), bool)
    is_valid[valid_rows] = True
    tr, va = train[~is_valid], train[is_valid]

    def xy(a):
        return a[:, :SARCOS_NUM_INPUTS], a[:, SARCOS_NUM_INPUTS:]

    (xtr, ytr), (xva, yva), (xte, yte) = xy(tr), xy(va), xy(test)
    stats = SarcosStats(xtr.mean(0), _scale(xtr), ytr.mean(0), _scale(ytr))
    if standardize:
        fx = lambda x: (x - stats.x_mean) / stats.x_scale  # noqa: E731
        fy = lambda y: (y - stats.y_mean) / stats.y_scale  # noqa: E731
        xtr, xva, xte, ytr, yva, yte = fx(xtr), fx(xva), fx(xte), fy(ytr), fy(yva), fy(yte)
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return Sarcos(cast(xtr), cast(ytr), cast(xva), cast(yva), cast(xte), cast(yte), stats, valid_rows)
