"""Uncertainty metrics for probabilistic students (NumPy, float64).

Shapes: `N` examples, `K` classes. `probs` are class probabilities `[N, K]` (rows on the simplex),
`labels` are integer class indices `[N]`. Every function returns a Python float (or a float64
array for the per-class variants) and raises `ValueError` naming the argument on bad input.

These are the uncertainty outputs and scores of METHODS.md sections 4.5 and 4.7 (Bayesian
knowledge distillation). Streaming Keras versions of ECE and the Brier score live in
`kdtfp.metrics.keras_metrics`; the streaming NLL is `keras.metrics.SparseCategoricalCrossentropy`.
"""

from __future__ import annotations

import numpy as np

# Rows of `probs` must sum to 1 within this tolerance (float32 softmax outputs do).
_SIMPLEX_ATOL = 1e-3
# `credible_set` accepts a cumulative mass within this much below `level` as reaching it, so that
# e.g. [0.5, 0.45, 0.05] at level 0.95 gives two classes despite float rounding.
_LEVEL_RTOL = 1e-12


def _check_probs(probs, name="probs"):
    probs = np.asarray(probs, dtype="float64")
    if probs.ndim != 2 or probs.shape[-1] < 1:
        raise ValueError(f"`{name}` must have shape [N, K], got shape {probs.shape}.")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0.0):
        raise ValueError(f"`{name}` must be finite and non-negative.")
    sums = probs.sum(axis=-1)
    if probs.shape[0] and np.max(np.abs(sums - 1.0)) > _SIMPLEX_ATOL:
        raise ValueError(
            f"`{name}` rows must sum to 1 (within {_SIMPLEX_ATOL}); "
            f"got row sums in [{sums.min():.6g}, {sums.max():.6g}]."
        )
    return probs


def _check_labels(labels, num_examples, num_classes, name="labels"):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num_examples:
        raise ValueError(f"`{name}` must have shape [{num_examples}], got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        rounded = np.round(labels)
        if not np.all(rounded == labels):
            raise ValueError(f"`{name}` must hold integer class indices.")
        labels = rounded
    labels = labels.astype("int64")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes - 1}], "
            f"got values in [{labels.min()}, {labels.max()}]."
        )
    return labels


def _check_nonempty(array, name):
    if array.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one example.")


def negative_log_likelihood(probs, labels) -> float:
    """Mean `-log p(label | x)` in nats over examples (lower is better).

    Args:
        probs: `[N, K]` class probabilities.
        labels: `[N]` integer labels.

    Probabilities are floored at the smallest positive float64, so a zero probability on the
    label gives a large finite value (about 708) instead of `inf`. For logits use
    `-kdtfp.metrics.mean_log_likelihood(logits, labels)`, which stays in log space throughout.
    The streaming Keras equivalent is `keras.metrics.SparseCategoricalCrossentropy()`
    (`from_logits=True` for logits); kdtfp does not duplicate it.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    _check_nonempty(probs, "probs")
    picked = probs[np.arange(probs.shape[0]), labels]
    return float(-np.mean(np.log(np.maximum(picked, np.finfo("float64").tiny))))


def expected_calibration_error(probs, labels, num_bins=15) -> float:
    """Expected calibration error (Guo et al., 2017, eq. 3) with equal-width confidence bins.

    The confidence of an example is its largest probability, its prediction the arg-max class
    (first one on ties). Confidences fall in bin `min(floor(conf * num_bins), num_bins - 1)` of
    `[0, 1]`, and

    ```
    ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b|
    ```

    over non-empty bins. This is what `tfp.stats.expected_calibration_error(num_bins,
    logits=log(probs), labels_true=labels)` computes (tested).

    Args:
        probs: `[N, K]` class probabilities.
        labels: `[N]` integer labels.
        num_bins: integer >= 1.
    """
    num_bins = _check_num_bins(num_bins)
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    _check_nonempty(probs, "probs")
    counts, confidence_sums, correct_sums = calibration_bin_sums(probs, labels, num_bins)
    return float(np.sum(np.abs(correct_sums - confidence_sums)) / probs.shape[0])


def _check_num_bins(num_bins):
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"`num_bins` must be an integer >= 1, got {num_bins!r}.")
    return int(num_bins)


def calibration_bin_sums(probs, labels, num_bins=15):
    """Per-bin `(counts, confidence_sums, correct_sums)`, each `[num_bins]` float64.

    The sufficient statistics of `expected_calibration_error` (and of a reliability diagram:
    bin accuracy is `correct_sums / counts`, bin confidence `confidence_sums / counts`). They add
    over batches, which is how `kdtfp.metrics.ExpectedCalibrationError` streams.
    """
    num_bins = _check_num_bins(num_bins)
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    confidence = probs.max(axis=-1)
    correct = (np.argmax(probs, axis=-1) == labels).astype("float64")
    bins = np.clip(np.floor(confidence * num_bins).astype("int64"), 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins).astype("float64")
    confidence_sums = np.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sums = np.bincount(bins, weights=correct, minlength=num_bins)
    return counts, confidence_sums, correct_sums


def brier_score(probs, labels) -> float:
    """Multi-class Brier score: mean over examples of `sum_k (p_k - onehot(label)_k)^2`.

    Lies in `[0, 2]`; 0 for a certain correct prediction, 2 for a certain wrong one.

    Args:
        probs: `[N, K]` class probabilities.
        labels: `[N]` integer labels.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    _check_nonempty(probs, "probs")
    onehot = np.eye(probs.shape[1], dtype="float64")[labels]
    return float(np.mean(np.sum(np.square(probs - onehot), axis=-1)))


def _check_level(level):
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must lie in (0, 1), got {level}.")
    return level


def credible_set(probs, level=0.95):
    """Smallest set of classes whose total probability reaches `level`, as a bool `[N, K]` mask.

    Classes are added in order of descending probability (ties broken by lower class index)
    until their cumulative mass is >= `level` (up to a relative 1e-12 for float rounding). Every
    set holds at least one class. This is the "smallest set with mass >= 0.95" rule of
    METHODS.md 4.7; the bisection rule of the authors' code (METHODS.md 4.5) gives slightly
    larger sets.

    Args:
        probs: `[N, K]` class probabilities (for BKD, the posterior-mean probabilities).
        level: credibility level in (0, 1).
    """
    level = _check_level(level)
    probs = _check_probs(probs)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    cumulative = np.cumsum(sorted_probs, axis=-1)
    # Number of classes kept: one plus the number of prefixes whose mass is still below level.
    below = cumulative < level * (1.0 - _LEVEL_RTOL)
    size = np.minimum(below.sum(axis=-1) + 1, probs.shape[1])
    keep_sorted = np.arange(probs.shape[1])[None, :] < size[:, None]
    sets = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(sets, order, keep_sorted, axis=-1)
    return sets


def credible_set_bisection(q, level=0.95, tolerance=1e-10):
    """Credible sets by the bisection rule of Fang et al.'s code (METHODS.md 4.5), bool `[N, K]`.

    From posterior probability samples `q` `[r, N, K]`, find per example the threshold `u` with

    ```
    (1/r) sum_j sum_k q_k^(j) 1[q_k^(j) >= u] = level
    ```

    (the posterior mass carried by sampled probabilities of at least `u`, a non-increasing
    step function of `u`), by bisection on `[0, 1]` to `tolerance`; the set is
    `{k : -2 log qbar_k <= -2 log u}`, i.e. the classes whose posterior-mean probability
    `qbar_k` is at least `u`. At least the top class is always kept. With one sample (`r = 1`)
    it is the smallest-set rule of `credible_set` (up to ties); with several, the threshold
    comes from the sampled probabilities, so a class whose samples spread widely can enter or
    leave the set (METHODS.md 4.7 measured BKD label coverage 0.965-0.981 with this rule).

    Args:
        q: `[r, N, K]` class probabilities, one slice per posterior sample (`r = 1` allowed).
        level: credibility level in (0, 1).
        tolerance: width of the final bisection interval.
    """
    level = _check_level(level)
    q = np.asarray(q, dtype="float64")
    if q.ndim != 3 or q.shape[0] < 1:
        raise ValueError(f"`q` must have shape [samples, N, K], got shape {q.shape}.")
    for j in range(q.shape[0]):
        _check_probs(q[j], "q")
    low = np.zeros(q.shape[1])  # mass(low) >= level
    high = np.ones(q.shape[1]) + tolerance  # mass(high) < level (nothing is above 1)
    while np.max(high - low) > tolerance:
        middle = 0.5 * (low + high)
        mass = np.mean(np.sum(q * (q >= middle[None, :, None]), axis=-1), axis=0)
        reaches = mass >= level
        low = np.where(reaches, middle, low)
        high = np.where(reaches, high, middle)
    mean_probs = q.mean(axis=0)
    sets = mean_probs >= low[:, None]
    sets[np.arange(len(sets)), mean_probs.argmax(-1)] = True
    return sets


def _check_sets(sets, name="sets"):
    sets = np.asarray(sets)
    if sets.ndim != 2:
        raise ValueError(f"`{name}` must be a bool array of shape [N, K], got shape {sets.shape}.")
    if sets.dtype != bool:
        if not np.all((sets == 0) | (sets == 1)):
            raise ValueError(f"`{name}` must be a bool mask (0/1 values).")
        sets = sets.astype(bool)
    return sets


def coverage_credible_set(sets, labels) -> float:
    """Share of examples whose label lies inside its set.

    Args:
        sets: bool `[N, K]` set masks, e.g. from `credible_set(mean_probs, 0.95)`.
        labels: `[N]` integer labels.

    Label coverage of a 95 % set is bounded by the discreteness of the sets: compare it with
    `coverage_oracle_set` on the same data rather than with 0.95 (METHODS.md 4.7).
    """
    sets = _check_sets(sets)
    labels = _check_labels(labels, sets.shape[0], sets.shape[1])
    _check_nonempty(sets, "sets")
    return float(np.mean(sets[np.arange(sets.shape[0]), labels]))


def coverage_oracle_set(probs_true, labels, level=0.95) -> float:
    """Label coverage of the oracle sets: the same set rule applied to the TRUE probabilities.

    METHODS.md 4.7 ("Reference point"): with the "smallest set with mass >= level" rule, even the
    sets built from the true class probabilities cover the sampled labels more often than
    `level` (0.983-0.995 at 0.95 in our synthetic configurations), so a band around 0.95 is
    unreachable. `coverage_oracle_set` is that attainable reference, reported beside
    `coverage_credible_set`:

    ```
    coverage_oracle_set(p, y, level) = coverage_credible_set(credible_set(p, level), y)
    ```

    Args:
        probs_true: `[N, K]` true class probabilities of the data-generating process.
        labels: `[N]` labels sampled from `probs_true` (the same labels the student's sets are
            scored on).
        level: credibility level in (0, 1), the one used for the student's sets.
    """
    return coverage_credible_set(credible_set(probs_true, level), labels)


def _check_intervals(lower, upper, probs_true):
    lower = np.asarray(lower, dtype="float64")
    upper = np.asarray(upper, dtype="float64")
    probs_true = _check_probs(probs_true, "probs_true")
    for name, array in (("lower", lower), ("upper", upper)):
        if array.shape != probs_true.shape:
            raise ValueError(
                f"`{name}` must have the shape of `probs_true` {probs_true.shape}, "
                f"got {array.shape}."
            )
        if np.any(np.isnan(array)):
            raise ValueError(f"`{name}` must not contain NaN.")
    if np.any(lower > upper):
        raise ValueError("`lower` must be <= `upper` everywhere.")
    _check_nonempty(probs_true, "probs_true")
    return (lower <= probs_true) & (probs_true <= upper)


def interval_coverage(lower, upper, probs_true) -> float:
    """Share of `(example, class)` entries whose true probability lies in `[lower, upper]`.

    Args:
        lower, upper: `[N, K]` interval ends (e.g. per-class 2.5 % and 97.5 % quantiles of the
            posterior samples, METHODS.md 4.5). Ends are inclusive.
        probs_true: `[N, K]` true class probabilities.
    """
    return float(np.mean(_check_intervals(lower, upper, probs_true)))


def interval_coverage_per_class(lower, upper, probs_true):
    """Per-class interval coverage: float64 `[K]`, the share of examples covered for each class.

    Arguments as for `interval_coverage`; its value is the mean of this array.
    """
    return np.mean(_check_intervals(lower, upper, probs_true), axis=0)


def _average_ranks(values):
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_ranks = (starts + 1 + ends) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype="float64")
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def deviance_auroc(deviance, correct) -> float:
    """AUROC of the deviance as a score for flagging misclassified points.

    Positives are the misclassified examples (`correct == False`); a higher deviance should mean
    "more likely wrong". Computed with the Mann-Whitney U statistic on average ranks, so ties
    count one half:

    ```
    AUROC = P(D_wrong > D_right) + 0.5 * P(D_wrong == D_right)
          = (R_wrong - n_wrong (n_wrong + 1) / 2) / (n_wrong * n_right)
    ```

    with `R_wrong` the rank sum of the misclassified examples. Equals
    `sklearn.metrics.roc_auc_score(~correct, deviance)` (tested).

    Args:
        deviance: `[N]` finite scores, e.g. the mean deviance of METHODS.md 4.5.
        correct: `[N]` bools, whether the prediction of each example is right.

    Returns:
        The AUROC in [0, 1], or `nan` when it is undefined: all examples correct or all wrong
        (no positives or no negatives). Callers should report the `nan` rather than a number.
    """
    deviance = np.asarray(deviance, dtype="float64")
    correct = np.asarray(correct)
    if deviance.ndim != 1:
        raise ValueError(f"`deviance` must have shape [N], got shape {deviance.shape}.")
    if correct.shape != deviance.shape:
        raise ValueError(
            f"`correct` must have the shape of `deviance` {deviance.shape}, got {correct.shape}."
        )
    if not np.all(np.isfinite(deviance)):
        raise ValueError("`deviance` must be finite.")
    if correct.dtype != bool:
        if not np.all((correct == 0) | (correct == 1)):
            raise ValueError("`correct` must hold bools (or 0/1).")
        correct = correct.astype(bool)
    wrong = ~correct
    num_wrong = int(wrong.sum())
    num_right = int(correct.sum())
    if num_wrong == 0 or num_right == 0:
        return float("nan")
    ranks = _average_ranks(deviance)
    u_statistic = ranks[wrong].sum() - num_wrong * (num_wrong + 1) / 2.0
    return float(u_statistic / (num_wrong * num_right))
