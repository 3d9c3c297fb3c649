"""Shared-noise divergences against closed forms (NumPy and TFP)."""

import keras
import numpy as np
import pytest
import tensorflow_probability as tfp

from kdtfp.losses.shared_noise import BernoulliKL, GaussianKL, GaussianW2, PerExampleMean

tfd = tfp.distributions
RNG = np.random.default_rng(0)


def gaussians(shape=(5, 3)):
    return (
        {"loc": RNG.normal(size=shape), "scale": RNG.uniform(0.2, 2.0, size=shape)},
        {"loc": RNG.normal(size=shape), "scale": RNG.uniform(0.2, 2.0, size=shape)},
    )


def test_gaussian_kl_matches_numpy_and_tfp():
    t, s = gaussians()
    numpy = (
        np.log(s["scale"] / t["scale"])
        + (t["scale"] ** 2 + (t["loc"] - s["loc"]) ** 2) / (2 * s["scale"] ** 2)
        - 0.5
    ).sum(-1)
    per_example = GaussianKL(reduction=None)(t, s)
    np.testing.assert_allclose(per_example, numpy, rtol=1e-5)
    reference = tfd.kl_divergence(
        tfd.Independent(tfd.Normal(t["loc"], t["scale"]), 1),
        tfd.Independent(tfd.Normal(s["loc"], s["scale"]), 1),
    )
    np.testing.assert_allclose(GaussianKL()(t, s), np.mean(reference), rtol=1e-5)


def test_gaussian_kl_with_equal_fixed_scale_is_scaled_squared_error():
    t, s = gaussians()
    t["scale"] = s["scale"] = np.full_like(t["loc"], 0.5)
    expected = ((t["loc"] - s["loc"]) ** 2).sum(-1) / (2 * 0.25)
    np.testing.assert_allclose(GaussianKL(reduction=None)(t, s), expected, rtol=1e-5)


def test_gaussian_w2_matches_numpy_and_is_symmetric():
    t, s = gaussians()
    expected = ((t["loc"] - s["loc"]) ** 2 + (t["scale"] - s["scale"]) ** 2).sum(-1)
    np.testing.assert_allclose(GaussianW2(reduction=None)(t, s), expected, rtol=1e-5)
    np.testing.assert_allclose(GaussianW2()(t, s), GaussianW2()(s, t), rtol=1e-6)
    assert float(GaussianW2()(t, t)) == 0.0


def test_bernoulli_kl_matches_numpy_and_stays_finite_at_extreme_logits():
    lt, ls = RNG.normal(size=(6, 4)) * 3, RNG.normal(size=(6, 4)) * 3
    pt, ps = 1 / (1 + np.exp(-lt)), 1 / (1 + np.exp(-ls))
    expected = (pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))).sum(-1)
    np.testing.assert_allclose(
        BernoulliKL(reduction=None)({"logits": lt}, {"logits": ls}), expected, rtol=1e-4
    )
    extreme = BernoulliKL(reduction=None)({"logits": [[80.0, -80.0]]}, {"logits": [[-80.0, 80.0]]})
    assert np.all(np.isfinite(extreme)) and float(extreme[0]) == pytest.approx(160.0, rel=1e-3)


def test_sequence_params_give_a_per_step_mean():
    t, s = gaussians((2, 7, 3))
    per_step = GaussianKL(reduction=None)(t, s)
    assert per_step.shape == (2, 7)
    np.testing.assert_allclose(GaussianKL()(t, s), np.mean(per_step), rtol=1e-5)


def test_missing_keys_name_the_argument():
    with pytest.raises(ValueError, match="y_pred"):
        GaussianKL()({"loc": [[0.0]], "scale": [[1.0]]}, {"loc": [[0.0]]})
    with pytest.raises(ValueError, match="y_true"):
        BernoulliKL()({"probs": [[0.5]]}, {"logits": [[0.0]]})


def test_per_example_mean_averages_and_ignores_y_true():
    values = np.array([1.0, 2.0, 6.0], np.float32)
    assert float(PerExampleMean()(None, values)) == pytest.approx(3.0)


@pytest.mark.parametrize("cls", [GaussianKL, GaussianW2, BernoulliKL, PerExampleMean])
def test_losses_round_trip(cls):
    loss = cls(name="custom")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss), safe_mode=True
    )
    assert type(restored) is cls and restored.name == "custom"
