"""Accuracy, Brier score, calibration error and per-task MSE (docs/algorithm.md §8).

Conventions:

* ``probs`` are predicted class probabilities of shape (N, C) (rows on the
  simplex; this is not checked, it cannot be under ``jit``); ``labels`` are
  integer class indices of shape (N,). Labels outside [0, C) cannot be detected
  under ``jit``: they count as wrong predictions and their one-hot row is zero.
* The prediction of an ensemble (a particle set of M networks) is the mean of
  the particles' predicted probabilities, :func:`ensemble_probs`: (M, N, C) ->
  (N, C). Average probabilities, not logits.
* Shapes and dtypes are checked eagerly (at trace time under ``jit``) with a
  ``ValueError`` / ``TypeError`` naming the argument. ``num_bins`` is a Python
  int: mark it static when jitting (``jax.jit(f, static_argnames="num_bins")``).

Every function is vectorised ``jax.numpy`` and returns JAX arrays; scalars are
0-d arrays in the dtype of ``probs``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "ReliabilityDiagram",
    "accuracy",
    "brier_score",
    "ensemble_accuracy",
    "ensemble_probs",
    "expected_calibration_error",
    "per_task_mse",
    "plot_reliability_diagram",
    "reliability_diagram",
]


# ---------------------------------------------------------------------------
# validation


def _check_probs_labels(probs, labels, fn: str) -> tuple[Array, Array]:
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    if probs.ndim != 2:
        hint = " (for an ensemble (M, N, C), average first with ensemble_probs)" if probs.ndim == 3 else ""
        raise ValueError(f"{fn}: probs must have shape (N, C), got shape {probs.shape}{hint}.")
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise TypeError(f"{fn}: probs must be floating point, got dtype {probs.dtype}.")
    if labels.ndim != 1:
        hint = " (one column per task? evaluate each task separately)" if labels.ndim == 2 else ""
        raise ValueError(f"{fn}: labels must have shape (N,), got shape {labels.shape}{hint}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}.")
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{fn}: probs (N, C) = {probs.shape} and labels (N,) = {labels.shape} disagree on N."
        )
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{fn}: probs must have N >= 1 examples and C >= 1 classes, got shape {probs.shape}.")
    return probs, labels


def _check_num_bins(num_bins, fn: str) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"{fn}: num_bins must be a Python int >= 1, got {num_bins!r}.")
    return int(num_bins)


# ---------------------------------------------------------------------------
# accuracy and ensembles


def accuracy(probs, labels) -> Array:
    """Fraction of examples whose most probable class is the label.

    Args:
      probs: (N, C) class probabilities. Logits give the same result (argmax is
        unchanged by softmax). Ties go to the lowest class index.
      labels: (N,) integer labels.

    Returns:
      Scalar in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> float(accuracy(jnp.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]]), jnp.array([0, 1, 1])))
      0.666...
    """
    probs, labels = _check_probs_labels(probs, labels, "accuracy")
    return jnp.mean(jnp.argmax(probs, axis=-1) == labels, dtype=probs.dtype)


def ensemble_probs(per_particle_probs) -> Array:
    """Ensemble prediction: mean over the M particles of their probabilities.

    Args:
      per_particle_probs: (M, N, C), e.g. ``jax.nn.softmax(logits, -1)`` of
        :func:`mtsgd_jax.models.apply_ensemble` outputs for one task.

    Returns:
      (N, C) probabilities.

    Example:
      >>> import jax.numpy as jnp
      >>> ensemble_probs(jnp.array([[[1.0, 0.0]], [[0.5, 0.5]]])).tolist()
      [[0.75, 0.25]]
    """
    p = jnp.asarray(per_particle_probs)
    if p.ndim != 3:
        raise ValueError(f"ensemble_probs: per_particle_probs must have shape (M, N, C), got shape {p.shape}.")
    if p.shape[0] == 0:
        raise ValueError("ensemble_probs: per_particle_probs has M = 0 particles.")
    if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"ensemble_probs: per_particle_probs must be floating point, got dtype {p.dtype}.")
    return jnp.mean(p, axis=0)


def ensemble_accuracy(per_particle_probs, labels) -> Array:
    """:func:`accuracy` of the ensemble prediction :func:`ensemble_probs`.

    Args:
      per_particle_probs: (M, N, C) probabilities of each particle.
      labels: (N,) integer labels.

    Example:
      >>> import jax.numpy as jnp
      >>> pp = jnp.array([[[0.9, 0.1], [0.6, 0.4]], [[0.8, 0.2], [0.1, 0.9]]])
      >>> float(ensemble_accuracy(pp, jnp.array([0, 1])))  # means (0.85, 0.15), (0.35, 0.65)
      1.0
    """
    return accuracy(ensemble_probs(per_particle_probs), labels)


# ---------------------------------------------------------------------------
# proper scoring and calibration


def brier_score(probs, labels) -> Array:
    """Multi-class Brier score (1/N) sum_n sum_c (1[y_n = c] - p_nc)^2.

    Ranges over [0, 2]; 0 for a confident correct prediction of every example.

    Args:
      probs: (N, C) probabilities.
      labels: (N,) integer labels.

    Example:
      >>> import jax.numpy as jnp
      >>> # (0.1^2 + 0.1^2 + (1 - 0.4)^2 + 0.6^2) / 2 = 0.37
      >>> float(brier_score(jnp.array([[0.9, 0.1], [0.6, 0.4]]), jnp.array([0, 1])))
      0.37...
    """
    probs, labels = _check_probs_labels(probs, labels, "brier_score")
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    return jnp.mean(jnp.sum((onehot - probs) ** 2, axis=-1))


class ReliabilityDiagram(NamedTuple):
    """Per-bin statistics of confidence (max probability) vs accuracy.

    Attributes:
      bin_edges: (B + 1,) edges 0, 1/B, ..., 1. Bin b is (edges[b], edges[b+1]],
        except that bin 0 also holds confidence exactly 0: [0, 1/B].
      counts: (B,) number of examples per bin (floating point).
      accuracy: (B,) fraction correct in each bin; 0 for empty bins.
      confidence: (B,) mean confidence in each bin; 0 for empty bins.
    """

    bin_edges: Array
    counts: Array
    accuracy: Array
    confidence: Array


def _bin_sums(probs, labels, num_bins):
    """Edges, bin index, and per-bin counts / correct sums / confidence sums."""
    conf = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(probs.dtype)
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=probs.dtype)
    # searchsorted(side="left") - 1 puts conf in (edges[b], edges[b+1]]; conf <= 0
    # goes to bin 0 and conf > 1 (rounding) to the last bin.
    idx = jnp.clip(jnp.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    counts = jnp.zeros(num_bins, probs.dtype).at[idx].add(1.0)
    correct_sum = jnp.zeros(num_bins, probs.dtype).at[idx].add(correct)
    conf_sum = jnp.zeros(num_bins, probs.dtype).at[idx].add(conf)
    return edges, counts, correct_sum, conf_sum


def reliability_diagram(probs, labels, num_bins: int = 10) -> ReliabilityDiagram:
    """Counts, accuracy and mean confidence in ``num_bins`` equal-width confidence bins.

    The confidence of an example is its largest class probability; the
    prediction is its argmax. Bin b covers (b/B, (b+1)/B]; bin 0 also takes
    confidence 0. See :class:`ReliabilityDiagram`.

    Args:
      probs: (N, C) probabilities.
      labels: (N,) integer labels.
      num_bins: B >= 1 (static under ``jit``).

    Example:
      >>> import jax.numpy as jnp
      >>> probs = jnp.array([[0.95, 0.05], [0.15, 0.85], [0.6, 0.4]])
      >>> d = reliability_diagram(probs, jnp.array([0, 0, 0]), num_bins=2)
      >>> d.counts.tolist(), d.accuracy.tolist()  # bin (0.5, 1] holds all three
      ([0.0, 3.0], [0.0, 0.666...])
    """
    probs, labels = _check_probs_labels(probs, labels, "reliability_diagram")
    num_bins = _check_num_bins(num_bins, "reliability_diagram")
    edges, counts, correct_sum, conf_sum = _bin_sums(probs, labels, num_bins)
    safe = jnp.maximum(counts, 1.0)
    return ReliabilityDiagram(edges, counts, correct_sum / safe, conf_sum / safe)


def expected_calibration_error(probs, labels, num_bins: int = 10) -> Array:
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over equal-width confidence bins.

    Bins as in :func:`reliability_diagram`: (b/B, (b+1)/B], bin 0 closed at 0.
    Empty bins contribute nothing. ECE is in [0, 1].

    Args:
      probs: (N, C) probabilities.
      labels: (N,) integer labels.
      num_bins: B >= 1 (10 in the experiments; static under ``jit``).

    Example:
      >>> import jax.numpy as jnp
      >>> # bin (0.8, 0.9]: 2 examples, conf 0.85, acc 1/2 -> 2/3 * 0.35
      >>> # bin (0.6, 0.7]: 1 example, conf 0.65, acc 1 -> 1/3 * 0.35
      >>> probs = jnp.array([[0.85, 0.15], [0.15, 0.85], [0.35, 0.65]])
      >>> round(float(expected_calibration_error(probs, jnp.array([0, 0, 1]))), 6)
      0.35
    """
    probs, labels = _check_probs_labels(probs, labels, "expected_calibration_error")
    num_bins = _check_num_bins(num_bins, "expected_calibration_error")
    _, _, correct_sum, conf_sum = _bin_sums(probs, labels, num_bins)
    # |B_b|/N * |acc_b - conf_b| = |sum_{n in b} (correct_n - conf_n)| / N
    return jnp.sum(jnp.abs(correct_sum - conf_sum)) / probs.shape[0]


def plot_reliability_diagram(probs, labels, num_bins: int = 10, *, path=None, ax=None, title: str | None = None):
    """Draw a reliability diagram (accuracy per confidence bin vs the diagonal).

    Bars show each bin's accuracy, a hatched overlay the gap to its mean
    confidence, the dashed diagonal perfect calibration; the ECE is in the legend.
    matplotlib is imported here only, so the metrics need no matplotlib; without
    ``ax`` a new figure is created with the Agg canvas (no display needed).

    Args:
      probs: (N, C) probabilities.
      labels: (N,) integer labels.
      num_bins: B >= 1.
      path: if given, save the figure there (format from the suffix, e.g. ``.png``).
      ax: a matplotlib ``Axes`` to draw on; default a new 4 x 4 inch figure.
      title: axes title.

    Returns:
      The matplotlib ``Axes`` drawn on.
    """
    diag = jax.device_get(reliability_diagram(probs, labels, num_bins))
    ece = float(expected_calibration_error(probs, labels, num_bins))
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
    edges = np.asarray(diag.bin_edges, dtype=float)
    width = np.diff(edges)
    acc = np.asarray(diag.accuracy, dtype=float)
    conf = np.asarray(diag.confidence, dtype=float)
    nonempty = np.asarray(diag.counts) > 0
    ax.bar(edges[:-1][nonempty], acc[nonempty], width=width[nonempty], align="edge",
           color="tab:blue", edgecolor="black", linewidth=0.5, label=f"accuracy (ECE {ece:.3f})")
    gap_lo = np.minimum(acc, conf)[nonempty]
    gap_hi = np.maximum(acc, conf)[nonempty]
    ax.bar(edges[:-1][nonempty], gap_hi - gap_lo, bottom=gap_lo, width=width[nonempty], align="edge",
           color="tab:red", alpha=0.3, hatch="//", edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
    ax.plot([0.0, 1.0], [0.0, 1.0], "k--", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    if title is not None:
        ax.set_title(title)
    if path is not None:
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    return ax


# ---------------------------------------------------------------------------
# regression


def per_task_mse(predictions, targets) -> Array:
    """Mean squared error of each task (column): ((predictions - targets)^2).mean(0).

    Args:
      predictions: (N, T), e.g. :class:`mtsgd_jax.models.SarcosMLP` outputs (or
        the ensemble mean of them).
      targets: (N, T).

    Returns:
      (T,) per-task MSE.

    Example:
      >>> import jax.numpy as jnp
      >>> per_task_mse(jnp.array([[1.0, 0.0], [3.0, 2.0]]), jnp.array([[0.0, 0.0], [1.0, 0.0]])).tolist()
      [2.5, 2.0]
    """
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets)
    if predictions.ndim != 2:
        hint = " (an ensemble (M, N, T)? average over M first)" if predictions.ndim == 3 else ""
        raise ValueError(f"per_task_mse: predictions must have shape (N, T), got shape {predictions.shape}{hint}.")
    if targets.shape != predictions.shape:
        raise ValueError(
            f"per_task_mse: targets must have the shape of predictions (N, T) = {predictions.shape}, "
            f"got shape {targets.shape}."
        )
    if predictions.shape[0] == 0:
        raise ValueError("per_task_mse: N = 0 examples.")
    return jnp.mean((predictions - targets) ** 2, axis=0)
