"""`kdtfp.Distiller`: training, per-term metrics, frozen teacher, saving, caching, XLA, errors."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import kdtfp
from kdtfp.callbacks import LossWeightSchedule, TemperatureSchedule
from kdtfp.distill import (
    DistillationObjective,
    Distiller,
    FeatureDistillation,
    teacher_cached_dataset,
)
from kdtfp.losses import DerivativeMatching, SoftTargetKL
from kdtfp.teachers import mlp

INPUT_DIM, CLASSES = 64, 10


# ---------------------------------------------------------------------------------------- models


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class SubclassedStudent(keras.Model):
    """A student with its own `call` (no symbolic graph); the Distiller must not rewrite it."""

    def __init__(self, hidden=16, classes=CLASSES, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.classes = classes
        self.hidden_layer = keras.layers.Dense(
            hidden, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=3)
        )
        self.logits_layer = keras.layers.Dense(
            classes, kernel_initializer=keras.initializers.GlorotUniform(seed=4)
        )

    def call(self, x):
        return self.logits_layer(self.hidden_layer(x))

    def get_config(self):
        config = super().get_config()
        config.update(hidden=self.hidden, classes=self.classes)
        return config


def make_teacher(hidden=(32,), seed=1, classes=CLASSES, input_dim=INPUT_DIM):
    return mlp(input_dim, hidden, classes, name="teacher", seed=seed)


def make_student(kind="functional", hidden=16, classes=CLASSES, input_dim=INPUT_DIM):
    if kind == "functional":
        return mlp(input_dim, (hidden,), classes, name="student", seed=2)
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input((input_dim,)),
                keras.layers.Dense(
                    hidden,
                    activation="relu",
                    kernel_initializer=keras.initializers.GlorotUniform(seed=3),
                ),
                keras.layers.Dense(
                    classes, kernel_initializer=keras.initializers.GlorotUniform(seed=4)
                ),
            ],
            name="student",
        )
    if kind == "subclassed":
        return SubclassedStudent(hidden, classes, name="student")
    raise AssertionError(kind)


STUDENT_KINDS = ["functional", "sequential", "subclassed"]


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def assert_weights_close(actual, expected, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=0.0, atol=atol)


def json_normalized(config):
    """A config as it reads after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(config))


def mse():
    return keras.losses.MeanSquaredError()


def max_change(before, after):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(before, after, strict=True))


@pytest.fixture
def transfer(digits):
    """256 digits images with labels, float32."""
    return digits.x_train[:256], digits.y_train[:256]


# ------------------------------------------------------------------------------ NumPy references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_mlp(weights, x):
    """Forward pass of a one-hidden-layer ReLU MLP; returns logits and the Jacobian [B, I, D]."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    pre = x.astype(np.float64) @ w1 + b1
    logits = np.maximum(pre, 0.0) @ w2 + b2
    jacobian = np.einsum("dh,bh,hi->bid", w1, (pre > 0).astype(np.float64), w2)
    return logits, jacobian


def np_log_prob_jacobian(weights, x):
    logits, jacobian = np_mlp(weights, x)
    p = np.exp(np_log_softmax(logits))
    return jacobian - np.einsum("bk,bkd->bd", p, jacobian)[:, None, :]


# ------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", STUDENT_KINDS)
def test_training_decreases_the_loss_for_each_kind_of_student(kind, transfer):
    x, _ = transfer
    student = make_student(kind)
    distiller = Distiller(student, make_teacher(hidden=(32,)), [(SoftTargetKL(2.0), 1.0)])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = distiller.evaluate(x, batch_size=128, verbose=0, return_dict=True)["soft_target_kl"]
    history = distiller.fit(x, batch_size=64, epochs=4, verbose=0)
    after = distiller.evaluate(x, batch_size=128, verbose=0, return_dict=True)["soft_target_kl"]
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert after < 0.5 * before, (before, after)
    # The student object itself was trained, and `predict` returns its outputs.
    np.testing.assert_allclose(
        distiller.predict(x[:8], verbose=0), np.asarray(student(x[:8])), atol=1e-6
    )


def test_each_term_is_logged_and_equals_the_loss_recomputed_by_hand(transfer):
    x, y = transfer[0][:32], transfer[1][:32]
    teacher, student = make_teacher(), make_student()
    temperature, weights = (
        2.0,
        {"soft_target_kl": 1.0, "derivative_matching": 0.5, "student_loss": 0.3},
    )
    distiller = Distiller(
        student,
        teacher,
        [
            (SoftTargetKL(temperature), weights["soft_target_kl"]),
            (DerivativeMatching("exact"), weights["derivative_matching"]),
        ],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        student_loss_weight=weights["student_loss"],
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))
    history = distiller.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history

    teacher_logits, _ = np_mlp(teacher.get_weights(), x)
    student_logits, _ = np_mlp(student.get_weights(), x)
    log_p = np_log_softmax(teacher_logits / temperature)
    log_q = np_log_softmax(student_logits / temperature)
    expected = {
        "soft_target_kl": np.mean(temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q), -1)),
        "derivative_matching": np.mean(
            np.sum(
                (
                    np_log_prob_jacobian(student.get_weights(), x)
                    - np_log_prob_jacobian(teacher.get_weights(), x)
                )
                ** 2,
                axis=(1, 2),
            )
            / (2 * CLASSES * INPUT_DIM)
        ),
        "student_loss": -np.mean(np_log_softmax(student_logits)[np.arange(len(y)), y]),
    }
    assert set(expected) | {"loss"} <= set(history)
    for name, value in expected.items():
        assert len(history[name]) == 1
        np.testing.assert_allclose(history[name][0], value, rtol=1e-4, err_msg=name)
    total = sum(weights[name] * value for name, value in expected.items())
    np.testing.assert_allclose(history["loss"][0], total, rtol=1e-4)


def test_teacher_weights_do_not_change_during_fit(transfer):
    x, y = transfer
    teacher, student = make_teacher(), make_student()
    teacher_before, student_before = weights_of(teacher), weights_of(student)
    distiller = Distiller(
        student,
        teacher,
        [(SoftTargetKL(2.0), 1.0), (DerivativeMatching("projection", num_projections=2), 1.0)],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        seed=0,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(5e-2))
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert_weights_close(weights_of(teacher), teacher_before, atol=0.0)
    assert max_change(student_before, weights_of(student)) > 1e-3
    assert not teacher.trainable
    trainable_ids = {id(v) for v in distiller.trainable_variables}
    assert not any(id(v) in trainable_ids for v in teacher.variables)


# ----------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", STUDENT_KINDS)
def test_keras_file_round_trip_gives_identical_predictions_config_and_training(
    kind, transfer, tmp_path
):
    x, y = transfer
    distiller = Distiller(
        make_student(kind),
        make_teacher(),
        [(SoftTargetKL(2.0), 0.9), (DerivativeMatching("exact"), 0.1)],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        student_loss_weight=0.5,
        seed=3,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)

    assert isinstance(loaded, Distiller)
    assert json_normalized(loaded.get_config()) == json_normalized(distiller.get_config())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), distiller.predict(x, verbose=0))
    np.testing.assert_array_equal(np.asarray(loaded.student(x)), np.asarray(distiller.student(x)))
    np.testing.assert_array_equal(np.asarray(loaded.teacher(x)), np.asarray(distiller.teacher(x)))
    np.testing.assert_array_equal(
        np.asarray(loaded.term_weights), np.asarray(distiller.term_weights)
    )
    assert not loaded.teacher.trainable

    # Optimizer state came back too: one more epoch on both gives the same student.
    distiller.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(weights_of(loaded.student), weights_of(distiller.student), atol=1e-6)


# ----------------------------------------------------------------------------- teacher caching


def test_teacher_cached_dataset_trains_the_same_student_as_recomputing_the_teacher(transfer):
    x, y = transfer
    teacher = make_teacher()
    results = []
    for cached in (False, True):
        keras.utils.set_random_seed(0)
        distiller = Distiller(
            make_student(),
            teacher,
            [(SoftTargetKL(2.0), 1.0), (DerivativeMatching("exact"), 0.5)],
            student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
        if cached:
            dataset = teacher_cached_dataset(teacher, x, y, batch_size=32, shuffle=False)
            element = next(iter(dataset))
            assert set(element[0]) == {"inputs", "teacher_outputs"}
            np.testing.assert_allclose(
                element[0]["teacher_outputs"], np.asarray(teacher(x[:32])), atol=1e-6
            )
        else:
            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        history = distiller.fit(dataset, epochs=2, verbose=0).history
        results.append((weights_of(distiller.student), history))
    (plain_weights, plain_history), (cached_weights, cached_history) = results
    assert max_change(weights_of(make_student()), plain_weights) > 1e-3
    assert_weights_close(cached_weights, plain_weights, atol=1e-5)
    for key in ("loss", "soft_target_kl", "derivative_matching", "student_loss"):
        np.testing.assert_allclose(cached_history[key], plain_history[key], rtol=1e-5, err_msg=key)


def test_cached_teacher_outputs_are_used_instead_of_running_the_teacher(transfer):
    # Outputs cached from teacher A, distiller holding teacher B: output terms must read A's.
    x = transfer[0][:32]
    cached_from = make_teacher(seed=11)
    teacher, student = make_teacher(seed=12), make_student()
    distiller = Distiller(student, teacher, [(SoftTargetKL(1.0), 1.0)])
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))
    dataset = teacher_cached_dataset(cached_from, x, batch_size=32, shuffle=False)
    logged = distiller.fit(dataset, epochs=1, verbose=0).history["soft_target_kl"][0]
    student_log_q = np_log_softmax(np_mlp(student.get_weights(), x)[0])

    def kl_to(model):
        log_p = np_log_softmax(np_mlp(model.get_weights(), x)[0])
        return np.mean(np.sum(np.exp(log_p) * (log_p - student_log_q), -1))

    np.testing.assert_allclose(logged, kl_to(cached_from), rtol=1e-4)
    assert abs(kl_to(teacher) - kl_to(cached_from)) > 1e-2


def test_teacher_cached_dataset_rejects_empty_or_non_finite_x(transfer):
    x, _ = transfer
    teacher = make_teacher()
    with pytest.raises(ValueError, match="`x` is empty"):
        teacher_cached_dataset(teacher, x[:0])
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="`x`"):
        teacher_cached_dataset(teacher, bad)


# ------------------------------------------------------------------------------------------ XLA


def test_jit_compiled_training_on_cpu_equals_non_jit_training():
    # DESIGN rule 9: jit_compile="auto" is off on CPU, so XLA must be tested explicitly.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype("float32")
    y = rng.integers(0, 4, 64)
    teacher = make_teacher(hidden=(16,), classes=4, input_dim=8)
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        distiller = Distiller(
            make_student(hidden=8, classes=4, input_dim=8),
            teacher,
            [
                (SoftTargetKL(2.0), 1.0),
                DistillationObjective(DerivativeMatching("exact"), 1.0, name="dm_exact"),
                DistillationObjective(
                    DerivativeMatching("projection", num_projections=1), 1.0, name="dm_projection_1"
                ),
                DistillationObjective(
                    DerivativeMatching("projection", num_projections=3), 1.0, name="dm_projection_3"
                ),
            ],
            student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            seed=5,
        )
        distiller.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
        history = distiller.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
        assert distiller.jit_compile is jit
        results.append((weights_of(distiller.student), history))
    (eager_weights, eager_history), (jit_weights, jit_history) = results
    assert (
        max_change(weights_of(make_student(hidden=8, classes=4, input_dim=8)), eager_weights) > 1e-3
    )
    assert_weights_close(jit_weights, eager_weights, atol=1e-5)
    assert set(jit_history) == set(eager_history)
    for key in eager_history:
        np.testing.assert_allclose(
            jit_history[key], eager_history[key], rtol=1e-5, atol=1e-6, err_msg=key
        )


# ------------------------------------------------------------------ string and function losses


@keras.saving.register_keras_serializable(package="kdtfp_tests")
def half_squared_error(y_true, y_pred):
    return 0.5 * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


def test_string_and_function_losses_are_wrapped_as_loss_objects_and_logged(transfer):
    x = transfer[0][:32]
    y = keras.utils.to_categorical(transfer[1][:32], CLASSES).astype("float32")
    teacher, student = make_teacher(), make_student()
    distiller = Distiller(
        student,
        teacher,
        [("mean_squared_error", 1.0), (half_squared_error, 2.0)],
        student_loss="mean_squared_error",
        student_loss_weight=0.5,
    )
    for objective in distiller.objectives:
        assert isinstance(objective.loss, keras.losses.Loss)
    assert isinstance(distiller.student_loss, keras.losses.Loss)
    assert distiller.term_names == ["mean_squared_error", "half_squared_error", "student_loss"]
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))
    history = distiller.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    teacher_logits, _ = np_mlp(teacher.get_weights(), x)
    student_logits, _ = np_mlp(student.get_weights(), x)
    mse_value = np.mean((student_logits - teacher_logits) ** 2)
    label_mse = np.mean((student_logits - y) ** 2)
    np.testing.assert_allclose(history["mean_squared_error"][0], mse_value, rtol=1e-4)
    np.testing.assert_allclose(history["half_squared_error"][0], 0.5 * mse_value, rtol=1e-4)
    np.testing.assert_allclose(history["student_loss"][0], label_mse, rtol=1e-4)
    np.testing.assert_allclose(history["loss"][0], 2.0 * mse_value + 0.5 * label_mse, rtol=1e-4)


def test_string_loss_objective_survives_keras_round_trip_in_safe_mode(transfer, tmp_path):
    x = transfer[0][:64]
    one_hot = keras.utils.to_categorical(transfer[1][:64], CLASSES)
    distiller = Distiller(
        make_student(), make_teacher(), [("mean_squared_error", 1.0)], student_loss="mse"
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    distiller.fit(x, one_hot, batch_size=32, epochs=1, verbose=0)
    distiller.save(tmp_path / "string_loss.keras")
    loaded = keras.saving.load_model(tmp_path / "string_loss.keras", safe_mode=True)
    assert json_normalized(loaded.get_config()) == json_normalized(distiller.get_config())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), distiller.predict(x, verbose=0))


def test_feature_distillation_default_loss_is_mean_squared_error():
    objective = FeatureDistillation("teacher_hidden_0", "student_hidden_0")
    assert isinstance(objective.loss, keras.losses.Loss)
    assert objective.name == "features_student_hidden_0"
    np.testing.assert_allclose(float(objective.loss(np.zeros((2, 3)), np.ones((2, 3)))), 1.0)


# ------------------------------------------------------------------------ feature distillation


@pytest.mark.parametrize("projection", [False, True], ids=["same_width", "projection"])
def test_feature_distillation_by_layer_name_trains_student_and_projection_not_teacher(
    projection, transfer
):
    x, _ = transfer
    teacher = make_teacher(hidden=(32,))
    student = make_student(hidden=16 if projection else 32)
    objective = FeatureDistillation(
        "teacher_hidden_0", "student_hidden_0", loss=mse(), weight=1.0, projection=projection
    )
    distiller = Distiller(student, teacher, [objective, (SoftTargetKL(2.0), 1.0)])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    teacher_before, student_before = weights_of(teacher), weights_of(student)
    distiller.fit(x[:64], batch_size=64, epochs=1, verbose=0)  # builds the projection, if any
    projection_before = [weights_of(layer) for layer in distiller.projections]
    history = distiller.fit(x, batch_size=64, epochs=3, verbose=0).history

    assert "features_student_hidden_0" in history
    assert history["features_student_hidden_0"][-1] < history["features_student_hidden_0"][0]
    assert_weights_close(weights_of(teacher), teacher_before, atol=0.0)
    assert max_change(student_before, weights_of(student)) > 1e-3
    assert len(distiller.projections) == int(projection)
    for layer, before in zip(distiller.projections, projection_before, strict=True):
        assert layer.kernel.shape == (16, 32)
        assert max_change(before, weights_of(layer)) > 1e-4


def test_feature_distillation_with_subclassed_student_raises_value_error():
    with pytest.raises(ValueError, match="subclassed"):
        Distiller(
            make_student("subclassed"),
            make_teacher(),
            [FeatureDistillation("teacher_hidden_0", "dense", loss=mse())],
        )


def test_feature_projection_weights_survive_keras_round_trip(transfer, tmp_path):
    x = transfer[0][:64]
    objective = FeatureDistillation(
        "teacher_hidden_0", "student_hidden_0", loss=mse(), projection=True
    )
    distiller = Distiller(
        make_student(hidden=16), make_teacher(hidden=(32,)), [objective, (SoftTargetKL(2.0), 1.0)]
    )
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    distiller.fit(x, batch_size=32, epochs=1, verbose=0)
    distiller.save(tmp_path / "projection.keras")
    loaded = keras.saving.load_model(tmp_path / "projection.keras")
    assert loaded.projections[0].built
    np.testing.assert_array_equal(
        loaded.projections[0].kernel.numpy(), distiller.projections[0].kernel.numpy()
    )
    distiller.fit(x, batch_size=32, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(weights_of(loaded), weights_of(distiller), atol=1e-6)


# ---------------------------------------------------------------------------------- schedules


def test_weight_and_temperature_schedules_change_variables_each_epoch_and_survive_saving(
    transfer, tmp_path
):
    x = transfer[0][:32]
    teacher, student = make_teacher(), make_student()
    distiller = Distiller(student, teacher, [(SoftTargetKL(1.0), 1.0)])
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.0)
    )  # weights fixed: loss depends on T and w only
    weights, temperatures = [1.0, 0.5, 2.0], [1.0, 3.0, 8.0]
    history = distiller.fit(
        x,
        batch_size=32,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[
            LossWeightSchedule("soft_target_kl", lambda epoch: weights[epoch]),
            TemperatureSchedule("soft_target_kl", lambda epoch: temperatures[epoch]),
        ],
    ).history

    np.testing.assert_allclose(history["soft_target_kl_weight"], weights)
    np.testing.assert_allclose(history["soft_target_kl_temperature"], temperatures)
    teacher_logits, _ = np_mlp(teacher.get_weights(), x)
    student_logits, _ = np_mlp(student.get_weights(), x)
    for epoch, (weight, temperature) in enumerate(zip(weights, temperatures, strict=True)):
        log_p = np_log_softmax(teacher_logits / temperature)
        log_q = np_log_softmax(student_logits / temperature)
        kl = np.mean(temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q), -1))
        np.testing.assert_allclose(history["soft_target_kl"][epoch], kl, rtol=1e-4)
        np.testing.assert_allclose(history["loss"][epoch], weight * kl, rtol=1e-4)

    path = tmp_path / "scheduled.keras"
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.term_weight("soft_target_kl") == pytest.approx(weights[-1])
    assert float(loaded.temperature_variable("soft_target_kl").numpy()) == pytest.approx(
        temperatures[-1]
    )


def test_loss_weight_schedule_at_zero_freezes_a_single_term_student(transfer):
    x = transfer[0][:64]
    student = make_student()
    distiller = Distiller(student, make_teacher(), [(SoftTargetKL(2.0), 1.0)])
    distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    before = weights_of(student)
    distiller.fit(
        x,
        batch_size=32,
        epochs=1,
        verbose=0,
        callbacks=[LossWeightSchedule("soft_target_kl", lambda e: 0.0)],
    )
    assert_weights_close(weights_of(student), before, atol=0.0)


# --------------------------------------------------------------------------------- bad input


def assert_no_step_ran(distiller, student, before):
    assert int(distiller.optimizer.iterations.numpy()) == 0
    assert_weights_close(weights_of(student), before, atol=0.0)


def test_mismatched_output_shapes_raise_before_training():
    with pytest.raises(ValueError, match="`teacher` and `student` outputs differ in shape"):
        Distiller(make_student(classes=5), make_teacher(), [SoftTargetKL()])


def test_mismatched_output_shapes_of_subclassed_student_raise_before_any_step(transfer):
    x = transfer[0][:32]
    student = make_student("subclassed", classes=5)
    student(x[:1])
    before = weights_of(student)
    distiller = Distiller(student, make_teacher(), [SoftTargetKL()])
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="outputs differ in shape"):
        distiller.fit(x, batch_size=32, epochs=1, verbose=0)
    assert_no_step_ran(distiller, student, before)


def test_mismatched_input_shapes_raise_before_training():
    with pytest.raises(ValueError, match="inputs of different shapes"):
        Distiller(make_student(input_dim=32), make_teacher(), [SoftTargetKL()])


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_non_positive_temperature_raises(temperature):
    with pytest.raises(ValueError, match="`temperature`"):
        Distiller(make_student(), make_teacher(), [(SoftTargetKL(temperature), 1.0)])


def test_temperature_schedule_giving_zero_raises_before_any_step(transfer):
    x = transfer[0][:32]
    student = make_student()
    before = weights_of(student)
    distiller = Distiller(student, make_teacher(), [SoftTargetKL(2.0)])
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`temperature`"):
        distiller.fit(
            x, epochs=1, verbose=0, callbacks=[TemperatureSchedule("soft_target_kl", lambda e: 0.0)]
        )
    assert_no_step_ran(distiller, student, before)


@pytest.mark.parametrize(
    "build",
    [
        lambda s, t: Distiller(s, t, [(SoftTargetKL(), -1.0)]),
        lambda s, t: Distiller(s, t, [DistillationObjective(SoftTargetKL(), weight=-0.1)]),
        lambda s, t: Distiller(s, t, [(SoftTargetKL(), float("nan"))]),
        lambda s, t: Distiller(
            s,
            t,
            [FeatureDistillation("teacher_hidden_0", "student_hidden_0", loss=mse(), weight=-1.0)],
        ),
    ],
    ids=["pair", "objective", "nan", "feature"],
)
def test_negative_objective_weight_raises_naming_weight(build):
    with pytest.raises(ValueError, match="`weight`"):
        build(make_student(hidden=32), make_teacher())


@pytest.mark.parametrize("value", [-0.5, float("inf")])
def test_negative_student_loss_weight_raises_naming_it(value):
    with pytest.raises(ValueError, match="`student_loss_weight`"):
        Distiller(
            make_student(),
            make_teacher(),
            [SoftTargetKL()],
            student_loss=mse(),
            student_loss_weight=value,
        )


def test_student_loss_weight_above_one_is_allowed():
    distiller = Distiller(
        make_student(),
        make_teacher(),
        [SoftTargetKL()],
        student_loss=mse(),
        student_loss_weight=5.0,
    )
    assert distiller.term_weight("student_loss") == 5.0


def test_negative_scheduled_weight_raises(transfer):
    distiller = Distiller(make_student(), make_teacher(), [SoftTargetKL()])
    with pytest.raises(ValueError, match="weight of 'soft_target_kl'"):
        distiller.set_term_weight("soft_target_kl", -1.0)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_x_raises_before_any_step(bad_value, transfer):
    x, y = transfer[0][:64].copy(), transfer[1][:64]
    x[10, 3] = bad_value
    student = make_student()
    before = weights_of(student)
    distiller = Distiller(
        student,
        make_teacher(),
        [SoftTargetKL()],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`x` contains 1 NaN/Inf"):
        distiller.fit(x, y, epochs=1, verbose=0)
    assert_no_step_ran(distiller, student, before)


def test_non_finite_y_raises_before_any_step(transfer):
    x = transfer[0][:64]
    y = np.zeros((64, CLASSES), "float32")
    y[0, 0] = np.nan
    student = make_student()
    distiller = Distiller(
        student,
        make_teacher(),
        [SoftTargetKL()],
        student_loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`y`"):
        distiller.fit(x, y, epochs=1, verbose=0)


def test_student_that_is_the_teacher_raises():
    teacher = make_teacher()
    with pytest.raises(ValueError, match="same model"):
        Distiller(teacher, teacher, [SoftTargetKL()])


def test_empty_transfer_set_raises_before_any_step(transfer):
    x = transfer[0][:0]
    student = make_student()
    before = weights_of(student)
    distiller = Distiller(student, make_teacher(), [SoftTargetKL()])
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`x` is empty"):
        distiller.fit(x, epochs=1, verbose=0)
    assert_no_step_ran(distiller, student, before)


def test_duplicate_objective_names_raise():
    with pytest.raises(ValueError, match="unique"):
        Distiller(
            make_student(), make_teacher(), [(SoftTargetKL(1.0), 1.0), (SoftTargetKL(4.0), 1.0)]
        )
    with pytest.raises(ValueError, match="unique"):
        Distiller(
            make_student(),
            make_teacher(),
            [DistillationObjective(SoftTargetKL(), name="student_loss")],
        )


def test_distinctly_named_objectives_of_the_same_loss_are_accepted():
    distiller = Distiller(
        make_student(),
        make_teacher(),
        [
            DistillationObjective(SoftTargetKL(1.0), name="kd_t1"),
            DistillationObjective(SoftTargetKL(4.0), name="kd_t4"),
        ],
    )
    assert distiller.term_names == ["kd_t1", "kd_t4", "student_loss"]
    assert float(distiller.temperature_variable("kd_t4").numpy()) == 4.0


@pytest.mark.parametrize(
    "teacher_layer, student_layer, argument",
    [
        ("no_such_layer", "student_hidden_0", "teacher_layer"),
        ("teacher_hidden_0", "no_such_layer", "student_layer"),
    ],
)
def test_unknown_feature_layer_name_raises_naming_the_argument(
    teacher_layer, student_layer, argument
):
    with pytest.raises(ValueError, match=f"`{argument}`='no_such_layer'"):
        Distiller(
            make_student(hidden=32),
            make_teacher(),
            [FeatureDistillation(teacher_layer, student_layer, loss=mse())],
        )


def test_nothing_to_train_raises():
    with pytest.raises(ValueError, match="nothing to train"):
        Distiller(make_student(), make_teacher(), [])


def test_the_callers_loss_object_is_not_mutated():
    loss = SoftTargetKL(3.0)
    distiller = Distiller(make_student(), make_teacher(), [(loss, 1.0)])
    assert loss.temperature == 3.0
    assert distiller.objectives[0].loss is not loss


def test_kdtfp_top_level_exports_the_distiller():
    assert kdtfp.Distiller is Distiller
    assert kdtfp.FeatureDistillation is FeatureDistillation


def test_student_loss_without_labels_raises_before_any_step(transfer):
    x, _ = transfer
    student = make_student()
    before = [w.numpy().copy() for w in student.weights]
    distiller = Distiller(
        student,
        make_teacher(),
        [SoftTargetKL()],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`student_loss` needs labels"):
        distiller.fit(x, batch_size=32, epochs=1, verbose=0)
    assert max_change(before, [w.numpy() for w in student.weights]) == 0.0


def test_student_sharing_weights_with_the_teacher_raises():
    teacher = make_teacher()
    student = keras.Model(teacher.inputs, teacher.outputs, name="alias")
    with pytest.raises(ValueError, match="shares weights with `teacher`"):
        Distiller(student, teacher, [SoftTargetKL()])


def test_feature_layers_of_different_width_without_projection_raise_naming_the_layers():
    with pytest.raises(ValueError, match="`teacher_layer`='teacher_hidden_0'.*projection=True"):
        Distiller(
            make_student(hidden=8),
            make_teacher(hidden=(32,)),
            [FeatureDistillation("teacher_hidden_0", "student_hidden_0", loss=mse())],
        )


def test_objective_named_loss_raises():
    with pytest.raises(ValueError, match="not 'loss'"):
        Distiller(
            make_student(), make_teacher(), [DistillationObjective(SoftTargetKL(), name="loss")]
        )


def test_empty_dataset_raises_before_any_step(transfer):
    distiller = Distiller(make_student(), make_teacher(), [SoftTargetKL()])
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    empty = tf.data.Dataset.from_tensor_slices(transfer[0][:0]).batch(8)
    with pytest.raises(ValueError, match="`x` is an empty dataset"):
        distiller.fit(empty, epochs=1, verbose=0)


def test_batch_size_that_does_not_split_over_replicas_raises(mirrored_strategy, transfer):
    with mirrored_strategy.scope():
        distiller = Distiller(make_student(), make_teacher(), [SoftTargetKL()])
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`batch_size`=25 does not split evenly over 2 replicas"):
        distiller.fit(transfer[0][:50], batch_size=25, epochs=1, verbose=0)
