"""Derivative matching (Papamakarios 2015, part A): match input-gradients of log-probabilities."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

_MODES = ("exact", "projection")


@keras.saving.register_keras_serializable(package="kdtfp")
class DerivativeMatching(keras.losses.Loss):
    """Squared error between teacher and student input-gradients of per-class log-probabilities.

    With `f_i(x)` and `g_i(x)` the student's and teacher's log-probabilities of the `I` classes and
    `D` the input size, the per-example loss is

    ```
    L_D(x) = 1 / (2 I D) * sum_i || grad_x f_i(x) - grad_x g_i(x) ||^2
    ```

    i.e. the thesis's `L_D / (2I)` divided by the input dimension, so that `weight = λ` in a
    `Distiller` gives the thesis's `L_CE + (λ / D) L_D`.

    Two ways to get the gradients (`mode`):

    * `"exact"`: the whole Jacobian `J = d log p / dx`, `[batch, I, D]`, with `batch_jacobian`
      (I vector–Jacobian products per example). For small inputs and few classes.
    * `"projection"`: `num_projections` random directions `v` with `E[v v^T] = I / I` per example,
      and the rows `v^T J` (one vector–Jacobian product each). Since
      `E_v ||v^T (J_f - J_g)||^2 = ||J_f - J_g||_F^2 / I`, the loss is an unbiased estimate of the
      exact one. Directions are Rademacher vectors scaled by `1/sqrt(I)`.

    The loss itself compares gradient "rows" of shape `[batch, R, D]` (`y_true` from the
    teacher, `y_pred` from the student): `0.5 * mean over (R, D) of (y_pred - y_true)^2`. The
    `Distiller` computes the rows with `input_gradient_rows` (nested `GradientTape`, so the
    student's rows stay differentiable with respect to its weights).

    Args:
        mode: `"exact"` or `"projection"`.
        num_projections: number of random directions per example in projection mode.

    Example:

    >>> distiller = kdtfp.Distiller(
    ...     student, teacher,
    ...     objectives=[(kdtfp.losses.SoftTargetKL(), 1.0),
    ...                 (kdtfp.losses.DerivativeMatching(mode="projection"), 10.0)])
    """

    uses_input_gradients = True

    def __init__(
        self,
        mode="exact",
        num_projections=1,
        reduction="sum_over_batch_size",
        name="derivative_matching",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if mode not in _MODES:
            raise ValueError(f"DerivativeMatching: `mode` must be one of {_MODES}, got {mode!r}.")
        num_projections = int(num_projections)
        if num_projections < 1:
            raise ValueError(
                f"DerivativeMatching: `num_projections` must be >= 1, got {num_projections}."
            )
        self.mode = mode
        self.num_projections = num_projections

    def call(self, y_true, y_pred):
        return 0.5 * ops.mean(ops.square(y_pred - y_true), axis=(1, 2))

    def directions(self, batch_size, num_classes, seed):
        """Random directions `[batch, P, I]` for projection mode (Rademacher / sqrt(I)).

        `seed` is a stateless seed (shape `[2]` int tensor). The draw is made for the *global*
        batch and sliced to this replica's part, so that a step on N replicas sees the same
        directions per example as a step on one device with the same global batch.
        """
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        replica_id = context.replica_id_in_sync_group if context is not None else 0
        shape = tf.stack([batch_size * replicas, self.num_projections, num_classes])
        signs = tf.random.stateless_uniform(shape, seed=seed, minval=0, maxval=2, dtype=tf.int32)
        start = tf.cast(replica_id, tf.int32) * batch_size
        signs = signs[start : start + batch_size]
        scale = tf.math.rsqrt(tf.cast(num_classes, tf.float32))
        return (2.0 * tf.cast(signs, tf.float32) - 1.0) * scale

    def input_gradient_rows(self, log_prob_fn, x, directions=None):
        """Gradient rows `[batch, R, D]` of `log_prob_fn(x)` (`[batch, I]`) with respect to `x`.

        `R = I` in exact mode, `R = num_projections` in projection mode (then `directions`,
        `[batch, P, I]`, are required). `x` may have any rank; its non-batch axes are flattened.
        """
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            log_probs = log_prob_fn(x)
            if self.mode == "projection":
                projected = tf.einsum("bi,bpi->bp", log_probs, tf.cast(directions, log_probs.dtype))
        if self.mode == "exact":
            rows = tape.batch_jacobian(log_probs, x)
        elif self.num_projections == 1:
            # One direction: a single vector-Jacobian product, cheaper than batch_jacobian.
            rows = tape.gradient(projected, x)[:, None]
        else:
            rows = tape.batch_jacobian(projected, x)
        batch = tf.shape(rows)[0]
        num_rows = rows.shape[1]
        return tf.reshape(rows, tf.stack([batch, num_rows, -1]))

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, num_projections=self.num_projections)
        return config
