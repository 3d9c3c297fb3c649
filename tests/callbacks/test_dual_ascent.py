"""`DualAscent` and `MultiplierSchedule`: the update rule by hand, saving, BackupAndRestore."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from kdtfp.callbacks import DualAscent, MultiplierSchedule
from kdtfp.distill import ConstrainedVIDistiller


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class TinyStudent(keras.Model):
    """Deterministic: softmax features of a dense layer and a reconstruction loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(
            3, kernel_initializer=keras.initializers.GlorotUniform(seed=1)
        )
        self.decoder = keras.layers.Dense(
            4, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
        )

    def call(self, x, training=None):
        h = ops.softmax(self.encoder(x))
        self.add_loss(ops.mean(ops.sum(ops.square(self.decoder(h) - x), axis=-1)))
        return h


def data(n=32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype("float32")
    teacher = np.maximum(rng.standard_normal((n, 5)), 0).astype("float32")
    return x, teacher


def make(multiplier=1.0, mode="lagrangian"):
    keras.utils.set_random_seed(0)
    distiller = ConstrainedVIDistiller(
        TinyStudent(), multiplier=multiplier, mode=mode, epsilon=0.01
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    return distiller


class Recorder(keras.callbacks.Callback):
    """Records γ and the last step's constraint after every batch (before DualAscent runs)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((self.model.multiplier_value(), float(self.model.last_constraint.numpy())))


def test_update_rule_is_projected_gradient_ascent():
    assert DualAscent.update(1.0, 0.3, 0.1, 10.0) == pytest.approx(3.0)
    assert DualAscent.update(1.0, 0.0, 0.5, 10.0) == 0.0  # projected onto gamma >= 0
    assert DualAscent.update(1.0, 0.3, 0.1, 10.0, max_multiplier=2.5) == 2.5


def test_epoch_updates_match_the_hand_computation_from_the_logged_constraint():
    x, teacher = data()
    distiller = make(multiplier=1.0)
    callback = DualAscent(target=0.01, learning_rate=50.0)
    history = distiller.fit(
        x, teacher, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[callback]
    ).history
    gamma = 1.0
    for epoch in range(4):
        assert history["multiplier"][epoch] == pytest.approx(gamma, rel=1e-6)
        gamma = max(0.0, gamma + 50.0 * (history["constraint"][epoch] - 0.01))
        assert history["multiplier_next"][epoch] == pytest.approx(gamma, rel=1e-6)
    assert distiller.multiplier_value() == pytest.approx(gamma, rel=1e-6)
    assert gamma != 1.0


def test_multiplier_is_clamped_at_zero_when_the_constraint_holds():
    x, teacher = data()
    distiller = make(multiplier=0.2)
    callback = DualAscent(target=1.0, learning_rate=1.0)  # L_SP <= 4/b < 1: always satisfied
    distiller.fit(x, teacher, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert distiller.multiplier_value() == 0.0


def test_step_updates_use_the_last_step_constraint():
    x, teacher = data()
    distiller = make(multiplier=1.0)
    recorder = Recorder()
    callback = DualAscent(target=0.01, learning_rate=20.0, frequency="step")
    distiller.fit(
        x,
        teacher,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[recorder, callback],
    )
    assert len(recorder.rows) == 4
    for (gamma, constraint), (next_gamma, _) in zip(
        recorder.rows[:-1], recorder.rows[1:], strict=True
    ):
        assert next_gamma == pytest.approx(max(0.0, gamma + 20.0 * (constraint - 0.01)), rel=1e-6)


def test_multiplier_is_saved_in_keras_files(tmp_path):
    x, teacher = data()
    distiller = make(multiplier=1.0)
    distiller.fit(
        x, teacher, batch_size=16, epochs=2, verbose=0, callbacks=[DualAscent(0.0, 100.0)]
    )
    gamma = distiller.multiplier_value()
    assert gamma > 1.0
    distiller.save(tmp_path / "m.keras")
    assert keras.saving.load_model(tmp_path / "m.keras").multiplier_value() == pytest.approx(gamma)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_with_the_same_multiplier(tmp_path):
    x, teacher = data()

    def fit(distiller, extra):
        callbacks = [keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), *extra]
        callbacks.append(DualAscent(target=0.0, learning_rate=30.0))
        return distiller.fit(
            x, teacher, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=callbacks
        )

    reference = make()
    reference.fit(
        x,
        teacher,
        batch_size=16,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=[DualAscent(target=0.0, learning_rate=30.0)],
    )

    interrupted = make()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupted, [Interrupt(2)])
    after_two_epochs = interrupted.multiplier_value()
    resumed = make()  # a fresh process would start from the initial multiplier
    assert resumed.multiplier_value() == 1.0
    history = fit(resumed, []).history
    assert len(history["multiplier"]) == 2  # epochs 3 and 4 only
    assert history["multiplier"][0] == pytest.approx(after_two_epochs, rel=1e-6)
    assert resumed.multiplier_value() == pytest.approx(reference.multiplier_value(), rel=1e-5)


def test_multiplier_schedule_sets_the_penalty_each_epoch():
    x, teacher = data()
    distiller = make(mode="penalty")
    history = distiller.fit(
        x,
        teacher,
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[MultiplierSchedule(lambda epoch: 10.0 * epoch)],
    ).history
    assert history["multiplier"] == pytest.approx([0.0, 10.0, 20.0])


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"target": -1e-3, "learning_rate": 1.0}, "target"),
        ({"target": 0.0, "learning_rate": 0.0}, "learning_rate"),
        ({"target": 0.0, "learning_rate": 1.0, "frequency": "batch"}, "frequency"),
        ({"target": 0.0, "learning_rate": 1.0, "max_multiplier": -1}, "max_multiplier"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DualAscent(**kwargs)


def test_a_model_without_the_multiplier_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((4, 4), "float32")
    with pytest.raises(ValueError, match="multiplier"):
        model.fit(
            x,
            np.zeros((4, 1)),
            epochs=1,
            verbose=0,
            callbacks=[DualAscent(0.0, 1.0, metric="loss")],
        )
