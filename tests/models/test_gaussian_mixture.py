"""GaussianMixtureDensity: NumPy log-density, maximum likelihood with fit (also under XLA), one
step on two replicas, .keras round trip, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.models.gaussian_mixture import GaussianMixtureDensity


def _numpy_log_prob(model, x):
    """log sum_k pi_k N(x; mu_k, L_k L_k^T) in float64."""
    logits = model.mixture_logits.numpy().astype("float64")
    log_pi = logits - np.logaddexp.reduce(logits)
    locs = model.locs.numpy().astype("float64")
    tril = model.scale_tril().numpy().astype("float64")
    x = np.asarray(x, "float64")
    terms = []
    for k in range(len(log_pi)):
        cov = tril[k] @ tril[k].T
        diff = x - locs[k]
        maha = np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff)
        _, logdet = np.linalg.slogdet(cov)
        terms.append(log_pi[k] - 0.5 * (maha + logdet + x.shape[1] * np.log(2 * np.pi)))
    return np.logaddexp.reduce(np.stack(terms, 1), axis=1)


def _two_clusters(n=200, seed=0):
    rng = np.random.default_rng(seed)
    first = rng.normal((-3.0, 0.0), (1.0, 0.5), (n // 2, 2))
    second = rng.normal((3.0, 1.0), (0.5, 1.0), (n - n // 2, 2))
    return np.concatenate([first, second]).astype("float32")


def _randomised(seed=1):
    model = GaussianMixtureDensity(3, dim=2, seed=seed)
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.normal(0.0, 0.7, weight.shape).astype("float32"))
    return model


def test_log_prob_matches_numpy_mixture_of_full_covariance_gaussians():
    model = _randomised()
    x = np.random.default_rng(2).normal(0.0, 2.0, (7, 2)).astype("float32")
    out = model.log_prob(x).numpy()
    assert out.shape == (7,) and out.dtype == np.float32
    np.testing.assert_allclose(out, _numpy_log_prob(model, x), rtol=1e-5, atol=1e-5)
    one_dim = GaussianMixtureDensity(2, dim=1, seed=0)
    x1 = np.linspace(-3, 3, 5, dtype="float32")[:, None]
    np.testing.assert_allclose(one_dim(x1).numpy(), _numpy_log_prob(one_dim, x1), atol=1e-5)


def test_log_prob_integrates_to_one_in_one_dimension():
    model = GaussianMixtureDensity(3, dim=1, seed=0)
    grid = np.linspace(-30, 30, 20001, dtype="float32")[:, None]
    mass = np.trapezoid(np.exp(model(grid).numpy()), grid[:, 0])
    assert mass == pytest.approx(1.0, abs=1e-4)


def _fit(jit_compile, epochs=20):
    x = _two_clusters()
    model = GaussianMixtureDensity(2, dim=2, seed=0).init_from_samples(x)
    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=jit_compile)
    history = model.fit(x, batch_size=50, epochs=epochs, verbose=0).history["loss"]
    return model, history


def test_maximum_likelihood_fit_recovers_two_clusters():
    model, history = _fit(jit_compile=False)
    assert history[-1] < history[0]
    locs = model.locs.numpy()[np.argsort(model.locs.numpy()[:, 0])]
    np.testing.assert_allclose(locs, [[-3.0, 0.0], [3.0, 1.0]], atol=0.35)
    weights = tf.nn.softmax(model.mixture_logits).numpy()
    np.testing.assert_allclose(np.sort(weights), [0.5, 0.5], atol=0.08)
    # The loss is the mean negative log-likelihood of the samples.
    np.testing.assert_allclose(
        model.evaluate(_two_clusters(), batch_size=200, verbose=0),
        -np.mean(_numpy_log_prob(model, _two_clusters())),
        rtol=1e-4,
    )


def test_fit_with_jit_compile_on_cpu_matches_eager_fit():
    eager, eager_history = _fit(jit_compile=False, epochs=2)
    jit, jit_history = _fit(jit_compile=True, epochs=2)
    np.testing.assert_allclose(jit_history, eager_history, rtol=1e-4)
    for a, b in zip(jit.weights, eager.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def _one_step(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _randomised()
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    x = _two_clusters(n=10)
    loss = model.fit(x, batch_size=10, epochs=1, shuffle=False, verbose=0).history["loss"][0]
    return [w.numpy() for w in model.weights], loss


def test_one_step_on_two_replicas_equals_one_step_on_one_device(mirrored_strategy):
    single_weights, single_loss = _one_step(tf.distribute.get_strategy())
    mirrored_weights, mirrored_loss = _one_step(mirrored_strategy)
    for single, mirrored in zip(single_weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(mirrored, single, atol=1e-6)
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-6)


def test_keras_round_trip_keeps_the_density(tmp_path):
    model = _randomised()
    path = tmp_path / "gmm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(5, 2)).astype("float32")
    np.testing.assert_allclose(loaded.log_prob(x).numpy(), model.log_prob(x).numpy(), rtol=1e-6)
    assert loaded.get_config()["num_components"] == 3
    assert loaded.sample(4).shape == (4, 2)


def test_bad_input_raises_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="num_components"):
        GaussianMixtureDensity(0, dim=2)
    with pytest.raises(ValueError, match="dim"):
        GaussianMixtureDensity(2, dim=0)
    with pytest.raises(ValueError, match="init_scale"):
        GaussianMixtureDensity(2, dim=2, init_scale=-1.0)
    model = GaussianMixtureDensity(2, dim=2)
    with pytest.raises(ValueError, match="inputs"):
        model(np.zeros((3, 3), "float32"))
    with pytest.raises(ValueError, match="NaN"):
        model.fit(np.full((4, 2), np.nan, "float32"), verbose=0)
    with pytest.raises(ValueError, match="samples"):
        model.init_from_samples(np.zeros((1, 2)))
