"""`kdtfp.models.PosteriorEnsemble`: weight samples as a Keras model, against the NumPy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import kdtfp
from kdtfp.metrics import credible_set
from kdtfp.models import PosteriorEnsemble
from kdtfp.predictive import predict_distribution, summarize_probability_samples
from kdtfp.teachers import mlp

ATOL = 1e-5
KEYS = ("mean_probs", "lower", "upper", "credible_set", "deviance")


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class DropoutStudent(keras.Model):
    """A subclassed student with dropout: the ensemble must run it in inference mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.dropout = keras.layers.Dropout(0.5)
        self.head = keras.layers.Dense(3)

    def call(self, inputs, training=None):
        return self.head(self.dropout(self.hidden(inputs), training=training))


def _student(num_classes=10, hidden=16, input_dim=64, name="student"):
    return mlp(input_dim, (hidden,), num_classes, name=name, seed=0)


def _samples(student, r, scale=0.5, seed=0):
    """`r` random weight samples around the student's weights, in trainable-weight order."""
    rng = np.random.default_rng(seed)
    return [
        [
            (w.numpy() + scale * rng.standard_normal(w.shape)).astype("float32")
            for w in student.trainable_weights
        ]
        for _ in range(r)
    ]


def _inputs(n, input_dim=64, seed=1):
    return np.random.default_rng(seed).random((n, input_dim)).astype("float32")


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _numpy_probs(samples, x):
    """Float64 forward pass of a one-hidden-layer ReLU MLP for every sample: `[r, N, K]`."""
    x = x.astype("float64")
    probs = []
    for w1, b1, w2, b2 in samples:
        hidden = np.maximum(x @ w1.astype("float64") + b1, 0.0)
        probs.append(np.exp(_log_softmax(hidden @ w2.astype("float64") + b2)))
    return np.stack(probs)


def _numpy(outputs):
    return {key: keras.ops.convert_to_numpy(value) for key, value in outputs.items()}


def _assert_matches(got, want, atol=ATOL):
    assert set(got) == set(KEYS)
    for key in ("mean_probs", "lower", "upper", "deviance"):
        np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=0, err_msg=key)
    assert got["credible_set"].dtype == bool
    np.testing.assert_array_equal(got["credible_set"], want["credible_set"])


def _tie_student(logits):
    """A student whose output kernel is zero, so every sample gives exactly `logits`."""
    student = _student(num_classes=len(logits), name="tied")
    samples = _samples(student, 5, seed=3)
    for sample in samples:
        sample[2] = np.zeros_like(sample[2])
        sample[3] = np.asarray(logits, dtype="float32")
    return student, samples


def test_matches_predict_distribution_on_random_samples():
    student = _student()
    samples = _samples(student, 6)
    x = _inputs(40)
    ensemble = PosteriorEnsemble(student, samples, level=0.9)
    want = predict_distribution(student, samples, x, level=0.9)
    got = _numpy(ensemble(x))
    _assert_matches(got, want)
    assert got["mean_probs"].shape == (40, 10) and got["deviance"].shape == (40,)
    assert 1 < got["credible_set"].sum(axis=-1).max()  # the sets are not trivially one class


@pytest.mark.parametrize(
    "num_classes, r, level",
    [(2, 1, 0.95), (2, 33, 0.9), (10, 200, 0.95), (10, 7, 0.5), (10, 40, 0.99)],
)
def test_matches_numpy_summaries(num_classes, r, level):
    student = _student(num_classes)
    samples = _samples(student, r, scale=0.8, seed=r)
    x = _inputs(25, seed=r)
    want = summarize_probability_samples(_numpy_probs(samples, x), level)
    ensemble = PosteriorEnsemble(student, samples, level=level)
    _assert_matches(_numpy(ensemble(x)), want)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ensemble.sample_probs(x)), _numpy_probs(samples, x), atol=ATOL
    )


@pytest.mark.parametrize(
    "logits, level, expected",
    [
        ([0.0, 0.0], 0.3, [True, False]),  # K = 2, an exact tie: the lower index goes first
        ([0.0, 0.0], 0.95, [True, True]),
        # K = 10: three tied classes at p = 0.227 (1, 2, 5), two at 0.083 (0, 3), five at 0.031.
        ([1.0, 2.0, 2.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0], 0.2, [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
        ([1.0, 2.0, 2.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0], 0.4, [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]),
        ([1.0, 2.0, 2.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0], 0.7, [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]),
        ([1.0, 2.0, 2.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0], 0.9, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
        ([0.0] * 10, 0.35, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]),
    ],
)
def test_credible_set_ties_go_to_the_lower_class_index(logits, level, expected):
    student, samples = _tie_student(logits)
    x = _inputs(3)
    got = _numpy(PosteriorEnsemble(student, samples, level=level)(x))
    want = summarize_probability_samples(_numpy_probs(samples, x), level)
    _assert_matches(got, want)
    np.testing.assert_array_equal(got["credible_set"], np.tile(np.asarray(expected, bool), (3, 1)))
    # Identical samples: the interval collapses onto the probabilities.
    np.testing.assert_allclose(got["lower"], got["upper"], atol=1e-7)


def test_borderline_mass_counts_as_reaching_the_level():
    # [0.5, 0.45, 0.05] at level 0.95: the relative tolerance of kdtfp.metrics.credible_set keeps
    # two classes although 0.5 + 0.45 rounds below 0.95 (float64 summaries reproduce it).
    student, samples = _tie_student(np.log([0.5, 0.45, 0.05]))
    x = _inputs(2)
    got = _numpy(PosteriorEnsemble(student, samples, level=0.95)(x))
    want = summarize_probability_samples(_numpy_probs(samples, x), 0.95)
    _assert_matches(got, want)
    np.testing.assert_array_equal(got["credible_set"], credible_set(want["mean_probs"], 0.95))


def test_probability_outputs_with_exact_zeros():
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    probs = keras.layers.Softmax()(keras.layers.Dense(3)(hidden))
    student = keras.Model(inputs, probs)
    samples = _samples(student, 9, seed=5)
    for j, sample in enumerate(samples):  # class 2 underflows to probability 0 for some samples
        sample[3] = np.asarray([0.0, 0.5, -200.0 if j % 2 else 0.0], "float32")
    x = _inputs(12, input_dim=4)
    q = np.stack(
        [np.asarray(student.stateless_call(s, [], x)[0], "float64") for s in samples]
    )  # the reference needs the student's own outputs (float32 softmax, zeros included)
    assert (q == 0).any()
    ensemble = PosteriorEnsemble(student, samples, from_logits=False)
    got = _numpy(ensemble(x))
    _assert_matches(got, summarize_probability_samples(q, 0.95))
    assert np.all(np.isfinite(got["deviance"]))


def test_extreme_logits_give_finite_deviance():
    student, samples = _tie_student([0.0, 300.0, -300.0])
    got = _numpy(PosteriorEnsemble(student, samples)(_inputs(2)))
    np.testing.assert_allclose(got["deviance"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(got["credible_set"], [[False, True, False]] * 2)


def test_map_fn_float32_and_vectorized_map_agree():
    student = _student()
    samples = _samples(student, 11)
    x = _inputs(17)
    want = _numpy(PosteriorEnsemble(student, samples)(x))
    _assert_matches(_numpy(PosteriorEnsemble(student, samples, vectorize=False)(x)), want)
    fast = _numpy(PosteriorEnsemble(student, samples, summary_dtype="float32")(x))
    for key in ("mean_probs", "lower", "upper", "deviance"):
        np.testing.assert_allclose(fast[key], want[key], atol=ATOL)


@pytest.mark.parametrize("vectorize", [True, False])
def test_jit_compiled_call_matches_eager(vectorize):
    student, samples = _tie_student([1.0, 2.0, 2.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    noisy = _samples(student, 5, seed=7)
    ensemble = PosteriorEnsemble(student, samples + noisy, level=0.5, vectorize=vectorize)
    x = _inputs(9)
    want = _numpy(ensemble(x))
    got = _numpy(tf.function(ensemble, jit_compile=True)(tf.constant(x)))
    _assert_matches(got, want)


def test_predict_and_batch_sizes():
    student = _student()
    ensemble = PosteriorEnsemble(student, _samples(student, 5))
    x = _inputs(23)
    whole = _numpy(ensemble(x))
    predicted = ensemble.predict(x, batch_size=8, verbose=0)
    _assert_matches(predicted, whole)
    _assert_matches(_numpy(ensemble(x[:1])), {k: v[:1] for k, v in whole.items()})


def test_keras_round_trip_gives_identical_outputs(tmp_path):
    student = _student()
    ensemble = PosteriorEnsemble(
        student, _samples(student, 8), level=0.8, summary_dtype="float32", name="bkd"
    )
    x = _inputs(15)
    before = _numpy(ensemble(x))
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, PosteriorEnsemble) and loaded.name == "bkd"
    assert (loaded.num_samples, loaded.level, loaded.from_logits) == (8, 0.8, True)
    assert loaded.summary_dtype == "float32"
    for a, b in zip(loaded.sample_variables, ensemble.sample_variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    after = _numpy(loaded(x))
    for key in KEYS:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_config_holds_no_sample_values():
    student = _student()
    ensemble = PosteriorEnsemble(student, _samples(student, 4), from_logits=True)
    config = ensemble.get_config()
    assert config["num_samples"] == 4 and config["level"] == 0.95
    clone = PosteriorEnsemble.from_config(config)
    assert [tuple(w.shape) for w in clone.sample_variables] == [
        (4, *w.shape) for w in student.trainable_weights
    ]
    assert all(not np.any(w.numpy()) for w in clone.sample_variables)  # filled by weight loading


def test_from_sampler_uses_every_kept_sample():
    keras.utils.set_random_seed(0)
    student = _student(num_classes=3, hidden=4, input_dim=5)
    student.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    sampler = kdtfp.callbacks.PosteriorSampler(burn_in=2, thin=2, max_samples=10, verbose=0)
    x = _inputs(64, input_dim=5)
    y = np.arange(64) % 3
    student.fit(x, y, batch_size=8, epochs=1, callbacks=[sampler], verbose=0)
    assert len(sampler) == 3
    ensemble = PosteriorEnsemble.from_sampler(student, sampler, level=0.9)
    assert ensemble.num_samples == 3 and ensemble.level == 0.9
    np.testing.assert_array_equal(
        ensemble.sample_variables[0].numpy(), np.stack([s[0] for s in sampler.samples])
    )
    _assert_matches(
        _numpy(ensemble(x)), predict_distribution(student, sampler.samples, x, level=0.9)
    )


def test_student_weights_are_left_alone():
    student = _student()
    before = [w.numpy().copy() for w in student.weights]
    PosteriorEnsemble(student, _samples(student, 3))(_inputs(4))
    for a, b in zip(before, student.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_bad_arguments_are_named():
    student = _student()
    samples = _samples(student, 2)
    with pytest.raises(ValueError, match="`samples`"):
        PosteriorEnsemble(student, [])
    with pytest.raises(ValueError, match="`samples`"):
        PosteriorEnsemble(student)
    with pytest.raises(ValueError, match=r"`samples\[1\]` has 3 arrays"):
        PosteriorEnsemble(student, [samples[0], samples[1][:3]])
    bad = [list(samples[0]), [np.zeros((64, 17), "float32"), *samples[1][1:]]]
    with pytest.raises(ValueError, match=r"`samples\[1\]\[0\]` has shape \(64, 17\)"):
        PosteriorEnsemble(student, bad)
    for level in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="`level`"):
            PosteriorEnsemble(student, samples, level=level)
    with pytest.raises(ValueError, match="`summary_dtype`"):
        PosteriorEnsemble(student, samples, summary_dtype="float16")
    with pytest.raises(ValueError, match="`student`"):
        PosteriorEnsemble(lambda x: x, samples)
    with pytest.raises(ValueError, match="`num_samples`"):
        PosteriorEnsemble(student, samples, num_samples=3)


def test_credible_set_tf_matches_numpy_rule_with_ties_and_borderline_masses():
    from kdtfp.models.posterior_ensemble import credible_set_tf

    rng = np.random.default_rng(4)
    raw = np.round(rng.random((300, 6)), 1) + 1e-3  # many exact ties
    probs = raw / raw.sum(axis=-1, keepdims=True)
    borderline = [[0.5, 0.45, 0.05, 0, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]
    probs = np.concatenate([probs, borderline])
    for level in (0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99):
        want = credible_set(probs, level)
        got = credible_set_tf(tf.constant(probs), level).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"level={level}")
        jitted = tf.function(lambda p, level=level: credible_set_tf(p, level), jit_compile=True)
        np.testing.assert_array_equal(jitted(tf.constant(probs)).numpy(), want)
    assert credible_set_tf(tf.constant(probs[-2:-1]), 0.95).numpy().sum() == 2


def test_subclassed_student_with_dropout_round_trips(tmp_path):
    student = DropoutStudent()
    x = _inputs(6, input_dim=5)
    student(x)
    ensemble = PosteriorEnsemble(student, _samples(student, 4, seed=9))
    before = _numpy(ensemble(x))
    _assert_matches(_numpy(ensemble(x)), before)  # deterministic: dropout is off
    ensemble.save(tmp_path / "subclassed.keras")
    loaded = keras.saving.load_model(tmp_path / "subclassed.keras")
    after = _numpy(loaded(x))
    for key in KEYS:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
