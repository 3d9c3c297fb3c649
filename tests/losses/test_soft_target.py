"""`kdtfp.losses.SoftTargetKL` against a float64 NumPy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.losses import SoftTargetKL

TEMPERATURES = [0.5, 1.0, 4.0, 20.0]
SHAPES = [(1, 2), (8, 10), (32, 100)]


def log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_kl(teacher_logits, student_logits, temperature):
    """Per-example T^2 * KL(softmax(t/T) || softmax(s/T)) in float64."""
    log_p = log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
    log_q = log_softmax(np.asarray(student_logits, np.float64) / temperature)
    return temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def random_logits(shape, scale, seed):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype("float32")


def extreme_logits(shape, seed):
    """Logits of magnitude exactly 1e4 with random signs."""
    rng = np.random.default_rng(seed)
    return (1e4 * rng.choice([-1.0, 1.0], size=shape)).astype("float32")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_target_kl_matches_numpy_per_example_and_mean(temperature, shape):
    teacher = random_logits(shape, 3.0, seed=1)
    student = random_logits(shape, 3.0, seed=2)
    expected = reference_kl(teacher, student, temperature)

    per_example = SoftTargetKL(temperature, reduction=None)(teacher, student)
    np.testing.assert_allclose(np.asarray(per_example), expected, rtol=1e-4, atol=1e-5)
    mean = SoftTargetKL(temperature)(teacher, student)
    np.testing.assert_allclose(float(mean), expected.mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_target_kl_matches_numpy_at_extreme_logits(temperature):
    teacher = extreme_logits((16, 10), seed=3)
    student = extreme_logits((16, 10), seed=4)
    value = np.asarray(SoftTargetKL(temperature, reduction=None)(teacher, student))
    expected = reference_kl(teacher, student, temperature)
    assert np.all(np.isfinite(value)), value
    assert np.all(expected > 0.0)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_target_kl_gradient_is_finite_and_equals_closed_form_at_extreme_logits(temperature):
    # d/ds [T^2 KL(p || softmax(s/T))] = T * (softmax(s/T) - p), divided by the batch size.
    teacher = extreme_logits((8, 10), seed=5)
    student = tf.Variable(extreme_logits((8, 10), seed=6))
    with tf.GradientTape() as tape:
        value = SoftTargetKL(temperature)(teacher, student)
    gradient = tape.gradient(value, student).numpy()
    assert np.all(np.isfinite(gradient))
    p = np.exp(log_softmax(teacher / temperature))
    q = np.exp(log_softmax(student.numpy() / temperature))
    expected = temperature * (q - p) / len(teacher)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-6)


def test_soft_target_kl_is_scaled_by_temperature_squared():
    teacher = random_logits((16, 10), 2.0, seed=7)
    student = random_logits((16, 10), 2.0, seed=8)
    for temperature in TEMPERATURES:
        loss = np.asarray(SoftTargetKL(temperature, reduction=None)(teacher, student))
        log_p = log_softmax(teacher / temperature)
        log_q = log_softmax(student / temperature)
        unscaled_kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
        np.testing.assert_allclose(loss, temperature**2 * unscaled_kl, rtol=1e-4, atol=1e-6)


def test_soft_target_kl_tends_to_half_squared_centered_logit_gap_at_high_temperature():
    # Hinton et al. (2015): with T^2 scaling the loss tends to ||centered(s) - centered(t)||^2 / (2C)
    # as T grows, i.e. the gradient scale does not vanish with the temperature.
    classes = 10
    teacher = random_logits((4, classes), 1.0, seed=9)
    student = random_logits((4, classes), 1.0, seed=10)
    centered_gap = (student - student.mean(-1, keepdims=True)) - (
        teacher - teacher.mean(-1, keepdims=True)
    )
    limit = 0.5 * np.sum(centered_gap.astype(np.float64) ** 2, axis=-1) / classes
    value = np.asarray(SoftTargetKL(50.0, reduction=None)(teacher, student))
    # The O(1/T) correction is ~1% at T = 50 (float32 round-off grows beyond T ~ 100).
    np.testing.assert_allclose(value, limit, rtol=2e-2)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_target_kl_is_zero_when_student_equals_teacher(temperature):
    for logits in (random_logits((8, 10), 5.0, seed=11), extreme_logits((8, 10), seed=12)):
        value = np.asarray(SoftTargetKL(temperature, reduction=None)(logits, logits))
        np.testing.assert_allclose(value, 0.0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_soft_target_kl_rejects_non_positive_or_nan_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SoftTargetKL(temperature)


def test_soft_target_kl_rejects_infinite_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SoftTargetKL(float("inf"))


def test_soft_target_kl_get_config_from_config_round_trip():
    loss = SoftTargetKL(temperature=3.5, reduction="sum", name="kd")
    config = loss.get_config()
    assert config["temperature"] == 3.5
    clone = SoftTargetKL.from_config(config)
    assert isinstance(clone, SoftTargetKL)
    assert clone.get_config() == config
    teacher, student = random_logits((4, 5), 2.0, 13), random_logits((4, 5), 2.0, 14)
    np.testing.assert_allclose(
        float(clone(teacher, student)), float(loss(teacher, student)), rtol=1e-6
    )


def test_soft_target_kl_keras_serialize_deserialize_round_trip():
    loss = SoftTargetKL(temperature=2.0)
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == "kdtfp>SoftTargetKL"
    clone = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(clone, SoftTargetKL)
    assert clone.get_config() == loss.get_config()


def test_soft_target_kl_config_reports_float_when_temperature_is_a_variable():
    # The Distiller replaces the temperature by a Keras variable (for TemperatureSchedule).
    loss = SoftTargetKL(temperature=2.0)
    loss.temperature = keras.Variable(3.0, trainable=False)
    config = loss.get_config()
    assert isinstance(config["temperature"], float) and config["temperature"] == 3.0
    teacher, student = random_logits((4, 5), 2.0, 15), random_logits((4, 5), 2.0, 16)
    expected = reference_kl(teacher, student, 3.0).mean()
    np.testing.assert_allclose(float(loss(teacher, student)), expected, rtol=1e-5)
