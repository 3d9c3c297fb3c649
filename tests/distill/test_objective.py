"""`kdtfp.distill.objective`: DistillationObjective, FeatureDistillation, weights, coercions."""

from __future__ import annotations

import keras
import pytest

from kdtfp.distill import DistillationObjective, FeatureDistillation
from kdtfp.distill.objective import as_loss, as_objective, check_weight
from kdtfp.losses import DerivativeMatching, SoftTargetKL


def test_objective_defaults_to_the_loss_name_and_weight_one():
    objective = DistillationObjective(SoftTargetKL(2.0))
    assert objective.name == "soft_target_kl"
    assert objective.weight == 1.0
    assert not objective.uses_features and not objective.uses_input_gradients
    assert DistillationObjective(DerivativeMatching()).uses_input_gradients


def test_feature_distillation_is_named_after_the_student_layer():
    objective = FeatureDistillation(
        "t_hidden", "s_hidden", loss=keras.losses.MeanSquaredError(), projection=True
    )
    assert objective.name == "features_s_hidden"
    assert objective.uses_features and objective.projection
    assert (objective.teacher_layer, objective.student_layer) == ("t_hidden", "s_hidden")


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "heavy", None])
def test_check_weight_rejects_negative_nan_inf_and_non_numbers(value):
    with pytest.raises(ValueError, match="`weight`"):
        check_weight(value)


@pytest.mark.parametrize("value, expected", [(0, 0.0), (2, 2.0), ("0.5", 0.5), (1e3, 1000.0)])
def test_check_weight_accepts_finite_non_negative_numbers(value, expected):
    assert check_weight(value) == expected


def test_feature_distillation_needs_both_layer_names():
    with pytest.raises(ValueError, match="both `teacher_layer` and `student_layer`"):
        DistillationObjective(keras.losses.MeanSquaredError(), teacher_layer="hidden")


def test_projection_without_layer_names_raises():
    with pytest.raises(ValueError, match="`projection=True`"):
        DistillationObjective(keras.losses.MeanSquaredError(), projection=True)


def test_as_objective_accepts_objectives_pairs_and_bare_losses():
    objective = DistillationObjective(SoftTargetKL(), 0.3)
    assert as_objective(objective) is objective
    pair = as_objective((SoftTargetKL(), 0.7))
    assert isinstance(pair, DistillationObjective) and pair.weight == 0.7
    bare = as_objective(SoftTargetKL())
    assert bare.weight == 1.0
    with pytest.raises(ValueError, match="\\(loss, weight\\)"):
        as_objective((SoftTargetKL(), 1.0, "extra"))


def test_as_loss_returns_loss_objects_unchanged_and_rejects_non_losses():
    loss = SoftTargetKL()
    assert as_loss(loss) is loss
    with pytest.raises(ValueError, match="`loss`"):
        as_loss(3.0)


def test_as_loss_returns_a_loss_object_for_a_class_name():
    assert isinstance(as_loss("MeanSquaredError"), keras.losses.MeanSquaredError)


@pytest.mark.parametrize(
    "loss",
    ["mean_squared_error", "mse", keras.losses.mean_absolute_error],
    ids=["name", "alias", "function"],
)
def test_as_loss_wraps_loss_names_and_functions_in_a_loss_object(loss):
    # Keras divides a replica's loss by the replica count only inside Loss.__call__ (rule 5).
    wrapped = as_loss(loss)
    assert isinstance(wrapped, keras.losses.Loss)
    assert float(wrapped([[0.0, 0.0]], [[1.0, 1.0]])) == pytest.approx(1.0)


def test_objective_config_round_trip_through_keras_serialization():
    objective = DistillationObjective(SoftTargetKL(3.0), weight=0.25, name="kd")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(objective))
    assert type(restored) is DistillationObjective
    assert restored.get_config() == objective.get_config()
    assert restored.loss.temperature == 3.0

    feature = FeatureDistillation(
        "t_hidden", "s_hidden", loss=keras.losses.MeanSquaredError(), weight=0.1, projection=True
    )
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(feature))
    assert type(restored) is FeatureDistillation
    assert restored.get_config() == feature.get_config()
