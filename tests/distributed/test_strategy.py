"""`kdtfp.distribute`: strategies from the command-line flags, and the steps_per_execution fallback."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kdtfp
from kdtfp.distribute import make_strategy, safe_steps_per_execution


def test_make_strategy_gives_two_cpu_replicas_in_a_fresh_process():
    # In a fresh process nothing has initialised TensorFlow's runtime yet: the logical CPU
    # devices must be configured before anything lists them.
    code = "from kdtfp.distribute import make_strategy; print(make_strategy('mirrored', 2).num_replicas_in_sync)"
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "2"


@pytest.mark.parametrize(("name", "devices"), [("nope", None), ("default", 2), ("mirrored", 0)])
def test_bad_strategy_arguments_raise_naming_them(name, devices):
    with pytest.raises(ValueError, match="strategy|devices"):
        make_strategy(name, devices)


def test_steps_per_execution_falls_back_to_one_on_several_replicas(mirrored_strategy):
    assert safe_steps_per_execution(8, mirrored_strategy) == 1
    assert safe_steps_per_execution(8) == 8


def test_distiller_with_steps_per_execution_trains_under_mirrored_strategy(
    mirrored_strategy, digits
):
    # Keras 3.15 fails on steps_per_execution > 1 under MirroredStrategy (keras-team/keras#19246);
    # the Distiller warns and falls back to 1 instead of crashing.
    with mirrored_strategy.scope():
        teacher = kdtfp.teachers.mlp(64, (16,), 10, name="teacher")
        student = kdtfp.teachers.mlp(64, (8,), 10, name="student")
        distiller = kdtfp.Distiller(student, teacher, [kdtfp.losses.SoftTargetKL()])
        with pytest.warns(UserWarning, match="keras-team/keras#19246"):
            distiller.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=4)
    history = distiller.fit(digits.x_train[:128], batch_size=32, epochs=2, verbose=0)
    assert history.history["soft_target_kl"][-1] < history.history["soft_target_kl"][0]
    assert np.all(np.isfinite(np.asarray(student(digits.x_test[:4]))))
