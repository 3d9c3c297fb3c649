"""`NaNGuard`: a NaN injected at a known step stops `fit` there, names the term, rolls back."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from kdtfp.callbacks.nan_guard import NaNGuard, NumericalFailureError, with_nan_guard
from kdtfp.distill.distiller import Distiller
from kdtfp.losses.soft_target import SoftTargetKL

BATCH, STEPS, BAD_STEP = 8, 6, 4  # the 4th step (1-based) sees the bad batch


class _Sqrt(keras.layers.Layer):
    """sqrt(x): NaN for x < 0."""

    def call(self, x):
        return ops.sqrt(x)


class _RootAbs(keras.layers.Layer):
    """sqrt(|x|): finite value at 0, but its gradient there is 0 * inf = NaN."""

    def call(self, x):
        return ops.sqrt(ops.abs(x))


class _Recorder(keras.callbacks.Callback):
    """Keeps the weights after every step (runs before the guard, listed first)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(self.model.get_weights())


def _data():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(BATCH * STEPS, 4)).astype("float32")
    y = rng.integers(0, 3, size=BATCH * STEPS)
    return x, y


def _distiller(teacher_layers, student_layers):
    teacher = keras.Sequential([keras.Input((4,)), *teacher_layers, keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((4,)), *student_layers])
    distiller = Distiller(
        student,
        teacher,
        objectives=[(SoftTargetKL(temperature=2.0), 1.0)],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    return distiller


def _assert_weights_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


def test_nan_term_stops_at_its_step_names_it_and_restores_the_previous_step(tmp_path):
    x, y = _data()
    x[(BAD_STEP - 1) * BATCH] = -1.0  # the teacher's sqrt makes soft_target_kl NaN at BAD_STEP
    distiller = _distiller([_Sqrt()], [keras.layers.Dense(3)])
    recorder = _Recorder()
    path = str(tmp_path / "good.weights.h5")
    with pytest.raises(NumericalFailureError) as caught:
        distiller.fit(
            x, y, batch_size=BATCH, shuffle=False, verbose=0,
            callbacks=[recorder, NaNGuard(checkpoint_path=path, checkpoint_every=2)],
        )  # fmt: skip
    error = caught.value
    assert error.step == BAD_STEP and error.restored_step == BAD_STEP - 1
    assert error.cause == "term 'soft_target_kl' is NaN"  # student_loss stayed finite
    assert str(error) == (
        f"kdtfp: training stopped at step {BAD_STEP}: term 'soft_target_kl' is NaN; "
        f"restored weights of step {BAD_STEP - 1} (checkpoint {path})"
    )
    assert "\n" not in str(error) and isinstance(error, FloatingPointError)
    assert len(recorder.weights) == BAD_STEP
    assert not all(np.isfinite(w).all() for w in recorder.weights[-1])  # the NaN step's update
    after_good_step = recorder.weights[BAD_STEP - 2]
    _assert_weights_equal(distiller.get_weights(), after_good_step)
    # The file holds the restored weights although the periodic write (every 2) was at step 2.
    distiller.set_weights([np.zeros_like(w) for w in after_good_step])
    distiller.load_weights(path)
    _assert_weights_equal(distiller.get_weights(), after_good_step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.weights.h5"]  # no temp left


def test_nan_gradient_with_finite_loss_is_caught_in_the_weights():
    x, y = _data()
    x[(BAD_STEP - 1) * BATCH : BAD_STEP * BATCH] = 0.0  # sqrt(|0|) = 0, but its gradient is NaN
    distiller = _distiller([], [keras.layers.Dense(3, use_bias=False), _RootAbs()])
    recorder = _Recorder()
    # The default guard of Distiller.fit.
    with pytest.raises(NumericalFailureError) as caught:
        distiller.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[recorder])
    error = caught.value
    assert error.step == BAD_STEP and error.restored_step == BAD_STEP - 1
    assert error.checkpoint_path is None
    assert "kernel" in error.cause and "is NaN after the update" in error.cause
    _assert_weights_equal(distiller.get_weights(), recorder.weights[BAD_STEP - 2])


def test_nan_at_the_first_step_restores_the_initial_weights():
    x, y = _data()
    x[0] = -1.0
    distiller = _distiller([_Sqrt()], [keras.layers.Dense(3)])
    initial = distiller.get_weights()
    with pytest.raises(NumericalFailureError, match="at step 1: .* restored weights of step 0$"):
        distiller.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    _assert_weights_equal(distiller.get_weights(), initial)


def test_without_raise_fit_returns_stopped_and_opt_out_trains_through():
    x, y = _data()
    x[(BAD_STEP - 1) * BATCH] = -1.0
    distiller = _distiller([_Sqrt()], [keras.layers.Dense(3)])
    guard = NaNGuard(raise_error=False)
    distiller.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.failure.step == BAD_STEP and distiller.stop_training
    assert all(np.isfinite(w).all() for w in distiller.get_weights())

    distiller = _distiller([_Sqrt()], [keras.layers.Dense(3)])
    history = distiller.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, nan_guard=False)
    assert np.isnan(history.history["soft_target_kl"][-1])


def test_check_every_rolls_back_to_the_last_checked_step():
    x, y = _data()
    x[(BAD_STEP - 1) * BATCH] = -1.0
    distiller = _distiller([_Sqrt()], [keras.layers.Dense(3)])
    recorder = _Recorder()
    guard = NaNGuard(check_every=3)  # checks steps 1 and 4
    with pytest.raises(NumericalFailureError, match=f"step {BAD_STEP}: .* of step 1$"):
        distiller.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[recorder, guard])
    _assert_weights_equal(distiller.get_weights(), recorder.weights[0])


def test_with_nan_guard_puts_one_guard_first_only_when_enabled():
    guard = NaNGuard()
    assert with_nan_guard([guard]) == [guard]
    assert [type(c) for c in with_nan_guard(None)] == [NaNGuard]
    other = keras.callbacks.History()
    assert [type(c) for c in with_nan_guard([other])] == [NaNGuard, keras.callbacks.History]
    assert with_nan_guard(None, enabled=False) is None
    with pytest.raises(ValueError, match="nan_guard"):
        with_nan_guard([], enabled="yes")


def test_get_config_round_trip(tmp_path):
    guard = NaNGuard(str(tmp_path / "a.weights.h5"), check_every=2, checkpoint_every=5)
    config = keras.saving.serialize_keras_object(guard)
    again = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert isinstance(again, NaNGuard) and again.get_config() == guard.get_config()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"checkpoint_path": "last.h5"}, "checkpoint_path"),
        ({"check_every": 0}, "check_every"),
        ({"check_every": 1.5}, "check_every"),
        ({"checkpoint_every": True}, "checkpoint_every"),
        ({"raise_error": "no"}, "raise_error"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NaNGuard(**kwargs)


def test_nan_under_mirrored_strategy_is_caught_and_rolled_back(mirrored_strategy):
    x, y = _data()
    x[(BAD_STEP - 1) * BATCH] = -1.0
    with mirrored_strategy.scope():
        distiller = _distiller([_Sqrt()], [keras.layers.Dense(3)])
    recorder = _Recorder()
    with pytest.raises(NumericalFailureError, match=f"at step {BAD_STEP}: term 'soft_target_kl'"):
        distiller.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[recorder])
    _assert_weights_equal(distiller.get_weights(), recorder.weights[BAD_STEP - 2])


def test_constrained_vi_constraint_term_is_named():
    import tensorflow as tf

    from kdtfp.distill.constrained_vi import ConstrainedVIDistiller
    from kdtfp.models.topic_model import TopicModel

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(BATCH * STEPS, 10)).astype("float32")
    features = rng.random((BATCH * STEPS, 4)).astype("float32")
    features[(BAD_STEP - 1) * BATCH] = np.nan  # a dataset's values are not scanned by fit
    dataset = tf.data.Dataset.from_tensor_slices((x, features)).batch(BATCH)
    student = TopicModel(3, 10, corpus_size=len(x), encoder_units=(4,), seed=0)
    distiller = ConstrainedVIDistiller(student, multiplier=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    with pytest.raises(NumericalFailureError) as caught:
        distiller.fit(dataset, verbose=0, shuffle=False)
    assert caught.value.step == BAD_STEP and caught.value.cause == "term 'constraint' is NaN"
    assert all(np.isfinite(w).all() for w in distiller.get_weights())
