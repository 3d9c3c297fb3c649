"""`kdtfp.datasets.transfer`: transfer-set samplers."""

from __future__ import annotations

import numpy as np
import pytest

from kdtfp.datasets import gaussian_inputs, gaussian_noise, pixel_kde, subset


@pytest.fixture
def x():
    return np.random.default_rng(0).uniform(size=(50, 4, 3)).astype("float32")


# -------------------------------------------------------------------------------------- subset


def test_subset_draws_distinct_real_examples_with_their_labels(x):
    y = np.arange(len(x))
    chosen, labels = subset(x, 20, seed=1, y=y)
    assert chosen.shape == (20, 4, 3) and labels.shape == (20,)
    assert len(set(labels.tolist())) == 20  # without replacement
    np.testing.assert_array_equal(chosen, x[labels])


def test_subset_returns_everything_when_n_exceeds_the_data(x):
    chosen = subset(x, 500)
    assert chosen.shape == x.shape
    np.testing.assert_array_equal(
        np.sort(chosen.reshape(len(x), -1), axis=0), np.sort(x.reshape(len(x), -1), axis=0)
    )


def test_subset_is_deterministic_in_the_seed(x):
    np.testing.assert_array_equal(subset(x, 10, seed=3), subset(x, 10, seed=3))
    assert not np.array_equal(subset(x, 10, seed=3), subset(x, 10, seed=4))


# ------------------------------------------------------------------------------ gaussian_noise


def test_gaussian_noise_gives_copies_near_each_example(x):
    noisy = gaussian_noise(x, copies=200, sigma=0.3, seed=0)
    assert noisy.shape == (50 * 200, 4, 3)
    assert noisy.dtype == x.dtype
    noise = noisy - np.repeat(x, 200, axis=0)
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(0.3, rel=0.02)


def test_gaussian_noise_is_deterministic_and_clips(x):
    np.testing.assert_array_equal(gaussian_noise(x, 3, seed=5), gaussian_noise(x, 3, seed=5))
    assert not np.array_equal(gaussian_noise(x, 3, seed=5), gaussian_noise(x, 3, seed=6))
    clipped = gaussian_noise(x, copies=5, sigma=2.0, clip=(0.0, 1.0))
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


# ----------------------------------------------------------------------------------- pixel_kde


def test_pixel_kde_keeps_shape_and_is_deterministic(x):
    samples = pixel_kde(x, 30, seed=2)
    assert samples.shape == (30, 4, 3)
    assert samples.dtype == x.dtype
    np.testing.assert_array_equal(samples, pixel_kde(x, 30, seed=2))
    assert not np.array_equal(samples, pixel_kde(x, 30, seed=3))


def test_pixel_kde_keeps_marginal_means_and_variances(digits):
    data = digits.x_train
    bandwidth = 0.1
    samples = pixel_kde(data, 20000, bandwidth=bandwidth, seed=0)
    np.testing.assert_allclose(samples.mean(axis=0), data.mean(axis=0), atol=0.02)
    # A KDE's marginal variance is the data's plus the kernel's.
    np.testing.assert_allclose(samples.var(axis=0), data.var(axis=0) + bandwidth**2, atol=0.02)


def test_pixel_kde_destroys_correlations_between_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000)
    data = np.stack([a, a, -a + 0.1 * rng.standard_normal(2000)], axis=1).astype("float32")
    assert np.corrcoef(data.T)[0, 1] > 0.99
    samples = pixel_kde(data, 20000, bandwidth=0.05, seed=1)
    correlations = np.corrcoef(samples.T)
    assert np.max(np.abs(correlations - np.eye(3))) < 0.05


def test_pixel_kde_clips(x):
    samples = pixel_kde(x, 200, bandwidth=1.0, clip=(0.0, 1.0))
    assert samples.min() >= 0.0 and samples.max() <= 1.0


# ----------------------------------------------------------------------------- gaussian_inputs


def test_gaussian_inputs_have_the_requested_shape_and_moments():
    samples = gaussian_inputs(20000, (2, 3), mean=1.0, std=2.0, seed=0)
    assert samples.shape == (20000, 2, 3) and samples.dtype == np.float32
    assert samples.mean() == pytest.approx(1.0, abs=0.02)
    assert samples.std() == pytest.approx(2.0, rel=0.01)
    np.testing.assert_array_equal(
        gaussian_inputs(5, (2,), seed=1), gaussian_inputs(5, (2,), seed=1)
    )


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "sample",
    [
        lambda x: subset(x, 0),
        lambda x: pixel_kde(x, 0),
        lambda x: pixel_kde(x, -3),
    ],
    ids=["subset", "pixel_kde", "pixel_kde_negative"],
)
def test_samplers_reject_n_below_one(sample, x):
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        sample(x)


def test_gaussian_noise_rejects_zero_copies(x):
    with pytest.raises(ValueError, match="`copies` must be >= 1"):
        gaussian_noise(x, copies=0)


def test_gaussian_inputs_reject_n_below_one():
    with pytest.raises(ValueError, match="`n` must be >= 1"):
        gaussian_inputs(0, (3,))


@pytest.mark.parametrize(
    "sample",
    [lambda x: subset(x, 5), lambda x: gaussian_noise(x, 2), lambda x: pixel_kde(x, 5)],
    ids=["subset", "gaussian_noise", "pixel_kde"],
)
def test_samplers_reject_empty_x(sample):
    with pytest.raises(ValueError, match="`x` is empty"):
        sample(np.zeros((0, 4), "float32"))


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan")])
def test_gaussian_noise_rejects_non_positive_sigma(sigma, x):
    with pytest.raises(ValueError, match="`sigma` must be > 0"):
        gaussian_noise(x, sigma=sigma)


@pytest.mark.parametrize("bandwidth", [0.0, -0.1, float("nan")])
def test_pixel_kde_rejects_non_positive_bandwidth(bandwidth, x):
    with pytest.raises(ValueError, match="`bandwidth` must be > 0"):
        pixel_kde(x, 5, bandwidth=bandwidth)


@pytest.mark.parametrize(
    "sample",
    [lambda x: gaussian_noise(x, 4, sigma=0.3), lambda x: pixel_kde(x, 200)],
    ids=["gaussian_noise", "pixel_kde"],
)
def test_samplers_return_floats_for_integer_inputs(sample):
    x = np.random.default_rng(0).integers(0, 2, size=(50, 6))
    samples = sample(x)
    assert np.issubdtype(samples.dtype, np.floating)
    assert np.any(samples != np.round(samples))
