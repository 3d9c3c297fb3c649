"""Shared test setup: two logical CPUs, ONE session-wide MirroredStrategy, fixed seeds.

DESIGN.md rule 6: a second `MirroredStrategy` in one process breaks collectives, so every test
that needs two replicas uses the session-scoped `mirrored_strategy` fixture below.
The logical devices must be configured before TensorFlow initialises its runtime, i.e. before
the first op runs; `pytest_configure` runs before any test module is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

NUM_LOGICAL_CPUS = 2


def pytest_configure(config):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
        )
    except RuntimeError:
        # The runtime was already initialised (e.g. by a plugin); the fixture below checks the
        # number of logical devices and says why if there are too few.
        pass


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one `MirroredStrategy` over `/cpu:0` and `/cpu:1` shared by the whole session."""
    import tensorflow as tf

    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < NUM_LOGICAL_CPUS:
        pytest.fail(
            f"Expected {NUM_LOGICAL_CPUS} logical CPUs, found {len(logical)}: a TensorFlow op ran "
            "before tests/conftest.py:pytest_configure could configure them."
        )
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def digits():
    """sklearn digits: 1200 train / 197 validation / 400 test images, pixels in [0, 1]."""
    import kdtfp

    return kdtfp.datasets.load_digits_split()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Fixed seeds and fresh Keras name counters for every test.

    `clear_session` only resets Keras's global state (name uids, default graph, kernel cache);
    it does not touch `tf.distribute` state, so the shared strategy keeps working.
    """
    import keras

    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield


_RECIPE_RUNS = {}


def _run_recipe(name, out, *flags, fresh=False):
    """`kdtfp run NAME --quick --out OUT --json OUT/m.json FLAGS...` in a fresh process (one
    strategy per process, DESIGN rule 6); returns `(out, json record, stdout)`.

    Runs are shared by the session: a second call with the same `name` and `flags` returns the
    first one's result (and its `out`), so the recipe tests and the determinism test pay for a
    run once. `fresh=True` always runs again (and does not replace the shared run).
    """
    key = (name, tuple(flags))
    if not fresh and key in _RECIPE_RUNS:
        return _RECIPE_RUNS[key]
    json_path = out / "m.json"
    completed = subprocess.run(
        [sys.executable, "-m", "kdtfp.cli", "run", name, "--quick"]
        + ["--out", str(out), "--json", str(json_path), *flags],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = (out, json.loads(json_path.read_text()), completed.stdout)
    if not fresh:
        _RECIPE_RUNS[key] = result
    return result


@pytest.fixture(scope="session")
def run_recipe():
    """The function `run_recipe(name, out, *flags, fresh=False) -> (out, record, stdout)`."""
    return _run_recipe
