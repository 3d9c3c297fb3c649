"""`MixturePredictive`: NumPy reference, save/load, XLA, replica invariance, export, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.export import export_student
from kdtfp.models.mixture_predictive import MixturePredictive

ATOL = 1e-5


def _inputs(n=16, dim=3, scale=3.0, seed=0):
    return (scale * np.random.default_rng(seed).standard_normal((n, dim))).astype("float32")


def _soft_targets(n=16, seed=1):
    p = np.random.default_rng(seed).random(n).astype("float32")
    return np.stack([1.0 - p, p], axis=1)


def _numpy_log_probs(x, kernel, bias=None, mixture_logits=None):
    """Float64 reference: `[log(1 - f), log f]` with `f = sum_m pi_m sigmoid(x . v_m + b_m)`."""
    a = x.astype("float64") @ kernel.astype("float64")
    if bias is not None:
        a = a + bias
    m = kernel.shape[1]
    weights = np.full(m, 1.0 / m)
    if mixture_logits is not None:
        weights = np.exp(mixture_logits - mixture_logits.max())
        weights = weights / weights.sum()
    f = (weights * (1.0 / (1.0 + np.exp(-a)))).sum(axis=-1)
    return np.stack([np.log1p(-f), np.log(f)], axis=-1)


def _model(dim=3, **kwargs):
    model = MixturePredictive(**{"num_components": 4, "seed": 0, **kwargs})
    model.build((None, dim))
    return model


def test_equal_weight_mixture_matches_numpy():
    model = _model()
    x = _inputs()
    got = np.asarray(model(x))
    want = _numpy_log_probs(x, model.kernel.numpy())
    assert got.shape == (16, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(model.probability(x)), np.exp(want[:, 1]), atol=ATOL)


def test_learned_weights_and_biases_match_numpy():
    model = _model(use_bias=True, learn_weights=True)
    rng = np.random.default_rng(3)
    model.bias.assign(rng.standard_normal(4).astype("float32"))
    model.mixture_logits.assign(rng.standard_normal(4).astype("float32"))
    x = _inputs()
    want = _numpy_log_probs(
        x, model.kernel.numpy(), model.bias.numpy(), model.mixture_logits.numpy()
    )
    np.testing.assert_allclose(np.asarray(model(x)), want, atol=ATOL)
    assert model.stored_floats == 3 * 4 + 4 + 4


def test_log_probs_stay_finite_at_extreme_margins():
    model = _model(dim=1, num_components=2)
    model.kernel.assign(np.array([[100.0, 50.0]], "float32"))
    x = np.array([[-50.0], [50.0], [0.0]], "float32")
    out = np.asarray(model(x))
    assert np.all(np.isfinite(out))
    # f(-50) = (sigmoid(-5000) + sigmoid(-2500)) / 2: log f ~ -2500 - log 2, not -inf.
    np.testing.assert_allclose(out[0, 1], -2500.0 - np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(out[2], np.log([0.5, 0.5]), atol=ATOL)


def test_keras_save_load_round_trip(tmp_path):
    model = _model(use_bias=True, learn_weights=True, num_components=3)
    x = _inputs()
    path = tmp_path / "mixture.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MixturePredictive)
    assert loaded.get_config()["num_components"] == 3 and loaded.learn_weights and loaded.use_bias
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def _compiled(jit_compile=False, learning_rate=0.5):
    model = _model(learn_weights=True)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def test_fit_with_jit_compile_on_cpu_lowers_the_cross_entropy():
    x, targets = _inputs(64), _soft_targets(64)
    model = _compiled(jit_compile=True)
    history = model.fit(x, targets, batch_size=16, epochs=15, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]


def test_cross_entropy_gradient_matches_numpy_finite_differences():
    # The loss the recipe uses: CE(targets, softmax(outputs)) = -mean(t log f + (1 - t) log(1 - f)).
    model = _model()
    x, targets = _inputs(8), _soft_targets(8)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        value = loss(targets, model(x))
    gradient = tape.gradient(value, model.kernel).numpy()
    kernel = model.kernel.numpy().astype("float64")

    def numpy_loss(k):
        return -np.mean(np.sum(targets * _numpy_log_probs(x, k), axis=1))

    np.testing.assert_allclose(float(value), numpy_loss(kernel), rtol=1e-5)
    eps, numeric = 1e-4, np.zeros_like(kernel)
    for index in np.ndindex(kernel.shape):
        step = np.zeros_like(kernel)
        step[index] = eps
        numeric[index] = (numpy_loss(kernel + step) - numpy_loss(kernel - step)) / (2 * eps)
    np.testing.assert_allclose(gradient, numeric, atol=1e-4)


def _one_step(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _compiled()
    x, targets = _inputs(10), _soft_targets(10)
    history = model.fit(x, targets, batch_size=10, epochs=1, shuffle=False, verbose=0).history
    return [w.numpy() for w in model.weights], history["loss"][0]


def test_one_step_on_two_replicas_equals_one_step_on_one_device(mirrored_strategy):
    single_weights, single_loss = _one_step(tf.distribute.get_strategy())
    mirrored_weights, mirrored_loss = _one_step(mirrored_strategy)
    for single, mirrored in zip(single_weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(mirrored, single, atol=1e-6)
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-6)


_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["kdtfp"] = None  # kdtfp is not importable in this process
    sys.modules["tensorflow_probability"] = None
    import numpy as np
    import tensorflow as tf

    export_dir, batch_file, out_dir = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(batch_file))
    np.save(out_dir + "/serve.npy", loaded.serve(x).numpy())
    np.save(out_dir + "/positive.npy", loaded.prob_positive(x).numpy())
    """
)


def _export(tmp_path):
    model = _model()
    path = export_student(
        model, tmp_path / "export", input_signature=tf.TensorSpec([None, 3], tf.float32)
    )
    return model, path


def test_export_student_serves_class_probabilities_and_prob_positive(tmp_path):
    model, path = _export(tmp_path)
    loaded = tf.saved_model.load(path)
    x = _inputs(5, seed=4)
    want = np.exp(_numpy_log_probs(x, model.kernel.numpy()))
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), want, atol=ATOL)
    np.testing.assert_allclose(loaded.prob_positive(tf.constant(x)).numpy(), want[:, 1], atol=ATOL)
    np.testing.assert_allclose(loaded.logits(tf.constant(x)).numpy(), np.log(want), atol=ATOL)


@pytest.mark.slow
def test_export_serves_in_a_process_without_kdtfp(tmp_path):
    model, path = _export(tmp_path)
    x = _inputs(7, seed=5)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "serve.py").write_text(_SERVE_SCRIPT)
    completed = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "serve.py"),
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    want = np.exp(_numpy_log_probs(x, model.kernel.numpy()))
    np.testing.assert_allclose(np.load(tmp_path / "serve.npy"), want, atol=ATOL)
    np.testing.assert_allclose(np.load(tmp_path / "positive.npy"), want[:, 1], atol=ATOL)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, None, "10"])
def test_bad_num_components_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="num_components"):
        MixturePredictive(num_components=bad)


def test_inputs_that_are_not_a_matrix_are_rejected():
    with pytest.raises(ValueError, match="inputs"):
        MixturePredictive(3).build((None, 2, 2))
