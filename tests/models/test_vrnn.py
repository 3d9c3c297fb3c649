"""`VRNN`: the ELBO against a NumPy reference, the shared-noise protocol, teacher forcing,
round trip, XLA, bad input and an export that serves without kdtfp."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.datasets.strokes import pen_strokes
from kdtfp.distill.shared_noise import SharedNoiseDistiller
from kdtfp.models.vrnn import VRNN, export_vrnn

T = 3


def _strokes(n=5, length=T, seed=0):
    x = pen_strokes(max(n, 3) * 2, length=length, seed=seed).x_train[:n]
    return x / np.array([1.0, 4.0, 4.0], np.float32)  # offsets of order 1


def _model(**kwargs):
    keras.utils.set_random_seed(0)
    return VRNN(**{"hidden_units": 5, "latent_size": 2, "length": T, "mlp_units": 6, **kwargs})


def _np(v):
    return keras.ops.convert_to_numpy(v).astype(np.float64)


def _dense(x, layer):
    return x @ _np(layer.kernel) + _np(layer.bias)


def _mlp(node, parents):
    h = np.maximum(_dense(parents, node.hidden[0]), 0.0)
    loc = _dense(h, node.loc_layer) if hasattr(node, "loc_layer") else None
    if hasattr(node, "logits_layer"):
        return _dense(h, node.logits_layer)
    if node.scale_layer is None:
        return loc, np.full_like(loc, node.scale)
    return loc, np.logaddexp(0.0, _dense(h, node.scale_layer)) + node.min_scale


def _gru(cell, inputs, h):
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    bias = _np(cell.bias)
    xz, xr, xh = np.split(inputs @ _np(cell.kernel) + bias[0], 3, axis=-1)
    rz, rr, rh = np.split(h @ _np(cell.recurrent_kernel) + bias[1], 3, axis=-1)
    z, r = sig(xz + rz), sig(xr + rr)
    return z * h + (1.0 - z) * np.tanh(xh + r * rh)


def _numpy_elbo(model, x, eps):
    """-ELBO per sequence, written from the densities step by step (analytic KL(q || p))."""
    x, eps = x.astype(np.float64), eps.astype(np.float64)
    h = np.zeros((x.shape[0], model.hidden_units))
    total = np.zeros(x.shape[0])
    for t in range(x.shape[1]):
        q_loc, q_scale = _mlp(model.posterior, np.concatenate([x[:, t], h], -1))
        p_loc, p_scale = _mlp(model.prior, h)
        z = q_loc + q_scale * eps[:, t]
        e_loc, e_scale = _mlp(model.emission, np.concatenate([z, h], -1))
        logit = _mlp(model.pen, np.concatenate([z, h], -1))[:, 0]
        xy, pen = x[:, t, 1:], x[:, t, 0]
        log_lik = np.sum(
            -0.5 * ((xy - e_loc) / e_scale) ** 2 - np.log(e_scale) - 0.5 * np.log(2 * np.pi), -1
        )
        log_lik += pen * logit - np.logaddexp(0.0, logit)
        kl = np.sum(
            np.log(p_scale / q_scale)
            + (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2)
            - 0.5,
            -1,
        )
        total += log_lik - kl
        h = _gru(model.cell, np.concatenate([x[:, t], z], -1), h)
    return -total


@pytest.mark.parametrize("emission_scale", [1.0, None])
def test_negative_elbo_matches_a_numpy_reference_over_steps(emission_scale):
    model = _model(emission_scale=emission_scale)
    x = _strokes()
    eps = np.random.default_rng(1).standard_normal((5, T, 2)).astype(np.float32)
    got = _np(model.negative_elbo(x, noise=tf.constant(eps)))
    np.testing.assert_allclose(got, _numpy_elbo(model, x, eps), rtol=1e-4, atol=1e-4)
    # One step alone (T = 1) is the first term of the same reference.
    one = _np(model.negative_elbo(x[:, :1], noise=tf.constant(eps[:, :1])))
    np.testing.assert_allclose(one, _numpy_elbo(model, x[:, :1], eps[:, :1]), rtol=1e-4)
    # fit's loss is the mean negative ELBO per step.
    loss = float(model.compute_loss(x=tf.constant(x), y_pred=tf.constant(got, tf.float32)))
    np.testing.assert_allclose(loss, got.mean() / T, rtol=1e-5)


def test_unrolled_loop_equals_the_while_loop():
    x, eps = _strokes(), tf.random.stateless_normal((5, T, 2), seed=[0, 3])
    a = _np(_model().negative_elbo(x, noise=eps))
    b = _np(_model(unroll=True).negative_elbo(x, noise=eps))
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_iwae_bound_is_at_least_the_elbo_on_average():
    model = _model()
    x = _strokes(20)
    elbo = _np(model.log_prob(np.repeat(x, 20, axis=0))).mean()  # 20 draws per sequence
    iwae = _np(model.log_prob(x, k=50)).mean()
    assert np.isfinite(iwae) and iwae > elbo


def test_generate_is_ancestral_and_teacher_forcing_feeds_the_recurrence():
    model = _model()
    noise = model.sample_noise(4, seed=tf.constant([1, 2]))
    out = model.generate(noise)
    assert out["z"]["loc"].shape == (4, T, 2) and out["x"]["sample"].shape == (4, T, 2)
    assert out["pen"]["logits"].shape == (4, T, 1)
    pen = _np(out["pen"]["sample"])
    assert set(np.unique(pen)) <= {0.0, 1.0}
    # Same noise, same draw: z = loc + scale * eps under the model's own parents.
    z = out["z"]
    np.testing.assert_allclose(
        _np(z["sample"]), _np(z["loc"]) + _np(z["scale"]) * _np(noise["z"]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(_np(model.generate(noise)["x"]["sample"]), _np(out["x"]["sample"]))
    # Forced strokes are the samples, and the later steps' parameters read them.
    strokes = _strokes(4)
    forced = {"pen": strokes[..., :1], "x": strokes[..., 1:]}
    teacher_forced = model.generate(noise, forced=forced)
    np.testing.assert_allclose(_np(teacher_forced["x"]["sample"]), strokes[..., 1:])
    np.testing.assert_allclose(_np(teacher_forced["z"]["loc"][:, 0]), _np(z["loc"][:, 0]))
    assert not np.allclose(_np(teacher_forced["z"]["loc"][:, 1:]), _np(z["loc"][:, 1:]))
    sampled = _np(model.sample(7))
    assert sampled.shape == (7, T, 3) and set(np.unique(sampled[..., 0])) <= {0.0, 1.0}


def test_encode_is_the_zero_noise_posterior_trajectory():
    model = _model()
    x = _strokes()
    codes = _np(model.encode(x))
    assert codes.shape == (5, T, 2)
    q_loc, _ = _mlp(model.posterior, np.concatenate([x[:, 0], np.zeros((5, 5))], -1))
    np.testing.assert_allclose(codes[:, 0], q_loc, rtol=1e-4, atol=1e-5)


def test_round_trip_keeps_weights_and_config(tmp_path):
    model = _model(emission_scale=None)
    path = str(tmp_path / "vrnn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, VRNN) and loaded.get_config() == model.get_config()
    x, eps = _strokes(), tf.random.stateless_normal((5, T, 2), seed=[0, 4])
    np.testing.assert_allclose(
        _np(loaded.negative_elbo(x, noise=eps)), _np(model.negative_elbo(x, noise=eps)), rtol=1e-6
    )


def test_fit_under_xla_lowers_the_loss():
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(2e-2), jit_compile=True)
    history = model.fit(_strokes(16), batch_size=16, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_shared_noise_distiller_forces_latents_in_local_mode_and_checks_layouts():
    teacher, student = _model(), _model(hidden_units=3)
    noise = teacher.sample_noise(4, seed=tf.constant([0, 5]))
    local = SharedNoiseDistiller(student, teacher, teacher_forced=("pen",), local=True)
    out = local(noise)
    np.testing.assert_allclose(
        _np(out["student"]["z"]["sample"]), _np(out["teacher"]["z"]["sample"])
    )
    with pytest.raises(ValueError, match="noise layouts"):
        SharedNoiseDistiller(_model(latent_size=3), teacher)
    with pytest.raises(ValueError, match="noise"):
        student.generate({"z": noise["z"][:, :2], "pen": noise["pen"], "x": noise["x"]})


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"hidden_units": 0}, "hidden_units"),
        ({"latent_size": 0}, "latent_size"),
        ({"length": 0}, "length"),
        ({"mlp_units": 0}, "mlp_units"),
        ({"emission_scale": -1.0}, "emission_scale"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        VRNN(**kwargs)


def test_bad_data_and_arguments_raise_naming_them():
    model = _model()
    x = _strokes()
    half_pen = x.copy()
    half_pen[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=r"`x\[\.\.\., 0\]`.*support"):
        model.log_prob(half_pen)
    nan = x.copy()
    nan[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="`x` contains NaN"):
        model.fit(nan, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"`x` must have shape \[batch, T, 3\]"):
        model.negative_elbo(x[..., 1:])
    with pytest.raises(ValueError, match="`k`"):
        model.log_prob(x, k=0)
    with pytest.raises(ValueError, match="`noise`"):
        model.negative_elbo(x, noise=tf.zeros((5, T, 3)))
    with pytest.raises(ValueError, match="forced"):
        model.generate(model.sample_noise(5), forced={"x": tf.zeros((5, T + 1, 2))})
    with pytest.raises(ValueError, match="`n`"):
        model.sample(0)


_SERVE_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["kdtfp"] = None  # kdtfp is not importable in this process
    sys.modules["tensorflow_probability"] = None
    import numpy as np
    import tensorflow as tf

    export_dir, data_file, out_dir = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(data_file))
    np.save(out_dir + "/sample.npy", loaded.sample(tf.constant(6)).numpy())
    np.save(out_dir + "/log_prob.npy", loaded.log_prob(x).numpy())
    np.save(out_dir + "/encode.npy", loaded.encode(x).numpy())
    assert "kdtfp" not in {name.split(".")[0] for name, m in sys.modules.items() if m is not None}
    """
)


def test_export_serves_sample_log_prob_and_encode_without_kdtfp(tmp_path):
    model = _model()
    path = export_vrnn(model, str(tmp_path / "export" / "1"))
    x = _strokes()
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "x.npy"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    sample = np.load(tmp_path / "sample.npy")
    assert sample.shape == (6, T, 3) and set(np.unique(sample[..., 0])) <= {0.0, 1.0}
    np.testing.assert_allclose(np.load(tmp_path / "encode.npy"), _np(model.encode(x)), rtol=1e-5)
    served = np.load(tmp_path / "log_prob.npy")
    assert served.shape == (5,) and np.all(np.isfinite(served)) and np.all(served < 0)
    with pytest.raises(ValueError, match="`model`"):
        export_vrnn(object(), str(tmp_path / "bad"))
