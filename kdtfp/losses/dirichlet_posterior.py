"""Teacher-informed Dirichlet posterior of Bayesian knowledge distillation (Fang et al., 2024)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

#: Keys of a dict `y_true` (the packed tensor made by `targets` is the other accepted form).
LABELS = "labels"
TEACHER_LOGITS = "teacher_logits"
TEACHER_PROBS = "teacher_probs"

#: Tolerance of the eager check that teacher probabilities sum to 1.
PROBABILITY_SUM_TOLERANCE = 1e-3


def _check_number(value, argument, allow_zero):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{argument}` must be a number, got {value!r}.") from None
    lower_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (lower_ok and value < float("inf")):  # NaN fails both comparisons
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"TeacherDirichletPosterior: `{argument}` must be a finite number {bound}, got {value}."
        )
    return value


def _is_eager(*tensors):
    return tf.executing_eagerly() and all(
        not isinstance(t, keras.KerasTensor) and hasattr(t, "numpy") for t in tensors
    )


@keras.saving.register_keras_serializable(package="kdtfp")
class TeacherDirichletPosterior(keras.losses.Loss):
    """BKD negative log posterior per example: labels cross-entropy + λ · teacher cross-entropy.

    Model (METHODS.md §4.3). For an example with label `y`, student logits `s` (`[..., K]`) and
    teacher logits `t`, let `q = softmax(s)` be the student's class probabilities and
    `p = softmax(t / T)` the tempered teacher's. Then

    ```
    prior:       q ~ Dirichlet(1 + λ p)          # teacher-informed, on the student's outputs
    likelihood:  y ~ Categorical(q)
    -log posterior = -log q_y - λ * sum_k p_k log q_k + log B(1 + λ p)
    loss           = -log q_y - λ * sum_k p_k log q_k       # one value per example
    ```

    `log B(1 + λ p)` (the Dirichlet normaliser) depends on the teacher only, not on the
    student's weights, so it is dropped: the loss is `-log Dir(q; 1 + λp) - log Cat(y; q)` up to
    a constant in the weights. It is the KD loss `CE(e_y, q) + λ CE(p, q)`, so the MAP student
    is the KD student; for a free `q` the minimiser is `q* = (e_y + λ p) / (1 + λ)`.
    Minimising the mean over a batch and sampling with SGLD (data-set size N) uses
    `U = N * mean(loss)`, the summed negative log posterior.

    With `temper_student=True` the prior term uses the tempered student `q_T = softmax(s / T)`
    (the Dirichlet prior is on `q_T`; the label term keeps the untempered `q`), as in the
    authors' code. Then `(1 - α) CE(e_y, q) + α T² KL(p || q_T)` — Hinton's KD, e.g.
    `SparseCategoricalCrossentropy` and `SoftTargetKL(T)` with weights `1 - α` and `α` — has the
    gradient of `(1 - α) * TeacherDirichletPosterior(λ = α T² / (1 - α), T, temper_student=True)`.

    Everything is computed in float32 (also under mixed precision) with `log_softmax`, so logits
    of any magnitude (1e4 included) give finite values and gradients.

    Call signature. A Keras loss sees only `(y_true, y_pred)`, so `y_true` carries both the label
    and the teacher; `y_pred` is the student's logits (probabilities if `from_logits=False`),
    `[..., K]`. `y_true` is either

    * the packed tensor `targets(labels, teacher_logits)`, `[..., 1 + K]` float32: column 0 the
      integer label, columns 1: the teacher's logits. This is the form for `compile(loss=...)`
      + `model.fit(x, TeacherDirichletPosterior.targets(y, teacher_logits))`: Keras's
      `compile` matches a dict `y` against the model's outputs, so a single-output model cannot
      take a dict target there. It also works in a `tf.data` pipeline and as a `Distiller`'s
      `student_loss` (which receives `(y, student(x))`);
    * or a dict `{"labels": [...], "teacher_logits": [..., K]}` (key `"teacher_probs"` with
      `teacher_from_logits=False`), for direct calls and custom `compute_loss`.

    With `compile(loss=TeacherDirichletPosterior(...))` the packed `y` is what compiled metrics
    see too: use accuracy metrics in a custom `compute_metrics`, or evaluate with labels
    separately.

    Checks. `lam` and `temperature` are checked at construction. At call time a class-count
    mismatch between teacher and student (static shapes) raises `ValueError` naming
    `teacher_logits`. When the call runs eagerly (direct calls, `run_eagerly=True`), labels
    outside `[0, K)`, non-finite teacher values and, with `teacher_from_logits=False`, teacher
    probabilities that are negative or do not sum to 1 (tolerance 1e-3) raise `ValueError`
    too; inside a compiled `fit` step those value checks are skipped (check the data with
    `targets`, which always runs eagerly on NumPy inputs).

    Args:
        lam: non-negative float λ, the trust in the teacher (prior concentration scale).
        temperature: positive float T applied to the teacher's logits (and to the student's in
            the prior term with `temper_student=True`). A `Distiller` may replace it by a Keras
            variable; `get_config` then reports its current value.
        from_logits: whether `y_pred` holds logits (default) or probabilities.
        teacher_from_logits: whether the teacher part of `y_true` holds logits (default) or
            probabilities (then `p = softmax(log p_teacher / T)`, i.e. `p_teacher` at T = 1).
        temper_student: use `softmax(s / T)` in the prior term (see above).
        reduction, name, dtype: as for every `keras.losses.Loss`.

    Example:

    >>> loss = kdtfp.losses.TeacherDirichletPosterior(lam=5.0, temperature=2.0)
    >>> student.compile(optimizer="adam", loss=loss)
    >>> student.fit(x, loss.targets(y, teacher.predict(x)), epochs=5)
    >>> loss({"labels": y, "teacher_logits": t}, student(x))
    """

    def __init__(
        self,
        lam=1.0,
        temperature=1.0,
        from_logits=True,
        teacher_from_logits=True,
        temper_student=False,
        reduction="sum_over_batch_size",
        name="teacher_dirichlet_posterior",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.lam = _check_number(lam, "lam", allow_zero=True)
        self.temperature = _check_number(temperature, "temperature", allow_zero=False)
        self.from_logits = bool(from_logits)
        self.teacher_from_logits = bool(teacher_from_logits)
        self.temper_student = bool(temper_student)

    # ------------------------------------------------------------------ targets

    @staticmethod
    def targets(labels, teacher_logits):
        """Packs labels `[...]` and teacher outputs `[..., K]` into `y_true`, `[..., 1 + K]`.

        NumPy (or list) inputs give a float32 NumPy array, checked here: same leading shape,
        integer labels in `[0, K)`, finite teacher values. Tensors give a float32 tensor
        (usable inside `tf.data.Dataset.map`). Labels must be below 2**24 (exact in float32).
        """
        if isinstance(labels, (tf.Tensor, keras.KerasTensor)) or isinstance(
            teacher_logits, (tf.Tensor, keras.KerasTensor)
        ):
            labels = ops.cast(labels, "float32")
            teacher_logits = ops.cast(teacher_logits, "float32")
            if len(labels.shape) == len(teacher_logits.shape):
                labels = ops.squeeze(labels, axis=-1)
            return ops.concatenate([ops.expand_dims(labels, -1), teacher_logits], axis=-1)

        labels = np.asarray(labels)
        teacher_logits = np.asarray(teacher_logits, dtype=np.float32)
        if teacher_logits.ndim < 2:
            raise ValueError(
                f"`teacher_logits` must have shape [batch, ..., classes], got {teacher_logits.shape}."
            )
        if labels.ndim == teacher_logits.ndim and labels.shape[-1] == 1:
            labels = labels[..., 0]
        if labels.shape != teacher_logits.shape[:-1]:
            raise ValueError(
                f"`labels` has shape {labels.shape} but `teacher_logits` has {teacher_logits.shape}:"
                f" labels must have shape {teacher_logits.shape[:-1]}."
            )
        _check_label_values(labels, teacher_logits.shape[-1])
        if not np.all(np.isfinite(teacher_logits)):
            raise ValueError("`teacher_logits` contains NaN/Inf values.")
        packed = np.concatenate([labels[..., None].astype(np.float32), teacher_logits], axis=-1)
        return packed

    def unpack(self, y_true):
        """Returns `(labels, teacher)` from a packed tensor or a dict `y_true`."""
        if isinstance(y_true, dict):
            key = TEACHER_LOGITS if self.teacher_from_logits else TEACHER_PROBS
            if set(y_true) != {LABELS, key}:
                raise ValueError(
                    f"A dict `y_true` must have exactly the keys {LABELS!r} and {key!r} "
                    f"(teacher_from_logits={self.teacher_from_logits}), got {sorted(y_true)}."
                )
            labels, teacher = y_true[LABELS], y_true[key]
            if len(labels.shape) == len(teacher.shape) and labels.shape[-1] == 1:
                labels = ops.squeeze(labels, axis=-1)
            return labels, teacher
        return y_true[..., 0], y_true[..., 1:]

    # ------------------------------------------------------------------ loss

    def call(self, y_true, y_pred):
        teacher_argument = TEACHER_LOGITS if self.teacher_from_logits else TEACHER_PROBS
        labels, teacher = self.unpack(y_true)
        classes, teacher_classes = y_pred.shape[-1], teacher.shape[-1]
        if classes is not None and teacher_classes is not None and classes != teacher_classes:
            packed_hint = "" if isinstance(y_true, dict) else " (packed y_true has 1 + classes)"
            raise ValueError(
                f"`{teacher_argument}` has {teacher_classes} classes but the student's "
                f"predictions have {classes}{packed_hint}: build y_true with "
                "`TeacherDirichletPosterior.targets(labels, teacher_logits)` from a teacher with "
                "the student's classes."
            )
        if _is_eager(labels, teacher, y_pred):
            self._check_eager_values(labels, teacher, classes, teacher_argument)

        y_pred = ops.cast(y_pred, "float32")
        teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
        labels = ops.cast(labels, "int32")
        temperature = ops.cast(self.temperature, "float32")
        lam = ops.cast(self.lam, "float32")

        if self.from_logits:
            student_logits = y_pred
            student_log_probs = ops.log_softmax(y_pred, axis=-1)
        else:
            q = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
            epsilon = keras.backend.epsilon()
            student_log_probs = ops.log(ops.clip(q, epsilon, 1.0 - epsilon))
            student_logits = student_log_probs
        if not self.teacher_from_logits:
            teacher = ops.log(teacher)  # zeros give -inf logits, i.e. zero probabilities
        teacher_probs = ops.exp(ops.log_softmax(teacher / temperature, axis=-1))

        label_nll = -ops.squeeze(
            ops.take_along_axis(student_log_probs, ops.expand_dims(labels, -1), axis=-1), -1
        )
        prior_log_probs = (
            ops.log_softmax(student_logits / temperature, axis=-1)
            if self.temper_student
            else student_log_probs
        )
        teacher_cross_entropy = -ops.sum(teacher_probs * prior_log_probs, axis=-1)
        return label_nll + lam * teacher_cross_entropy

    def _check_eager_values(self, labels, teacher, classes, teacher_argument):
        _check_label_values(np.asarray(labels), classes)
        teacher = np.asarray(teacher, dtype=np.float64)
        if not np.all(np.isfinite(teacher)):
            raise ValueError(f"`{teacher_argument}` contains NaN/Inf values.")
        if not self.teacher_from_logits:
            sums = teacher.sum(axis=-1)
            worst = float(np.max(np.abs(sums - 1.0))) if sums.size else 0.0
            if np.any(teacher < 0.0) or worst > PROBABILITY_SUM_TOLERANCE:
                raise ValueError(
                    f"`{teacher_argument}` must be non-negative and sum to 1 over the classes "
                    f"(tolerance {PROBABILITY_SUM_TOLERANCE}); got a minimum of {teacher.min()} "
                    f"and a sum off by {worst}. Pass logits with `teacher_from_logits=True`."
                )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "lam": float(ops.convert_to_numpy(self.lam)),
                "temperature": float(ops.convert_to_numpy(self.temperature)),
                "from_logits": self.from_logits,
                "teacher_from_logits": self.teacher_from_logits,
                "temper_student": self.temper_student,
            }
        )
        return config


def _check_label_values(labels, classes):
    labels = np.asarray(labels)
    if labels.size == 0 or classes is None:
        return
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
        raise ValueError("`labels` must be integer class indices.")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"`labels` must lie in [0, {classes}) (the number of classes), got values in "
            f"[{labels.min()}, {labels.max()}]."
        )
