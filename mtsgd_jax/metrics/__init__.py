"""Evaluation metrics: Pareto-front quality (hypervolume, IGD, IGD+, front segments covered) and
classification calibration (accuracy, ensemble accuracy, Brier score, ECE, reliability diagrams)."""

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
from mtsgd_jax.metrics.pareto import (
    SEGMENT_COVERAGE_TOL,
    hypervolume_2d,
    igd,
    igd_plus,
    non_dominated_mask,
    segment_coverage,
    segments_covered,
)

__all__ = [
    "ReliabilityDiagram",
    "SEGMENT_COVERAGE_TOL",
    "accuracy",
    "brier_score",
    "ensemble_accuracy",
    "ensemble_probs",
    "expected_calibration_error",
    "hypervolume_2d",
    "igd",
    "igd_plus",
    "non_dominated_mask",
    "per_task_mse",
    "plot_reliability_diagram",
    "reliability_diagram",
    "segment_coverage",
    "segments_covered",
]
