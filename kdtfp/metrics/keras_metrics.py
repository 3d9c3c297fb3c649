"""Streaming Keras metrics for calibration and Bayesian-KD uncertainty.

`ExpectedCalibrationError`, `BrierScore` and `CredibleSetCoverage` accumulate sums in
`add_weight` variables over the batches of an epoch (`fit`/`evaluate`), so their result over
several batches equals the NumPy function of `kdtfp.metrics.uncertainty` on the concatenated
data. `DevianceAUROC` accumulates a thresholded confusion matrix (`keras.metrics.AUC`), an
approximation of `kdtfp.metrics.deviance_auroc`. Under `tf.distribute` Keras sums the variables
across replicas.

`y_true` is integer labels `[batch]` (or `[batch, 1]`), or one-hot `[batch, K]`; `y_pred` is
logits (`from_logits=True`, the default) or probabilities `[batch, K]`. `CredibleSetCoverage`
and `DevianceAUROC` also take posterior samples `[batch, r, K]` (e.g. the outputs of `r` SGLD
states, METHODS.md 4.5). `sample_weight`, if given, weights each example.

A model compiled with `kdtfp.losses.TeacherDirichletPosterior` gets the packed targets
`[batch, 1 + K]` as `y_true`, which these metrics do not unpack: evaluate such a model with
`model.compile(loss=..., metrics=...)` on plain labels (e.g. a second, evaluation-only
compile), or call the metric directly with the labels.

For the negative log-likelihood use `keras.metrics.SparseCategoricalCrossentropy(from_logits=...)`:
it is the streaming mean of `-log p(label | x)` and kdtfp does not duplicate it.
"""

from __future__ import annotations

import math

import keras
from keras import ops


def _labels_and_probs(y_true, y_pred, from_logits):
    y_pred = ops.convert_to_tensor(y_pred)
    if y_pred.dtype not in ("float32", "float64"):
        y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == num_classes != 1:
        labels = ops.argmax(y_true, axis=-1)  # one-hot
    else:
        labels = ops.reshape(y_true, (-1,))
    labels = ops.cast(labels, "int32")
    probs = ops.softmax(y_pred, axis=-1) if from_logits else y_pred
    return labels, probs, num_classes


def _example_weights(sample_weight, like):
    if sample_weight is None:
        return ops.ones_like(like)
    return ops.reshape(ops.cast(sample_weight, like.dtype), (-1,)) * ops.ones_like(like)


@keras.saving.register_keras_serializable(package="kdtfp")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Expected calibration error over equal-width confidence bins, accumulated over batches.

    Keeps, per bin, the (weighted) count of examples, the sum of their confidences (largest
    probability) and the sum of their correctness (arg-max == label); the result is

    ```
    ECE = sum_b |correct_sum_b - confidence_sum_b| / sum_b count_b
    ```

    which equals `kdtfp.metrics.expected_calibration_error` and
    `tfp.stats.expected_calibration_error` on all the data seen since the last reset.

    Args:
        num_bins: integer >= 1 (15 by default, as in Guo et al., 2017).
        from_logits: whether `y_pred` holds logits (True) or probabilities.
        name, dtype: as for every `keras.metrics.Metric`.

    Example:

    >>> model.compile(loss=..., metrics=[kdtfp.metrics.ExpectedCalibrationError(num_bins=15)])
    """

    def __init__(self, num_bins=15, from_logits=True, name="ece", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
            raise ValueError(
                f"ExpectedCalibrationError: `num_bins` must be an integer >= 1, got {num_bins!r}."
            )
        self.num_bins = int(num_bins)
        self.from_logits = bool(from_logits)
        self.counts = self.add_weight(
            shape=(self.num_bins,), initializer="zeros", name="counts", dtype=self.dtype
        )
        self.confidence_sums = self.add_weight(
            shape=(self.num_bins,), initializer="zeros", name="confidence_sums", dtype=self.dtype
        )
        self.correct_sums = self.add_weight(
            shape=(self.num_bins,), initializer="zeros", name="correct_sums", dtype=self.dtype
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, probs, _ = _labels_and_probs(y_true, y_pred, self.from_logits)
        confidence = ops.cast(ops.max(probs, axis=-1), self.dtype)
        predicted = ops.cast(ops.argmax(probs, axis=-1), "int32")
        correct = ops.cast(ops.equal(predicted, labels), self.dtype)
        weights = _example_weights(sample_weight, confidence)
        bins = ops.clip(
            ops.cast(ops.floor(confidence * self.num_bins), "int32"), 0, self.num_bins - 1
        )
        membership = ops.one_hot(bins, self.num_bins, dtype=self.dtype) * weights[:, None]
        self.counts.assign_add(ops.sum(membership, axis=0))
        self.confidence_sums.assign_add(ops.sum(membership * confidence[:, None], axis=0))
        self.correct_sums.assign_add(ops.sum(membership * correct[:, None], axis=0))

    def result(self):
        total = ops.sum(self.counts)
        gap = ops.sum(ops.abs(self.correct_sums - self.confidence_sums))
        return ops.divide_no_nan(gap, total)

    def reset_state(self):
        for variable in (self.counts, self.confidence_sums, self.correct_sums):
            variable.assign(ops.zeros_like(variable))

    def get_config(self):
        config = super().get_config()
        config.update(num_bins=self.num_bins, from_logits=self.from_logits)
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class BrierScore(keras.metrics.Metric):
    """Multi-class Brier score `mean_n sum_k (p_nk - onehot(y_n)_k)^2`, accumulated over batches.

    Equals `kdtfp.metrics.brier_score` on all the data seen since the last reset (a weighted
    mean when `sample_weight` is given).

    Args:
        from_logits: whether `y_pred` holds logits (True) or probabilities.
        name, dtype: as for every `keras.metrics.Metric`.
    """

    def __init__(self, from_logits=True, name="brier_score", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.total = self.add_weight(shape=(), initializer="zeros", name="total", dtype=self.dtype)
        self.count = self.add_weight(shape=(), initializer="zeros", name="count", dtype=self.dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, probs, num_classes = _labels_and_probs(y_true, y_pred, self.from_logits)
        probs = ops.cast(probs, self.dtype)
        onehot = ops.one_hot(labels, num_classes, dtype=self.dtype)
        per_example = ops.sum(ops.square(probs - onehot), axis=-1)
        weights = _example_weights(sample_weight, per_example)
        self.total.assign_add(ops.sum(per_example * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits)
        return config


# `credible_set` accepts a cumulative mass this much (relative) below `level`; NumPy uses 1e-12 in
# float64, here the masses are float32 sums, whose rounding is ~1e-7.
_LEVEL_RTOL_FLOAT32 = 1e-6


def _labels(y_true, num_classes):
    """Integer labels `[batch]` from `[batch]`, `[batch, 1]` or one-hot `[batch, K]`."""
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) >= 2 and y_true.shape[-1] == num_classes != 1:
        labels = ops.argmax(y_true, axis=-1)  # one-hot
    else:
        labels = ops.reshape(y_true, (-1,))
    return ops.cast(labels, "int32")


def _sample_probs(y_pred, from_logits):
    """Probabilities and log-probabilities `[batch, r, K]` of `[batch, K]` or `[batch, r, K]`."""
    y_pred = ops.convert_to_tensor(y_pred)
    if y_pred.dtype not in ("float32", "float64"):
        y_pred = ops.cast(y_pred, "float32")
    if len(y_pred.shape) == 2:
        y_pred = y_pred[:, None, :]
    elif len(y_pred.shape) != 3:
        raise ValueError(
            "`y_pred` must have shape [batch, K] (one prediction) or [batch, r, K] "
            f"(r posterior samples), got shape {tuple(y_pred.shape)}."
        )
    if from_logits:
        log_probs = ops.log_softmax(y_pred, axis=-1)
        return ops.exp(log_probs), log_probs
    positive = ops.greater(y_pred, 0.0)
    log_probs = ops.where(positive, ops.log(ops.where(positive, y_pred, 1.0)), 0.0)
    return y_pred, log_probs  # 0 * log 0 = 0 below: zero probabilities get log 0 := 0


@keras.saving.register_keras_serializable(package="kdtfp")
class CredibleSetCoverage(keras.metrics.Metric):
    """Share of examples whose label lies in the smallest class set of mass >= `level`.

    Per example, classes are added in order of descending (posterior-mean) probability, ties
    broken by lower class index, until their cumulative mass reaches `level`; the example is
    covered when its label is in that set. This is the rule of `kdtfp.metrics.credible_set`, so
    the result over all batches since the last reset equals

    ```python
    kdtfp.metrics.coverage_credible_set(kdtfp.metrics.credible_set(mean_probs, level), labels)
    ```

    (a weighted mean when `sample_weight` is given). The masses are float32 here, so "reaches"
    allows a relative 1e-6 below `level` instead of NumPy's 1e-12: only sets whose mass lies
    within that band of `level` can differ.

    With posterior samples `y_pred` `[batch, r, K]`, the set is built from the sample-mean
    probabilities `mean_j softmax(y_pred[:, j])` (METHODS.md 4.5). Label coverage of a 95 % set
    is bounded by the sets' discreteness: compare it with `kdtfp.metrics.coverage_oracle_set`
    rather than with `level` (METHODS.md 4.7).

    Args:
        level: credibility level in (0, 1). Defaults to 0.95.
        from_logits: whether `y_pred` holds logits (True) or probabilities.
        name, dtype: as for every `keras.metrics.Metric`.

    Example:

    >>> model.compile(loss=..., metrics=[kdtfp.metrics.CredibleSetCoverage(0.95)])
    """

    def __init__(self, level=0.95, from_logits=True, name="credible_set_coverage", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if isinstance(level, bool) or not 0.0 < float(level) < 1.0:
            raise ValueError(f"CredibleSetCoverage: `level` must lie in (0, 1), got {level!r}.")
        self.level = float(level)
        self.from_logits = bool(from_logits)
        self.covered = self.add_weight(
            shape=(), initializer="zeros", name="covered", dtype=self.dtype
        )
        self.count = self.add_weight(shape=(), initializer="zeros", name="count", dtype=self.dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        probs, _ = _sample_probs(y_pred, self.from_logits)
        num_classes = probs.shape[-1]
        mean_probs = ops.mean(probs, axis=1)
        labels = _labels(y_true, num_classes)
        # top_k sorts in descending order and puts the lower index first among equal values.
        sorted_probs, order = ops.top_k(mean_probs, k=num_classes, sorted=True)
        cumulative = ops.cumsum(sorted_probs, axis=-1)
        threshold = self.level * (1.0 - _LEVEL_RTOL_FLOAT32)
        below = ops.sum(ops.cast(ops.less(cumulative, threshold), "int32"), axis=-1)
        size = ops.minimum(below + 1, num_classes)
        rank = ops.argmax(ops.cast(ops.equal(order, labels[:, None]), "int32"), axis=-1)
        covered = ops.cast(ops.less(ops.cast(rank, "int32"), size), self.dtype)
        weights = _example_weights(sample_weight, covered)
        self.covered.assign_add(ops.sum(covered * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.covered, self.count)

    def reset_state(self):
        self.covered.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config.update(level=self.level, from_logits=self.from_logits)
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class DevianceAUROC(keras.metrics.Metric):
    """AUROC of the deviance as a score for flagging misclassified examples, streamed.

    The deviance of a probability vector is `D = sum_k -2 p_k log p_k` (twice the entropy, in
    nats); with posterior samples `y_pred` `[batch, r, K]` it is the mean deviance
    `mean_j D(softmax(y_pred[:, j]))` of METHODS.md 4.5, and the prediction is the arg-max of
    the sample-mean probabilities. Positives are the misclassified examples (prediction !=
    label), so a value near 1 means the deviance ranks the errors above the correct ones.

    This is a **threshold approximation** of `kdtfp.metrics.deviance_auroc` (the exact
    Mann-Whitney AUROC on all the data): the deviance is divided by its maximum `2 log K` to lie
    in [0, 1] and handed to `keras.metrics.AUC(num_thresholds, curve="ROC",
    summation_method="interpolation")`, which counts the examples between two neighbouring
    thresholds as tied. On digits students its error was below 0.003 with 200 thresholds;
    raise `num_thresholds` for more precision. Like `deviance_auroc`, the result is NaN while
    the examples seen are all correct or all wrong (the AUROC is undefined).

    Args:
        num_thresholds: int > 1, thresholds of the ROC curve on [0, 1]. Defaults to 200.
        from_logits: whether `y_pred` holds logits (True) or probabilities.
        name, dtype: as for every `keras.metrics.Metric`.

    Example:

    >>> model.compile(loss=..., metrics=[kdtfp.metrics.DevianceAUROC(num_thresholds=500)])
    """

    def __init__(self, num_thresholds=200, from_logits=True, name="deviance_auroc", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if (
            isinstance(num_thresholds, bool)
            or int(num_thresholds) != num_thresholds
            or num_thresholds < 2
        ):
            raise ValueError(
                f"DevianceAUROC: `num_thresholds` must be an integer > 1, got {num_thresholds!r}."
            )
        self.num_thresholds = int(num_thresholds)
        self.from_logits = bool(from_logits)
        self.auc = keras.metrics.AUC(
            num_thresholds=self.num_thresholds,
            curve="ROC",
            summation_method="interpolation",
            name=f"{name}_auc",
            dtype=self.dtype,
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        probs, log_probs = _sample_probs(y_pred, self.from_logits)
        num_classes = probs.shape[-1]
        deviance = ops.mean(-2.0 * ops.sum(probs * log_probs, axis=-1), axis=1)
        scale = 2.0 * math.log(num_classes) if num_classes > 1 else 1.0
        score = ops.clip(ops.cast(deviance, self.dtype) / scale, 0.0, 1.0)
        labels = _labels(y_true, num_classes)
        predicted = ops.cast(ops.argmax(ops.mean(probs, axis=1), axis=-1), "int32")
        wrong = ops.cast(ops.not_equal(predicted, labels), self.dtype)
        if sample_weight is not None:
            sample_weight = _example_weights(sample_weight, wrong)
        self.auc.update_state(wrong, score, sample_weight=sample_weight)

    def result(self):
        # At the lowest threshold every example is predicted positive: TP + FN counts the wrong
        # examples, TN + FP the correct ones.
        positives = self.auc.true_positives[0] + self.auc.false_negatives[0]
        negatives = self.auc.true_negatives[0] + self.auc.false_positives[0]
        defined = ops.logical_and(ops.greater(positives, 0.0), ops.greater(negatives, 0.0))
        return ops.where(defined, self.auc.result(), float("nan"))

    def reset_state(self):
        self.auc.reset_state()

    def get_config(self):
        config = super().get_config()
        config.update(num_thresholds=self.num_thresholds, from_logits=self.from_logits)
        return config
