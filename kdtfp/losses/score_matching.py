"""Average score matching (Papamakarios 2015, parts A-B; METHODS.md §5.3-5.4): match the input
gradients of the teacher's and the student's log predictive, weighted by the teacher's
probabilities."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


def score_rows(log_prob_fn, x):
    """Values and input-gradients of `log_prob_fn(x)`, packed as "score rows" `[B, I, 1 + D]`.

    `rows[b, i, 0] = log p_i(x_b)` and `rows[b, i, 1:] = grad_x log p_i(x_b)` for the `I`
    class log-probabilities `log_prob_fn(x)` `[B, I]` of `[B, D]` inputs (float32). Computed with
    `batch_jacobian` under a `GradientTape`, so that rows of a student stay differentiable with
    respect to its weights when called inside an outer tape (`fit`).
    """
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        log_probs = tf.cast(log_prob_fn(x), tf.float32)
    jacobian = tape.batch_jacobian(log_probs, x)  # [B, I, D]
    return tf.concat([log_probs[..., None], jacobian], axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class AverageScoreMatching(keras.losses.Loss):
    """Average score matching between a teacher's and a student's predictive, plus optional KL.

    With `p_i(x)` the teacher's and `f_i(x)` the student's probabilities of the `I` classes, the
    per-example loss is (METHODS.md §5.3, the thesis's `L_ASM`, here for any `I`)

    ```
    L_ASM(x) = sum_i p_i(x) / 2 * || grad_x log f_i(x) - grad_x log p_i(x) ||^2
    loss(x)  = score_weight * L_ASM(x) + kl_weight * sum_i p_i(x) (log p_i(x) - log f_i(x))
    ```

    i.e. the squared difference of the scores (input-gradients of the log predictive) averaged
    over `y ~ p(y | x)`: for one Bernoulli output with `y = g(x)` it is
    `y/2 ||grad log f - grad log y||^2 + (1-y)/2 ||grad log(1-f) - grad log(1-y)||^2`.
    The KL term (`kl_weight > 0`) has the same parameter gradient as the cross-entropy to `p`.

    **Online use.** The parameter gradient is linear in the teacher's `(p_i, grad_x p_i)`:
    `d/dθ L_ASM = sum_i (p_i grad_x log f_i - grad_x p_i) . d/dθ grad_x log f_i` (and
    `d/dθ KL = -sum_i p_i d/dθ log f_i`). So a target built from one posterior sample (or a few
    chains), `p = sigmoid(w_t . x)`, gives an unbiased gradient of the loss against the full
    MC predictive `g = E_w[sigmoid(w . x)]` as long as `p` and `grad log p` come from the **same**
    sampled predictive (the weighting and the score must not mix a running mean with a single
    sample). The loss *value* at such a target is biased; its gradient is not.

    `y_true` and `y_pred` are score rows `[B, I, 1 + D]` (see `score_rows`): column 0 the log
    probabilities, the rest their input-gradients. Two ways to get them inside `fit`:

    * in a `kdtfp.Distiller` (frozen teacher model, logits outputs), as an input-gradient
      objective: `objectives=[(SoftTargetKL(1.0), 1.0), (AverageScoreMatching(), lam)]`;
      the Distiller calls `input_gradient_rows` for both models;
    * with `InputScores(student)` and a dataset of `(x, teacher score rows)` (e.g. computed in
      the `tf.data` pipeline from the current MCMC state, for online distillation), with
      `kl_weight=1` so that one loss carries both terms.

    Args:
        score_weight: non-negative weight of `L_ASM`.
        kl_weight: non-negative weight of `KL(p || f)`.
    """

    uses_input_gradients = True
    #: Read by `kdtfp.Distiller`: the whole Jacobian, never random projections.
    mode = "exact"

    def __init__(
        self,
        score_weight=1.0,
        kl_weight=0.0,
        reduction="sum_over_batch_size",
        name="average_score_matching",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        for key, value in (("score_weight", score_weight), ("kl_weight", kl_weight)):
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(
                    f"AverageScoreMatching: `{key}` must be a finite number >= 0, got {value!r}."
                )
        if score_weight == 0 and kl_weight == 0:
            raise ValueError(
                "AverageScoreMatching: `score_weight` and `kl_weight` are both 0: nothing to match."
            )
        self.score_weight = float(score_weight)
        self.kl_weight = float(kl_weight)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if len(y_true.shape) != 3 or len(y_pred.shape) != 3:
            raise ValueError(
                "AverageScoreMatching: `y_true` and `y_pred` must be score rows [B, I, 1 + D]. "
                f"Received shapes {y_true.shape} and {y_pred.shape}."
            )
        teacher_log_probs = ops.stop_gradient(y_true[..., 0])  # [B, I]
        teacher_probs = ops.exp(teacher_log_probs)
        squared = ops.sum(ops.square(y_pred[..., 1:] - y_true[..., 1:]), axis=-1)  # [B, I]
        loss = self.score_weight * 0.5 * ops.sum(teacher_probs * squared, axis=-1)
        if self.kl_weight:
            kl = ops.sum(teacher_probs * (teacher_log_probs - y_pred[..., 0]), axis=-1)
            loss = loss + self.kl_weight * kl
        return loss

    def input_gradient_rows(self, log_prob_fn, x, directions=None):
        """Score rows `[B, I, 1 + D]` of `log_prob_fn(x)` (the `kdtfp.Distiller` hook)."""
        del directions  # exact mode only
        x = tf.convert_to_tensor(x)
        return score_rows(log_prob_fn, tf.reshape(x, tf.stack([tf.shape(x)[0], -1])))

    def get_config(self):
        config = super().get_config()
        config.update(score_weight=self.score_weight, kl_weight=self.kl_weight)
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class InputScores(keras.Model):
    """Wraps a classifier so that it outputs its score rows, for score matching with `fit`.

    `call(x)` `[B, D]` returns `score_rows(log_softmax(model(x)), x)` `[B, I, 1 + D]`: the
    class log-probabilities and their input-gradients. Compile it with
    `AverageScoreMatching(kl_weight=...)` and fit it on `(x, teacher score rows)`; the trained
    classifier is `.model` (export that one). The wrapper owns no weights of its own.

    Example:

    >>> scored = InputScores(MixturePredictive(10))
    >>> scored.compile("sgd", loss=AverageScoreMatching(score_weight=0.1, kl_weight=1.0))
    >>> scored.fit(dataset_of_x_and_teacher_rows, steps_per_epoch=5000)
    >>> scored.model.probability(x)
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(f"`model` must be a keras.Model, got {type(model).__name__}.")
        self.model = model
        if model.built:
            self.built = True

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        def log_probs(x):
            return ops.log_softmax(ops.cast(self.model(x, training=training), "float32"), axis=-1)

        return score_rows(log_probs, inputs)

    def get_config(self):
        config = super().get_config()
        config["model"] = keras.saving.serialize_keras_object(self.model)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)
