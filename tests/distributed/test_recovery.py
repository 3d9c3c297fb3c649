"""Fault tolerance: kdtfp models, distillers and callbacks under `keras.callbacks.BackupAndRestore`.

Single process (CPU, op determinism on): a run interrupted mid-epoch (an exception raised from a
callback at a known batch, as Keras's own BackupAndRestore tests do) and resumed in fresh
objects ends bit-identical to an uninterrupted run: student weights, `PosteriorSampler`
samples, the `DualAscent` multiplier, the schedules' term weight and temperature, and `SGLD`'s
step counter and seed state.

Keras 3.15 restarts an interrupted epoch from its first batch even when the backup was taken
mid-epoch (`save_freq=<steps>`; the batch it records is never read), so a resume from a
mid-epoch backup repeats the epoch's first batches: then the counts (samples, sampler steps,
epochs) match an uninterrupted run but the values only approximately.

Two workers (subprocesses, `MultiWorkerMirroredStrategy`): worker 1 is SIGKILLed mid-epoch,
the cluster is restarted and resumes from the last (mid-epoch) backup; it ends with the same
number of posterior samples, and a multiplier and metrics close to an uninterrupted run's.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kdtfp.callbacks import (
    DualAscent,
    LossWeightSchedule,
    PosteriorSampler,
    TemperatureSchedule,
)
from kdtfp.distill import ConstrainedVIDistiller, DistillationObjective, Distiller
from kdtfp.losses import DerivativeMatching, SoftTargetKL
from kdtfp.optimizers import SGLD
from kdtfp.teachers import mlp

ROWS, BATCH, EPOCHS = 64, 16, 4  # 4 steps per epoch, 16 steps


@pytest.fixture
def deterministic():
    """Op determinism on for one test, then back as it was (a process-wide switch)."""
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was_on:
        tf_config.disable_op_determinism()


class Interrupt(keras.callbacks.Callback):
    """Raises at `(epoch, batch)` after the batch, or at the end of `epoch` (batch None)."""

    def __init__(self, epoch, batch=None):
        super().__init__()
        self.at, self.batch, self.epoch = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.batch is not None and (self.epoch, batch) == (self.at, self.batch):
            raise RuntimeError("simulated interruption")

    def on_epoch_end(self, epoch, logs=None):
        if self.batch is None and epoch == self.at:
            raise RuntimeError("simulated interruption")


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, 8)).astype("float32")
    return x, rng.integers(0, 4, ROWS), np.maximum(rng.standard_normal((ROWS, 5)), 0)


# ----------------------------------------------------------------------- Distiller + SGLD
def _distiller(student_seed=2):
    keras.utils.set_random_seed(0)
    distiller = Distiller(
        mlp(8, (8,), 4, name="student", seed=student_seed),
        mlp(8, (16,), 4, name="teacher", seed=1),
        [
            (SoftTargetKL(4.0), 1.0),
            DistillationObjective(DerivativeMatching("exact"), 0.5, name="dm"),
        ],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    distiller.compile(
        optimizer=SGLD(1e-3, data_size=ROWS, temperature=0.1, burn_in_steps=3, seed=3)
    )
    distiller(_data()[0][:1])  # BackupAndRestore needs a built model
    return distiller


def _distiller_callbacks(tmp_path, save_freq="epoch"):
    sampler = PosteriorSampler(
        burn_in=2, thin=3, max_samples=100, verbose=0, backup_dir=str(tmp_path / "sampler")
    )
    return sampler, [
        sampler,
        LossWeightSchedule("dm", lambda epoch: 0.25 * (epoch + 1)),
        TemperatureSchedule("soft_target_kl", lambda epoch: 4.0 / (epoch + 1)),
        keras.callbacks.BackupAndRestore(str(tmp_path / "keras"), save_freq=save_freq),
    ]


def _fit(model, callbacks, *arrays):
    return model.fit(
        *arrays, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks
    )


def _state(model, sampler):
    optimizer = model.optimizer
    return {
        "weights": [np.array(w) for w in model.trainable_weights],
        "non_trainable": [np.array(w) for w in model.non_trainable_weights],
        "iterations": int(optimizer.iterations.numpy()),
        "seed_state": np.array(optimizer._seed_generator.state.numpy()),
        "samples": sampler.samples,
        "sampler_step": sampler.step,
    }


def _assert_identical(got, want):
    assert got["iterations"] == want["iterations"]
    assert got["sampler_step"] == want["sampler_step"]
    np.testing.assert_array_equal(got["seed_state"], want["seed_state"])
    for a, b in zip(
        got["weights"] + got["non_trainable"], want["weights"] + want["non_trainable"], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert len(got["samples"]) == len(want["samples"]) > 0
    for sample, reference in zip(got["samples"], want["samples"], strict=True):
        for a, b in zip(sample, reference, strict=True):
            np.testing.assert_array_equal(a, b)


def test_distiller_sgld_run_resumes_bit_identical(tmp_path, deterministic):
    x, y, _ = _data()
    reference_model = _distiller()
    sampler, callbacks = _distiller_callbacks(tmp_path / "reference")
    reference_history = _fit(reference_model, callbacks, x, y).history
    reference = _state(reference_model, sampler)
    assert reference["sampler_step"] == 16 and len(reference["samples"]) == (16 - 2) // 3

    first = _distiller()
    _, callbacks = _distiller_callbacks(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated"):
        _fit(first, callbacks + [Interrupt(epoch=2, batch=1)], x, y)  # backup: end of epoch 1

    resumed = _distiller(student_seed=9)  # a fresh process: other initial weights
    sampler, callbacks = _distiller_callbacks(tmp_path / "run")
    history = _fit(resumed, callbacks, x, y).history
    assert len(history["loss"]) == 2  # epochs 3 and 4
    _assert_identical(_state(resumed, sampler), reference)
    assert resumed.term_weight("dm") == reference_model.term_weight("dm") == 1.0
    assert float(resumed.temperature_variable("soft_target_kl").numpy()) == 1.0
    for key in ("loss", "soft_target_kl", "dm", "dm_weight", "soft_target_kl_temperature"):
        assert history[key] == reference_history[key][2:], key
    assert not (tmp_path / "run" / "sampler" / "posterior_sampler.npz").exists()


# ----------------------------------------------------------------- constrained VI + DualAscent
class TinyStudent(keras.Model):
    """Softmax features of a dense layer and a reconstruction loss (deterministic)."""

    def __init__(self, seed=1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(
            3, kernel_initializer=keras.initializers.GlorotUniform(seed)
        )
        self.decoder = keras.layers.Dense(8, kernel_initializer=keras.initializers.GlorotUniform(2))

    def call(self, x, training=None):
        h = ops.softmax(self.encoder(x))
        self.add_loss(ops.mean(ops.sum(ops.square(self.decoder(h) - x), axis=-1)))
        return h


def _constrained(seed=1):
    keras.utils.set_random_seed(0)
    model = ConstrainedVIDistiller(
        TinyStudent(seed), multiplier=1.0, mode="lagrangian", epsilon=0.01
    )
    model.compile(optimizer=SGLD(1e-3, data_size=ROWS, temperature=0.1, seed=4))
    model(_data()[0][:1])
    return model


def _constrained_callbacks(tmp_path, frequency, order):
    sampler = PosteriorSampler(
        burn_in=1, thin=2, max_samples=100, verbose=0, backup_dir=str(tmp_path / "sampler")
    )
    dual = DualAscent(target=0.01, learning_rate=20.0, frequency=frequency)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "keras"))
    ordered = [dual, sampler, backup] if order == "kdtfp_first" else [backup, sampler, dual]
    return sampler, ordered


@pytest.mark.parametrize(
    ("frequency", "order", "interrupt"),
    [
        ("epoch", "keras_first", (2, 1)),  # mid-epoch
        ("step", "kdtfp_first", (2, 1)),
        # Between the sampler's epoch-end record and BackupAndRestore's: Keras resumes at the
        # start of epoch 1, and the sampler must rewind its buffer there too.
        ("epoch", "kdtfp_first", (1, None)),
    ],
)
def test_dual_ascent_multiplier_and_samples_resume_bit_identical(
    tmp_path, deterministic, frequency, order, interrupt
):
    x, _, features = _data()
    reference_model = _constrained()
    sampler, callbacks = _constrained_callbacks(tmp_path / "reference", frequency, order)
    _fit(reference_model, callbacks, x, features)
    reference = _state(reference_model, sampler)
    assert reference_model.multiplier_value() != 1.0  # the dual variable moved

    first = _constrained()
    _, callbacks = _constrained_callbacks(tmp_path / "run", frequency, order)
    position = 1 if order == "kdtfp_first" else len(callbacks)  # after the sampler
    callbacks.insert(position, Interrupt(*interrupt))
    with pytest.raises(RuntimeError, match="simulated"):
        _fit(first, callbacks, x, features)

    resumed = _constrained(seed=7)
    sampler, callbacks = _constrained_callbacks(tmp_path / "run", frequency, order)
    _fit(resumed, callbacks, x, features)
    _assert_identical(_state(resumed, sampler), reference)
    assert resumed.multiplier_value() == reference_model.multiplier_value()


def test_mid_epoch_backup_keeps_the_counts_of_an_uninterrupted_run(tmp_path, deterministic):
    """`save_freq=3`: the last backup is at step 9 (epoch 2, batch 0); Keras restores it and
    runs epoch 2 again from its first batch, so 1 step is repeated. The sampler rewinds to the
    start of epoch 2: same steps counted, same number of samples."""
    x, y, _ = _data()
    reference_model = _distiller()
    sampler, callbacks = _distiller_callbacks(tmp_path / "reference", save_freq=3)
    _fit(reference_model, callbacks, x, y)
    reference = _state(reference_model, sampler)

    first = _distiller()
    _, callbacks = _distiller_callbacks(tmp_path / "run", save_freq=3)
    with pytest.raises(RuntimeError, match="simulated"):
        _fit(first, callbacks + [Interrupt(epoch=2, batch=2)], x, y)

    resumed = _distiller(student_seed=9)
    sampler, callbacks = _distiller_callbacks(tmp_path / "run", save_freq=3)
    _fit(resumed, callbacks, x, y)
    got = _state(resumed, sampler)
    assert got["sampler_step"] == reference["sampler_step"] == 16
    assert len(got["samples"]) == len(reference["samples"])
    assert got["iterations"] == reference["iterations"] + 1  # Keras repeats batch 0 of epoch 2
    # Samples taken before epoch 2 come from the backup, unchanged.
    kept = sum(1 for s in range(1, 9) if s > 2 and (s - 2) % 3 == 0)
    for sample, want in zip(got["samples"][:kept], reference["samples"][:kept], strict=True):
        np.testing.assert_array_equal(sample[0], want[0])


def test_sampler_rewinds_to_the_epoch_keras_resumes_at(tmp_path):
    """Hook-level: a backup written after epoch 2 is rewound to the end of epoch 0."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    sampler = PosteriorSampler(
        burn_in=0, thin=1, max_samples=100, verbose=0, backup_dir=str(tmp_path)
    )
    sampler.set_model(model)
    sampler.set_params({"epochs": 3, "steps": 2})
    sampler.on_train_begin()
    for epoch in range(3):
        sampler.on_epoch_begin(epoch)
        for batch in range(2):
            sampler.on_train_batch_end(batch)
    assert len(sampler.samples) == 6

    restored = PosteriorSampler(
        burn_in=0, thin=1, max_samples=100, verbose=0, backup_dir=str(tmp_path)
    )
    restored.set_model(model)
    restored.set_params({"epochs": 3, "steps": 2})
    restored.on_train_begin()
    assert restored.step == 6 and len(restored.samples) == 6  # read back as written
    restored.on_epoch_begin(1)  # Keras resumes at epoch 1
    assert restored.step == 2 and len(restored.samples) == 2
    assert os.path.exists(tmp_path / "posterior_sampler.npz")


# ------------------------------------------------------------------------------ 2 workers
@pytest.mark.slow
def test_two_workers_killed_worker_restart_resumes_from_the_last_backup(tmp_path):
    from kdtfp.bench import recovery

    settings = {"epochs": 2, "steps_per_epoch": 6, "save_freq": 4, "learning_rate": 2e-4}
    (tmp_path / "reference").mkdir()
    (tmp_path / "killed").mkdir()
    reference = recovery.run_cluster(2, str(tmp_path / "reference"), "run", timeout=400, **settings)
    # Worker 1 holds after step 10 (epoch 1, batch 3) and is SIGKILLed; the last backup is at
    # step 8 (epoch 1, batch 1). The survivor is stopped too and both are restarted.
    killed = recovery.run_killed_and_restarted(
        str(tmp_path / "killed"),
        "run",
        kill_at=[1, 3],
        timeout=400,
        survivor_grace=0.5,
        **settings,
    )
    assert killed["held"]["step"] == 10
    for want, got in zip(reference, killed["results"], strict=True):
        assert got["epochs_run"] == 1  # resumed at epoch 1 (of 0, 1)
        assert got["iterations"] == want["iterations"] + 2  # steps 7 and 8 were done twice
        assert got["sampler_step"] == want["sampler_step"] == 12
        assert got["num_samples"] == want["num_samples"] == (12 - 2) // 2
        assert got["multiplier"] == pytest.approx(want["multiplier"], rel=1e-2)
        assert got["multiplier"] != 1.0
        for key in ("loss", "elbo_loss", "constraint"):
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=5e-2), key
    # The workers agree with each other.
    assert killed["results"][0]["weights"] == killed["results"][1]["weights"]
    assert killed["results"][0]["multiplier"] == killed["results"][1]["multiplier"]


# ------------------------------------------------------------------------- known gap
def test_distiller_seed_state_survives_a_weights_round_trip(tmp_path):
    def make():
        return Distiller(
            mlp(8, (8,), 4, name="student", seed=2),
            mlp(8, (16,), 4, name="teacher", seed=1),
            [DistillationObjective(DerivativeMatching("projection", num_projections=2), 1.0)],
            seed=5,
        )

    distiller = make()
    distiller(_data()[0][:1])
    keras.random.normal((2,), seed=distiller.seed_generator)  # advance the state
    distiller.save_weights(str(tmp_path / "d.weights.h5"))
    restored = make()
    restored(_data()[0][:1])
    restored.load_weights(str(tmp_path / "d.weights.h5"))
    np.testing.assert_array_equal(
        restored.seed_generator.state.numpy(), distiller.seed_generator.state.numpy()
    )
