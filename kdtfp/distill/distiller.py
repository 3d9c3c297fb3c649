"""`Distiller`: a `keras.Model` that trains a student to match a frozen teacher."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.distill.checks import (
    check_arrays,
    check_same_shape,
    feature_extractor,
    has_symbolic_output,
    static_input_shape,
    static_output_shape,
)
from kdtfp.distill.objective import DistillationObjective, as_loss, as_objective, check_weight
from kdtfp.distill.safe_compile import SafeCompile
from kdtfp.seed_state import SavesSeedState

#: Keys of an input dict that carries precomputed teacher outputs (see `teacher_cached_dataset`).
INPUTS = "inputs"
TEACHER_OUTPUTS = "teacher_outputs"
STUDENT_LOSS = "student_loss"


def unscale_loss_for_distribution(value):
    """Undoes Keras's per-replica division of a Loss value, for metrics that read the same on
    N replicas as on one (`keras.src.losses.loss.unscale_loss_for_distribution`, kept local
    because it is private)."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value * ops.cast(replicas, value.dtype) if replicas > 1 else value


def split_inputs(inputs):
    """Returns `(x, cached_teacher_outputs_or_None)` for plain or teacher-cached inputs."""
    if isinstance(inputs, dict) and TEACHER_OUTPUTS in inputs:
        return inputs[INPUTS], inputs[TEACHER_OUTPUTS]
    return inputs, None


@keras.saving.register_keras_serializable(package="kdtfp")
class Distiller(SavesSeedState, SafeCompile, keras.Model):
    """Trains `student` to reproduce a frozen `teacher`, with `fit` and any distribution strategy.

    The loss is

    ```
    total = student_loss_weight * student_loss(y, student(x))          # if y and student_loss given
          + sum_k weight_k * objective_k(teacher, student, x)
          + student regularisation losses
    ```

    Every term is a `keras.losses.Loss` (strings and functions are wrapped into one), so Keras
    scales it correctly per replica under `tf.distribute`. Each term is reported, unweighted, as
    its own metric (`history.history["soft_target_kl"]`, ...), and reads the same on N replicas
    as on one. The teacher is called with `training=False`, is never updated, and is not part of
    `export_student`'s SavedModel. `predict` and `call` return the student's outputs.

    Inputs may be plain `x` or a dict `{"inputs": x, "teacher_outputs": t}` made by
    `kdtfp.distill.teacher_cached_dataset`: then the teacher is not run for output objectives.

    Term weights and loss temperatures live in non-trainable variables of this model, so
    `kdtfp.callbacks.LossWeightSchedule` / `TemperatureSchedule` can change them during `fit`
    and their current values are saved with the model.

    Args:
        student: a Keras model (functional, sequential or subclassed) mapping x to logits.
        teacher: a Keras model with the same input and output shapes. Frozen here.
        objectives: list of `DistillationObjective`s, `(loss, weight)` pairs or bare losses.
        student_loss: optional loss on the labels, e.g.
            `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.
        student_loss_weight: non-negative weight of `student_loss` (any value, not only [0, 1]).
        seed: seed of the random directions of projected derivative matching.

    Example:

    >>> distiller = kdtfp.Distiller(
    ...     student, teacher,
    ...     objectives=[(kdtfp.losses.SoftTargetKL(temperature=2.0), 1.0)],
    ...     student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     student_loss_weight=0.1)
    >>> distiller.compile(optimizer="adam")
    >>> distiller.fit(x, y, epochs=5)
    >>> kdtfp.export.export_student(distiller, "export/1")
    """

    def __init__(
        self,
        student,
        teacher,
        objectives,
        student_loss=None,
        student_loss_weight=1.0,
        seed=None,
        name="distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if not isinstance(student, keras.Model):
            raise ValueError(f"`student` must be a keras.Model, got {type(student).__name__}.")
        if not isinstance(teacher, keras.Model):
            raise ValueError(f"`teacher` must be a keras.Model, got {type(teacher).__name__}.")
        if student is teacher:
            raise ValueError(
                "`student` and `teacher` are the same model: the student must be a separate model."
            )
        teacher_variables = {id(v) for v in teacher.weights}
        if any(id(v) in teacher_variables for v in student.weights):
            raise ValueError(
                "`student` shares weights with `teacher`: freezing the teacher would freeze them "
                "too. Build the student from its own layers."
            )
        if objectives is None:
            objectives = []
        single_pair = (
            isinstance(objectives, (list, tuple))
            and len(objectives) == 2
            and isinstance(objectives[1], (int, float))
        )
        if not isinstance(objectives, (list, tuple)) or single_pair:
            objectives = [objectives]
        objectives = [as_objective(item) for item in objectives]
        if not objectives and student_loss is None:
            raise ValueError(
                "`objectives` is empty and there is no `student_loss`: there is nothing to train."
            )
        names = [objective.name for objective in objectives]
        if len(set(names)) != len(names) or {STUDENT_LOSS, "loss"} & set(names):
            raise ValueError(
                f"Objective names must be unique and not 'loss' or {STUDENT_LOSS!r}, got {names}: "
                "pass `name=` to DistillationObjective to tell them apart."
            )

        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.objectives = [self._with_temperature_variable(objective) for objective in objectives]
        self.student_loss = as_loss(student_loss) if student_loss is not None else None
        self.student_loss_weight = check_weight(student_loss_weight, "student_loss_weight")
        self.seed = seed
        self.term_names = names + [STUDENT_LOSS]
        self.term_weights = self.add_weight(
            name="term_weights",
            shape=(len(self.term_names),),
            initializer=keras.initializers.Constant(
                [o.weight for o in self.objectives] + [self.student_loss_weight]
            ),
            trainable=False,
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._check_output_shapes()
        self._build_feature_extractors()
        # One metric per active term (no `student_loss` metric without a student loss).
        self.term_trackers = [keras.metrics.Mean(name=o.name) for o in self.objectives]
        if self.student_loss is not None:
            self.term_trackers.append(keras.metrics.Mean(name=STUDENT_LOSS))

    # ------------------------------------------------------------------ construction helpers

    def _with_temperature_variable(self, objective):
        """Puts a tempered loss's temperature into a variable of this model (for schedules)."""
        if not hasattr(objective.loss, "temperature"):
            return objective
        # A copy, so that the caller's loss object is not mutated.
        objective = DistillationObjective.from_config(objective.get_config())
        objective.loss.temperature = self.add_weight(
            name=f"{objective.name}_temperature",
            shape=(),
            initializer=keras.initializers.Constant(objective.loss.temperature),
            trainable=False,
        )
        return objective

    def _check_output_shapes(self):
        student_shape = static_output_shape(self.student)
        teacher_shape = static_output_shape(self.teacher)
        if student_shape is not None and teacher_shape is not None:
            check_same_shape(teacher_shape, student_shape)
        student_input = static_input_shape(self.student)
        teacher_input = static_input_shape(self.teacher)
        if (
            student_input is not None
            and teacher_input is not None
            and student_input[1:] != teacher_input[1:]
        ):
            raise ValueError(
                f"`teacher` and `student` take inputs of different shapes: teacher {teacher_input}, "
                f"student {student_input}. They must read the same x."
            )

    def _build_feature_extractors(self):
        feature_objectives = [o for o in self.objectives if o.uses_features]
        self.teacher_features = None
        self.student_features = None
        self.projections = []
        self._projection_index = {}
        if not feature_objectives:
            return
        self.teacher_features = feature_extractor(
            self.teacher, [o.teacher_layer for o in feature_objectives], "teacher"
        )
        self.student_features = feature_extractor(
            self.student, [o.student_layer for o in feature_objectives], "student"
        )
        for objective in feature_objectives:
            width = self.teacher.get_layer(objective.teacher_layer).output.shape[-1]
            student_width = self.student.get_layer(objective.student_layer).output.shape[-1]
            if width != student_width and not objective.projection:
                raise ValueError(
                    f"`teacher_layer`={objective.teacher_layer!r} has width {width} but "
                    f"`student_layer`={objective.student_layer!r} has {student_width}: pass "
                    "`projection=True` to learn a map between them."
                )
            if objective.projection:
                self._projection_index[objective.name] = len(self.projections)
                projection = keras.layers.Dense(
                    width, use_bias=False, name=f"{objective.name}_projection"
                )
                # Built now, not at the first step, so a loaded model restores its kernel.
                projection.build(self.student.get_layer(objective.student_layer).output.shape)
                self.projections.append(projection)

    # ------------------------------------------------------------------ weights of the terms

    def term_weight(self, name):
        """Current weight of the term `name` (an objective's name or "student_loss")."""
        return float(ops.convert_to_numpy(self.term_weights[self._term_index(name)]))

    def set_term_weight(self, name, value):
        """Sets the weight of term `name`; used by `LossWeightSchedule`."""
        value = check_weight(value, f"weight of {name!r}")
        index = self._term_index(name)
        weights = np.array(ops.convert_to_numpy(self.term_weights))
        weights[index] = value
        self.term_weights.assign(weights)

    def temperature_variable(self, name):
        """The temperature variable of objective `name` (for `TemperatureSchedule`)."""
        for objective in self.objectives:
            if objective.name == name:
                if not hasattr(objective.loss, "temperature"):
                    raise ValueError(f"Objective {name!r} has no temperature.")
                return objective.loss.temperature
        raise ValueError(f"No objective named {name!r}; objectives: {self.term_names[:-1]}.")

    def _term_index(self, name):
        if name not in self.term_names:
            raise ValueError(f"No term named {name!r}; terms: {self.term_names}.")
        return self.term_names.index(name)

    # ------------------------------------------------------------------ forward and loss

    def call(self, inputs, training=None):
        x, _ = split_inputs(inputs)
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        x, teacher_outputs = split_inputs(x)
        if y_pred is None:
            y_pred = self.student(x, training=training)

        needs_outputs = any(
            not o.uses_features and not o.uses_input_gradients for o in self.objectives
        )
        teacher_features = student_features = None
        if self.teacher_features is not None:
            teacher_features = self.teacher_features(x, training=False)
            student_features = self.student_features(x, training=training)
            # Every term reads this one student pass (same dropout mask, one BatchNorm update).
            y_pred = student_features[0]
            if teacher_outputs is None:
                teacher_outputs = teacher_features[0]
        # Derivative terms first: their tape runs the teacher forward on x already, so output
        # objectives reuse those logits instead of running the teacher a second time.
        derivative_values = {}
        for index, objective in enumerate(self.objectives):
            if objective.uses_input_gradients:
                derivative_values[index], tape_teacher_outputs = self._derivative_term(
                    objective, x, sample_weight, training
                )
                if teacher_outputs is None:
                    teacher_outputs = tape_teacher_outputs
        if needs_outputs and teacher_outputs is None:
            teacher_outputs = self.teacher(x, training=False)
        if teacher_outputs is not None:
            teacher_outputs = ops.stop_gradient(teacher_outputs)
            check_same_shape(tuple(teacher_outputs.shape), tuple(y_pred.shape))

        # Terms are averaged over an epoch weighted by batch size, as Keras does for `loss`, so
        # that `loss` equals the weighted sum of the reported terms.
        batch_size = ops.shape(tf.nest.flatten(x)[0])[0]
        total = ops.zeros((), dtype="float32")
        feature_position = 0
        for index, objective in enumerate(self.objectives):
            if objective.uses_input_gradients:
                value = derivative_values[index]
            elif objective.uses_features:
                feature_position += 1
                student_feature = student_features[feature_position]
                if objective.name in self._projection_index:
                    student_feature = self.projections[self._projection_index[objective.name]](
                        student_feature
                    )
                value = objective.loss(
                    ops.stop_gradient(teacher_features[feature_position]),
                    student_feature,
                    sample_weight,
                )
            else:
                value = objective.loss(teacher_outputs, y_pred, sample_weight)
            total = total + ops.cast(self.term_weights[index], "float32") * ops.cast(
                value, "float32"
            )
            self.term_trackers[index].update_state(
                unscale_loss_for_distribution(value), sample_weight=batch_size
            )

        if self.student_loss is not None:
            if y is None:
                raise ValueError(
                    "`student_loss` needs labels: call fit(x, y) or drop `student_loss`."
                )
            value = self.student_loss(y, y_pred, sample_weight)
            total = total + ops.cast(self.term_weights[-1], "float32") * ops.cast(value, "float32")
            self.term_trackers[-1].update_state(
                unscale_loss_for_distribution(value), sample_weight=batch_size
            )

        for loss in self.student.losses:
            total = total + ops.cast(self._aggregate_additional_loss(loss), "float32")
        return total

    def _derivative_term(self, objective, x, sample_weight, training):
        """Returns `(derivative-matching loss, teacher logits on x)`."""
        loss = objective.loss
        x = ops.cast(x, "float32")
        directions = None
        if loss.mode == "projection":
            num_classes = (
                self.student.output.shape[-1] if has_symbolic_output(self.student) else None
            )
            if num_classes is None:
                num_classes = self.student(x[:1], training=False).shape[-1]
            directions = loss.directions(tf.shape(x)[0], num_classes, self.seed_generator.next())

        teacher_logits = []

        def teacher_log_probs(inputs):
            teacher_logits.append(self.teacher(inputs, training=False))
            return ops.log_softmax(ops.cast(teacher_logits[-1], "float32"), axis=-1)

        def student_log_probs(inputs):
            return ops.log_softmax(
                ops.cast(self.student(inputs, training=training), "float32"), axis=-1
            )

        teacher_rows = ops.stop_gradient(loss.input_gradient_rows(teacher_log_probs, x, directions))
        student_rows = loss.input_gradient_rows(student_log_probs, x, directions)
        return loss(teacher_rows, student_rows, sample_weight), teacher_logits[0]

    # ------------------------------------------------------------------ compile and fit

    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.fit`, after checks that fail before any step runs.

        Arrays must be non-empty and finite; a `tf.data.Dataset` must not be empty (its
        values are not scanned). On several replicas `batch_size` must split evenly: Keras
        fails on uneven shards when it builds a model under a strategy.

        A `kdtfp.callbacks.NaNGuard()` comes first among the callbacks unless one is there or
        `nan_guard=False` (see `SafeCompile`).
        """
        check_arrays(x, "x")
        check_arrays(y, "y")
        replicas = self.distribute_strategy.num_replicas_in_sync
        if batch_size is not None and replicas > 1 and batch_size % replicas:
            raise ValueError(
                f"`batch_size`={batch_size} does not split evenly over {replicas} replicas; "
                f"use a multiple of {replicas}."
            )
        return super().fit(x, y, batch_size=batch_size, **kwargs)

    # ------------------------------------------------------------------ serialisation

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "objectives": [keras.saving.serialize_keras_object(o) for o in self.objectives],
            "student_loss": keras.saving.serialize_keras_object(self.student_loss)
            if self.student_loss
            else None,
            "student_loss_weight": self.student_loss_weight,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("student", "teacher", "student_loss"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        config["objectives"] = [
            keras.saving.deserialize_keras_object(o) for o in config["objectives"]
        ]
        return cls(**config)
