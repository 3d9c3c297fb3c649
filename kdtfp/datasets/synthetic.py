"""Synthetic classification data with known class probabilities (the BKD coverage test).

METHODS.md section 4.7 A: inputs `x ~ N(0, I_d)`, true class probabilities from a softmax of a
linear or a small random-MLP function of `x`, labels sampled from them. Because the truth is
known, interval coverage of the true probabilities and the oracle credible-set coverage can be
measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdtfp.datasets.offline import Split

KINDS = ("linear", "nonlinear")


@dataclass(frozen=True)
class KnownProbabilities:
    """A `Split` plus the true class probabilities of every split, `[n, K]` float64."""

    split: Split
    probs_train: np.ndarray
    probs_val: np.ndarray
    probs_test: np.ndarray


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_truth(
    num_examples=3000,
    input_dim=5,
    num_classes=5,
    kind="linear",
    scale=2.0,
    hidden=16,
    fractions=(0.7, 0.2, 0.1),
    seed=0,
) -> KnownProbabilities:
    """Samples `x ~ N(0, I_d)`, true probabilities `softmax(f(x))` and labels `y ~ Cat(p(x))`.

    * `kind="linear"`: `f(x) = scale * (x W + b) / sqrt(d)`, `W, b ~ N(0, 1)`.
    * `kind="nonlinear"`: `f(x) = scale * tanh(x A + a) B / sqrt(hidden)` with `A ~ N(0, 1/d)`,
      `a ~ N(0, 0.25)`, `B ~ N(0, 1)`: a random one-hidden-layer network of `hidden` units.

    `scale` sets how peaked the truth is (larger means fewer ambiguous inputs). The examples
    are split into train / test / validation in the ratio `fractions` (7:2:1 by default; the
    test split gets the larger share because coverage is measured there).

    Returns:
        `KnownProbabilities` whose `split` holds float32 inputs and int32 labels.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    for name, value, minimum in (
        ("num_examples", num_examples, 10),
        ("input_dim", input_dim, 1),
        ("num_classes", num_classes, 2),
        ("hidden", hidden, 1),
    ):
        if int(value) != value or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0, got {scale!r}.")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions <= 0):
        raise ValueError(f"`fractions` must be three positive numbers, got {fractions!r}.")

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, input_dim))
    if kind == "linear":
        weights = rng.standard_normal((input_dim, num_classes))
        bias = rng.standard_normal(num_classes)
        logits = scale * (x @ weights + bias) / np.sqrt(input_dim)
    else:
        a = rng.standard_normal((input_dim, hidden)) / np.sqrt(input_dim)
        a_bias = 0.5 * rng.standard_normal(hidden)
        b = rng.standard_normal((hidden, num_classes))
        logits = scale * np.tanh(x @ a + a_bias) @ b / np.sqrt(hidden)
    probs = np.exp(_log_softmax(logits))
    # Inverse-CDF sampling of one label per row.
    cumulative = np.cumsum(probs, axis=-1)
    u = rng.uniform(size=(num_examples, 1))
    y = np.minimum((u > cumulative).sum(axis=-1), num_classes - 1)

    bounds = np.cumsum(fractions / fractions.sum())[:2] * num_examples
    train, test, val = np.split(np.arange(num_examples), bounds.astype(int))
    x, y = x.astype("float32"), y.astype("int32")
    split = Split(x[train], y[train], x[val], y[val], x[test], y[test])
    return KnownProbabilities(split, probs[train], probs[val], probs[test])
