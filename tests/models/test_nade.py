"""NADE: normalisation, a NumPy reference, sampling, losses, saving, XLA, replicas, export."""

import itertools
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.losses.density import BernoulliNegativeLogLikelihood, LogDensitySquaredError
from kdtfp.models.nade import NADE, export_nade


def all_states(n):
    return np.array(list(itertools.product([0.0, 1.0], repeat=n)), np.float32)


def random_nade(num_inputs=8, num_hidden=5, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    nade = NADE(num_inputs, num_hidden)
    nade.set_weights([scale * rng.normal(size=w.shape).astype("float32") for w in nade.weights])
    return nade


def numpy_log_prob(nade, x):
    """The textbook NADE: a Python loop over examples and dimensions."""
    kernel, hidden_bias, output_kernel, output_bias = (
        np.asarray(w, np.float64) for w in nade.weights
    )
    out = []
    for row in x:
        a, total = hidden_bias.copy(), 0.0
        for d, x_d in enumerate(row):
            h = 1.0 / (1.0 + np.exp(-a))
            p = 1.0 / (1.0 + np.exp(-(output_bias[d] + output_kernel[d] @ h)))
            total += np.log(p if x_d else 1.0 - p)
            a += x_d * kernel[d]
        out.append(total)
    return np.array(out)


def test_log_prob_sums_to_one_over_all_states():
    nade = random_nade(10, 6)
    log_q = np.asarray(nade.log_prob(all_states(10)), np.float64)
    assert np.exp(log_q).sum() == pytest.approx(1.0, abs=1e-4)


def test_log_prob_matches_a_numpy_loop():
    nade = random_nade(8, 5, seed=1)
    x = all_states(8)[::7]
    np.testing.assert_allclose(nade.log_prob(x), numpy_log_prob(nade, x), rtol=1e-5, atol=1e-5)


def test_conditionals_are_autoregressive():
    nade = random_nade(6, 4)
    x = all_states(6)
    logits = np.asarray(nade(x))
    flipped = x.copy()
    flipped[:, 3] = 1 - flipped[:, 3]
    changed = np.asarray(nade(flipped))
    np.testing.assert_array_equal(logits[:, :4], changed[:, :4])  # outputs 0..3 ignore x_3
    assert np.abs(logits[:, 4:] - changed[:, 4:]).max() > 0


def test_sample_frequencies_match_probabilities_and_returned_log_probs():
    nade = random_nade(4, 3, seed=2)
    x, log_q = nade.sample(20000, seed=3)
    x = x.numpy()
    np.testing.assert_allclose(log_q, nade.log_prob(x), atol=1e-5)
    index = (x.astype(int) * (2 ** np.arange(4)[::-1])).sum(-1)
    freq = np.bincount(index, minlength=16) / len(x)
    probs = np.exp(np.asarray(nade.log_prob(all_states(4)), np.float64))
    assert 0.5 * np.abs(freq - probs).sum() < 0.02


def test_losses_match_numpy():
    nade = random_nade(8, 5)
    x = all_states(8)[::17]
    logits = nade(x)
    log_q = numpy_log_prob(nade, x)
    nll = BernoulliNegativeLogLikelihood()(x, logits)
    assert float(nll) == pytest.approx(-log_q.mean(), rel=1e-5)
    target = log_q + np.linspace(-1, 1, len(x))
    y_true = np.concatenate([x, target[:, None].astype("float32")], axis=1)
    square = LogDensitySquaredError()(y_true, logits)
    assert float(square) == pytest.approx(np.mean(0.5 * (log_q - target) ** 2), rel=1e-4)


def binary_data(n=256, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, d)) < np.linspace(0.1, 0.9, d)).astype("float32")


def test_fit_with_jit_compile_on_cpu_lowers_the_loss():
    x = binary_data()
    nade = NADE(8, 5)
    nade.compile(optimizer=keras.optimizers.Adam(0.05), loss=BernoulliNegativeLogLikelihood(),
                 jit_compile=True)  # fmt: skip
    history = nade.fit(x, x, batch_size=32, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_keras_round_trip(tmp_path):
    nade = random_nade(8, 5)
    nade.compile(optimizer="adam", loss=BernoulliNegativeLogLikelihood())
    nade.fit(binary_data(), binary_data(), batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "nade.keras"
    nade.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, NADE) and loaded.get_config() == nade.get_config()
    x = all_states(8)
    np.testing.assert_allclose(loaded.log_prob(x), nade.log_prob(x), atol=1e-6)
    np.testing.assert_allclose(loaded.sample(5, seed=1)[0], nade.sample(5, seed=1)[0])


def one_step_weights(strategy, initial, x):
    with strategy.scope():
        nade = NADE(8, 5)
        nade.set_weights(initial)
        nade.compile(optimizer=keras.optimizers.SGD(0.1), loss=BernoulliNegativeLogLikelihood())
    history = nade.fit(x, x, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [np.asarray(w) for w in nade.weights], history.history["loss"][0]


def test_one_fit_step_is_replica_invariant(mirrored_strategy):
    x = binary_data(n=16)
    initial = random_nade(8, 5).get_weights()
    single, single_loss = one_step_weights(tf.distribute.get_strategy(), initial, x)
    mirrored, mirrored_loss = one_step_weights(mirrored_strategy, initial, x)
    assert mirrored_loss == pytest.approx(single_loss, rel=1e-5)
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(single, initial, strict=True))


def test_export_serves_log_prob_and_samples_without_kdtfp(tmp_path):
    nade = random_nade(6, 4)
    path = export_nade(nade, tmp_path / "export")
    x = all_states(6)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", np.asarray(nade.log_prob(x)))
    script = f"""
import sys
sys.modules["kdtfp"] = None  # any `import kdtfp` now fails
import numpy as np, tensorflow as tf
served = tf.saved_model.load({str(path)!r})
x = np.load({str(tmp_path / "x.npy")!r})
log_q = served.log_prob(tf.constant(x)).numpy()
np.testing.assert_allclose(log_q, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-5)
np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), log_q)
assert abs(np.exp(log_q).sum() - 1) < 1e-4
out = served.sample(tf.constant(7), tf.constant([1, 2]))
assert out["samples"].shape == (7, 6) and out["log_prob"].shape == (7,)
assert served.conditionals(tf.constant(x)).shape == (64, 6)
print("served ok")
"""
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "served ok" in completed.stdout


def test_bad_input_names_the_argument():
    nade = NADE(4, 3)
    with pytest.raises(ValueError, match="`x` must be binary"):
        nade.log_prob(np.full((2, 4), 0.3, np.float32))
    with pytest.raises(ValueError, match="`x` must be binary"):
        nade.fit(np.full((2, 4), 2.0, np.float32), np.zeros((2, 4)), verbose=0)
    with pytest.raises(ValueError, match="`num_hidden`"):
        NADE(4, 0)
    with pytest.raises(ValueError, match="`num_samples`"):
        nade.sample(0)
