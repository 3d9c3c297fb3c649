"""`kdtfp.export.export_student`: the student alone, as a SavedModel that serves without kdtfp."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kdtfp
from kdtfp.export import export_student
from kdtfp.teachers import mlp

ATOL = 1e-5
SPEC = tf.TensorSpec([None, 64], tf.float32)

# Runs in a fresh interpreter where `import kdtfp` fails: the export must serve with TensorFlow only.
_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["kdtfp"] = None  # kdtfp is not importable in this process
    sys.modules["tensorflow_probability"] = None  # nor is TFP: serving needs TensorFlow alone
    try:
        import kdtfp  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("kdtfp was importable in the serving process")

    import numpy as np
    import tensorflow as tf

    export_dir, batch_file, out_dir = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(batch_file))
    np.save(out_dir + "/serve.npy", loaded.serve(x).numpy())
    np.save(out_dir + "/logits.npy", loaded.logits(x).numpy())
    assert "kdtfp" not in {name.split(".")[0] for name, m in sys.modules.items() if m is not None}
    print("served", x.shape[0], "rows with", len(loaded.variables), "variables")
    """
)


def _digits_batch(n=48, seed=0):
    # Digits-like inputs in [0, 1]; the export check needs no real images.
    return np.random.default_rng(seed).random((n, 64)).astype("float32")


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _softmax(logits):
    return _numpy(tf.nn.softmax(logits, axis=-1))


def _variable_arrays(variables):
    """The variables' values, sorted by shape and content (names differ between Keras and a load)."""
    arrays = [np.asarray(_numpy(v), dtype="float64") for v in variables]
    return sorted(arrays, key=lambda a: (a.shape, float(a.sum()), float(np.abs(a).sum())))


def _assert_same_variables(loaded, model):
    """`loaded.variables` are exactly `model.variables`: as many, same shapes, same values."""
    got, want = _variable_arrays(loaded.variables), _variable_arrays(model.variables)
    assert [a.shape for a in got] == [a.shape for a in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


class ResidualStudent(keras.Model):
    """A subclassed student (no symbolic input) with its own forward pass and an extra endpoint."""

    def __init__(self, width=16, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Dense(width, activation="relu", name="stem")
        self.block = keras.layers.Dense(width, activation="relu", name="block")
        self.head = keras.layers.Dense(num_classes, name="head")

    def call(self, inputs, training=None):
        h = self.stem(inputs)
        return self.head(h + self.block(h))

    def export_endpoints(self):
        return {
            "top_class": lambda inputs: tf.argmax(
                self(inputs, training=False), axis=-1, output_type=tf.int32
            )
        }


class FunctionalWithEndpoints(keras.Model):
    """A functional student (built from `inputs`/`outputs`) that adds an endpoint of its own."""

    def export_endpoints(self):
        return {
            "top_class": lambda inputs: tf.argmax(
                self(inputs, training=False), axis=-1, output_type=tf.int32
            )
        }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny distiller (teacher 64-32-10, student 64-16-10) after a few steps, and its export."""
    keras.utils.set_random_seed(0)
    student = mlp(64, (16,), 10, name="student", seed=0)
    teacher = mlp(64, (32,), 10, name="teacher", seed=100)
    distiller = kdtfp.Distiller(
        student,
        teacher,
        objectives=[(kdtfp.losses.SoftTargetKL(temperature=2.0), 1.0)],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        student_loss_weight=0.1,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = _digits_batch(96, seed=1)
    y = np.arange(96, dtype="int32") % 10
    distiller.fit(x, y, epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("distiller") / "export"
    returned = export_student(distiller, path)
    return distiller, path, returned


def test_export_returns_path_and_writes_a_savedmodel(trained):
    _, path, returned = trained
    assert os.fspath(returned) == os.fspath(path)
    assert tf.saved_model.contains_saved_model(os.fspath(path))


def test_export_serves_in_a_process_without_kdtfp(trained, tmp_path):
    distiller, path, _ = trained
    x = _digits_batch(37, seed=2)  # a batch size the export never saw
    batch_file = tmp_path / "batch.npy"
    np.save(batch_file, x)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, str(script), os.fspath(path), str(batch_file), str(tmp_path)],
        cwd=tmp_path,  # not the repository root: nothing of kdtfp on the path but the installed package
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    logits = _numpy(distiller.student(x, training=False))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits, atol=ATOL)
    np.testing.assert_allclose(np.load(tmp_path / "serve.npy"), _softmax(logits), atol=ATOL)


def test_serve_endpoint_composes_into_a_functional_model_via_tfsmlayer(trained):
    distiller, path, _ = trained
    x = _digits_batch(20, seed=3)
    inputs = keras.Input(shape=(64,), name="pixels")
    probs = keras.layers.TFSMLayer(os.fspath(path), call_endpoint="serve", name="served_student")(
        inputs
    )
    top = keras.layers.Lambda(
        lambda p: keras.ops.max(p, axis=-1, keepdims=True), name="confidence"
    )(probs)
    model = keras.Model(inputs, [probs, top])
    served_probs, confidence = model.predict(x, verbose=0)
    expected = _softmax(distiller.student(x, training=False))
    np.testing.assert_allclose(served_probs, expected, atol=ATOL)
    np.testing.assert_allclose(confidence[:, 0], expected.max(axis=-1), atol=ATOL)
    np.testing.assert_allclose(served_probs.sum(axis=-1), 1.0, atol=ATOL)


def test_distiller_export_holds_only_the_students_variables(trained):
    distiller, path, _ = trained
    loaded = tf.saved_model.load(os.fspath(path))
    assert len(loaded.variables) == len(distiller.student.variables) == 4
    assert len(loaded.trainable_variables) == len(distiller.student.trainable_variables)
    _assert_same_variables(loaded, distiller.student)
    # Nothing of the teacher (64-32-10) nor of the distiller (term weights, temperatures) is in it.
    names = [v.name for v in loaded.variables]
    assert not any(
        name.startswith("teacher") or "term_weights" in name or "temperature" in name
        for name in names
    )
    shapes = {tuple(v.shape) for v in loaded.variables}
    assert not shapes & {(64, 32), (32,), (32, 10)}
    assert len(distiller.teacher.variables) == 4  # there was a teacher to leave out


def test_export_of_a_plain_student_model(trained, tmp_path):
    distiller, _, _ = trained
    student = distiller.student
    path = export_student(student, tmp_path / "plain")
    loaded = tf.saved_model.load(os.fspath(path))
    _assert_same_variables(loaded, student)
    x = _digits_batch(9, seed=4)
    logits = _numpy(student(x, training=False))
    np.testing.assert_allclose(loaded.logits(x).numpy(), logits, atol=ATOL)
    np.testing.assert_allclose(loaded.serve(x).numpy(), _softmax(logits), atol=ATOL)


def _functional_student_with_endpoints():
    keras.utils.set_random_seed(1)
    inputs = keras.Input(shape=(64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    student = FunctionalWithEndpoints(inputs, keras.layers.Dense(10)(hidden), name="with_endpoints")
    assert student.inputs  # functional: the signature comes from its symbolic input
    return student


def test_extra_endpoints_from_the_students_export_endpoints_method(tmp_path):
    student = _functional_student_with_endpoints()
    path = export_student(student, tmp_path / "method")
    loaded = tf.saved_model.load(os.fspath(path))
    x = _digits_batch(11, seed=5)
    logits = _numpy(student(x, training=False))
    np.testing.assert_array_equal(loaded.top_class(x).numpy(), logits.argmax(axis=-1))
    np.testing.assert_allclose(loaded.serve(x).numpy(), _softmax(logits), atol=ATOL)


def test_extra_endpoints_from_the_endpoints_argument(tmp_path):
    student = _functional_student_with_endpoints()
    path = export_student(
        student,
        tmp_path / "argument",
        endpoints={
            "log_probs": lambda model, x: tf.nn.log_softmax(model(x)),
            "scaled": lambda model, x: 2.0 * model(x),  # a second one: each keeps its own function
        },
    )
    loaded = tf.saved_model.load(os.fspath(path))
    x = _digits_batch(11, seed=5)
    logits = _numpy(student(x, training=False))
    np.testing.assert_allclose(
        loaded.log_probs(x).numpy(), _numpy(tf.nn.log_softmax(logits)), atol=ATOL
    )
    np.testing.assert_allclose(loaded.scaled(x).numpy(), 2.0 * logits, atol=ATOL)
    np.testing.assert_array_equal(
        loaded.top_class(x).numpy(), logits.argmax(axis=-1)
    )  # both kinds together
    np.testing.assert_allclose(loaded.serve(x).numpy(), _softmax(logits), atol=ATOL)


def test_reserved_endpoint_name_is_rejected(tmp_path):
    student = mlp(64, (8,), 10, name="reserved", seed=0)
    with pytest.raises(ValueError, match="serve"):
        export_student(
            student, tmp_path / "reserved", endpoints={"serve": lambda model, x: model(x)}
        )


def test_subclassed_student_needs_input_signature(tmp_path):
    keras.utils.set_random_seed(2)
    student = ResidualStudent(name="residual_student")
    x = _digits_batch(13, seed=6)
    logits = _numpy(student(x))  # built by a call, but still without a symbolic input
    with pytest.raises(ValueError, match="input_signature"):
        export_student(student, tmp_path / "no_signature")
    path = export_student(student, tmp_path / "with_signature", input_signature=SPEC)
    loaded = tf.saved_model.load(os.fspath(path))
    _assert_same_variables(loaded, student)
    np.testing.assert_allclose(loaded.logits(x).numpy(), logits, atol=ATOL)
    np.testing.assert_allclose(loaded.serve(x).numpy(), _softmax(logits), atol=ATOL)
    np.testing.assert_array_equal(loaded.top_class(x).numpy(), logits.argmax(axis=-1))


def test_subclassed_student_inside_a_distiller_exports_with_input_signature(tmp_path):
    keras.utils.set_random_seed(3)
    student = ResidualStudent(name="residual_student")
    teacher = mlp(64, (32,), 10, name="teacher", seed=7)
    distiller = kdtfp.Distiller(
        student, teacher, objectives=[(kdtfp.losses.SoftTargetKL(temperature=2.0), 1.0)]
    )
    distiller.compile(optimizer="adam")
    distiller.fit(_digits_batch(32, seed=8), epochs=1, batch_size=16, verbose=0)
    with pytest.raises(ValueError, match="input_signature"):
        export_student(distiller, tmp_path / "no_signature")
    path = export_student(distiller, tmp_path / "export", input_signature=SPEC)
    loaded = tf.saved_model.load(os.fspath(path))
    _assert_same_variables(loaded, student)
    assert not {tuple(v.shape) for v in loaded.variables} & {
        (64, 32),
        (32, 10),
    }  # no teacher kernels
    x = _digits_batch(5, seed=9)
    np.testing.assert_allclose(
        loaded.serve(x).numpy(), _softmax(student(x, training=False)), atol=ATOL
    )


def test_path_that_is_a_file_is_rejected(tmp_path):
    student = mlp(64, (8,), 10, name="file_target", seed=0)
    target = tmp_path / "not_a_directory"
    target.write_text("occupied")
    with pytest.raises(ValueError, match="`path`"):
        export_student(student, target)
    assert target.read_text() == "occupied"


def test_non_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="model_or_distiller"):
        export_student(lambda x: x, tmp_path / "function")
