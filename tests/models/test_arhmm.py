"""AutoregressiveHMM: exact inference against brute force and TFP, masks, saving, XLA, replicas."""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from kdtfp.models.arhmm import AutoregressiveHMM, dirichlet_logistic_normal_kl, forward_backward

tfd = tfp.distributions


def _model(k=3, d=2, order=1, seed=0, **kwargs):
    model = AutoregressiveHMM(
        k, order=order, observation_dim=d, num_sequences=10, seed=seed, **kwargs
    )
    rng = np.random.default_rng(seed)
    model.coefficient_loc.assign(rng.normal(0, 0.3, model.coefficient_loc.shape))
    model.bias_loc.assign(rng.normal(0, 1.0, model.bias_loc.shape))
    model.log_scale_loc.assign(rng.normal(0, 0.3, model.log_scale_loc.shape))
    model.initial_loc.assign(rng.normal(0, 1.0, model.initial_loc.shape))
    model.transition_loc.assign(rng.normal(0, 1.0, model.transition_loc.shape))
    return model


def _sequences(b=4, t=6, d=2, seed=1):
    return np.random.default_rng(seed).normal(0, 1.5, (b, t, d)).astype("float32")


def _brute_force(model, x):
    """log p(x) and p(z_t = k | x) by enumerating every state path (NumPy, float64)."""
    params = {k: np.asarray(v, np.float64) for k, v in model.parameters().items()}
    log_em = np.asarray(model.log_emissions(tf.constant(x), model.parameters()), np.float64)
    b, steps, k = log_em.shape
    log_pi, log_p = params["log_initial"], params["log_transition"]
    log_liks, marginals = [], []
    for n in range(b):
        joint = {}
        for path in itertools.product(range(k), repeat=steps):
            value = log_pi[path[0]] + log_em[n, 0, path[0]]
            for t in range(1, steps):
                value += log_p[path[t - 1], path[t]] + log_em[n, t, path[t]]
            joint[path] = value
        values = np.array(list(joint.values()))
        log_z = np.log(np.sum(np.exp(values - values.max()))) + values.max()
        marginal = np.zeros((steps, k))
        for path, value in joint.items():
            marginal[np.arange(steps), path] += np.exp(value - log_z)
        log_liks.append(log_z)
        marginals.append(marginal)
    return np.array(log_liks), np.stack(marginals)


def _tfp_hmm(model, x):
    params = model.parameters()
    x = tf.convert_to_tensor(x)
    mean = tf.einsum("btd,ked->btke", x[:, :-1], params["coefficients"][:, 0]) + params["bias"]
    return tfd.HiddenMarkovModel(
        tfd.Categorical(logits=params["log_initial"]),
        tfd.Categorical(logits=params["log_transition"]),
        tfd.Independent(tfd.Normal(mean, params["scale"]), 1),
        num_steps=x.shape[1] - 1,
        time_varying_observation_distribution=True,
    )


def test_forward_backward_matches_brute_force_enumeration_on_a_tiny_model():
    model = _model(k=2, order=2)
    x = _sequences(b=3, t=7)
    log_lik, marginals = _brute_force(model, x)
    np.testing.assert_allclose(model.log_likelihood(x).numpy(), log_lik, rtol=1e-5)
    ours = model.posterior_marginals(x).numpy()
    np.testing.assert_allclose(ours, marginals, atol=1e-5)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(model.features(x).numpy(), marginals.mean(1), atol=1e-5)


def test_log_likelihood_marginals_and_viterbi_match_tfd_hidden_markov_model():
    model = _model(k=4)
    x = _sequences(b=5, t=30)
    hmm = _tfp_hmm(model, x)
    np.testing.assert_allclose(
        model.log_likelihood(x).numpy(), hmm.log_prob(x[:, 1:]).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        model.posterior_marginals(x).numpy(),
        hmm.posterior_marginals(x[:, 1:]).probs_parameter().numpy(),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        model.most_likely_states(x).numpy(), hmm.posterior_mode(x[:, 1:]).numpy()
    )


def test_forward_backward_is_stable_for_extreme_emissions():
    log_em = tf.constant([[[0.0, -1e4], [-1e4, 0.0], [-5e3, -5e3 - 1.0]]])
    log_lik, marginals = forward_backward(
        tf.math.log([0.5, 0.5]), tf.math.log([[0.9, 0.1], [0.1, 0.9]]), log_em
    )
    assert np.all(np.isfinite(log_lik.numpy())) and np.all(np.isfinite(marginals.numpy()))
    np.testing.assert_allclose(marginals.numpy().sum(-1), 1.0, atol=1e-6)


def test_masked_sequences_equal_their_truncated_prefixes():
    model = _model()
    x = _sequences(b=3, t=10)
    lengths = [10, 6, 3]
    mask = (np.arange(10)[None] < np.array(lengths)[:, None]).astype("float32")
    padded = np.where(mask[..., None] > 0, x, 0.0).astype("float32")
    log_lik = model.log_likelihood(padded, mask=mask).numpy()
    features = model((padded, mask)).numpy()
    paths = model.most_likely_states({"x": padded, "mask": mask}).numpy()
    for n, length in enumerate(lengths):
        prefix = x[n : n + 1, :length]
        np.testing.assert_allclose(log_lik[n], model.log_likelihood(prefix).numpy()[0], rtol=1e-5)
        np.testing.assert_allclose(features[n], model.features(prefix).numpy()[0], atol=1e-5)
        np.testing.assert_array_equal(
            paths[n, : length - 1], model.most_likely_states(prefix).numpy()[0]
        )
        assert np.all(paths[n, length - 1 :] == -1)


@pytest.mark.parametrize(
    "x, mask, message",
    [
        (np.zeros((2, 2, 2), "float32"), None, "longer than the AR order"),
        (np.zeros((2, 5, 3), "float32"), None, "observation dimension"),
        (np.full((2, 5, 2), np.nan, "float32"), None, "NaN"),
        (np.zeros((2, 5), "float32"), None, "shape"),
        (np.zeros((2, 5, 2), "float32"), np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]), "order"),
        (
            np.zeros((2, 5, 2), "float32"),
            np.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
            "right-padded",
        ),
    ],
)
def test_bad_sequences_raise_value_errors_naming_the_argument(x, mask, message):
    model = _model(order=2)
    with pytest.raises(ValueError, match=message):
        model(x if mask is None else (x, mask))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_states": 0}, "num_states"),
        ({"order": 0}, "order"),
        ({"transition_concentration": 0.0}, "transition_concentration"),
        ({"self_transition_concentration": -1.0}, "self_transition_concentration"),
        ({"bias_prior_scale": -1.0}, "bias_prior_scale"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_naming_the_argument(kwargs, argument):
    arguments = {"num_states": 3, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        AutoregressiveHMM(**arguments)


def test_dirichlet_kl_estimate_matches_softmax_centered_density_and_monte_carlo():
    # log q(theta) = log N(z) - log|det J| with tfb.SoftmaxCentered's log-det minus log(K)/2.
    k, rng = 4, np.random.default_rng(0)
    loc = rng.normal(0, 0.5, k - 1).astype("float32")
    stddev = np.full(k - 1, 0.4, "float32")
    alpha = np.array([1.0, 2.0, 0.7, 3.0], "float32")
    z = loc + stddev * rng.standard_normal((20000, k - 1)).astype("float32")
    bijector = tfp.bijectors.SoftmaxCentered()
    theta = bijector.forward(z)
    log_q = tfd.MultivariateNormalDiag(loc, stddev).log_prob(z) - (
        bijector.forward_log_det_jacobian(z, 1) - 0.5 * math.log(k)
    )
    reference = np.mean(log_q - tfd.Dirichlet(alpha).log_prob(theta))
    ours = dirichlet_logistic_normal_kl(loc, stddev, tf.math.log(theta), alpha)
    np.testing.assert_allclose(np.mean(ours), reference, rtol=2e-3, atol=2e-3)


def test_call_adds_the_per_step_negative_elbo_and_returns_features():
    model = _model()
    x = _sequences(b=4, t=9)
    features = model(x)
    assert features.shape == (4, 3)
    params = model.parameters()
    expected = (
        -np.mean(model.log_likelihood(x).numpy()) + model.kl_divergence(params).numpy() / 10
    ) / 8
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-5)


def test_keras_file_round_trip_keeps_weights_and_outputs(tmp_path):
    model = _model()
    x = _sequences()
    model(x)
    path = str(tmp_path / "arhmm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, AutoregressiveHMM) and loaded.get_config() == model.get_config()
    np.testing.assert_allclose(loaded.features(x).numpy(), model.features(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        loaded.log_likelihood(x).numpy(), model.log_likelihood(x).numpy(), rtol=1e-6
    )


def test_loss_and_gradients_compile_with_xla_on_cpu_and_match_eager():
    model = _model(k=2)
    x = tf.constant(_sequences(b=8, t=8, seed=3))

    def loss_and_gradients(x):
        with tf.GradientTape() as tape:
            model.losses.clear() if hasattr(model.losses, "clear") else None
            features = model(x, training=False)
            loss = model.losses[-1] + 0.1 * tf.reduce_sum(tf.square(features))
        return loss, tape.gradient(loss, model.trainable_weights)

    eager_loss, eager_gradients = loss_and_gradients(x)
    xla_loss, xla_gradients = tf.function(loss_and_gradients, jit_compile=True)(x)
    np.testing.assert_allclose(xla_loss.numpy(), eager_loss.numpy(), rtol=1e-5)
    for a, b in zip(xla_gradients, eager_gradients, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_one_fit_step_on_two_replicas_equals_one_step_on_one_device(mirrored_strategy):
    x = _sequences(b=8, t=5, seed=4)

    def one_step(strategy):
        with strategy.scope():
            model = AutoregressiveHMM(3, num_sequences=8, observation_dim=2, seed=7)
            model.compile(keras.optimizers.SGD(0.1))
        model.initialize_from_data(x)
        model.fit(x, epochs=1, batch_size=8, shuffle=False, verbose=0)
        return [np.asarray(w) for w in model.trainable_weights]

    single = one_step(tf.distribute.get_strategy())
    mirrored = one_step(mirrored_strategy)
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
