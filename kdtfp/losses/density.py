"""Density-distillation losses for binary autoregressive students (NADE), as `keras.losses.Loss`es."""

from __future__ import annotations

import keras
from keras import ops


def _bernoulli_log_prob(x, logits):
    return ops.sum(ops.cast(x, logits.dtype) * logits - ops.softplus(logits), axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class BernoulliNegativeLogLikelihood(keras.losses.Loss):
    """`-log q(x)` of a product of Bernoulli conditionals, one value per example (nats).

    `y_true` is the binary sample `x` [B, D] and `y_pred` the student's conditional logits
    [B, D] (e.g. `NADE(x)`):

    ```python
    loss = -sum_d [x_d * logit_d - softplus(logit_d)]      # = -log q(x)
    ```

    On samples from a teacher `p` its mean estimates `KL(p || q) + H(p)`: maximum-likelihood
    distillation (Papamakarios 2015, METHODS.md 5.5). Unlike `BinaryCrossentropy` it sums over
    the D dimensions instead of averaging, so the value is a log-likelihood.
    """

    def __init__(self, reduction="sum_over_batch_size", name="bernoulli_nll", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return -_bernoulli_log_prob(y_true, y_pred)


@keras.saving.register_keras_serializable(package="kdtfp")
class LogDensitySquaredError(keras.losses.Loss):
    """`0.5 * (log q(x) - log p(x))^2`: the thesis's square log-density error.

    `y_true` [B, D + 1] is the sample `x` [B, D] with the teacher's **normalised** log-density
    `log p(x)` as its last column; `y_pred` holds the student's conditional logits [B, D]. For an
    RBM, `log p(x) = -F(x) - log Z` with log Z exact (enumeration, H <= 20) or an estimate
    `log Ẑ` (then the loss pulls `log q` towards `log p~ - log Ẑ`; any error in `log Ẑ` shifts
    the target by a constant that a normalised q cannot follow, so it only adds a constant to
    the loss at the optimum).

    ```python
    x, log_p = y_true[:, :-1], y_true[:, -1]
    loss = 0.5 * (sum_d [x_d * logit_d - softplus(logit_d)] - log_p) ** 2
    ```
    """

    def __init__(
        self, reduction="sum_over_batch_size", name="log_density_squared_error", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        x, log_p = y_true[..., :-1], y_true[..., -1]
        return 0.5 * ops.square(_bernoulli_log_prob(x, y_pred) - ops.cast(log_p, y_pred.dtype))
