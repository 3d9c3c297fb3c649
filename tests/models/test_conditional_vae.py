"""`ConditionalVAE`: ELBO and IWAE against NumPy/quadrature, the shared-noise protocol, bad
inputs, Keras round trip, XLA, and an export that serves without kdtfp."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.models.conditional_vae import ConditionalVAE, _iwae, export_conditional_vae

D, L, T = 8, 3, 2


def _model(latent_size=L, seed=1, **kwargs):
    return ConditionalVAE(latent_size, hidden_units=16, num_tasks=T, data_size=D, seed=seed,
                          **kwargs)  # fmt: skip


def _batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, D)) < 0.4).astype("float32"), rng.integers(0, T, n).astype("int32")


def _softplus(a):
    return np.logaddexp(0.0, a)


def _mlp(layer, inputs):
    """NumPy forward pass of a latent layer's hidden ReLU stack."""
    h = inputs.astype(np.float64)
    for dense in layer.hidden:
        h = np.maximum(h @ np.asarray(dense.kernel) + np.asarray(dense.bias), 0.0)
    return h


def _dense(dense, h):
    return h @ np.asarray(dense.kernel, np.float64) + np.asarray(dense.bias, np.float64)


def _numpy_encoder(model, x, task):
    h = _mlp(model.encoder, np.concatenate([x, np.eye(T)[task]], -1))
    return _dense(model.encoder.loc_layer, h), _softplus(
        _dense(model.encoder.scale_layer, h)
    ) + 1e-4


def _numpy_log_lik(model, x, z, task):
    """log p(x | z, task) for z [..., B, L]."""
    onehot = np.broadcast_to(np.eye(T)[task], z.shape[:-1] + (T,))
    logits = _dense(
        model.decoder.logits_layer, _mlp(model.decoder, np.concatenate([z, onehot], -1))
    )
    return np.sum(x * logits - _softplus(logits), -1)


def test_negative_elbo_matches_numpy():
    model = _model()
    x, task = _batch()
    eps = np.random.default_rng(3).standard_normal((len(x), L)).astype("float32")
    got = np.asarray(model.negative_elbo(x, task, noise=eps))
    loc, scale = _numpy_encoder(model, x, task)
    z = loc + scale * eps
    kl = np.sum(0.5 * (loc**2 + scale**2 - 1.0) - np.log(scale), -1)
    np.testing.assert_allclose(got, kl - _numpy_log_lik(model, x, z, task), rtol=1e-4, atol=1e-4)


def test_iwae_matches_numpy_for_given_noise():
    model = _model()
    x, task = _batch()
    eps = np.random.default_rng(4).standard_normal((5, len(x), L)).astype("float32")
    got = np.asarray(_iwae(model, tf.constant(x), tf.one_hot(task, T), tf.constant(eps)))
    loc, scale = _numpy_encoder(model, x, task)
    z = loc + scale * eps
    log_q = np.sum(-0.5 * eps**2 - np.log(scale) - 0.5 * np.log(2 * np.pi), -1)
    log_prior = np.sum(-0.5 * z**2 - 0.5 * np.log(2 * np.pi), -1)
    log_w = log_prior + _numpy_log_lik(model, x, z, task) - log_q
    want = np.logaddexp.reduce(log_w, axis=0) - np.log(5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_iwae_approaches_the_exact_marginal_from_quadrature():
    # One latent dimension: log p(x | task) = log integral N(z; 0, 1) p(x | z, task) dz on a grid.
    model = _model(latent_size=1, seed=5)
    x, task = _batch(6, seed=2)
    grid = np.linspace(-8.0, 8.0, 4001)
    log_joint = _numpy_log_lik(model, x, grid[:, None, None] * np.ones((1, len(x), 1)), task)
    log_joint += -0.5 * grid[:, None] ** 2 - 0.5 * np.log(2 * np.pi)
    exact = np.logaddexp.reduce(log_joint, axis=0) + np.log(grid[1] - grid[0])
    iwae_1 = np.asarray(model.log_prob(x, task, k=1, seed=0))
    iwae_big = np.asarray(model.log_prob(x, task, k=4000, seed=0))
    np.testing.assert_allclose(iwae_big, exact, atol=0.05)
    # A lower bound in expectation: k = 1 (the ELBO estimate) sits clearly below it.
    assert np.mean(iwae_1) < np.mean(iwae_big)


def test_generate_follows_the_noise_and_forced_values():
    model = _model()
    noise = model.sample_noise(7, seed=(3, 4), task=1)
    again = model.sample_noise(7, seed=(3, 4), task=1)
    for key in noise:
        np.testing.assert_array_equal(np.asarray(noise[key]), np.asarray(again[key]))
    np.testing.assert_array_equal(np.asarray(noise["task"]), np.tile([[0.0, 1.0]], (7, 1)))
    out = model.generate(noise)
    assert [n.name for n in model.nodes] == ["z", "x"]
    np.testing.assert_array_equal(np.asarray(out["z"]["sample"]), np.asarray(noise["z"]))
    probs = 1.0 / (1.0 + np.exp(-np.asarray(out["x"]["logits"], np.float64)))
    np.testing.assert_array_equal(
        np.asarray(out["x"]["sample"]), (np.asarray(noise["x"]) < probs).astype("float32")
    )
    # The task changes the decoder; forcing x replaces the sample only.
    other = model.generate(dict(noise, task=np.zeros(7, np.int32)))
    assert not np.allclose(np.asarray(other["x"]["logits"]), np.asarray(out["x"]["logits"]))
    x, _ = _batch(7)
    forced = model.generate(noise, forced={"x": x})
    np.testing.assert_array_equal(np.asarray(forced["x"]["sample"]), x)
    np.testing.assert_allclose(np.asarray(forced["x"]["logits"]), np.asarray(out["x"]["logits"]))
    random_tasks = np.asarray(model.sample_noise(200, seed=(1, 1))["task"])
    assert 0.3 < random_tasks[:, 1].mean() < 0.7


def test_fit_lowers_the_negative_elbo():
    model = _model()
    x, task = _batch(64)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=10)
    before = float(np.mean(model.negative_elbo(x, task, noise=np.zeros((64, L), "float32"))))
    model.fit({"x": x, "task": task}, batch_size=32, epochs=20, verbose=0)
    after = float(np.mean(model.negative_elbo(x, task, noise=np.zeros((64, L), "float32"))))
    assert after < before - 0.5


def test_jit_compiled_step_matches_the_eager_loss():
    model = _model()
    x, task = _batch(16)
    model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)
    noise = np.random.default_rng(0).standard_normal((16, L)).astype("float32")
    history = model.fit({"x": x, "task": task, "noise": noise}, batch_size=16, epochs=1, verbose=0)
    want = float(np.mean(model.negative_elbo(x, task, noise=noise)))
    np.testing.assert_allclose(history.history["loss"][0], want, rtol=1e-5)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, x, t: m.log_prob(x, t, k=0), "`k`"),
        (lambda m, x, t: m.log_prob(x * 0.5, t), "`x`"),
        (lambda m, x, t: m.negative_elbo(x[:, :5], t), "`x`"),
        (lambda m, x, t: m.negative_elbo(x, t + 2), "`task`"),
        (lambda m, x, t: m.sample(3, task=2), "`task`"),
        (
            lambda m, x, t: m.generate(
                {"z": np.zeros((2, L + 1)), "x": np.zeros((2, D)), "task": np.zeros(2, np.int32)}
            ),
            "noise",
        ),  # fmt: skip
        (lambda m, x, t: m.generate({"z": np.zeros((2, L)), "x": np.zeros((2, D))}), "`noise`"),
        (lambda m, x, t: m.generate(m.sample_noise(2, task=0), forced={"y": x}), "`forced`"),
        (lambda m, x, t: m.fit({"x": x - 1.0, "task": t}, verbose=0), "`x`"),
        (lambda m, x, t: ConditionalVAE(latent_size=0), "`latent_size`"),
        (lambda m, x, t: ConditionalVAE(num_tasks=True), "`num_tasks`"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, argument):
    model = _model()
    x, task = _batch(4)
    with pytest.raises(ValueError, match=argument):
        call(model, x, task)


def test_keras_round_trip_keeps_config_and_outputs(tmp_path):
    model = _model(hidden_layers=2)
    x, task = _batch()
    noise = np.random.default_rng(0).standard_normal((len(x), L)).astype("float32")
    path = str(tmp_path / "cvae.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, ConditionalVAE)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(
        np.asarray(loaded.negative_elbo(x, task, noise=noise)),
        np.asarray(model.negative_elbo(x, task, noise=noise)),
        rtol=1e-6,
    )


_SERVE = textwrap.dedent(
    """
    import sys

    sys.modules["kdtfp"] = None
    sys.modules["tensorflow_probability"] = None
    import numpy as np
    import tensorflow as tf

    path, x_file, task_file, out = sys.argv[1:5]
    loaded = tf.saved_model.load(path)
    x, task = tf.constant(np.load(x_file)), tf.constant(np.load(task_file))
    np.save(out + "/log_prob.npy", loaded.log_prob(x, task).numpy())
    np.save(out + "/loc.npy", loaded.encode(x, task)["loc"].numpy())
    np.save(out + "/a.npy", loaded.sample(tf.constant(50), tf.constant(1)).numpy())
    np.save(out + "/b.npy", loaded.sample(tf.constant(50), tf.constant(1)).numpy())
    for bad in (lambda: loaded.log_prob(x * 0.5, task), lambda: loaded.encode(x, task + 5)):
        try:
            bad()
        except tf.errors.InvalidArgumentError:
            pass
        else:
            raise AssertionError("bad input was served")
    assert "kdtfp" not in {n.split(".")[0] for n, m in sys.modules.items() if m is not None}
    """
)


def test_export_serves_sample_log_prob_and_encode_without_kdtfp(tmp_path):
    model = _model()
    x, task = _batch(10)
    export_conditional_vae(model, str(tmp_path / "export"), k=5000)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "task.npy", task)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE)
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "export"), str(tmp_path / "x.npy"),
         str(tmp_path / "task.npy"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "loc.npy"), np.asarray(model.encode(x, task)["loc"]), atol=1e-5
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "log_prob.npy"), np.asarray(model.log_prob(x, task, k=5000, seed=0)),
        atol=0.15,
    )  # fmt: skip
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (50, D) and set(np.unique(a)) <= {0.0, 1.0}
    assert not np.array_equal(a, b)  # fresh noise on every call
    with pytest.raises(ValueError, match="`k`"):
        export_conditional_vae(model, str(tmp_path / "bad"), k=0)


def test_generic_shared_noise_distiller_drives_the_protocol():
    # The task travels in the noise dict, so `SharedNoiseDistiller` distils one ConditionalVAE
    # into another over random tasks; the prior is shared (z = eps), so the latent term is 0.
    from kdtfp.distill.shared_noise import SharedNoiseDistiller

    teacher, student = _model(seed=1), _model(seed=2)
    distiller = SharedNoiseDistiller(student, teacher, latent_weight=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(teacher.noise_dataset(16), steps_per_epoch=5, verbose=0).history
    assert np.isfinite(history["output_kl"][0]) and history["output_kl"][0] > 0
    assert history["latent_loss"][0] == pytest.approx(0.0, abs=1e-7)
