"""What a distillation term compares: a Keras loss, its weight, and which outputs it reads."""

from __future__ import annotations

import keras
from keras.src.losses.losses import LossFunctionWrapper  # not exported by keras.losses in 3.15


def as_loss(loss) -> keras.losses.Loss:
    """Returns `loss` as a `keras.losses.Loss` object.

    Strings and plain functions are wrapped in `LossFunctionWrapper`, because Keras divides a
    replica's loss by the number of replicas only inside `Loss.__call__` (DESIGN.md rule 5):
    a bare function would be over-weighted x replicas under `tf.distribute`.
    """
    if isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str):
        function = keras.losses.get(loss)
        if isinstance(function, keras.losses.Loss):
            return function
        return LossFunctionWrapper(function, name=loss)
    if callable(loss):
        return LossFunctionWrapper(loss, name=getattr(loss, "__name__", "loss"))
    raise ValueError(
        f"`loss` must be a keras.losses.Loss, a loss name or a function, got {loss!r}."
    )


def check_weight(weight, argument="weight") -> float:
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"`{argument}` must be a non-negative number, got {weight!r}.") from None
    if not weight >= 0.0 or weight == float("inf"):
        raise ValueError(f"`{argument}` must be a finite number >= 0, got {weight}.")
    return weight


@keras.saving.register_keras_serializable(package="kdtfp")
class DistillationObjective:
    """One weighted distillation term of a `kdtfp.Distiller`.

    By default the loss compares the teacher's and the student's final outputs,
    `loss(y_true=teacher_outputs, y_pred=student_outputs)`. With `teacher_layer` and
    `student_layer` it compares the outputs of those named layers instead (feature distillation,
    see `FeatureDistillation`). A loss with `uses_input_gradients = True` (such as
    `kdtfp.losses.DerivativeMatching`) compares input-gradients of log-probabilities.

    Args:
        loss: a `keras.losses.Loss`, a Keras loss name or a function `(y_true, y_pred) -> [batch]`.
        weight: non-negative multiplier of the term in the total loss.
        name: metric name under which the (unweighted) term is reported; defaults to the loss name.
        teacher_layer, student_layer: layer names for feature distillation.
        projection: learn a linear map from the student's features to the teacher's width.

    Example:

    >>> objective = kdtfp.DistillationObjective(kdtfp.losses.SoftTargetKL(4.0), weight=0.9)
    """

    def __init__(
        self, loss, weight=1.0, name=None, teacher_layer=None, student_layer=None, projection=False
    ):
        self.loss = as_loss(loss)
        self.weight = check_weight(weight)
        self.name = name or self.loss.name
        if (teacher_layer is None) != (student_layer is None):
            raise ValueError(
                "Feature distillation needs both `teacher_layer` and `student_layer`, got "
                f"teacher_layer={teacher_layer!r}, student_layer={student_layer!r}."
            )
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        self.projection = bool(projection)
        if self.projection and teacher_layer is None:
            raise ValueError(
                "`projection=True` only applies to feature distillation (set the layer names)."
            )

    @property
    def uses_features(self) -> bool:
        return self.teacher_layer is not None

    @property
    def uses_input_gradients(self) -> bool:
        return bool(getattr(self.loss, "uses_input_gradients", False))

    def get_config(self):
        return {
            "loss": keras.saving.serialize_keras_object(self.loss),
            "weight": self.weight,
            "name": self.name,
            "teacher_layer": self.teacher_layer,
            "student_layer": self.student_layer,
            "projection": self.projection,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(loss={self.loss.name}, weight={self.weight}, name={self.name!r})"


@keras.saving.register_keras_serializable(package="kdtfp")
class FeatureDistillation(DistillationObjective):
    """Matches an intermediate layer of the student to one of the teacher, by layer name.

    The student's and teacher's models must be functional or sequential (their layers' symbolic
    outputs are needed). With `projection=True` a learned `Dense` maps the student's feature
    width to the teacher's (FitNets-style hint); it is trained with the student but is not
    part of the exported student.

    Example:

    >>> FeatureDistillation("teacher_hidden", "student_hidden", loss="mean_squared_error",
    ...                     weight=0.1, projection=True)
    """

    def __init__(
        self,
        teacher_layer,
        student_layer,
        loss="mean_squared_error",
        weight=1.0,
        name=None,
        projection=False,
    ):
        super().__init__(
            loss,
            weight=weight,
            name=name or f"features_{student_layer}",
            teacher_layer=teacher_layer,
            student_layer=student_layer,
            projection=projection,
        )


def as_objective(item) -> DistillationObjective:
    """Accepts a `DistillationObjective`, a `(loss, weight)` pair or a bare loss (weight 1)."""
    if isinstance(item, DistillationObjective):
        return item
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"An objective given as a tuple must be (loss, weight), got {item!r}.")
        return DistillationObjective(item[0], weight=item[1])
    return DistillationObjective(item)
