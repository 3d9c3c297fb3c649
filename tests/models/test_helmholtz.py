"""HelmholtzMachine: exact likelihood against brute force, the surrogate >= marginal KL bound,
wake-sleep, saving, bad input and the export served without kdtfp."""

import itertools
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.datasets.offline import load_faithful
from kdtfp.models.generative import export_generative
from kdtfp.models.helmholtz import HelmholtzMachine

SCALE = 0.5


def random_hm(hidden_units=8, seed=0, weight_scale=1.5, **kwargs):
    """A Helmholtz machine with large random weights (far from the near-uniform init)."""
    hm = HelmholtzMachine(hidden_units=hidden_units, seed=seed, **kwargs)
    rng = np.random.default_rng(seed)
    hm.set_weights(
        [
            (weight_scale * rng.normal(size=w.shape)).astype("float32") if w.dtype == "float32"
            else np.asarray(w)
            for w in hm.get_weights()
        ]
    )  # fmt: skip
    return hm


def grid(samples, n=301, margin=3.0):
    """A 2-D grid `[n * n, 2]` covering `samples` with `margin` on each side, and its cell area."""
    lo, hi = samples.min(0) - margin, samples.max(0) + margin
    y1 = np.linspace(lo[0], hi[0], n, dtype="float32")
    y2 = np.linspace(lo[1], hi[1], n, dtype="float32")
    mesh = np.meshgrid(y1, y2, indexing="ij")
    return np.stack([m.ravel() for m in mesh], -1), float((y1[1] - y1[0]) * (y2[1] - y2[0]))


def numpy_bernoulli(logits, z):
    logits = np.asarray(logits, np.float64)
    return np.sum(z * logits - np.logaddexp(0.0, logits), axis=-1)


def numpy_normal(loc, y):
    loc = np.asarray(loc, np.float64)
    return np.sum(-0.5 * ((y - loc) / SCALE) ** 2 - np.log(SCALE) - 0.5 * np.log(2 * np.pi), -1)


def brute_force_joint(hm, x):
    """`log p(x, z)` `[B, S]` for every joint latent state (no factorisation): the conditionals
    come from `generate` with every node forced, the log-densities from NumPy."""
    latents = [n for n in hm.nodes if n.role == "latent"]
    units = hm.latent_units
    states = np.array(list(itertools.product((0.0, 1.0), repeat=units * len(latents))), np.float32)
    batch, num_states = len(x), len(states)
    values = {"y1": np.repeat(x[:, :1], num_states, 0), "y2": np.repeat(x[:, 1:], num_states, 0)}
    for i, node in enumerate(latents):
        values[node.name] = np.tile(states[:, i * units : (i + 1) * units], (batch, 1))
    params = hm.generate({}, forced={k: tf.constant(v) for k, v in values.items()})
    total = 0.0
    for node in hm.nodes:
        p = params[node.name]
        if node.role == "latent":
            total = total + numpy_bernoulli(p["logits"], values[node.name])
        else:
            total = total + numpy_normal(p["loc"], values[node.name])
    return total.reshape(batch, num_states), states


def logsumexp(a, axis=-1):
    top = a.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(a - top).sum(axis=axis))


@pytest.mark.parametrize("layers, latent_units", [(4, 2), (2, 1), (6, 1)])
def test_exact_log_prob_and_encode_match_brute_force_enumeration(layers, latent_units):
    hm = random_hm(layers=layers, latent_units=latent_units, seed=layers)
    x = np.random.default_rng(1).normal(size=(7, 2)).astype("float32") * 1.5
    joint, states = brute_force_joint(hm, x)
    assert joint.shape == (7, 2 ** (layers * latent_units))
    expected = logsumexp(joint)
    np.testing.assert_allclose(hm.log_prob(x), expected, rtol=1e-5, atol=1e-4)
    posterior = np.exp(joint - expected[:, None])
    np.testing.assert_allclose(hm.encode(x), posterior @ states, atol=1e-4)


def test_density_integrates_to_one_and_matches_the_samples():
    hm = random_hm(seed=3)
    samples = np.asarray(hm.sample(20000))
    points, area = grid(samples)
    density = np.exp(np.asarray(hm.log_prob(points), np.float64))
    assert density.sum() * area == pytest.approx(1.0, abs=2e-3)
    mean = (density[:, None] * points).sum(0) * area
    assert samples.shape == (20000, 2)
    se = samples.std(0) / np.sqrt(len(samples))
    assert np.all(np.abs(samples.mean(0) - mean) < 4 * se + 1e-3), (samples.mean(0), mean)
    # Fresh noise on every call.
    assert not np.allclose(hm.sample(5), hm.sample(5))


def test_surrogate_upper_bounds_the_marginal_kl():
    # METHODS 3.3: E_eps KL(p_T(x | eps) || p_S(x | eps)) >= KL(p_T(x) || p_S(x)). With y2
    # observed and teacher-forced, KL(p(x | eps)) = KL(y2 | eps) + E_{y2 ~ T} KL(y1 | y2, eps),
    # both closed-form Gaussian KLs; the marginal KL comes from a fine 2-D grid (exact densities)
    # and, as a cross-check, from Monte Carlo over teacher samples.
    teacher = random_hm(8, seed=6, weight_scale=1.2)
    student = random_hm(2, seed=6, weight_scale=1.2)
    noise = teacher.sample_noise(20000, seed=(1, 2))
    t = teacher.generate(noise)
    s = student.generate(noise, forced={"y2": t["y2"]["sample"]})
    per_eps = sum(
        np.sum((np.asarray(t[k]["loc"]) - np.asarray(s[k]["loc"])) ** 2, -1) / (2 * SCALE**2)
        for k in ("y1", "y2")
    )
    surrogate, surrogate_se = per_eps.mean(), per_eps.std() / np.sqrt(len(per_eps))

    x = np.concatenate([t["y1"]["sample"], t["y2"]["sample"]], -1)
    points, area = grid(x, 401)
    log_t = np.asarray(teacher.log_prob(points), np.float64)
    log_s = np.asarray(student.log_prob(points), np.float64)
    marginal = float(np.sum(np.exp(log_t) * (log_t - log_s)) * area)
    ratio = np.asarray(teacher.log_prob(x), np.float64) - np.asarray(student.log_prob(x))
    mc, mc_se = ratio.mean(), ratio.std() / np.sqrt(len(ratio))

    assert marginal > 0.05  # the students differ: the bound is not trivially 0 >= 0
    assert abs(mc - marginal) < 4 * mc_se + 1e-3, (mc, mc_se, marginal)
    assert surrogate - 4 * surrogate_se > marginal, (surrogate, surrogate_se, marginal)
    # The same student with its teacher's weights has zero surrogate and zero KL.
    copy = random_hm(8, seed=6, weight_scale=1.2)
    c = copy.generate(noise, forced={"y2": t["y2"]["sample"]})
    np.testing.assert_allclose(c["y1"]["loc"], t["y1"]["loc"], atol=1e-6)


def test_generate_follows_the_noise_and_the_forced_values():
    hm = random_hm(seed=2)
    assert [n.name for n in hm.nodes] == ["z4", "z3", "y2", "z2", "z1", "y1"]
    assert [n.role for n in hm.nodes].count("observed") == 2
    noise = hm.sample_noise(64, seed=(3, 4))
    params = hm.generate(noise)
    # Bernoulli nodes threshold their uniform noise; Gaussian nodes are loc + 0.5 eps.
    z3 = params["z3"]
    expected = (np.asarray(noise["z3"]) < 1 / (1 + np.exp(-np.asarray(z3["logits"])))).astype(
        "float32"
    )
    np.testing.assert_array_equal(z3["sample"], expected)
    np.testing.assert_allclose(
        params["y1"]["sample"], params["y1"]["loc"] + SCALE * np.asarray(noise["y1"]), atol=1e-6
    )
    forced = hm.generate(noise, forced={"y2": tf.zeros((64, 1))})
    np.testing.assert_array_equal(forced["y2"]["sample"], np.zeros((64, 1)))
    np.testing.assert_array_equal(forced["z3"]["sample"], z3["sample"])  # upstream unchanged
    again = hm.generate(hm.sample_noise(64, seed=(3, 4)))
    np.testing.assert_array_equal(again["y1"]["sample"], params["y1"]["sample"])


def test_teacher_and_student_share_the_noise_layout_of_the_distiller():
    from kdtfp.distill.shared_noise import SharedNoiseDistiller

    teacher, student = HelmholtzMachine(8), HelmholtzMachine(2)
    distiller = SharedNoiseDistiller(student, teacher, teacher_forced=("y2",))
    out = distiller(teacher.sample_noise(16, seed=(0, 1)))
    np.testing.assert_array_equal(out["student"]["y2"]["sample"], out["teacher"]["y2"]["sample"])
    with pytest.raises(ValueError, match="noise layouts"):
        SharedNoiseDistiller(HelmholtzMachine(2, latent_units=3), teacher)
    with pytest.raises(ValueError, match="noise layouts"):
        SharedNoiseDistiller(HelmholtzMachine(2, layers=2), teacher)


def test_wake_and_sleep_terms_reach_only_their_own_nets():
    hm = random_hm(seed=4, weight_scale=0.5)
    x = load_faithful()[:64]
    generative = [v.value for layer in hm.generative_layers for v in layer.trainable_variables]
    recognition = [v.value for layer in hm.recognition_layers for v in layer.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        wake, sleep = hm._wake_sleep_terms(x, hm(x))
        wake, sleep = tf.reduce_mean(wake), tf.reduce_mean(sleep)
    for loss, own, other in ((wake, generative, recognition), (sleep, recognition, generative)):
        own_grads = tape.gradient(loss, own, unconnected_gradients="zero")
        other_grads = tape.gradient(loss, other, unconnected_gradients="zero")
        assert sum(float(tf.reduce_sum(tf.abs(g))) for g in own_grads) > 0
        assert all(float(tf.reduce_max(tf.abs(g))) == 0.0 for g in other_grads)


def test_wake_sleep_fit_raises_the_exact_likelihood():
    x = load_faithful()
    hm = HelmholtzMachine(hidden_units=8, seed=0)
    before = float(np.mean(hm.log_prob(x)))
    hm.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=100)
    history = hm.fit(
        tf.data.Dataset.from_tensors(x).repeat(), steps_per_epoch=300, epochs=1, verbose=0
    )
    assert {"loss", "wake", "sleep"} <= set(history.history)
    assert float(np.mean(hm.log_prob(x))) > before + 0.3
    elbo = -np.asarray(hm.negative_elbo(x))
    assert np.mean(elbo) <= float(np.mean(hm.log_prob(x))) + 1e-4  # ELBO <= exact log p


def test_keras_round_trip(tmp_path):
    hm = random_hm(hidden_units=3, seed=7, activation="leaky_relu")
    path = tmp_path / "hm.keras"
    hm.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, HelmholtzMachine) and loaded.get_config() == hm.get_config()
    x = load_faithful()[:20]
    np.testing.assert_allclose(loaded.log_prob(x), hm.log_prob(x), atol=1e-6)
    np.testing.assert_allclose(loaded.encode(x), hm.encode(x), atol=1e-6)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="`hidden_units`"):
        HelmholtzMachine(hidden_units=0)
    with pytest.raises(ValueError, match="`layers`"):
        HelmholtzMachine(layers=3)
    with pytest.raises(ValueError, match="`latent_units`"):
        HelmholtzMachine(latent_units=13)
    with pytest.raises(ValueError, match="`emission_scale`"):
        HelmholtzMachine(emission_scale=-0.5)
    with pytest.raises(ValueError, match="`activation`"):
        HelmholtzMachine(activation="no_such_activation")
    hm = HelmholtzMachine(hidden_units=2)
    with pytest.raises(ValueError, match="`x` must be finite"):
        hm.log_prob(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="`x` must be finite"):
        hm.fit(np.array([[0.0, np.inf]], np.float32), verbose=0)
    with pytest.raises(ValueError, match=r"`x` must have shape \[batch, 2\]"):
        hm.encode(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="`n`"):
        hm.sample(0)
    noise = hm.sample_noise(4)
    with pytest.raises(ValueError, match="`noise` has no entry for node 'y1'"):
        hm.generate({k: v for k, v in noise.items() if k != "y1"})
    noise["z3"] = tf.zeros((4, 3))
    with pytest.raises(ValueError, match="`noise`"):
        hm.generate(noise)


def test_export_serves_exact_log_prob_without_kdtfp(tmp_path):
    hm = random_hm(seed=8, weight_scale=0.5)
    path = export_generative(
        hm, str(tmp_path / "export" / "1"), tf.TensorSpec([None, 2], tf.float32)
    )
    x = load_faithful()[:50]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "log_prob.npy", np.asarray(hm.log_prob(x)))
    np.save(tmp_path / "encode.npy", np.asarray(hm.encode(x)))
    script = f"""
import sys
sys.modules["kdtfp"] = None  # any `import kdtfp` now fails
sys.modules["tensorflow_probability"] = None
import numpy as np, tensorflow as tf
served = tf.saved_model.load({path!r})
x = tf.constant(np.load({str(tmp_path / "x.npy")!r}))
np.testing.assert_allclose(served.log_prob(x).numpy(), np.load({str(tmp_path / "log_prob.npy")!r}),
                           rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(served.encode(x).numpy(), np.load({str(tmp_path / "encode.npy")!r}),
                           rtol=1e-5, atol=1e-5)
a, b = served.sample(tf.constant(500)).numpy(), served.sample(tf.constant(500)).numpy()
assert a.shape == (500, 2) and not np.allclose(a, b)
assert np.all(np.isfinite(served.log_prob(tf.constant(a)).numpy()))
# Through the serving signature (what TF Serving calls), which does not check shapes itself.
signature = served.signatures["log_prob"]
(argument,) = signature.structured_input_signature[1]
for bad in (tf.zeros([3, 3]), tf.constant([[np.nan, 0.0]], tf.float32)):  # wrong width, NaN
    try:
        signature(**{{argument: bad}})
    except tf.errors.InvalidArgumentError:
        pass
    else:
        raise AssertionError(f"log_prob accepted {{bad.shape}}")
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
