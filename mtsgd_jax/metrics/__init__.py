"""Evaluation metrics: Pareto-front quality (hypervolume, IGD, IGD+, ZDT3 segments) and
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
    ZDT3_COVERAGE_TOL,
    hypervolume_2d,
    igd,
    igd_plus,
    non_dominated_mask,
    zdt3_segment_coverage,
    zdt3_segments_covered,
)

__all__ = [
    "ReliabilityDiagram",
    "ZDT3_COVERAGE_TOL",
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
    "zdt3_segment_coverage",
    "zdt3_segments_covered",
]
