"""`kdtfp.callbacks.PosteriorSampler` and `kdtfp.predictive.predict_distribution`."""

from __future__ import annotations

import sys
import types

import keras
import numpy as np
import pytest

from kdtfp.callbacks import PosteriorSampler
from kdtfp.optimizers import SGLD
from kdtfp.predictive import predict_distribution

N, D, K, BATCH = 32, 3, 3, 8  # 4 steps per epoch


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype("float32")
    y = rng.integers(0, K, size=N)
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    model.compile(
        optimizer=SGLD(1e-3, data_size=N, seed=seed),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(model, sampler, epochs, callbacks=()):
    x, y = _data()
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[*callbacks, sampler],
    )  # fmt: skip


# ------------------------------------------------------------------- collection arithmetic
@pytest.mark.parametrize(
    "burn_in, thin, max_samples, expected",
    [(5, 2, 100, 5), (0, 1, 100, 16), (3, 4, 100, 3), (5, 2, 3, 3), (15, 1, 10, 1)],
)
def test_sample_count_follows_burn_in_thin_and_max(burn_in, thin, max_samples, expected):
    # 4 epochs x 4 steps = 16 steps: count = min(max, (16 - burn_in) // thin).
    sampler = PosteriorSampler(burn_in, thin, max_samples, verbose=0)
    _fit(_model(), sampler, epochs=4)
    assert sampler.step == 16
    assert len(sampler.samples) == expected == min(max_samples, (16 - burn_in) // thin)


def test_snapshots_are_copies_that_differ_under_sgld():
    model = _model()
    sampler = PosteriorSampler(burn_in=0, thin=1, max_samples=8, verbose=0)
    _fit(model, sampler, epochs=2)
    s = sampler.samples
    assert len(s) == 8 and all(len(w) == 2 for w in s)
    assert all(isinstance(a, np.ndarray) for w in s for a in w)
    for a, b in zip(s[:-1], s[1:], strict=True):
        assert not np.allclose(a[0], b[0])  # SGLD noise moves the kernel every step
    # The last snapshot equals the final weights, but is not a view of them.
    np.testing.assert_array_equal(s[-1][0], model.trainable_weights[0].numpy())
    model.trainable_weights[0].assign(np.zeros((D, K), "float32"))
    assert not np.allclose(s[-1][0], 0.0)


def test_progress_line(capsys):
    _fit(_model(), PosteriorSampler(burn_in=2, thin=1, max_samples=5, verbose=1), epochs=2)
    assert "posterior samples: 2/5" in capsys.readouterr().out


# ------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"burn_in": -1, "thin": 1, "max_samples": 1}, "burn_in"),
        ({"burn_in": 0, "thin": 0, "max_samples": 1}, "thin"),
        ({"burn_in": 0, "thin": 1.5, "max_samples": 1}, "thin"),
        ({"burn_in": 0, "thin": 1, "max_samples": 0}, "max_samples"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        PosteriorSampler(**kwargs)


def test_burn_in_not_below_planned_steps_raises_before_training():
    model = _model()
    before = [w.numpy().copy() for w in model.trainable_weights]
    with pytest.raises(ValueError, match="`burn_in`.*16"):
        _fit(model, PosteriorSampler(burn_in=16, thin=1, max_samples=5, verbose=0), epochs=4)
    np.testing.assert_array_equal(before[0], model.trainable_weights[0].numpy())


def test_predict_distribution_bad_arguments():
    model = _model()
    good = [w.numpy() for w in model.trainable_weights]
    x = _data()[0]
    with pytest.raises(ValueError, match="`level`"):
        predict_distribution(model, [good], x, level=1.0)
    with pytest.raises(ValueError, match="`samples`"):
        predict_distribution(model, [], x)
    with pytest.raises(ValueError, match=r"`samples\[0\]\[1\]`"):
        predict_distribution(model, [[good[0], np.zeros(K + 1)]], x)


# ------------------------------------------------------------------- R-hat / ESS
def _np_split_rhat(chains):
    """NumPy split-R-hat (TFP's Brooks-Gelman variance-ratio form). chains: [C, n]."""
    n = chains.shape[1] // 2
    halves = np.concatenate([chains[:, :n], chains[:, n : 2 * n]], axis=0)  # [2C, n]
    m = halves.shape[0]
    w = halves.var(axis=1, ddof=1).mean()
    b_div_n = halves.mean(axis=1).var(ddof=1)
    sigma2_plus = (n - 1) / n * w + b_div_n
    return (m + 1) / m * sigma2_plus / w - (n - 1) / (m * n)


def _sampler_from(chain_arrays):
    """Samplers (one per chain) holding [n, *shape] arrays as a single weight tensor."""
    samplers = []
    for arr in chain_arrays:
        s = PosteriorSampler(0, 1, len(arr), verbose=0)
        s._buffer = [[a] for a in arr]
        samplers.append(s)
    return samplers[0] if len(samplers) == 1 else PosteriorSampler.combine(samplers)


def test_summary_iid_normal_one_chain_rhat_one_and_ess_n():
    n = 400
    draws = np.random.default_rng(1).normal(size=(n, 4, 2))
    summary = _sampler_from([draws]).summary()
    assert summary["n_chains"] == 1 and summary["n_samples"] == n
    w = summary["per_weight"][0]
    assert w["shape"] == (4, 2)
    assert 0.97 < w["max_rhat"] < 1.05
    assert 0.5 * n < w["min_ess"] <= 1.6 * n
    flat = draws.reshape(n, -1)
    ref = max(_np_split_rhat(flat[:, i][None]) for i in range(flat.shape[1]))
    assert w["max_rhat"] == pytest.approx(ref, rel=1e-9)


def test_summary_two_chains_with_different_means_has_large_rhat():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.0, 1.0, (200, 3)), rng.normal(3.0, 1.0, (200, 3))
    summary = _sampler_from([a, b]).summary()
    assert summary["n_chains"] == 2
    assert summary["max_rhat"] > 2.0
    ref = max(_np_split_rhat(np.stack([a[:, i], b[:, i]])) for i in range(3))
    assert summary["max_rhat"] == pytest.approx(ref, rel=1e-9)
    # Same-mean chains combine to R-hat ~ 1 and ESS ~ total draws.
    c = rng.normal(0.0, 1.0, (200, 3))
    ok = _sampler_from([a, c]).summary()
    assert ok["max_rhat"] < 1.05 and ok["min_ess"] > 200


def test_summary_needs_four_samples():
    with pytest.raises(ValueError, match="at least 4"):
        _sampler_from([np.zeros((3, 2))]).summary()


def test_combine_concatenates_samples_for_prediction():
    a, b = _sampler_from([np.ones((4, 2))]), _sampler_from([np.zeros((5, 2))])
    both = PosteriorSampler.combine([a, b])
    assert len(both.chains) == 2 and len(both.samples) == 9 and len(both) == 9


# ------------------------------------------------------------------- posterior predictive
def _linear():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    return model


def test_predict_distribution_matches_numpy_and_restores_weights():
    model = _linear()
    original = [w.numpy().copy() for w in model.trainable_weights]
    samples = [
        [np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), np.array([0.0, 0.1, 0.2])],
        [np.array([[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]]), np.array([0.3, 0.0, -0.3])],
        [np.array([[40.0, 0.0, -40.0], [0.0, 0.0, 0.0]]), np.array([0.0, 0.0, 0.0])],
    ]
    x = np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0], [3.0, -2.0]], "float32")
    out = predict_distribution(model, samples, x, level=0.9, batch_size=2)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    q = np.stack([softmax(x.astype(np.float64) @ w + b) for w, b in samples])  # [3, 4, 3]
    mean = q.mean(0)
    np.testing.assert_allclose(out["mean_probs"], mean, atol=1e-6)
    # Quantiles of 3 values at 0.05 / 0.95 (linear interpolation): min + 0.1 * gap, etc.
    s = np.sort(q, axis=0)
    np.testing.assert_allclose(out["lower"], s[0] + 0.1 * (s[1] - s[0]), atol=1e-6)
    np.testing.assert_allclose(out["upper"], s[1] + 0.9 * (s[2] - s[1]), atol=1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(q > 0, -q * np.log(q), 0.0)
    np.testing.assert_allclose(out["deviance"], 2 * ent.sum(-1).mean(0), atol=1e-5)
    assert np.all(np.isfinite(out["deviance"]))  # sample 3 saturates: q = 0 exactly somewhere
    # Credible set: classes by decreasing mean prob until the sum reaches 0.9.
    for i in range(len(x)):
        order = np.argsort(-mean[i])
        k = int(np.searchsorted(np.cumsum(mean[i][order]), 0.9)) + 1
        expected = np.zeros(3, bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(out["credible_set"][i], expected)
    assert out["credible_set"][2].all()  # x = 0: mean ~ uniform-ish, all classes needed
    for w, w0 in zip(model.trainable_weights, original, strict=True):
        np.testing.assert_array_equal(w.numpy(), w0)


def test_sampler_predict_distribution_uses_its_samples():
    model = _model()
    sampler = PosteriorSampler(burn_in=0, thin=2, max_samples=4, verbose=0)
    _fit(model, sampler, epochs=2)
    x = _data()[0][:5]
    a = sampler.predict_distribution(model, x)
    b = predict_distribution(model, sampler.samples, x)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["mean_probs"].shape == (5, K) and a["deviance"].shape == (5,)
    np.testing.assert_allclose(a["mean_probs"].sum(-1), 1.0, atol=1e-6)


# ------------------------------------------------------------------- BackupAndRestore
class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("simulated interruption")


def test_buffer_survives_backup_and_restore(tmp_path):
    kwargs = {"burn_in": 3, "thin": 2, "max_samples": 100, "verbose": 0}
    reference = PosteriorSampler(**kwargs)
    _fit(_model(), reference, epochs=4)  # 16 steps -> (16 - 3) // 2 = 6 samples

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "keras"))
    sampler_dir = tmp_path / "sampler"
    model = _model()
    first = PosteriorSampler(**kwargs, backup_dir=str(sampler_dir))
    with pytest.raises(RuntimeError, match="simulated"):
        _fit(model, first, epochs=4, callbacks=[backup, _Interrupt()])
    assert (sampler_dir / "posterior_sampler.npz").exists()
    assert len(first.samples) == 2  # steps 5 and 7 of the first 8

    # A new process: fresh model and sampler, same backup directories.
    resumed = PosteriorSampler(**kwargs, backup_dir=str(sampler_dir))
    history = _fit(_model(seed=5), resumed, epochs=4, callbacks=[backup])
    assert len(history.epoch) == 2  # only epochs 3 and 4 ran
    assert resumed.step == 16
    assert len(resumed.samples) == len(reference.samples) == 6
    # Weights, optimizer and its noise seed are restored too, so the chain is the same chain.
    for got, want in zip(resumed.samples, reference.samples, strict=True):
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    assert not (sampler_dir / "posterior_sampler.npz").exists()  # removed after a full run


# ------------------------------------------------------------------- ArviZ export
def _fake_arviz(monkeypatch, version):
    """Installs a fake `arviz` module whose `from_dict` records its arguments."""
    calls = []
    module = types.ModuleType("arviz")
    module.__version__ = version
    module.from_dict = lambda *args, **kwargs: calls.append((args, kwargs)) or "idata"
    monkeypatch.setitem(sys.modules, "arviz", module)
    return calls


def _two_chains():
    a = PosteriorSampler(burn_in=0, thin=1, max_samples=6, verbose=0)
    b = PosteriorSampler(burn_in=0, thin=1, max_samples=5, verbose=0)
    model_a, model_b = _model(seed=0), _model(seed=1)
    _fit(model_a, a, epochs=2)
    _fit(model_b, b, epochs=2)
    return model_a, a, b


def test_to_arviz_posterior_is_chain_draw_shape_named_by_weight_paths(monkeypatch):
    calls = _fake_arviz(monkeypatch, "0.22.0")
    model, a, b = _two_chains()
    names = [v.path for v in model.trainable_weights]
    assert a.weight_names == names and len(set(names)) == 2
    both = PosteriorSampler.combine([a, b])
    assert both.weight_names == names  # the first sampler's
    assert both.to_arviz(coords={"c": [0]}) == "idata"
    ((args, kwargs),) = calls
    assert args == () and kwargs["coords"] == {"c": [0]}
    posterior = kwargs["posterior"]
    assert list(posterior) == names
    # Chains truncated to the shortest (5 draws); [chain, draw, *shape].
    assert posterior[names[0]].shape == (2, 5, D, K) and posterior[names[1]].shape == (2, 5, K)
    for c, chain in enumerate((a.samples, b.samples)):
        for i in range(5):
            for v, name in enumerate(names):
                np.testing.assert_array_equal(posterior[name][c, i], chain[i][v])


def test_to_arviz_uses_the_arviz_1_signature_and_default_names(monkeypatch):
    calls = _fake_arviz(monkeypatch, "1.2.0")
    sampler = _sampler_from([np.zeros((4, 2, 3)), np.ones((6, 2, 3))])  # never ran fit
    sampler.to_arviz()
    ((args, kwargs),) = calls
    assert kwargs == {} and set(args[0]) == {"posterior"}
    assert list(args[0]["posterior"]) == ["w0"]
    assert args[0]["posterior"]["w0"].shape == (2, 4, 2, 3)
    with pytest.raises(ValueError, match="no"):
        PosteriorSampler(0, 1, 1, verbose=0).to_arviz()


def test_to_arviz_without_arviz_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)  # makes `import arviz` fail
    with pytest.raises(ImportError, match="pip install arviz"):
        _sampler_from([np.zeros((4, 2))]).to_arviz()


def test_weight_names_survive_the_backup_file(tmp_path):
    sampler = _sampler_from([np.zeros((3, 2))])
    sampler.backup_dir, sampler.weight_names = str(tmp_path), ["dense/kernel"]
    sampler._save_backup()
    restored = PosteriorSampler(0, 1, 10, backup_dir=str(tmp_path), verbose=0)
    restored._load_backup()
    assert restored.weight_names == ["dense/kernel"] and len(restored.samples) == 3


def test_to_arviz_with_real_arviz():
    pytest.importorskip("arviz")
    model, a, b = _two_chains()
    idata = PosteriorSampler.combine([a, b]).to_arviz()
    posterior = idata["posterior"]
    for v, weight in enumerate(model.trainable_weights):
        values = np.asarray(posterior[weight.path])
        assert values.shape == (2, 5, *weight.shape)
        np.testing.assert_array_equal(values[0, 0], a.samples[0][v])
