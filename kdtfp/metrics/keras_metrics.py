"""Streaming Keras metrics for calibration: ECE and the Brier score.

Both accumulate sums in `add_weight` variables over the batches of an epoch (`fit`/`evaluate`),
so their result over several batches equals the NumPy function of `kdtfp.metrics.uncertainty`
on the concatenated data. Under `tf.distribute` Keras sums the variables across replicas.

`y_true` is integer labels `[batch]` (or `[batch, 1]`), or one-hot `[batch, K]`; `y_pred` is
logits (`from_logits=True`, the default) or probabilities `[batch, K]`. `sample_weight`, if
given, weights each example.

For the negative log-likelihood use `keras.metrics.SparseCategoricalCrossentropy(from_logits=...)`:
it is the streaming mean of `-log p(label | x)` and kdtfp does not duplicate it.
"""

from __future__ import annotations

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
