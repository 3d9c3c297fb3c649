"""`kdtfp.optimizers.SGLD` / `PSGLD`: NumPy references, sampling a known Gaussian, replica-synchronous noise."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.optimizers import PSGLD, SGLD


def _apply(opt, w0, grads):
    """Applies the gradients `grads` (one per step) to a variable starting at `w0`."""
    w = keras.Variable(np.asarray(w0, np.float32))
    for g in grads:
        opt.apply_gradients([(tf.constant(g, tf.float32), w)])
    return w.numpy()


def test_sgld_step_at_zero_temperature_matches_numpy():
    rng = np.random.default_rng(0)
    w0, g0, g1 = rng.normal(size=(3, 5, 3))
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=1, decay_rate=0.5)
    opt = SGLD(schedule, data_size=50, temperature=0.0)
    w = _apply(opt, w0, [g0, g1])
    expected = w0 - 1e-3 * 50 * g0 - 0.5e-3 * 50 * g1
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)


def test_psgld_steps_at_zero_temperature_match_numpy():
    rng = np.random.default_rng(1)
    w0, g0, g1 = rng.normal(size=(3, 4, 2))
    lr, n, rho, eps0 = 1e-2, 20, 0.9, 1e-3
    w = _apply(PSGLD(lr, data_size=n, rho=rho, epsilon=eps0, temperature=0.0), w0, [g0, g1])
    expected, v = w0.astype(np.float64), 0.0
    for g in (g0, g1):
        v = rho * v + (1 - rho) * (n * g) ** 2
        expected = expected - lr * n * g / (eps0 + np.sqrt(v))
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SGLD, PSGLD])
def test_noise_variance_and_burn_in_with_zero_gradient(cls):
    lr, temperature, eps0, size = 1e-3, 0.5, 1e-2, 100_000
    kwargs = {"epsilon": eps0} if cls is PSGLD else {}
    opt = cls(lr, data_size=10, temperature=temperature, burn_in_steps=2, seed=3, **kwargs)
    w = keras.Variable(np.zeros(size, np.float32))
    zero = tf.zeros(size)
    for _ in range(2):  # burn-in: no noise, and the gradient is zero
        opt.apply_gradients([(zero, w)])
    np.testing.assert_array_equal(w.numpy(), 0.0)
    opt.apply_gradients([(zero, w)])
    # v stays 0, so G = 1 / epsilon for PSGLD.
    expected_var = 2 * lr * temperature * (1 / eps0 if cls is PSGLD else 1.0)
    x = w.numpy().astype(np.float64)
    assert abs(x.mean()) < 5 * np.sqrt(expected_var / size)
    # Relative standard error of a sample variance of 1e5 normals is sqrt(2/1e5) = 0.45 %.
    assert x.var() == pytest.approx(expected_var, rel=0.02)
    opt.apply_gradients([(zero, w)])
    assert not np.allclose(w.numpy(), x)  # a fresh draw each step


MU = np.array([1.0, -2.0])
SIGMA = np.array([[1.0, 0.5], [0.5, 0.5]])


def _sample_gaussian(opt, chains=2000, burn_in=3000, keep=20, thin=100, data_size=100):
    """Samples N(MU, SIGMA) with `chains` independent chains held in one [chains, 2] weight.

    The mean batch loss is U(w) / N with U(w) = 0.5 (w - MU)^T SIGMA^-1 (w - MU) per chain, so
    the target density exp(-U) is the Gaussian; the chains start at 0.
    """
    prec = tf.constant(np.linalg.inv(SIGMA), tf.float32)
    mu = tf.constant(MU, tf.float32)
    w = keras.Variable(np.zeros((chains, 2), np.float32))

    @tf.function
    def run(steps):
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                d = w.value - mu
                loss = 0.5 * tf.reduce_sum((d @ prec) * d) / data_size
            opt.apply_gradients([(tape.gradient(loss, w.value), w)])

    run(tf.constant(burn_in))
    samples = []
    for _ in range(keep):
        run(tf.constant(thin))
        samples.append(w.numpy())
    return np.concatenate(samples).astype(np.float64)


@pytest.mark.parametrize(
    "make_opt, cov_rtol",
    [
        (lambda: SGLD(5e-3, data_size=100, seed=1), 0.08),
        # rho close to 1 keeps G nearly constant over a chain's mixing time; with rho = 0.99 the
        # dropped Gamma term inflates this Gaussian's variances by 40 % (measured).
        (lambda: PSGLD(5e-3, data_size=100, rho=0.9999, seed=1), 0.10),
    ],
    ids=["sgld", "psgld"],
)
def test_samples_gaussian_posterior_mean_and_covariance(make_opt, cov_rtol):
    x = _sample_gaussian(make_opt())
    np.testing.assert_allclose(x.mean(axis=0), MU, atol=0.05)
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.diag(cov), np.diag(SIGMA), rtol=cov_rtol)
    assert cov[0, 1] == pytest.approx(SIGMA[0, 1], rel=2 * cov_rtol)


def _model(seed=0):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(2)])  # fmt: skip
    model.set_weights([np.random.default_rng(seed + i).normal(size=v.shape).astype("float32")
                       for i, v in enumerate(model.weights)])  # fmt: skip
    return model


def _data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")


@pytest.mark.parametrize("cls", [SGLD, PSGLD])
def test_two_replicas_draw_the_same_noise_and_match_one_device(cls, mirrored_strategy):
    x, y = _data()

    def fit(strategy):
        with strategy.scope():
            model = _model()
            opt = cls(1e-3, data_size=100, temperature=1.0, seed=11)
            model.compile(optimizer=opt, loss=keras.losses.MeanSquaredError())
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        return model

    mirrored = fit(mirrored_strategy)
    for v in mirrored.weights + mirrored.optimizer.variables:
        copies = v.value.values
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy(), err_msg=v.path)
    single = fit(tf.distribute.get_strategy())
    initial = _model().get_weights()
    for a, b, w0 in zip(mirrored.get_weights(), single.get_weights(), initial, strict=True):
        assert np.abs(a - b).max() < 1e-5
        assert np.abs(a - w0).max() > 1e-2  # the noise (std 0.045 per step) really moved them


def test_config_round_trip_and_keras_file_keeps_optimizer(tmp_path):
    opt = PSGLD(
        2e-4, data_size=123, temperature=0.3, burn_in_steps=7, seed=4, rho=0.95, epsilon=1e-4
    )
    config = opt.get_config()
    restored = PSGLD.from_config(config)
    assert restored.get_config() == config
    assert keras.optimizers.deserialize(keras.optimizers.serialize(opt)).get_config() == config

    x, y = _data()
    model = _model()
    model.compile(optimizer=SGLD(1e-3, data_size=16, temperature=0.5, seed=2), loss="mse")
    model.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, SGLD)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # seed state and iterations included


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"data_size": 0}, "data_size"),
        ({"data_size": 2.5}, "data_size"),
        ({"temperature": -0.1}, "temperature"),
        ({"burn_in_steps": -1}, "burn_in_steps"),
        ({"rho": 1.0}, "rho"),
        ({"rho": 0.0}, "rho"),
        ({"epsilon": 0.0}, "epsilon"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    cls = PSGLD if name in ("rho", "epsilon") else SGLD
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**{"data_size": 10, **kwargs})


@pytest.mark.parametrize("cls", [SGLD, PSGLD])
def test_jit_compiled_training_runs_on_cpu(cls):
    x, y = _data()
    model = _model()
    model.compile(optimizer=cls(1e-3, data_size=16, seed=0), loss="mse", jit_compile=True)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())
