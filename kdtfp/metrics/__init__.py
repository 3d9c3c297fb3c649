"""Evaluation metrics of students against labels and teachers (NumPy, float64)."""

from kdtfp.metrics.classification import (
    accuracy,
    agreement,
    kl_divergence,
    log_softmax,
    mean_log_likelihood,
)

__all__ = ["accuracy", "agreement", "kl_divergence", "log_softmax", "mean_log_likelihood"]
