"""Classification metrics computed from logits in float64 log space."""

from __future__ import annotations

import numpy as np


def log_softmax(logits):
    """Stable `log softmax` over the last axis, float64."""
    logits = np.asarray(logits, dtype="float64")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def accuracy(logits, labels) -> float:
    """Share of examples whose arg-max class is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def mean_log_likelihood(logits, labels) -> float:
    """Mean `log p(label | x)` in nats (higher is better)."""
    log_probs = log_softmax(logits)
    return float(np.mean(log_probs[np.arange(len(log_probs)), np.asarray(labels)]))


def agreement(student_logits, teacher_logits) -> float:
    """Share of examples where student and teacher predict the same class."""
    return float(np.mean(np.argmax(student_logits, axis=-1) == np.argmax(teacher_logits, axis=-1)))


def kl_divergence(teacher_logits, student_logits) -> float:
    """Mean `KL(teacher || student)` over examples, in nats."""
    teacher = log_softmax(teacher_logits)
    student = log_softmax(student_logits)
    return float(np.mean(np.sum(np.exp(teacher) * (teacher - student), axis=-1)))
