"""RBM: exact log Z and free energy against brute force, Gibbs sampling, CD/PCD training, saving."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.models.rbm import (
    RBM,
    ContrastiveDivergence,
    exact_log_partition,
    exact_samples,
    free_energy,
)


def all_states(n):
    return np.array(list(itertools.product([0.0, 1.0], repeat=n)))


def random_rbm(num_visible=6, num_hidden=4, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    rbm = RBM(num_visible, num_hidden, seed=seed)
    rbm.kernel.assign(scale * rng.normal(size=(num_visible, num_hidden)).astype("float32"))
    rbm.visible_bias.assign(rng.normal(size=num_visible).astype("float32"))
    rbm.hidden_bias.assign(rng.normal(size=num_hidden).astype("float32"))
    return rbm


def brute_force_log_z(kernel, visible_bias, hidden_bias):
    v, h = all_states(kernel.shape[0]), all_states(kernel.shape[1])
    neg_energy = (v @ visible_bias)[:, None] + (h @ hidden_bias)[None] + v @ kernel @ h.T
    peak = neg_energy.max()
    return peak + np.log(np.exp(neg_energy - peak).sum())


def numpy_free_energy(v, kernel, visible_bias, hidden_bias):
    return -v @ visible_bias - np.log1p(np.exp(v @ kernel + hidden_bias)).sum(-1)


def test_exact_log_partition_matches_enumeration_over_visible_and_hidden_states():
    rbm = random_rbm(6, 4, scale=1.5)
    params = rbm.numpy_parameters()
    expected = brute_force_log_z(*params)
    assert rbm.log_partition() == pytest.approx(expected, abs=1e-10)
    # Chunked enumeration gives the same number.
    assert exact_log_partition(rbm, chunk_size=3) == pytest.approx(expected, abs=1e-10)


def test_exact_log_partition_enumerates_the_visible_side_when_hidden_is_too_wide():
    rng = np.random.default_rng(1)
    params = (rng.normal(size=(3, 21)) * 0.3, rng.normal(size=3), rng.normal(size=21))
    v = all_states(3)
    expected = np.logaddexp.reduce(-numpy_free_energy(v, *params))
    assert exact_log_partition(params) == pytest.approx(expected, abs=1e-9)


def test_free_energy_matches_numpy_and_model_call():
    rbm = random_rbm(6, 4)
    v = all_states(6).astype("float32")
    expected = numpy_free_energy(v.astype(np.float64), *rbm.numpy_parameters())
    np.testing.assert_allclose(np.asarray(rbm(v)), expected, rtol=1e-5, atol=1e-5)
    params = [tf.constant(p, tf.float32) for p in rbm.numpy_parameters()]
    np.testing.assert_allclose(free_energy(tf.constant(v), *params), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_is_normalised_over_all_visible_states():
    rbm = random_rbm(6, 4)
    log_p = rbm.log_prob(all_states(6))
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-10)


def exact_visible_probs(rbm):
    return np.exp(rbm.log_prob(all_states(rbm.num_visible)))


def frequencies(samples, num_visible):
    index = (samples.astype(int) * (2 ** np.arange(num_visible)[::-1])).sum(-1)
    return np.bincount(index, minlength=2**num_visible) / len(samples)


def test_gibbs_sampler_stationary_distribution_matches_exact_probabilities():
    rbm = random_rbm(4, 3, scale=1.0, seed=2)
    start = np.zeros((20000, 4), np.float32)
    samples = np.asarray(rbm.gibbs(start, num_sweeps=30, seed=3))
    total_variation = 0.5 * np.abs(frequencies(samples, 4) - exact_visible_probs(rbm)).sum()
    assert total_variation < 0.02


def test_exact_samples_follow_exact_probabilities():
    rbm = random_rbm(4, 3, scale=1.0, seed=2)
    samples = exact_samples(rbm, 20000, seed=0)
    total_variation = 0.5 * np.abs(frequencies(samples, 4) - exact_visible_probs(rbm)).sum()
    assert total_variation < 0.02


def test_contrastive_divergence_loss_gradient_is_the_cd_update():
    rbm = random_rbm(6, 4)
    rng = np.random.default_rng(0)
    data = (rng.random((5, 6)) < 0.5).astype("float32")
    negatives = (rng.random((5, 6)) < 0.5).astype("float32")
    with tf.GradientTape() as tape:
        stacked = tf.stack([rbm(data), rbm(tf.stop_gradient(negatives))], axis=-1)
        loss = ContrastiveDivergence()(tf.zeros(5), stacked)
    grad = tape.gradient(loss, rbm.kernel).numpy()
    kernel, _, hidden_bias = rbm.numpy_parameters()

    def positive_statistics(v):  # <v h^T> with h at its conditional mean
        return v.T @ (1.0 / (1.0 + np.exp(-(v @ kernel + hidden_bias)))) / len(v)

    expected = -(positive_statistics(data) - positive_statistics(negatives))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def toy_patterns():
    # Two noisy prototypes over 8 pixels.
    rng = np.random.default_rng(0)
    prototypes = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], np.float32)
    data = prototypes[rng.integers(0, 2, 400)]
    flips = rng.random(data.shape) < 0.05
    return np.where(flips, 1 - data, data).astype("float32")


@pytest.mark.parametrize("persistent", [False, True])
def test_cd_and_pcd_training_raise_the_data_log_likelihood(persistent):
    data = toy_patterns()
    rbm = RBM(8, 4, cd_steps=1, persistent=persistent, num_chains=50, seed=0)
    before = rbm.log_prob(data).mean()
    rbm.compile(optimizer=keras.optimizers.Adam(0.01), steps_per_execution=10)
    rbm.fit(data, batch_size=50, epochs=20, verbose=0)
    after = rbm.log_prob(data).mean()
    assert after > before + 1.0, (before, after)


def test_fit_with_jit_compile_on_cpu():
    data = toy_patterns()
    rbm = RBM(8, 4, cd_steps=2, persistent=True, num_chains=20, seed=0)
    rbm.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=True)
    history = rbm.fit(data, batch_size=50, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(rbm.numpy_parameters()[0]))


def test_keras_round_trip_keeps_weights_chains_and_config(tmp_path):
    rbm = RBM(8, 4, cd_steps=3, persistent=True, num_chains=10, seed=5)
    rbm.compile(optimizer="adam")
    rbm.fit(toy_patterns(), batch_size=50, epochs=1, verbose=0)
    path = tmp_path / "rbm.keras"
    rbm.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RBM)
    assert loaded.get_config() == rbm.get_config()
    for a, b in zip(rbm.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.log_partition() == pytest.approx(rbm.log_partition(), abs=1e-12)
    # Loaded compiled (with the ContrastiveDivergence loss): training resumes.
    assert isinstance(loaded.loss, ContrastiveDivergence)
    loaded.fit(toy_patterns(), batch_size=50, epochs=1, verbose=0)


def test_bad_input_names_the_argument():
    rbm = RBM(8, 4)
    with pytest.raises(ValueError, match="`x` must be binary"):
        rbm.fit(np.full((4, 8), 0.5, np.float32), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="NaN"):
        rbm.log_prob(np.full((2, 8), np.nan))
    with pytest.raises(ValueError, match="`num_hidden` <= 20"):
        RBM(30, 21).log_partition()
    with pytest.raises(ValueError, match="`num_hidden` must be an int >= 1"):
        RBM(8, 0)
    with pytest.raises(ValueError, match="`cd_steps`"):
        RBM(8, 4, cd_steps=0)
