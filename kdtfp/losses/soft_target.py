"""Soft-target distillation loss (Hinton et al., 2015)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdtfp")
class SoftTargetKL(keras.losses.Loss):
    """KL divergence between tempered teacher and student class distributions, times T².

    For teacher logits `t` and student logits `s` of shape `[batch, classes]`:

    ```
    p = softmax(t / T);  q = softmax(s / T)
    loss = T**2 * sum_k p_k * (log p_k - log q_k)      # one value per example
    ```

    The T² factor keeps the gradient's scale independent of the temperature. Both sides are
    computed with `log_softmax`, so logits of any magnitude (1e4 included) give finite values.
    With `T = 1` the gradient equals that of the cross-entropy to the teacher's probabilities.

    Args:
        temperature: positive float T. A `Distiller` may replace it by a Keras variable so that
            `kdtfp.callbacks.TemperatureSchedule` can change it during `fit`.
        reduction, name, dtype: as for every `keras.losses.Loss`.

    Example:

    >>> loss = kdtfp.losses.SoftTargetKL(temperature=4.0)
    >>> loss(teacher_logits, student_logits)  # y_true = teacher, y_pred = student
    """

    def __init__(
        self, temperature=1.0, reduction="sum_over_batch_size", name="soft_target_kl", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        temperature = float(temperature)
        if not 0.0 < temperature < float("inf"):
            raise ValueError(
                f"SoftTargetKL: `temperature` must be a finite number > 0, got {temperature}."
            )
        self.temperature = temperature

    def call(self, y_true, y_pred):
        temperature = ops.cast(self.temperature, y_pred.dtype)
        teacher_log_probs = ops.log_softmax(y_true / temperature, axis=-1)
        student_log_probs = ops.log_softmax(y_pred / temperature, axis=-1)
        kl = ops.sum(ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
        return kl * ops.square(temperature)

    def get_config(self):
        config = super().get_config()
        config["temperature"] = float(ops.convert_to_numpy(self.temperature))
        return config
