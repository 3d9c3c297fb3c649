"""Latent layers with explicit noise: reparameterised samples, forcing, log-probs, round trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.layers.latent import BernoulliLatent, BernoulliRoot, GaussianLatent, GaussianRoot

RNG = np.random.default_rng(1)


def test_gaussian_sample_is_loc_plus_scale_times_noise():
    layer = GaussianLatent(3, hidden_units=[5])
    parents = RNG.normal(size=(4, 2)).astype("float32")
    noise = RNG.normal(size=(4, 3)).astype("float32")
    params = layer(parents, noise=noise)
    np.testing.assert_allclose(params["sample"], params["loc"] + params["scale"] * noise, rtol=1e-6)
    assert np.all(np.asarray(params["scale"]) > 0)


def test_gaussian_log_prob_matches_numpy():
    layer = GaussianLatent(3, scale=0.5)
    params = layer(RNG.normal(size=(4, 2)).astype("float32"), noise=np.zeros((4, 3), "float32"))
    x = RNG.normal(size=(4, 3)).astype("float32")
    loc = np.asarray(params["loc"])
    expected = (-0.5 * ((x - loc) / 0.5) ** 2 - np.log(0.5) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(layer.log_prob(params, x), expected, rtol=1e-5)
    np.testing.assert_allclose(params["scale"], 0.5)


def test_value_forces_the_sample_and_ignores_noise():
    layer = GaussianLatent(2)
    value = np.ones((3, 2), "float32")
    params = layer(np.zeros((3, 4), "float32"), value=value)
    np.testing.assert_array_equal(params["sample"], value)


def test_gradient_flows_through_gaussian_but_not_bernoulli_samples():
    gaussian, bernoulli = GaussianLatent(2, hidden_units=[4]), BernoulliLatent(2, hidden_units=[4])
    parents = tf.constant(RNG.normal(size=(5, 3)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(parents)
        g = gaussian(parents, noise=tf.ones((5, 2)))["sample"]
        b = bernoulli(parents, noise=tf.fill((5, 2), 0.5))["sample"]
    assert tape.gradient(g, parents) is not None
    assert tape.gradient(b, parents) is None


def test_bernoulli_sample_thresholds_uniform_noise():
    layer = BernoulliLatent(4)
    parents = RNG.normal(size=(6, 3)).astype("float32")
    noise = RNG.uniform(size=(6, 4)).astype("float32")
    params = layer(parents, noise=noise)
    probs = 1 / (1 + np.exp(-np.asarray(params["logits"])))
    np.testing.assert_array_equal(params["sample"], (noise < probs).astype("float32"))
    x = (RNG.uniform(size=(6, 4)) < 0.5).astype("float32")
    expected = (x * np.log(probs) + (1 - x) * np.log(1 - probs)).sum(-1)
    np.testing.assert_allclose(layer.log_prob(params, x), expected, rtol=1e-5)


def test_sequence_inputs_keep_their_leading_axes():
    layer = GaussianLatent(4, hidden_units=[8])
    params = layer(tf.zeros((2, 7, 3)), noise=tf.zeros((2, 7, 4)))
    assert params["sample"].shape == (2, 7, 4)
    assert layer.log_prob(params, params["sample"]).shape == (2, 7)


def test_parents_as_a_list_are_concatenated():
    layer = GaussianLatent(2)
    a, b = tf.ones((3, 1)), tf.zeros((3, 2))
    params = layer([a, b], noise=tf.zeros((3, 2)))
    np.testing.assert_allclose(
        params["loc"], layer(tf.concat([a, b], -1), noise=tf.zeros((3, 2)))["loc"]
    )


def test_roots():
    gaussian = GaussianRoot(3)
    noise = RNG.normal(size=(5, 3)).astype("float32")
    np.testing.assert_allclose(gaussian(noise)["sample"], noise, rtol=1e-6)
    learned = GaussianRoot(3, learn=True)
    np.testing.assert_allclose(learned(noise)["scale"], 1.0, rtol=1e-4)
    bernoulli = BernoulliRoot(2)
    params = bernoulli(np.array([[0.2, 0.7]], "float32"))
    np.testing.assert_array_equal(params["sample"], [[1.0, 0.0]])  # sigmoid(0) = 0.5
    assert len(bernoulli.trainable_weights) == 1


def test_noise_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="noise"):
        GaussianLatent(3)(tf.zeros((4, 2)), noise=tf.zeros((4, 2)))
    with pytest.raises(ValueError, match="noise"):
        BernoulliRoot(2)(tf.zeros((4, 3)))


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: GaussianLatent(0), "units"),
        (lambda: GaussianLatent(2, scale=0.0), "scale"),
        (lambda: GaussianLatent(2, min_scale=-1.0), "min_scale"),
        (lambda: BernoulliLatent(2, hidden_units=[0]), "hidden_units"),
        (lambda: GaussianRoot(-1), "units"),
    ],
)
def test_bad_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_round_trip_in_a_functional_model(tmp_path):
    parents = keras.Input((3,))
    noise = keras.Input((2,))
    gaussian = GaussianLatent(2, hidden_units=[4], scale=None, seed=3)(parents, noise=noise)
    bernoulli = BernoulliLatent(2, hidden_units=[4])(gaussian["sample"], noise=noise)
    model = keras.Model([parents, noise], [gaussian["loc"], bernoulli["logits"]])
    inputs = [RNG.normal(size=(4, 3)).astype("float32"), RNG.uniform(size=(4, 2)).astype("float32")]
    path = tmp_path / "latent.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    for a, b in zip(model(inputs), restored(inputs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for layer in (GaussianRoot(3, learn=True), BernoulliRoot(2)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
