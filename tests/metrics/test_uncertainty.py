"""Uncertainty metrics against NumPy, scikit-learn and TFP references; streaming Keras metrics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from sklearn.metrics import log_loss, roc_auc_score

from kdtfp.metrics import (
    BrierScore,
    ExpectedCalibrationError,
    brier_score,
    calibration_bin_sums,
    coverage_credible_set,
    coverage_oracle_set,
    credible_set,
    credible_set_bisection,
    deviance_auroc,
    expected_calibration_error,
    interval_coverage,
    interval_coverage_per_class,
    negative_log_likelihood,
)


def _data(n=300, k=5, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(n, k))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return logits, probs, labels


# ----------------------------------------------------------------------------- NumPy references


def test_nll_matches_sklearn_and_is_finite_on_zero_prob():
    _, probs, labels = _data()
    assert negative_log_likelihood(probs, labels) == pytest.approx(
        log_loss(labels, probs, labels=range(5)), rel=1e-9
    )
    value = negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1]))
    assert np.isfinite(value) and value > 700


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_tfp(num_bins):
    _, probs, labels = _data(n=400, seed=num_bins)
    ours = expected_calibration_error(probs, labels, num_bins=num_bins)
    reference = tfp.stats.expected_calibration_error(
        num_bins,
        # TFP's binning only accepts float32 logits.
        logits=tf.constant(np.log(probs), dtype=tf.float32),
        labels_true=tf.constant(labels, dtype=tf.int32),
    )
    assert ours == pytest.approx(float(reference), abs=1e-6)


def test_ece_direct_definition():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # 2 bins: [0, .5) empty; [.5, 1]: confidences .9 .8 .55 .7, correct 1 0 1 1.
    expected = abs(3 / 4 - (0.9 + 0.8 + 0.55 + 0.7) / 4)
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(expected)
    counts, conf, corr = calibration_bin_sums(probs, labels, num_bins=2)
    np.testing.assert_allclose(counts, [0, 4])
    np.testing.assert_allclose(conf, [0, 2.95])
    np.testing.assert_allclose(corr, [0, 3])


def test_brier_score():
    _, probs, labels = _data()
    onehot = np.eye(5)[labels]
    assert brier_score(probs, labels) == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, -1)))
    assert brier_score(np.array([[1.0, 0.0]]), [0]) == 0.0
    assert brier_score(np.array([[1.0, 0.0]]), [1]) == 2.0


def test_credible_set_smallest_by_descending_probability():
    probs = np.array(
        [
            [0.5, 0.45, 0.05],  # exactly 0.95 with two classes despite rounding
            [0.97, 0.02, 0.01],  # one class
            [0.2, 0.5, 0.3],  # needs all three (0.8 < 0.95)
            [0.4, 0.4, 0.2],  # tie: both 0.4 before 0.2 -> all three
            [1 / 3, 1 / 3, 1 / 3],
        ]
    )
    sets = credible_set(probs, level=0.95)
    assert sets.dtype == bool and sets.shape == probs.shape
    np.testing.assert_array_equal(
        sets,
        [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]],
    )
    np.testing.assert_array_equal(
        credible_set(probs, level=0.5), [[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]]
    )


def test_credible_set_is_minimal_and_reaches_level():
    _, probs, _ = _data(n=200, k=6, seed=3, scale=1.0)
    for level in (0.5, 0.9, 0.95):
        sets = credible_set(probs, level)
        mass = np.sum(probs * sets, -1)
        assert np.all(mass >= level - 1e-12)
        # Dropping the smallest included class falls below the level.
        smallest = np.where(sets, probs, np.inf).min(-1)
        assert np.all(mass - smallest < level)


def test_coverage_credible_and_oracle_set():
    sets = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=bool)
    assert coverage_credible_set(sets, [0, 0, 1]) == pytest.approx(2 / 3)
    _, probs, labels = _data(n=2000, k=5, seed=1)
    oracle = coverage_oracle_set(probs, labels, level=0.95)
    assert oracle == coverage_credible_set(credible_set(probs, 0.95), labels)
    # METHODS.md 4.7: the oracle set over-covers (discreteness), so it is >= about 0.95.
    expected_mass = np.mean(np.sum(probs * credible_set(probs, 0.95), -1))
    assert expected_mass >= 0.95
    assert abs(oracle - expected_mass) < 4 * np.sqrt(0.05 * 0.95 / len(labels))


def test_interval_coverage_and_per_class():
    probs_true = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    lower = np.array([[0.1, 0.8], [0.7, 0.3], [0.0, 0.6]])
    upper = np.array([[0.3, 0.9], [0.9, 0.5], [0.5, 0.7]])
    covered = np.array([[1, 1], [0, 1], [1, 0]])
    assert interval_coverage(lower, upper, probs_true) == pytest.approx(covered.mean())
    np.testing.assert_allclose(
        interval_coverage_per_class(lower, upper, probs_true), covered.mean(0)
    )


def test_deviance_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(4)
    correct = rng.random(500) < 0.8
    # Rounded scores give many ties; misclassified points score higher on average.
    deviance = np.round(rng.normal(size=500) + 1.0 * ~correct, 1)
    ours = deviance_auroc(deviance, correct)
    assert ours == pytest.approx(roc_auc_score(~correct, deviance), abs=1e-12)
    assert 0.6 < ours < 0.9
    # All scores tied -> 0.5; perfect and reversed ranking -> 1 and 0.
    assert deviance_auroc(np.ones(4), [True, False, True, False]) == 0.5
    assert deviance_auroc([0.1, 0.2, 3.0, 4.0], [1, 1, 0, 0]) == 1.0
    assert deviance_auroc([3.0, 4.0, 0.1, 0.2], [1, 1, 0, 0]) == 0.0


def test_deviance_auroc_undefined_without_both_classes_is_nan():
    assert np.isnan(deviance_auroc([0.1, 0.5, 0.9], [True, True, True]))
    assert np.isnan(deviance_auroc([0.1, 0.5, 0.9], [False, False, False]))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda p, y: expected_calibration_error(p, y, num_bins=0), "num_bins"),
        (lambda p, y: expected_calibration_error(p, y, num_bins=2.5), "num_bins"),
        (lambda p, y: credible_set(p, level=0.0), "level"),
        (lambda p, y: credible_set(p, level=1.0), "level"),
        (lambda p, y: coverage_oracle_set(p, y, level=1.5), "level"),
        (lambda p, y: negative_log_likelihood(p, y[:-1]), "labels"),
        (lambda p, y: brier_score(p, y + 5), "labels"),
        (lambda p, y: brier_score(p[0], y), "probs"),
        (lambda p, y: brier_score(p * 2.0, y), "probs"),
        (lambda p, y: negative_log_likelihood(p[:0], y[:0]), "probs"),
        (lambda p, y: coverage_credible_set(credible_set(p)[:, :2], y), "labels"),
        (lambda p, y: coverage_credible_set(p, y), "sets"),
        (lambda p, y: interval_coverage(p[:, :2], p, p), "lower"),
        (lambda p, y: interval_coverage(p, p[1:], p), "upper"),
        (lambda p, y: interval_coverage(p + 0.1, p, p), "lower"),
        (lambda p, y: deviance_auroc(p[:, 0], y[:-1] == 0), "correct"),
        (lambda p, y: deviance_auroc(p, y == 0), "deviance"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    _, probs, labels = _data(n=10, k=3)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        call(probs, labels)


# ----------------------------------------------------------------------------- Keras metrics


@pytest.mark.parametrize("from_logits", [True, False])
def test_streaming_metrics_equal_numpy_on_concatenated_data(from_logits):
    logits, probs, labels = _data(n=250, k=4, seed=7)
    ece = ExpectedCalibrationError(num_bins=10, from_logits=from_logits)
    brier = BrierScore(from_logits=from_logits)
    inputs = logits if from_logits else probs
    for start in range(0, 250, 64):  # uneven last batch
        batch = slice(start, start + 64)
        y_pred = inputs[batch].astype("float32")
        ece.update_state(labels[batch], y_pred)
        brier.update_state(labels[batch][:, None], y_pred)  # [batch, 1] labels work too
    assert float(ece.result()) == pytest.approx(
        expected_calibration_error(probs, labels, 10), abs=1e-5
    )
    assert float(brier.result()) == pytest.approx(brier_score(probs, labels), abs=1e-5)
    ece.reset_state()
    brier.reset_state()
    assert float(ece.result()) == 0.0 and float(brier.result()) == 0.0


def test_streaming_metrics_one_hot_and_sample_weight():
    logits, probs, labels = _data(n=40, k=3, seed=8)
    onehot = np.eye(3, dtype="float32")[labels]
    weight = np.r_[np.ones(20), np.zeros(20)].astype("float32")
    brier = BrierScore()
    brier.update_state(onehot, logits.astype("float32"), sample_weight=weight)
    assert float(brier.result()) == pytest.approx(brier_score(probs[:20], labels[:20]), abs=1e-5)
    ece = ExpectedCalibrationError(num_bins=5)
    ece.update_state(onehot, logits.astype("float32"), sample_weight=weight)
    assert float(ece.result()) == pytest.approx(
        expected_calibration_error(probs[:20], labels[:20], 5), abs=1e-5
    )


def test_keras_metric_config_round_trip_and_bad_num_bins():
    for metric in (ExpectedCalibrationError(num_bins=7, from_logits=False), BrierScore(False)):
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(metric)
        )
        assert type(restored) is type(metric)
        assert restored.get_config() == metric.get_config()
    assert ExpectedCalibrationError(num_bins=7).get_config()["num_bins"] == 7
    with pytest.raises(ValueError, match="`num_bins`"):
        ExpectedCalibrationError(num_bins=0)


def _fit_and_evaluate(strategy=None, jit_compile=False):
    logits, _, labels = _data(n=96, k=3, seed=9)
    x = logits.astype("float32")
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[ExpectedCalibrationError(num_bins=5), BrierScore()],
            jit_compile=jit_compile,
        )
    history = model.fit(x, labels, batch_size=32, epochs=1, verbose=0)
    assert {"ece", "brier_score"} <= set(history.history)
    result = model.evaluate(x, labels, batch_size=32, verbose=0, return_dict=True)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(x, verbose=0)))
    probs = probs.astype("float64") / probs.sum(-1, keepdims=True)
    assert result["ece"] == pytest.approx(expected_calibration_error(probs, labels, 5), abs=1e-5)
    assert result["brier_score"] == pytest.approx(brier_score(probs, labels), abs=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_metrics_in_compile_fit_evaluate(jit_compile):
    _fit_and_evaluate(jit_compile=jit_compile)


def test_keras_metrics_sum_over_replicas(mirrored_strategy):
    # Each replica sees half of every batch; the metric variables are summed across replicas.
    _fit_and_evaluate(strategy=mirrored_strategy)


def _bisection_reference(q, level):
    """Slow reference: scan every sampled value as a candidate threshold (largest u whose
    carried mass reaches `level`), one example at a time."""
    sets = []
    for i in range(q.shape[1]):
        values = np.unique(q[:, i])
        mass = [np.mean(np.sum(q[:, i] * (q[:, i] >= u), axis=-1)) for u in values]
        u = max(v for v, m in zip(values, mass, strict=True) if m >= level)
        mean = q[:, i].mean(0)
        chosen = mean >= u
        chosen[mean.argmax()] = True
        sets.append(chosen)
    return np.array(sets)


@pytest.mark.parametrize("samples, classes", [(1, 3), (20, 5), (50, 10)])
def test_credible_set_bisection_matches_a_threshold_scan(samples, classes):
    rng = np.random.default_rng(samples)
    logits = rng.standard_normal((1, 40, classes)) * 2 + 0.5 * rng.standard_normal(
        (samples, 40, classes)
    )
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = credible_set_bisection(q, 0.95)
    np.testing.assert_array_equal(got, _bisection_reference(q, 0.95))


def test_credible_set_bisection_on_one_certain_sample_and_its_relation_to_the_smallest_set():
    q = np.array([[[1.0, 0.0, 0.0], [0.5, 0.45, 0.05]]])
    np.testing.assert_array_equal(
        credible_set_bisection(q, 0.95), [[True, False, False], [True, True, False]]
    )
    # With r = 1 the carried mass at u = q_k is the sum of the classes >= q_k: the rule keeps
    # at least the smallest set's classes.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=200)
    bisection = credible_set_bisection(p[None], 0.9)
    assert np.all(bisection >= credible_set(p, 0.9))


def test_credible_set_bisection_bad_input():
    with pytest.raises(ValueError, match="`q`"):
        credible_set_bisection(np.ones((4, 3)) / 3)
    with pytest.raises(ValueError, match="`level`"):
        credible_set_bisection(np.ones((2, 4, 3)) / 3, level=1.0)
