"""Streaming `CredibleSetCoverage` and `DevianceAUROC` against the NumPy functions of
`kdtfp.metrics.uncertainty`, for single predictions `[B, K]` and posterior samples `[B, r, K]`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kdtfp.metrics import (
    CredibleSetCoverage,
    DevianceAUROC,
    coverage_credible_set,
    credible_set,
    deviance_auroc,
)

N, R, K, BATCHES = 600, 5, 6, 4


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _data(samples, seed=0):
    """Logits `[N, K]` or `[N, R, K]` with spread-out confidences, and labels drawn from them
    (so the arg-max is often but not always right: both classes of the AUROC are populated)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 6.0, size=(N, 1))
    centre = rng.normal(size=(N, K)) * scale
    logits = centre[:, None, :] + 0.7 * rng.normal(size=(N, R, K)) if samples else centre
    mean_probs = _softmax(logits).mean(axis=1) if samples else _softmax(logits)
    # Labels drawn from the predictive probabilities: errors are likelier at high deviance.
    labels = (rng.uniform(size=(N, 1)) > np.cumsum(mean_probs, axis=-1)).sum(-1).clip(0, K - 1)
    return logits.astype("float32"), labels.astype("int32")


def _reference(logits, labels, level=0.95):
    probs = _softmax(logits)
    if probs.ndim == 2:
        probs = probs[:, None, :]
    mean_probs = probs.mean(axis=1)
    coverage = coverage_credible_set(credible_set(mean_probs, level), labels)
    deviance = np.mean(-2.0 * np.sum(probs * np.log(probs), axis=-1), axis=1)
    auroc = deviance_auroc(deviance, mean_probs.argmax(-1) == labels)
    return coverage, auroc


def _stream(metric, y_true, y_pred, sample_weight=None):
    metric.reset_state()
    for i in np.array_split(np.arange(len(y_pred)), BATCHES):
        weight = None if sample_weight is None else sample_weight[i]
        metric.update_state(y_true[i], y_pred[i], sample_weight=weight)
    return float(metric.result())


@pytest.mark.parametrize("samples", [False, True], ids=["single", "posterior_samples"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probs"])
def test_streamed_over_batches_matches_numpy(samples, from_logits):
    logits, labels = _data(samples)
    y_pred = logits if from_logits else _softmax(logits).astype("float32")
    coverage, auroc = _reference(logits, labels)
    assert 0.75 < coverage < 1.0 and 0.6 < auroc < 1.0  # non-trivial data
    got = _stream(CredibleSetCoverage(0.95, from_logits=from_logits), labels, y_pred)
    assert got == pytest.approx(coverage, abs=1e-6)
    # DevianceAUROC is a threshold approximation of the exact Mann-Whitney AUROC.
    got = _stream(DevianceAUROC(num_thresholds=200, from_logits=from_logits), labels, y_pred)
    assert got == pytest.approx(auroc, abs=0.01)
    got = _stream(DevianceAUROC(num_thresholds=2000, from_logits=from_logits), labels, y_pred)
    assert got == pytest.approx(auroc, abs=0.002)


@pytest.mark.parametrize("level", [0.5, 0.8, 0.99])
def test_coverage_levels_one_hot_labels_and_sample_weights(level):
    logits, labels = _data(samples=True, seed=1)
    mean_probs = _softmax(logits).mean(axis=1)
    inside = credible_set(mean_probs, level)[np.arange(N), labels]
    one_hot = np.eye(K, dtype="float32")[labels]
    metric = CredibleSetCoverage(level)
    assert _stream(metric, one_hot, logits) == pytest.approx(inside.mean(), abs=1e-6)
    assert _stream(metric, labels[:, None], logits) == pytest.approx(inside.mean(), abs=1e-6)
    weights = np.random.default_rng(2).uniform(size=N).astype("float32")
    expected = np.sum(weights * inside) / np.sum(weights)
    assert _stream(metric, labels, logits, weights) == pytest.approx(expected, rel=1e-5)


def test_coverage_ties_and_exact_level_follow_credible_set():
    # Mass exactly at the level ends the set; among equal probabilities the lower class comes
    # first (as in `credible_set`).
    probs = np.array(
        [[0.5, 0.45, 0.05], [0.5, 0.45, 0.05], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4], [1.0, 0.0, 0.0]],
        "float32",
    )
    labels = np.array([1, 2, 0, 1, 1])
    expected = credible_set(probs, 0.7)[np.arange(5), labels]
    np.testing.assert_array_equal(expected, [True, False, True, False, False])
    metric = CredibleSetCoverage(0.7, from_logits=False)
    for i in range(5):
        assert _stream(metric, labels[i : i + 1], probs[i : i + 1]) == float(expected[i]), i
    metric = CredibleSetCoverage(0.95, from_logits=False)
    assert _stream(metric, np.array([1, 2]), probs[:2]) == 0.5


def test_deviance_auroc_sample_weights_and_undefined_case():
    logits, labels = _data(samples=False, seed=3)
    mean_probs = _softmax(logits)
    correct = mean_probs.argmax(-1) == labels
    deviance = -2.0 * np.sum(mean_probs * np.log(mean_probs), axis=-1)
    # Integer weights = repeating examples, which the exact AUROC can reproduce.
    weights = np.random.default_rng(4).integers(1, 4, size=N)
    expected = deviance_auroc(np.repeat(deviance, weights), np.repeat(correct, weights))
    got = _stream(DevianceAUROC(1000), labels, logits, weights.astype("float32"))
    assert got == pytest.approx(expected, abs=0.005)
    # All correct: no positives, the AUROC is undefined (NaN, as `deviance_auroc` returns).
    metric = DevianceAUROC()
    assert np.isnan(_stream(metric, mean_probs.argmax(-1), logits))
    metric.update_state(labels, logits)  # now with errors: defined again, and reset works
    assert np.isfinite(float(metric.result()))
    metric.reset_state()
    assert np.isnan(float(metric.result()))


def test_get_config_round_trip_and_argument_checks():
    for metric in (
        CredibleSetCoverage(level=0.9, from_logits=False, name="cov90"),
        DevianceAUROC(num_thresholds=321, from_logits=False, name="dev_auc"),
    ):
        config = metric.get_config()
        restored = type(metric).from_config(config)
        assert restored.get_config() == config
        again = keras.metrics.deserialize(keras.metrics.serialize(metric))
        assert type(again) is type(metric) and again.get_config() == config
    assert DevianceAUROC(num_thresholds=321).auc.num_thresholds == 321
    for level in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="`level`"):
            CredibleSetCoverage(level)
    for num in (1, 2.5, True):
        with pytest.raises(ValueError, match="`num_thresholds`"):
            DevianceAUROC(num)
    with pytest.raises(ValueError, match=r"\[batch, r, K\]"):
        CredibleSetCoverage().update_state(np.zeros(2), np.zeros((2, 1, 1, 3), "float32"))


@keras.saving.register_keras_serializable(package="kdtfp_tests")
def _logit_penalty(y_true, y_pred):
    """A loss for any output shape (evaluate needs one; the metrics are what is tested)."""
    return keras.ops.mean(keras.ops.square(y_pred))


def _model(samples):
    """A linear model of logits `[B, K]`, or of `R` posterior-sample logits `[B, R, K]`."""
    inputs = keras.Input((8,))
    if samples:
        outputs = keras.layers.Reshape((R, K))(keras.layers.Dense(R * K)(inputs))
    else:
        outputs = keras.layers.Dense(K)(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "samples, jit_compile", [(False, False), (True, True)], ids=["single", "samples_jit"]
)
def test_compiled_metrics_in_evaluate_and_after_save_load(samples, jit_compile, tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = rng.integers(0, K, size=256).astype("int32")
    model = _model(samples)
    model.compile(
        optimizer="sgd",
        loss=_logit_penalty,
        metrics=[CredibleSetCoverage(0.9), DevianceAUROC(num_thresholds=1000)],
        jit_compile=jit_compile,
    )
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    coverage, auroc = _reference(model.predict(x, verbose=0), y, level=0.9)
    assert logs["credible_set_coverage"] == pytest.approx(coverage, abs=1e-6)
    assert logs["deviance_auroc"] == pytest.approx(auroc, abs=0.005)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    for name in ("credible_set_coverage", "deviance_auroc"):
        assert again[name] == pytest.approx(logs[name], abs=1e-6), name


def test_metrics_sum_over_replicas(mirrored_strategy):
    # Each replica sees half of every batch; Keras sums the metric variables across replicas.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(192, 8)).astype("float32")
    y = rng.integers(0, K, size=192).astype("int32")
    with mirrored_strategy.scope():
        model = _model(samples=True)
        model.compile(
            optimizer="sgd",
            loss=_logit_penalty,
            metrics=[CredibleSetCoverage(0.9), DevianceAUROC(num_thresholds=1000)],
        )
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    coverage, auroc = _reference(model.predict(x, verbose=0), y, level=0.9)
    assert logs["credible_set_coverage"] == pytest.approx(coverage, abs=1e-6)
    assert logs["deviance_auroc"] == pytest.approx(auroc, abs=0.005)
