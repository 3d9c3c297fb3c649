"""HierarchicalVAE: exact IWAE on a linear-Gaussian model, a NumPy ELBO, the shared-noise
protocol, encoder refit, saving, XLA, bad inputs and an export that serves without kdtfp."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.distill.shared_noise import SharedNoiseDistiller
from kdtfp.models.hierarchical_vae import HierarchicalVAE, export_hvae


def _binary(n, d=12, seed=0):
    return (np.random.default_rng(seed).random((n, d)) < 0.4).astype("float32")


def _small(**kwargs):
    config = dict(latent_sizes=(2, 3), data_size=12, hidden_units=6, seed=0)
    config.update(kwargs)
    return HierarchicalVAE(**config)


# ---------------------------------------------------------------- a model with a closed form

SIGMA = 0.5
# Orthogonal columns: W^T W is diagonal, so the exact posterior has a diagonal covariance.
W = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
B = np.array([0.3, -0.2, 0.1])


def _linear_gaussian(exact_posterior):
    """x = W z + b + 0.5 eps, z ~ N(0, I_2); the encoder is linear (no hidden layer)."""
    model = HierarchicalVAE(latent_sizes=(2,), data_size=3, hidden_units=(), decoder="gaussian",
                            decoder_scale=SIGMA, seed=0)  # fmt: skip
    decoder, encoder = model.generative_layers[1], model.encoder_layers[0]
    decoder.loc_layer.kernel.assign(W.T.astype("float32"))
    decoder.loc_layer.bias.assign(B.astype("float32"))
    # Exact posterior: cov = (I + W^T W / s^2)^-1, mean = cov W^T (x - b) / s^2.
    cov = np.linalg.inv(np.eye(2) + W.T @ W / SIGMA**2)
    gain = cov @ W.T / SIGMA**2  # [2, 3]
    sd = np.sqrt(np.diag(cov))
    if not exact_posterior:
        gain, sd = 0.6 * gain, 1.8 * sd
    encoder.loc_layer.kernel.assign(gain.T.astype("float32"))
    encoder.loc_layer.bias.assign((-gain @ B).astype("float32"))
    encoder.scale_layer.kernel.assign(np.zeros((3, 2), "float32"))
    raw = np.log(np.expm1(sd - encoder.min_scale))
    encoder.scale_layer.bias.assign(raw.astype("float32"))
    return model


def _exact_log_marginal(x):
    cov = W @ W.T + SIGMA**2 * np.eye(3)
    diff = x - B
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + 3 * np.log(2 * np.pi))


def test_iwae_with_the_exact_posterior_is_the_exact_marginal_for_every_k():
    model = _linear_gaussian(exact_posterior=True)
    x = np.random.default_rng(1).normal(size=(20, 3)).astype("float32")
    exact = _exact_log_marginal(x.astype("float64"))
    for k in (1, 7):
        np.testing.assert_allclose(model.log_prob(x, k=k), exact, atol=2e-4)


def test_iwae_is_monotone_in_k_and_below_the_exact_marginal():
    model = _linear_gaussian(exact_posterior=False)
    x = np.random.default_rng(2).normal(size=(200, 3)).astype("float32")
    exact = _exact_log_marginal(x.astype("float64")).mean()
    bounds = [float(np.mean(model.log_prob(x, k=k))) for k in (1, 10, 300)]
    assert bounds[0] < bounds[1] < bounds[2] <= exact + 1e-3
    assert exact - bounds[2] < 0.02 < exact - bounds[0]


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
    model = _small()
    x = np.repeat(_binary(2, seed=3), 3000, axis=0)
    iwae = np.asarray(model.log_prob(x, k=1), np.float64).reshape(2, -1)
    elbo = -np.asarray(model.negative_elbo(x), np.float64).reshape(2, -1)
    se = np.sqrt((iwae.var(1) + elbo.var(1)) / iwae.shape[1])
    assert np.all(np.abs(iwae.mean(1) - elbo.mean(1)) < 4 * se)


# ---------------------------------------------------------------- the ELBO against NumPy


def _softplus(a):
    return np.logaddexp(0.0, a)


def _np_conditional(layer, parent, noise=None):
    h = parent
    for dense in layer.hidden:
        h = np.maximum(h @ np.asarray(dense.kernel) + np.asarray(dense.bias), 0.0)
    if hasattr(layer, "logits_layer"):
        return h @ np.asarray(layer.logits_layer.kernel) + np.asarray(layer.logits_layer.bias)
    loc = h @ np.asarray(layer.loc_layer.kernel) + np.asarray(layer.loc_layer.bias)
    scale = _softplus(h @ np.asarray(layer.scale_layer.kernel) + np.asarray(layer.scale_layer.bias))
    return loc, scale + layer.min_scale


def _np_normal(z, loc, scale):
    return np.sum(-0.5 * ((z - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi), -1)


def test_negative_elbo_matches_a_numpy_forward_pass():
    model = _small()
    x = _binary(5, seed=4).astype("float64")
    rng = np.random.default_rng(5)
    noise = {"z1": rng.normal(size=(5, 3)), "z2": rng.normal(size=(5, 2))}
    # q(z1 | x) q(z2 | z1), then log p(z2) p(z1 | z2) p(x | z1).
    loc1, sd1 = _np_conditional(model.encoder_layers[0], x)
    z1 = loc1 + sd1 * noise["z1"]
    loc2, sd2 = _np_conditional(model.encoder_layers[1], z1)
    z2 = loc2 + sd2 * noise["z2"]
    log_q = _np_normal(z1, loc1, sd1) + _np_normal(z2, loc2, sd2)
    p_loc1, p_sd1 = _np_conditional(model.generative_layers[1], z2)
    logits = _np_conditional(model.generative_layers[2], z1)
    log_p = _np_normal(z2, 0.0, 1.0) + _np_normal(z1, p_loc1, p_sd1)
    log_p += np.sum(x * logits - _softplus(logits), -1)
    expected = log_q - log_p
    got = model.negative_elbo(x.astype("float32"), noise={k: v.astype("float32")
                                                           for k, v in noise.items()})  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- protocol and training


def test_nodes_and_generate_follow_the_shared_noise_protocol():
    model = _small()
    assert [(n.name, n.family, n.role, n.shape) for n in model.nodes] == [
        ("z2", "gaussian", "latent", (2,)),
        ("z1", "gaussian", "latent", (3,)),
        ("x", "bernoulli", "observed", (12,)),
    ]
    noise = model.sample_noise(4, seed=(1, 2))
    out = model.generate(noise)
    np.testing.assert_allclose(out["z2"]["sample"], noise["z2"])  # the root is N(0, I)
    np.testing.assert_allclose(
        out["z1"]["sample"], out["z1"]["loc"] + out["z1"]["scale"] * noise["z1"], atol=1e-6
    )
    np.testing.assert_array_equal(
        out["x"]["sample"], (noise["x"] < tf.sigmoid(out["x"]["logits"])).numpy()
    )
    again = model.generate(model.sample_noise(4, seed=(1, 2)))
    np.testing.assert_array_equal(again["x"]["sample"], out["x"]["sample"])
    forced = model.generate(noise, forced={"z1": tf.zeros((4, 3))})
    np.testing.assert_array_equal(forced["z1"]["sample"], np.zeros((4, 3)))
    assert model.sample(7).shape == (7, 12)
    assert set(np.unique(model.sample(7))) <= {0.0, 1.0}
    assert model.encode(_binary(3)).shape == (3, 5)


def test_fit_with_warm_up_and_jit_then_refit_the_encoder_with_a_frozen_decoder():
    keras.utils.set_random_seed(0)
    model = _small(kl_warmup_steps=10)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    x = _binary(64, seed=6)
    before = float(np.mean(model.negative_elbo(x)))
    history = model.fit(x, batch_size=16, epochs=3, verbose=0)
    assert {"loss", "kl", "reconstruction"} <= set(history.history)
    assert float(model.kl_weight()) == pytest.approx(1.0)  # 12 steps > 10 warm-up steps
    assert float(np.mean(model.negative_elbo(x))) < before
    generative = [w.numpy().copy() for layer in model.generative_layers for w in layer.weights]
    encoder = [w.numpy().copy() for layer in model.encoder_layers for w in layer.weights]
    model.fit_encoder(x, steps=5, batch_size=16, learning_rate=1e-2)
    after = [w.numpy() for layer in model.generative_layers for w in layer.weights]
    for a, b in zip(generative, after, strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [w.numpy() for layer in model.encoder_layers for w in layer.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(encoder, changed, strict=True))
    assert all(layer.trainable for layer in model.generative_layers)


def test_a_shared_noise_distiller_step_trains_only_the_student_decoder():
    teacher, student = _small(hidden_units=8, seed=1), _small(hidden_units=3, seed=2)
    distiller = SharedNoiseDistiller(student, teacher, latent_weight=0.1)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    frozen = [w.numpy().copy() for w in teacher.weights]
    history = distiller.fit(teacher.noise_dataset(8), steps_per_epoch=3, epochs=1, verbose=0)
    assert np.isfinite(history.history["output_kl"][0])
    for a, b in zip(frozen, teacher.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


# ---------------------------------------------------------------- saving and bad inputs


def test_keras_round_trip_keeps_config_and_densities(tmp_path):
    model = _small(decoder="gaussian", decoder_scale=0.3, kl_warmup_steps=5)
    path = str(tmp_path / "hvae.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_config() == model.get_config()
    x = np.random.default_rng(7).random((4, 12)).astype("float32")
    noise = {"z1": np.ones((4, 3), "float32"), "z2": np.zeros((4, 2), "float32")}
    np.testing.assert_allclose(
        loaded.negative_elbo(x, noise=noise), model.negative_elbo(x, noise=noise), rtol=1e-6
    )
    shared = model.sample_noise(3, seed=(0, 1))
    np.testing.assert_allclose(
        loaded.generate(shared)["x"]["loc"], model.generate(shared)["x"]["loc"], rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(latent_sizes=(2, 0)), "latent_sizes"),
        (dict(latent_sizes=()), "latent_sizes"),
        (dict(data_size=0), "data_size"),
        (dict(hidden_units=(4, -1)), "hidden_units"),
        (dict(decoder="poisson"), "decoder"),
        (dict(decoder="gaussian", decoder_scale=0.0), "decoder_scale"),
        (dict(kl_warmup_steps=-1), "kl_warmup_steps"),
        (dict(num_importance_samples=0), "num_importance_samples"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _small(**kwargs)


def test_bad_inputs_are_named():
    model = _small()
    x = _binary(3)
    with pytest.raises(ValueError, match="`k`"):
        model.log_prob(x, k=0)
    with pytest.raises(ValueError, match="binary"):
        model.log_prob(np.full((3, 12), 0.5, "float32"))
    with pytest.raises(ValueError, match="`x`"):
        model.negative_elbo(np.full((3, 12), 2.0, "float32"))
    with pytest.raises(ValueError, match="`x`"):
        model.fit(x[:, :5], epochs=1, verbose=0)
    with pytest.raises(ValueError, match="NaN"):
        model.encode(np.full((3, 12), np.nan, "float32"))
    with pytest.raises(ValueError, match="noise"):
        model.generate({"z2": tf.zeros((3, 5)), "z1": tf.zeros((3, 3)), "x": tf.zeros((3, 12))})
    with pytest.raises(ValueError, match="noise"):
        model.generate({"z2": tf.zeros((3, 2))})
    with pytest.raises(ValueError, match="forced"):
        model.generate(model.sample_noise(3), forced={"z7": tf.zeros((3, 2))})
    with pytest.raises(ValueError, match="`n`"):
        model.sample(0)
    with pytest.raises(ValueError, match="steps"):
        model.fit_encoder(x, steps=0)
    gaussian = _small(decoder="gaussian")
    assert np.all(np.isfinite(gaussian.log_prob(np.full((3, 12), 0.5, "float32"), k=2)))


# ---------------------------------------------------------------- export

_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["kdtfp"] = None  # kdtfp is not importable in this process
    sys.modules["tensorflow_probability"] = None
    import numpy as np
    import tensorflow as tf

    export_dir, batch_file, out_dir = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(batch_file))
    np.save(out_dir + "/log_prob.npy", loaded.log_prob(x).numpy())
    np.save(out_dir + "/encode.npy", loaded.encode(x).numpy())
    np.save(out_dir + "/sample.npy", loaded.sample(tf.constant(6)).numpy())
    np.save(out_dir + "/sample2.npy", loaded.sample(tf.constant(6)).numpy())
    np.save(out_dir + "/mean.npy", loaded.sample_mean(tf.constant(6)).numpy())
    """
)


def test_export_serves_sample_log_prob_and_encode_without_kdtfp(tmp_path):
    # With the exact posterior every importance weight is p(x): the served IWAE is exact.
    model = _linear_gaussian(exact_posterior=True)
    x = np.random.default_rng(8).normal(size=(8, 3)).astype("float32")
    path = export_hvae(model, str(tmp_path / "export" / "1"))
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    completed = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "x.npy"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "encode.npy"), model.encode(x), atol=1e-5)
    np.testing.assert_allclose(
        np.load(tmp_path / "log_prob.npy"), _exact_log_marginal(x.astype("float64")), atol=2e-4
    )
    samples, again = np.load(tmp_path / "sample.npy"), np.load(tmp_path / "sample2.npy")
    assert samples.shape == (6, 3) and np.all(np.isfinite(samples))
    assert not np.array_equal(samples, again)  # fresh noise on every call
    mean = np.load(tmp_path / "mean.npy")
    assert mean.shape == (6, 3)
    with pytest.raises(ValueError, match="model"):
        export_hvae(object(), str(tmp_path / "bad"))
