"""Evaluation metrics of students against labels and teachers (NumPy, float64), plus streaming
Keras metrics for calibration and Bayesian-KD uncertainty."""

from kdtfp.metrics.classification import (
    accuracy,
    agreement,
    kl_divergence,
    log_softmax,
    mean_log_likelihood,
)
from kdtfp.metrics.keras_metrics import (
    BrierScore,
    CredibleSetCoverage,
    DevianceAUROC,
    ExpectedCalibrationError,
)
from kdtfp.metrics.uncertainty import (
    brier_score,
    calibration_bin_sums,
    coverage_credible_set,
    coverage_oracle_set,
    credible_set,
    credible_set_bisection,
    deviance_auroc,
    expected_calibration_error,
    interval_coverage,
    interval_coverage_per_class,
    negative_log_likelihood,
)

__all__ = [
    "BrierScore",
    "CredibleSetCoverage",
    "DevianceAUROC",
    "ExpectedCalibrationError",
    "accuracy",
    "agreement",
    "brier_score",
    "calibration_bin_sums",
    "coverage_credible_set",
    "coverage_oracle_set",
    "credible_set",
    "credible_set_bisection",
    "deviance_auroc",
    "expected_calibration_error",
    "interval_coverage",
    "interval_coverage_per_class",
    "kl_divergence",
    "log_softmax",
    "mean_log_likelihood",
    "negative_log_likelihood",
]
