"""Accuracy, ensembles, Brier score, ECE / reliability diagrams and per-task MSE."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtsgd_jax.metrics.calibration import (
    ReliabilityDiagram,
    accuracy,
    brier_score,
    ensemble_accuracy,
    ensemble_probs,
    expected_calibration_error,
    per_task_mse,
    plot_reliability_diagram,
    reliability_diagram,
)

# Five 3-class predictions, hand-binned with B = 10 bins (b/10, (b+1)/10]:
#   row  probs                 label  conf  pred  correct  bin
#   0    (0.95, 0.05, 0.00)    0      0.95  0     yes      9
#   1    (0.05, 0.95, 0.00)    0      0.95  1     no       9
#   2    (0.15, 0.85, 0.00)    1      0.85  1     yes      8
#   3    (0.45, 0.35, 0.20)    1      0.45  0     no       4
#   4    (0.35, 0.45, 0.20)    1      0.45  1     yes      4
# bin 9: n=2, acc 1/2, conf 0.95 -> 2/5 * 0.45 = 0.18
# bin 8: n=1, acc 1,   conf 0.85 -> 1/5 * 0.15 = 0.03
# bin 4: n=2, acc 1/2, conf 0.45 -> 2/5 * 0.05 = 0.02
# ECE = 0.23; accuracy = 3/5.
PROBS = np.array(
    [
        [0.95, 0.05, 0.00],
        [0.05, 0.95, 0.00],
        [0.15, 0.85, 0.00],
        [0.45, 0.35, 0.20],
        [0.35, 0.45, 0.20],
    ]
)
LABELS = np.array([0, 0, 1, 1, 1])


def random_probs(seed, n, c, dtype=np.float64):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, c))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return (probs / probs.sum(1, keepdims=True)).astype(dtype), rng.integers(0, c, n)


def naive_ece(probs, labels, num_bins):
    """Loop over bins (lo, hi], bin 0 closed at 0: the definition written out."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = (conf > lo) & (conf <= hi) if b > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return ece


# ---------------------------------------------------------------------------
# accuracy and ensembles


def test_accuracy_hand_example_and_logits():
    assert float(accuracy(PROBS, LABELS)) == pytest.approx(3 / 5)
    logits = jnp.log(jnp.asarray(PROBS) + 1e-3) + 7.0
    assert float(accuracy(logits, LABELS)) == pytest.approx(3 / 5)
    assert float(accuracy(np.eye(4), np.arange(4))) == 1.0


@pytest.mark.x64
def test_ensemble_probs_is_mean_of_particle_probabilities():
    p1 = np.array([[0.9, 0.1], [0.2, 0.8]])
    p2 = np.array([[0.4, 0.6], [0.4, 0.6]])
    ens = ensemble_probs(np.stack([p1, p2]))
    np.testing.assert_allclose(ens, [[0.65, 0.35], [0.3, 0.7]])
    labels = np.array([0, 1])
    # particle accuracies 1 and 1/2, but the averaged prediction gets both right
    assert float(accuracy(p1, labels)) == 1.0 and float(accuracy(p2, labels)) == 0.5
    assert float(ensemble_accuracy(np.stack([p1, p2]), labels)) == 1.0
    # M identical particles: the ensemble is that particle
    same = np.stack([PROBS] * 4)
    np.testing.assert_allclose(ensemble_probs(same), PROBS, rtol=1e-12)
    assert float(ensemble_accuracy(same, LABELS)) == pytest.approx(float(accuracy(PROBS, LABELS)))
    # averaging probabilities is not averaging logits
    logits = np.log(np.stack([p1, p2]))
    assert not np.allclose(ensemble_probs(np.stack([p1, p2])), jax.nn.softmax(logits.mean(0), -1))


# ---------------------------------------------------------------------------
# Brier score


def test_brier_score_hand_computed():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    labels = np.array([0, 2, 1])
    # (0.3^2 + 0.2^2 + 0.1^2) + (0.1^2 + 0.5^2 + 0.6^2) + (0.3^2 + 0.7^2 + 0.4^2) = 0.14 + 0.62 + 0.74
    assert float(brier_score(probs, labels)) == pytest.approx(1.5 / 3, abs=1e-12)
    assert float(brier_score(np.eye(3), np.arange(3))) == 0.0  # confident and right
    assert float(brier_score(np.eye(3), np.array([1, 2, 0]))) == pytest.approx(2.0)  # confident and wrong
    assert float(brier_score(np.full((2, 4), 0.25), np.array([0, 3]))) == pytest.approx(0.75**2 + 3 * 0.25**2)


@pytest.mark.x64
def test_brier_score_matches_formula_on_random_data():
    probs, labels = random_probs(0, 50, 5)
    onehot = np.eye(5)[labels]
    assert float(brier_score(probs, labels)) == pytest.approx(((onehot - probs) ** 2).sum(1).mean(), rel=1e-12)


# ---------------------------------------------------------------------------
# ECE and reliability diagram


@pytest.mark.x64
def test_ece_and_reliability_diagram_hand_computed():
    assert float(expected_calibration_error(PROBS, LABELS)) == pytest.approx(0.23, abs=1e-12)
    d = reliability_diagram(PROBS, LABELS, num_bins=10)
    assert isinstance(d, ReliabilityDiagram)
    np.testing.assert_allclose(d.bin_edges, np.linspace(0, 1, 11), atol=1e-15)
    np.testing.assert_array_equal(d.counts, [0, 0, 0, 0, 2, 0, 0, 0, 1, 2])
    np.testing.assert_allclose(d.accuracy, [0, 0, 0, 0, 0.5, 0, 0, 0, 1.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(d.confidence, [0, 0, 0, 0, 0.45, 0, 0, 0, 0.85, 0.95], atol=1e-12)
    # ECE is the count-weighted gap of the diagram
    ece = float((d.counts / d.counts.sum() * jnp.abs(d.accuracy - d.confidence)).sum())
    assert ece == pytest.approx(0.23, abs=1e-12)
    # one bin: |accuracy - mean confidence| = |0.6 - 0.73|
    assert float(expected_calibration_error(PROBS, LABELS, num_bins=1)) == pytest.approx(0.13, abs=1e-12)


@pytest.mark.x64
def test_bin_edges_are_right_closed_with_zero_in_the_first_bin():
    # B = 4: edges 0, 0.25, 0.5, 0.75, 1 are exact in binary floating point
    probs = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],  # conf 0     -> bin 0 (closed at 0)
            [0.25, 0.25, 0.25, 0.25],  # 0.25   -> bin 0 = [0, 0.25]
            [0.26, 0.25, 0.25, 0.24],  # 0.26   -> bin 1
            [0.5, 0.5, 0.0, 0.0],  # 0.5        -> bin 1 = (0.25, 0.5]
            [0.75, 0.25, 0.0, 0.0],  # 0.75     -> bin 2 = (0.5, 0.75]
            [0.76, 0.24, 0.0, 0.0],  # 0.76     -> bin 3
            [1.0, 0.0, 0.0, 0.0],  # 1.0        -> bin 3 = (0.75, 1]
        ]
    )
    labels = np.zeros(7, dtype=int)
    d = reliability_diagram(probs, labels, num_bins=4)
    np.testing.assert_array_equal(d.bin_edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(d.counts, [2, 2, 1, 2])
    np.testing.assert_allclose(d.confidence, [0.125, 0.38, 0.75, 0.88], atol=1e-12)
    # ties go to the lowest class, so every row predicts class 0 and is correct
    np.testing.assert_array_equal(d.accuracy, [1, 1, 1, 1])
    assert float(expected_calibration_error(probs, labels, num_bins=4)) == pytest.approx(
        naive_ece(probs, labels, 4), abs=1e-12
    )
    # rounding just above 1 stays in the last bin
    d = reliability_diagram(np.array([[1.0 + 1e-9, 0.0]]), np.array([0]), num_bins=4)
    np.testing.assert_array_equal(d.counts, [0, 0, 0, 1])


@pytest.mark.x64
def test_ece_is_zero_for_a_calibrated_construction():
    # bin (0.7, 0.8]: ten predictions of confidence 0.8, eight of them right;
    # bin (0.5, 0.6]: ten of confidence 0.6 on class 1, six right.
    probs = np.concatenate([np.tile([0.8, 0.2], (10, 1)), np.tile([0.4, 0.6], (10, 1))])
    labels = np.array([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    assert float(expected_calibration_error(probs, labels)) == pytest.approx(0.0, abs=1e-12)
    d = reliability_diagram(probs, labels)
    nonempty = np.asarray(d.counts) > 0
    np.testing.assert_allclose(d.accuracy[nonempty], d.confidence[nonempty], atol=1e-12)
    # a confident, always-right predictor is calibrated too; always wrong has ECE 1
    assert float(expected_calibration_error(np.eye(3), np.arange(3))) == 0.0
    assert float(expected_calibration_error(np.eye(3), np.array([1, 2, 0]))) == pytest.approx(1.0)


@pytest.mark.x64
@pytest.mark.parametrize("num_bins", [1, 3, 10, 15])
def test_ece_matches_loop_definition_on_random_data(num_bins):
    probs, labels = random_probs(num_bins, 200, 4)
    got = float(expected_calibration_error(probs, labels, num_bins=num_bins))
    assert got == pytest.approx(naive_ece(probs, labels, num_bins), abs=1e-12)
    d = reliability_diagram(probs, labels, num_bins=num_bins)
    assert float(d.counts.sum()) == 200


@pytest.mark.x64
def test_metrics_jit_and_keep_float32():
    probs, labels = random_probs(1, 64, 10, dtype=np.float32)
    ece = jax.jit(expected_calibration_error, static_argnames="num_bins")
    assert float(ece(probs, labels, num_bins=10)) == pytest.approx(
        float(expected_calibration_error(probs, labels)), abs=1e-6
    )
    for fn in (accuracy, brier_score, expected_calibration_error):
        out = jax.jit(fn)(jnp.asarray(probs), jnp.asarray(labels))
        assert out.shape == () and out.dtype == jnp.float32
    d = jax.jit(reliability_diagram, static_argnames="num_bins")(probs, labels, num_bins=5)
    assert d.counts.shape == (5,) and d.accuracy.dtype == jnp.float32
    pp = jnp.stack([jnp.asarray(probs)] * 3)
    assert jax.jit(ensemble_accuracy)(pp, labels).dtype == jnp.float32
    assert jax.jit(per_task_mse)(probs, probs).dtype == jnp.float32


@pytest.mark.x64
def test_reliability_diagram_png_is_written(tmp_path):
    probs, labels = random_probs(2, 300, 3)
    path = tmp_path / "reliability.png"
    ax = plot_reliability_diagram(probs, labels, num_bins=10, path=path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_title() == "test"
    assert any("ECE" in t.get_text() for t in ax.get_legend().get_texts())

    from matplotlib.figure import Figure

    fig = Figure()
    ax0 = fig.subplots()
    assert plot_reliability_diagram(probs, labels, ax=ax0) is ax0
    path2 = tmp_path / "on_axes.png"
    fig.savefig(path2)
    assert path2.stat().st_size > 0


def test_metrics_module_does_not_import_matplotlib():
    code = "import sys, mtsgd_jax.metrics.calibration; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# per-task MSE


def test_per_task_mse_hand_computed():
    pred = np.array([[1.0, 0.0, 2.0], [3.0, 2.0, 2.0]])
    target = np.array([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    # task 0: (1 + 4) / 2; task 1: (0 + 4) / 2; task 2: (0 + 4) / 2
    np.testing.assert_allclose(per_task_mse(pred, target), [2.5, 2.0, 2.0])
    assert per_task_mse(np.zeros((5, 7)), np.ones((5, 7))).shape == (7,)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "fn", [accuracy, brier_score, expected_calibration_error, reliability_diagram]
)
def test_bad_shapes_and_dtypes_fail_with_clear_errors(fn):
    with pytest.raises(ValueError, match=r"probs must have shape \(N, C\)"):
        fn(np.array([0.2, 0.8]), np.array([1]))
    with pytest.raises(ValueError, match="ensemble_probs"):
        fn(np.stack([PROBS] * 2), LABELS)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\)"):
        fn(PROBS, LABELS[:, None])
    with pytest.raises(ValueError, match="disagree on N"):
        fn(PROBS, LABELS[:3])
    with pytest.raises(TypeError, match="labels must be integer"):
        fn(PROBS, LABELS.astype(float))
    with pytest.raises(TypeError, match="probs must be floating"):
        fn(np.eye(5, dtype=int), LABELS)
    with pytest.raises(ValueError, match="N >= 1"):
        fn(np.zeros((0, 3)), np.zeros((0,), dtype=int))


def test_other_argument_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_bins"):
            expected_calibration_error(PROBS, LABELS, num_bins=bad)
    with pytest.raises(ValueError, match="num_bins"):
        reliability_diagram(PROBS, LABELS, num_bins=0)
    with pytest.raises(ValueError, match=r"\(M, N, C\)"):
        ensemble_probs(PROBS)
    with pytest.raises(ValueError, match=r"\(M, N, C\)"):
        ensemble_accuracy(PROBS, LABELS)
    with pytest.raises(ValueError, match="M = 0"):
        ensemble_probs(np.zeros((0, 2, 3)))
    with pytest.raises(ValueError, match=r"targets must have the shape of predictions"):
        per_task_mse(np.zeros((4, 7)), np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"predictions must have shape \(N, T\).*average over M"):
        per_task_mse(np.zeros((2, 4, 7)), np.zeros((2, 4, 7)))
    with pytest.raises(ValueError, match="N = 0"):
        per_task_mse(np.zeros((0, 7)), np.zeros((0, 7)))
