"""`kdtfp.callbacks.schedules`: argument checks (training behaviour is in tests/distill)."""

from __future__ import annotations

import keras
import pytest

from kdtfp.callbacks import LossWeightSchedule, TemperatureSchedule
from kdtfp.distill import Distiller
from kdtfp.losses import DerivativeMatching, SoftTargetKL
from kdtfp.teachers import mlp


@pytest.fixture
def distiller():
    return Distiller(
        mlp(8, (8,), 4, name="student", seed=2),
        mlp(8, (16,), 4, name="teacher", seed=1),
        [(SoftTargetKL(2.0), 1.0), (DerivativeMatching(), 0.5)],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def attached(callback, model):
    callback.set_model(model)
    return callback


@pytest.mark.parametrize("schedule_class", [LossWeightSchedule, TemperatureSchedule])
def test_schedule_must_be_callable(schedule_class):
    with pytest.raises(ValueError, match="`schedule`"):
        schedule_class("soft_target_kl", 2.0)


def test_loss_weight_schedule_sets_the_term_weight_and_logs_it(distiller):
    callback = attached(
        LossWeightSchedule("derivative_matching", lambda epoch: 0.1 * (epoch + 1)), distiller
    )
    callback.on_epoch_begin(2)
    assert distiller.term_weight("derivative_matching") == pytest.approx(0.3)
    assert distiller.term_weight("soft_target_kl") == 1.0
    logs = {}
    callback.on_epoch_end(2, logs)
    assert logs["derivative_matching_weight"] == pytest.approx(0.3)


def test_loss_weight_schedule_drives_the_student_loss(distiller):
    attached(LossWeightSchedule("student_loss", lambda epoch: 4.0), distiller).on_epoch_begin(0)
    assert distiller.term_weight("student_loss") == 4.0


def test_temperature_schedule_sets_the_temperature_variable_and_logs_it(distiller):
    callback = attached(
        TemperatureSchedule("soft_target_kl", lambda epoch: 8.0 / (epoch + 1)), distiller
    )
    callback.on_epoch_begin(1)
    assert float(distiller.temperature_variable("soft_target_kl").numpy()) == 4.0
    logs = {}
    callback.on_epoch_end(1, logs)
    assert logs["soft_target_kl_temperature"] == 4.0


def test_unknown_term_raises(distiller):
    with pytest.raises(ValueError, match="No term named 'nope'"):
        attached(LossWeightSchedule("nope", lambda epoch: 1.0), distiller).on_epoch_begin(0)
    with pytest.raises(ValueError, match="No objective named 'nope'"):
        attached(TemperatureSchedule("nope", lambda epoch: 1.0), distiller).on_epoch_begin(0)


def test_temperature_schedule_on_an_objective_without_temperature_raises(distiller):
    with pytest.raises(ValueError, match="has no temperature"):
        attached(
            TemperatureSchedule("derivative_matching", lambda epoch: 2.0), distiller
        ).on_epoch_begin(0)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_temperature_schedule_rejects_non_positive_values(distiller, value):
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        attached(
            TemperatureSchedule("soft_target_kl", lambda epoch: value), distiller
        ).on_epoch_begin(0)
    assert float(distiller.temperature_variable("soft_target_kl").numpy()) == 2.0


def test_loss_weight_schedule_rejects_negative_values(distiller):
    with pytest.raises(ValueError, match="weight of 'soft_target_kl'"):
        attached(
            LossWeightSchedule("soft_target_kl", lambda epoch: -0.5), distiller
        ).on_epoch_begin(0)
    assert distiller.term_weight("soft_target_kl") == 1.0


@pytest.mark.parametrize("schedule_class", [LossWeightSchedule, TemperatureSchedule])
def test_schedules_only_drive_a_distiller(schedule_class):
    model = mlp(8, (8,), 4, name="plain", seed=0)
    with pytest.raises(ValueError, match="kdtfp.Distiller"):
        attached(schedule_class("soft_target_kl", lambda epoch: 1.0), model).on_epoch_begin(0)
