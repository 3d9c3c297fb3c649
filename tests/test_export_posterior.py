"""`kdtfp.export.export_posterior`: a posterior ensemble as a SavedModel that serves without kdtfp."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.export import POSTERIOR_ENDPOINTS, export_posterior
from kdtfp.models import PosteriorEnsemble
from kdtfp.teachers import mlp

ATOL = 1e-6
NUM_SAMPLES = 7

# Runs in a fresh interpreter where `import kdtfp` (and TFP) fail: the export must serve with
# TensorFlow alone, the posterior samples included.
_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["kdtfp"] = None  # kdtfp is not importable in this process
    sys.modules["tensorflow_probability"] = None  # nor is TFP
    try:
        import kdtfp  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("kdtfp was importable in the serving process")

    import numpy as np
    import tensorflow as tf

    export_dir, batch_file, out_file = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(batch_file))
    intervals = loaded.intervals(x)
    assert sorted(intervals) == ["lower", "upper"], sorted(intervals)
    np.savez(
        out_file,
        serve=loaded.serve(x).numpy(),
        mean_probs=loaded.mean_probs(x).numpy(),
        lower=intervals["lower"].numpy(),
        upper=intervals["upper"].numpy(),
        credible_set=loaded.credible_set(x).numpy(),
        deviance=loaded.deviance(x).numpy(),
        sample_probs=loaded.sample_probs(x).numpy(),
    )
    assert "kdtfp" not in {name.split(".")[0] for name, m in sys.modules.items() if m is not None}
    print("served", x.shape[0], "rows with", len(loaded.variables), "variables")
    """
)


def _inputs(n, seed=0):
    return np.random.default_rng(seed).random((n, 64)).astype("float32")


def _ensemble(level=0.9):
    student = mlp(64, (16,), 10, name="student", seed=0)
    rng = np.random.default_rng(1)
    samples = [
        [
            (w.numpy() + 0.5 * rng.standard_normal(w.shape)).astype("float32")
            for w in student.trainable_weights
        ]
        for _ in range(NUM_SAMPLES)
    ]
    return PosteriorEnsemble(student, samples, level=level, name="posterior")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    ensemble = _ensemble()
    path = tmp_path_factory.mktemp("posterior") / "export"
    returned = export_posterior(ensemble, path)
    return ensemble, path, returned


def _expected(ensemble, x):
    out = {k: keras.ops.convert_to_numpy(v) for k, v in ensemble(x).items()}
    out["serve"] = out["mean_probs"]
    out["sample_probs"] = keras.ops.convert_to_numpy(ensemble.sample_probs(x))
    return out


def _assert_same(got, want):
    for key, value in want.items():
        if key == "credible_set":
            assert got[key].dtype == bool
            np.testing.assert_array_equal(got[key], value)
        else:
            assert got[key].dtype == np.float32, key
            np.testing.assert_allclose(got[key], value, atol=ATOL, rtol=0, err_msg=key)


def test_export_writes_every_endpoint(exported):
    ensemble, path, returned = exported
    assert os.fspath(returned) == os.fspath(path)
    loaded = tf.saved_model.load(os.fspath(path))
    for name in POSTERIOR_ENDPOINTS:
        assert callable(getattr(loaded, name)), name
    x = _inputs(6, seed=2)
    intervals = loaded.intervals(x)
    got = {
        "serve": loaded.serve(x).numpy(),
        "mean_probs": loaded.mean_probs(x).numpy(),
        "lower": intervals["lower"].numpy(),
        "upper": intervals["upper"].numpy(),
        "credible_set": loaded.credible_set(x).numpy(),
        "deviance": loaded.deviance(x).numpy(),
        "sample_probs": loaded.sample_probs(x).numpy(),
    }
    _assert_same(got, _expected(ensemble, x))
    assert got["sample_probs"].shape == (NUM_SAMPLES, 6, 10)
    assert got["deviance"].shape == (6,)


def test_posterior_samples_travel_inside_the_savedmodel(exported):
    ensemble, path, _ = exported
    loaded = tf.saved_model.load(os.fspath(path))
    by_shape = {tuple(v.shape): v.numpy() for v in loaded.variables if v.shape[0] == NUM_SAMPLES}
    for weight in ensemble.sample_variables:
        np.testing.assert_array_equal(by_shape[tuple(weight.shape)], weight.numpy())
    assert len(by_shape) == len(ensemble.student.trainable_weights)


def test_export_serves_in_a_process_without_kdtfp(exported, tmp_path):
    ensemble, path, _ = exported
    x = _inputs(37, seed=3)  # a batch size the export never saw
    batch_file = tmp_path / "batch.npy"
    np.save(batch_file, x)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    out_file = tmp_path / "served.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, str(script), os.fspath(path), str(batch_file), str(out_file)],
        cwd=tmp_path,  # not the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with np.load(out_file) as served:
        got = {key: served[key] for key in served.files}
    _assert_same(got, _expected(ensemble, x))


def test_serve_endpoint_composes_via_tfsmlayer(exported):
    ensemble, path, _ = exported
    inputs = keras.Input(shape=(64,))
    probs = keras.layers.TFSMLayer(os.fspath(path), call_endpoint="serve")(inputs)
    model = keras.Model(inputs, probs)
    x = _inputs(5, seed=4)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), _expected(ensemble, x)["mean_probs"], atol=ATOL
    )


def test_subclassed_student_needs_input_signature(tmp_path):
    class Student(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.head = keras.layers.Dense(3)

        def call(self, inputs):
            return self.head(self.hidden(inputs))

    student = Student()
    x = _inputs(4)
    student(x)
    samples = [[w.numpy() + j for w in student.trainable_weights] for j in range(3)]
    ensemble = PosteriorEnsemble(student, samples)
    with pytest.raises(ValueError, match="input_signature"):
        export_posterior(ensemble, tmp_path / "no_signature")
    path = export_posterior(
        ensemble, tmp_path / "signature", input_signature=tf.TensorSpec([None, 64], tf.float32)
    )
    loaded = tf.saved_model.load(os.fspath(path))
    np.testing.assert_allclose(
        loaded.deviance(x).numpy(), _expected(ensemble, x)["deviance"], atol=ATOL
    )


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`ensemble`"):
        export_posterior(mlp(64, (4,), 10, name="plain", seed=0), tmp_path / "plain")
    target = tmp_path / "file"
    target.write_text("occupied")
    with pytest.raises(ValueError, match="`path`"):
        export_posterior(_ensemble(), target)
    assert target.read_text() == "occupied"
