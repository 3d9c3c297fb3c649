"""`ConstrainedVIDistiller`: variational inference with a teacher-similarity constraint
(Saeedi et al., AAAI 2022; METHODS.md section 2.3)."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras import ops

from kdtfp.distill.checks import check_arrays
from kdtfp.distill.distiller import unscale_loss_for_distribution
from kdtfp.distill.safe_compile import SafeCompile

MODES = ("penalty", "lagrangian")


def _check_nonnegative(value, argument):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{argument}` must be a number >= 0, got {value!r}.") from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"`{argument}` must be a finite number >= 0, got {value}.")
    return value


@keras.saving.register_keras_serializable(package="kdtfp")
class ConstrainedVIDistiller(SafeCompile, keras.Model):
    """Fits a probabilistic student by VI while its posterior features keep the teacher's
    similarity structure.

    The student is a Keras model that, when called on a batch `x`, adds its own negative ELBO
    with `add_loss` (per example: the mean over the batch of the local terms plus the global
    KL divided by the corpus size, or that divided by a fixed token count — the student's
    choice) and returns its posterior features `[b, d_S]` (or `feature_fn` gives them). The
    teacher is not part of this model: `y` are the teacher's features `[b, d_T]`, precomputed
    once (`kdtfp.distill.teacher_outputs(feature_extractor, x)`). The loss of a batch is

    ```
    elbo_loss  = sum(student.losses)                        # the student's negative ELBO
    constraint = constraint_loss(y, features)              # L_SP, SimilarityPreserving()
    loss       = elbo_loss + multiplier * constraint
    ```

    * `mode="penalty"`: `multiplier` (γ) is fixed, or set per epoch by
      `kdtfp.callbacks.MultiplierSchedule`.
    * `mode="lagrangian"`: the problem is `min -ELBO s.t. L_SP <= epsilon`; γ starts at
      `multiplier` and `kdtfp.callbacks.DualAscent(target=epsilon, ...)` raises it while the
      constraint is violated. (The constant `-γ ε` of the Lagrangian does not change the weights'
      gradients and is left out of `loss`.) `fit` warns if no `DualAscent` callback is passed.

    γ is the non-trainable weight `multiplier` of this model: saved in `.keras` files, restored
    by `BackupAndRestore`, and the same on every replica (it changes only in cross-replica
    context, from callbacks). `last_constraint` holds the last step's constraint value (the
    mean over replicas), for `DualAscent(frequency="step")`.

    Metrics: `loss`, `elbo_loss`, `constraint` and `multiplier` (the γ the steps used), each a
    batch-size-weighted mean over the epoch, unscaled so it reads the same on N replicas as on
    one. With `DualAscent(frequency="epoch")` γ is constant within an epoch, so `multiplier` is
    that epoch's γ and the callback logs the next one as `multiplier_next`.

    Distribution: the student's `add_loss` terms and the constraint (a `keras.losses.Loss`) are
    divided by the replica count by Keras; nothing is hand-scaled. The similarity is computed
    within each replica's sub-batch (see `SimilarityPreserving`): on R replicas the constraint
    is the mean of R sub-batch values, so use global batches of R x 64 or more.

    `call(x)` and `predict(x)` return the student's features.

    Args:
        student: a `keras.Model` as above (e.g. `kdtfp.models.topic_model.TopicModel`).
        constraint: a `keras.losses.Loss` `(teacher_features, student_features) -> scalar`;
            defaults to `kdtfp.losses.SimilarityPreserving()`.
        multiplier: γ >= 0, the (initial) weight of the constraint.
        mode: `"penalty"` or `"lagrangian"`.
        epsilon: ε >= 0, the constraint level (used by `DualAscent`; recorded here so the model
            carries its own target).
        feature_fn: None (the student's output is the features), the name of a student method
            `student.<name>(x, training=...)`, or a function `(student, x) -> features`. A
            function must be registered with `keras.saving.register_keras_serializable` for the
            model to be saved; a method name always saves.

    Example:

    >>> lda = TopicModel(num_topics=12, vocab_size=64, corpus_size=len(x))
    >>> distiller = kdtfp.distill.ConstrainedVIDistiller(lda, multiplier=1e3)
    >>> distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    >>> distiller.fit(x, teacher_features, batch_size=128, epochs=100)
    >>> lda.features(x_test)
    """

    def __init__(
        self,
        student,
        constraint=None,
        multiplier=1.0,
        mode="penalty",
        epsilon=0.0,
        feature_fn=None,
        name="constrained_vi_distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if not isinstance(student, keras.Model):
            raise ValueError(f"`student` must be a keras.Model, got {type(student).__name__}.")
        if constraint is None:
            from kdtfp.losses.similarity import SimilarityPreserving

            constraint = SimilarityPreserving()
        if not isinstance(constraint, keras.losses.Loss):
            raise ValueError(
                "`constraint` must be a keras.losses.Loss (Keras scales only Loss objects per "
                f"replica, DESIGN rule 5), got {constraint!r}."
            )
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if feature_fn is not None and not (isinstance(feature_fn, str) or callable(feature_fn)):
            raise ValueError(
                f"`feature_fn` must be None, a student method name or a function, got {feature_fn!r}."
            )
        if isinstance(feature_fn, str) and not callable(getattr(student, feature_fn, None)):
            raise ValueError(
                f"`feature_fn`={feature_fn!r} is not a method of {type(student).__name__}."
            )
        self.student = student
        self.constraint = constraint
        self.mode = mode
        self.epsilon = _check_nonnegative(epsilon, "epsilon")
        self.feature_fn = feature_fn
        initial = _check_nonnegative(multiplier, "multiplier")
        self.multiplier = self.add_weight(
            name="multiplier",
            shape=(),
            initializer=keras.initializers.Constant(initial),
            trainable=False,
        )
        self.last_constraint = self.add_weight(
            name="last_constraint",
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="mean",
        )
        self.elbo_tracker = keras.metrics.Mean(name="elbo_loss")
        self.constraint_tracker = keras.metrics.Mean(name="constraint")
        self.multiplier_tracker = keras.metrics.Mean(name="multiplier")

    # ------------------------------------------------------------------ multiplier

    def multiplier_value(self) -> float:
        """The current γ as a Python float."""
        return float(ops.convert_to_numpy(self.multiplier))

    def set_multiplier(self, value) -> None:
        """Sets γ (outside a train step, e.g. from a callback)."""
        value = _check_nonnegative(value, "multiplier")
        self.multiplier.assign(np.asarray(value, dtype=self.multiplier.dtype))

    # ------------------------------------------------------------------ forward and loss

    def features(self, x, training=None):
        """The student's posterior features of `x`, `[b, d_S]`."""
        if self.feature_fn is None:
            return self.student(x, training=training)
        if isinstance(self.feature_fn, str):
            return getattr(self.student, self.feature_fn)(x, training=training)
        return self.feature_fn(self.student, x)

    def call(self, inputs, training=None):
        return self.features(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError(
                "ConstrainedVIDistiller needs the teacher's features as `y`: call "
                "fit(x, teacher_features) (e.g. kdtfp.distill.teacher_outputs(extractor, x))."
            )
        if sample_weight is not None:
            raise ValueError(
                "ConstrainedVIDistiller does not support `sample_weight`: the similarity "
                "constraint is one value per batch."
            )
        if y_pred is None:
            y_pred = self(x, training=training)
        if len(y.shape) != 2 or len(y_pred.shape) != 2:
            raise ValueError(
                f"Teacher features `y` {tuple(y.shape)} and student features "
                f"{tuple(y_pred.shape)} must both be [batch, features]."
            )
        batch_size = ops.shape(y_pred)[0]

        elbo = ops.zeros((), dtype="float32")
        for loss in self.losses:  # the student's add_loss terms (and any regularizers)
            elbo = elbo + ops.cast(self._aggregate_additional_loss(loss), "float32")
        constraint = ops.cast(
            self.constraint(ops.stop_gradient(ops.cast(y, "float32")), y_pred), "float32"
        )
        multiplier = ops.cast(ops.convert_to_tensor(self.multiplier), "float32")
        total = elbo + multiplier * constraint

        constraint_value = unscale_loss_for_distribution(constraint)
        self.last_constraint.assign(ops.stop_gradient(constraint_value))
        self.elbo_tracker.update_state(
            unscale_loss_for_distribution(elbo), sample_weight=batch_size
        )
        self.constraint_tracker.update_state(constraint_value, sample_weight=batch_size)
        self.multiplier_tracker.update_state(multiplier, sample_weight=batch_size)
        return total

    # ------------------------------------------------------------------ compile and fit

    def fit(self, x=None, y=None, batch_size=None, callbacks=None, **kwargs):
        """`keras.Model.fit(x, teacher_features, ...)` after checks that run before any step.

        Arrays must be non-empty and finite, `x` and `y` must have the same number of rows,
        `student.check_inputs(x)` runs if the student has it (e.g. `TopicModel` checks counts),
        and on several replicas `batch_size` must split evenly. An unbuilt model is built on
        `x[:1]` first (NumPy `x`), as `keras.callbacks.BackupAndRestore` requires.

        A `kdtfp.callbacks.NaNGuard()` comes first among the callbacks unless one is there or
        `nan_guard=False` (see `SafeCompile`): a NaN/Inf ELBO, constraint or weight stops it.
        """
        check_arrays(x, "x")
        check_arrays(y, "y")
        student_check = getattr(self.student, "check_inputs", None)
        if callable(student_check):
            student_check(x)  # e.g. TopicModel: non-negative integer counts of the vocabulary
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and len(x) != len(y):
            raise ValueError(
                f"`x` has {len(x)} rows but `y` (teacher features) has {len(y)}: one feature "
                "row per example is needed."
            )
        replicas = self.distribute_strategy.num_replicas_in_sync
        if batch_size is not None and replicas > 1 and batch_size % replicas:
            raise ValueError(
                f"`batch_size`={batch_size} does not split evenly over {replicas} replicas; "
                f"use a multiple of {replicas}."
            )
        if not self.built and isinstance(x, np.ndarray) and len(x):
            # Built before `fit` so that `BackupAndRestore` can load weights into it.
            with self.distribute_strategy.scope():
                self(x[:1], training=False)
        if self.mode == "lagrangian":
            from kdtfp.callbacks.dual_ascent import DualAscent

            if not any(isinstance(c, DualAscent) for c in callbacks or []):
                warnings.warn(
                    "mode='lagrangian' without a kdtfp.callbacks.DualAscent callback: the "
                    "multiplier stays fixed (a penalty).",
                    stacklevel=2,
                )
        return super().fit(x, y, batch_size=batch_size, callbacks=callbacks, **kwargs)

    # ------------------------------------------------------------------ serialisation

    def get_config(self):
        feature_fn = self.feature_fn
        if feature_fn is not None and not isinstance(feature_fn, str):
            feature_fn = keras.saving.serialize_keras_object(feature_fn)
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "constraint": keras.saving.serialize_keras_object(self.constraint),
            "multiplier": self.multiplier_value(),
            "mode": self.mode,
            "epsilon": self.epsilon,
            "feature_fn": feature_fn,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["constraint"] = keras.saving.deserialize_keras_object(config["constraint"])
        if isinstance(config.get("feature_fn"), dict):
            config["feature_fn"] = keras.saving.deserialize_keras_object(config["feature_fn"])
        return cls(**config)
