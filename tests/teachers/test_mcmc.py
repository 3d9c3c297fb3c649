"""MCMC teachers: the HMC/NUTS posterior against numerical integration, the online chain, the
MC predictive against NumPy, the transfer streams and the unbiasedness of online targets."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.models.mixture_predictive import MixturePredictive
from kdtfp.teachers import mcmc
from kdtfp.teachers.mcmc import (
    OnlineChain,
    laplace_approximation,
    logistic_log_posterior,
    mc_predictive_log_probs,
    sample_posterior,
)
from kdtfp.teachers.mcmc_streams import (
    batch_transfer_dataset,
    gaussian_inputs,
    online_transfer_dataset,
)

PRIOR_SCALE = 10.0


def _toy(seed=0, per_class=12):
    """The thesis's 2-D toy (as the recipe's): separable-ish, so the posterior is broad and skewed."""
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [rng.normal((-4, 0), 1, (per_class, 2)), rng.normal((4, 0), 1, (per_class, 2))]
    ).astype("float32")
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-x[:, 0]))).astype("int32")
    return x, y


def _numpy_log_posterior(w, x, y, prior_scale=PRIOR_SCALE):
    margins = (w @ x.T) * (2 * y - 1)
    return -np.logaddexp(0, -margins).sum(-1) - (w**2).sum(-1) / (2 * prior_scale**2)


def _grid_moments(x, y, low=-40.0, high=60.0, points=801):
    """Posterior mean and standard deviation of a 2-D posterior by quadrature on a grid."""
    axis = np.linspace(low, high, points)
    w = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    log_p = _numpy_log_posterior(w, x.astype("float64"), y)
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    mean = p @ w
    return mean, np.sqrt(p @ (w - mean) ** 2)


@pytest.fixture(scope="module")
def toy():
    x, y = _toy()
    mean, sd = _grid_moments(x, y)
    return x, y, mean, sd


def test_log_posterior_matches_numpy_and_broadcasts_over_chains():
    x, y = _toy()
    w = np.random.default_rng(1).normal(0, 5, (3, 4, 2)).astype("float32")
    got = logistic_log_posterior(x, y, PRIOR_SCALE)(tf.constant(w)).numpy()
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, _numpy_log_posterior(w, x, y), rtol=1e-5)


def test_laplace_approximation_is_at_the_mode():
    x, y = _toy()
    mode, covariance = laplace_approximation(x, y, PRIOR_SCALE)
    w = tf.Variable(mode.astype("float32"))
    with tf.GradientTape() as tape:
        value = logistic_log_posterior(x, y, PRIOR_SCALE)(w)
    assert np.max(np.abs(tape.gradient(value, w).numpy())) < 1e-3
    assert np.all(np.linalg.eigvalsh(covariance) > 0)


@pytest.fixture(scope="module")
def posterior(toy):
    x, y, _, _ = toy
    return sample_posterior(
        x, y, num_results=1000, num_chains=8, num_burnin_steps=300, prior_scale=PRIOR_SCALE
    )


def test_hmc_matches_numerical_integration_with_rhat_near_one(toy, posterior):
    _, _, mean, sd = toy
    summary = posterior.summary()
    assert posterior.samples.shape == (1000, 8, 2) and posterior.bag.shape == (8000, 2)
    assert posterior.stored_floats == 16000
    assert summary["max_rhat"] < 1.02
    assert summary["min_ess"] > 500
    assert 0.5 < summary["acceptance_rate"] < 0.97
    # Within 5 Monte Carlo standard errors of the quadrature moments.
    standard_error = sd / np.sqrt(posterior.ess)
    np.testing.assert_array_less(np.abs(posterior.bag.mean(0) - mean), 5 * standard_error)
    np.testing.assert_allclose(posterior.bag.std(0), sd, rtol=0.1)


def test_every_chain_mixes_even_from_the_far_tail(toy):
    # Regression: with one shared step size a chain started where all points are misclassified
    # rejected every proposal for ever; per-chain adaptation rescues it.
    x, y, mean, _ = toy
    chain = OnlineChain(
        x, y, initial_state=np.array([[-3.0, 0.0], [10.0, 0.0]]), num_burnin_steps=300, seed=1
    )
    states = np.stack(list(chain.states(400).as_numpy_iterator()))
    assert np.all(states[-200:, 0, 0] > 0.0)  # the tail chain has left w1 < 0
    assert abs(states[:, :, 0].mean() - mean[0]) < 3.0


def test_nuts_kernel_agrees_with_numerical_integration_in_1d():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, (20, 1)).astype("float32")
    y = (rng.random(20) < 1 / (1 + np.exp(-1.5 * x[:, 0]))).astype("int32")
    w = np.linspace(-20, 20, 40001)[:, None]
    p = np.exp(_numpy_log_posterior(w, x.astype("float64"), y) - 0.0)
    p /= p.sum()
    mean = float(p @ w[:, 0])
    sd = float(np.sqrt(p @ (w[:, 0] - mean) ** 2))
    posterior = sample_posterior(
        x, y, num_results=500, num_chains=4, num_burnin_steps=200, kernel="nuts", max_tree_depth=3
    )
    assert abs(posterior.bag.mean() - mean) < 5 * sd / np.sqrt(posterior.ess[0])
    np.testing.assert_allclose(posterior.bag.std(), sd, rtol=0.1)
    assert posterior.summary()["max_rhat"] < 1.05


def test_online_chain_yields_posterior_states_in_constant_memory(toy):
    x, y, mean, sd = toy
    chain = OnlineChain(x, y, num_chains=8, num_burnin_steps=300, seed=3)
    assert chain.stored_floats == 8 * (2 + 1)
    short, long = chain.states(10), chain.states(1000, thin=2)
    # The dataset carries only the chains' state: the same element spec whatever the length.
    assert short.element_spec == long.element_spec == tf.TensorSpec([8, 2], tf.float32)
    total, total_sq = long.reduce(
        (tf.zeros([8, 2]), tf.zeros([8, 2])), lambda acc, s: (acc[0] + s, acc[1] + s * s)
    )
    pooled_mean = total.numpy().mean(0) / 1000
    pooled_sd = np.sqrt(total_sq.numpy().mean(0) / 1000 - pooled_mean**2)
    # 8,000 draws two transitions apart (ESS ~ 4,000): within 5 standard errors / 10 %.
    np.testing.assert_array_less(np.abs(pooled_mean - mean), 5 * sd / np.sqrt(4000))
    np.testing.assert_allclose(pooled_sd, sd, rtol=0.1)
    first = np.stack(list(short.as_numpy_iterator()))
    again = np.stack(list(chain.states(10).as_numpy_iterator()))
    np.testing.assert_array_equal(first, again)  # every pass restarts from the burnt-in state
    assert not np.allclose(first[0], first[1])  # ... and the chains move
    endless = chain.states()
    assert endless.cardinality() == tf.data.INFINITE_CARDINALITY


def test_mc_predictive_matches_numpy_and_is_stable_in_log_space(monkeypatch):
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 3, (50, 2)).astype("float32")
    x = rng.normal(0, 3, (7, 2)).astype("float32")
    probs = (1 / (1 + np.exp(-(x.astype("float64") @ samples.T.astype("float64"))))).mean(1)
    got = mc_predictive_log_probs(samples, x).numpy()
    np.testing.assert_allclose(got, np.log(np.stack([1 - probs, probs], 1)), atol=1e-5)
    # Chunked evaluation gives the same numbers.
    monkeypatch.setattr(mcmc, "_PREDICTIVE_CHUNK_ELEMENTS", 100)
    np.testing.assert_allclose(mc_predictive_log_probs(samples, x).numpy(), got, atol=1e-6)
    # Margins of +-1000: log g stays finite (a naive log(mean(sigmoid)) would be -inf).
    extreme = mc_predictive_log_probs(np.array([[100.0], [50.0]]), np.array([[-20.0]])).numpy()
    np.testing.assert_allclose(extreme[0], [np.log(1.0), -1000.0 - np.log(2.0)], rtol=1e-6)


def test_batch_and_online_streams_share_inputs_and_give_the_right_targets(toy):
    x, y, _, _ = toy
    sampler = gaussian_inputs(np.zeros(2), 10.0)
    bag = np.random.default_rng(0).normal(5, 3, (100, 2)).astype("float32")
    chain = OnlineChain(x, y, num_chains=4, num_burnin_steps=0, jit_compile=False)
    batch_x, batch_t = next(iter(batch_transfer_dataset(bag, sampler, 10, seed=7)))
    (online_x, online_t), state = next(
        iter(
            tf.data.Dataset.zip(online_transfer_dataset(chain, sampler, 10, seed=7), chain.states())
        )
    )
    assert batch_x.shape == (10, 2) and batch_t.shape == (10, 2)
    np.testing.assert_array_equal(batch_x.numpy(), online_x.numpy())  # common random inputs
    want = np.exp(mc_predictive_log_probs(bag, batch_x).numpy())
    np.testing.assert_allclose(batch_t.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(
        online_t.numpy(), np.exp(mc_predictive_log_probs(state, online_x).numpy()), atol=1e-5
    )
    np.testing.assert_allclose(online_t.numpy().sum(1), 1.0, atol=1e-6)
    # The inputs follow N(0, 10 I).
    many = sampler(tf.constant([1, 2]), 20000).numpy()
    np.testing.assert_allclose(many.var(0), [10.0, 10.0], rtol=0.05)


def _gradient_function(student):
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)

    @tf.function
    def gradient(x, targets):
        with tf.GradientTape() as tape:
            value = loss(targets, student(x))
        return tape.gradient(value, student.kernel)

    return lambda x, targets: gradient(tf.constant(x), tf.constant(targets)).numpy()


def test_online_gradient_expectation_equals_the_batch_gradient(toy, posterior):
    x, y, _, _ = toy
    student = MixturePredictive(10, seed=0)
    student.build((None, 2))
    _loss_gradient = _gradient_function(student)
    inputs = np.random.default_rng(2).normal(0, np.sqrt(10), (10, 2)).astype("float32")
    fixed = lambda seed, n: tf.constant(inputs)  # noqa: E731  the same inputs every step
    chain = OnlineChain(x, y, num_chains=1, num_burnin_steps=300, seed=5)
    steps = 400
    online = online_transfer_dataset(chain, fixed, 10).take(steps)
    gradients = [_loss_gradient(xs, ts) for xs, ts in online]
    states = np.concatenate(list(chain.states(steps).as_numpy_iterator()))  # [steps, 2]
    # Cross-entropy is linear in the target: the mean of the single-state gradients is exactly
    # the gradient for the MC predictive of those states ...
    stored = np.exp(mc_predictive_log_probs(states, inputs).numpy())
    np.testing.assert_allclose(np.mean(gradients, 0), _loss_gradient(inputs, stored), atol=1e-5)
    # ... and, the chain being stationary, it estimates the batch teacher's gradient.
    batch_targets = np.exp(mc_predictive_log_probs(posterior.bag, inputs).numpy())
    batch_gradient = _loss_gradient(inputs, batch_targets)
    spread = np.std(gradients, 0) / np.sqrt(steps / 10)  # ~10 steps per effective sample
    np.testing.assert_array_less(np.abs(np.mean(gradients, 0) - batch_gradient), 5 * spread + 1e-4)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_results": 1}, "num_results"),
        ({"num_chains": 0}, "num_chains"),
        ({"num_burnin_steps": -1}, "num_burnin_steps"),
        ({"kernel": "slice"}, "kernel"),
        ({"prior_scale": 0.0}, "prior_scale"),
        ({"step_size": -0.1}, "step_size"),
        ({"num_leapfrog_steps": 0}, "num_leapfrog_steps"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampler_arguments_are_value_errors_naming_them(kwargs, name):
    x, y = _toy()
    with pytest.raises(ValueError, match=name):
        sample_posterior(x, y, **{"num_results": 10, **kwargs})


def test_bad_data_is_rejected_before_sampling():
    x, y = _toy()
    with pytest.raises(ValueError, match="`y`"):
        sample_posterior(x, 2 * y - 1, num_results=10)
    with pytest.raises(ValueError, match="`y`"):
        sample_posterior(x, y[:-1], num_results=10)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="`x`"):
        sample_posterior(bad, y, num_results=10)
    with pytest.raises(ValueError, match="initial_state"):
        OnlineChain(x, y, initial_state=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="initial_state"):
        OnlineChain(x, y, initial_state=np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="thin"):
        OnlineChain(x, y, thin=0)


def test_bad_stream_arguments_are_rejected():
    sampler = gaussian_inputs(np.zeros(2), 10.0)
    with pytest.raises(ValueError, match="batch_size"):
        batch_transfer_dataset(np.zeros((5, 2)), sampler, 0)
    with pytest.raises(ValueError, match="input_sampler"):
        batch_transfer_dataset(np.zeros((5, 2)), None, 10)
    with pytest.raises(ValueError, match="chain"):
        online_transfer_dataset("chain", sampler, 10)
    with pytest.raises(ValueError, match="covariance"):
        gaussian_inputs(np.zeros(2), -1.0)
    with pytest.raises(ValueError, match="covariance"):
        gaussian_inputs(np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="samples"):
        mc_predictive_log_probs(np.zeros((5, 3)), np.zeros((2, 2)))
