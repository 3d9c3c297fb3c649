"""The models that `kdtfp bench distiller` compares (the variants are described in its docstring).

Every variant is built around a fresh copy of one reference student, so all start from the
same weights, and is compiled with the same optimizer and `steps_per_execution`.
"""

from __future__ import annotations

import keras
from keras import ops

from kdtfp.distill import Distiller
from kdtfp.losses import DerivativeMatching, SoftTargetKL
from kdtfp.teachers import mlp


class HandwrittenKD(keras.Model):
    """The baseline: what a Keras user writes by hand for soft-target KD (no framework)."""

    def __init__(self, student, teacher, temperature, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self.student(x, training=training)
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        t = self.temperature
        teacher_log_probs = ops.log_softmax(teacher_logits / t, axis=-1)
        student_log_probs = ops.log_softmax(y_pred / t, axis=-1)
        kl = ops.sum(ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
        return ops.mean(kl) * (t * t)


def make_student(settings, source=None, name="student"):
    """The benchmark's student; a copy of `source`'s weights when it is given."""
    student = mlp(
        settings.input_dim,
        settings.student_hidden,
        settings.num_classes,
        name=name,
        seed=settings.seed + 100,
    )
    if source is not None:
        student.set_weights(source.get_weights())
    return student


def _compile(model, settings, jit_compile=False, **kwargs):
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        steps_per_execution=settings.steps_per_execution,
        jit_compile=jit_compile,
        **kwargs,
    )
    return model


def make_variant(kind, settings, teacher, reference_student, jit_compile=False):
    """Builds and compiles one variant around a fresh copy of the reference student."""
    student = make_student(settings, reference_student, name=f"student_{kind}")
    soft = SoftTargetKL(settings.temperature)
    if kind in ("kdtfp", "kdtfp_cached", "kdtfp_jit"):
        model = Distiller(student, teacher, [(soft, 1.0)], name=f"distiller_{kind}")
        return _compile(model, settings, jit_compile=jit_compile)
    if kind == "kdtfp_dm":
        dm = DerivativeMatching(mode="projection", num_projections=1)
        model = Distiller(
            student, teacher, [(soft, 1.0), (dm, 1.0)], seed=settings.seed, name=f"distiller_{kind}"
        )
        return _compile(model, settings, jit_compile=jit_compile)
    if kind == "handwritten":
        return _compile(
            HandwrittenKD(student, teacher, settings.temperature, name="handwritten"),
            settings,
            jit_compile,
        )
    if kind == "keras_distiller":
        model = keras.distillation.Distiller(
            teacher=teacher,
            student=student,
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=settings.temperature, loss=keras.losses.KLDivergence()
            ),
            student_loss_weight=0.0,  # pure soft targets, like the other variants (y is not given)
            name="keras_distiller",
        )
        # `loss` is mandatory in its compile; with student_loss_weight=0 it is never evaluated.
        return _compile(
            model,
            settings,
            jit_compile,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    raise ValueError(f"Unknown variant {kind!r}.")


def loss_on_batch(model, inputs, x):
    """The variant's training loss on one batch, before any step (same weights everywhere)."""
    y_pred = model.student(x, training=False)
    return float(
        ops.convert_to_numpy(model.compute_loss(x=inputs, y=None, y_pred=y_pred, training=False))
    )
