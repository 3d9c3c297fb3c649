"""`kdtfp.datasets.offline`: sklearn digits split and Old Faithful."""

from __future__ import annotations

import numpy as np
import pytest

from kdtfp.datasets import Split, load_digits_split, load_faithful


def test_digits_split_has_1200_197_400_images_of_64_pixels_in_unit_range(digits):
    assert isinstance(digits, Split)
    assert digits.x_train.shape == (1200, 64)
    assert digits.x_val.shape == (197, 64)
    assert digits.x_test.shape == (400, 64)
    assert (len(digits.y_train), len(digits.y_val), len(digits.y_test)) == (1200, 197, 400)
    for x in (digits.x_train, digits.x_val, digits.x_test):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.x_train.max() == 1.0  # divided by 16, the largest pixel value
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert y.dtype == np.int32
        assert set(np.unique(y)) <= set(range(10))
    assert digits.num_classes == 10
    assert digits.input_dim == 64


def test_digits_split_partitions_all_1797_images():
    from sklearn.datasets import load_digits

    digits = load_digits_split()
    combined = np.concatenate([digits.x_train, digits.x_val, digits.x_test])
    original = (load_digits().data / 16.0).astype("float32")
    # Same multiset of rows: sort rows lexicographically and compare.
    np.testing.assert_array_equal(np.unique(combined, axis=0), np.unique(original, axis=0))
    assert len(combined) == len(original) == 1797
    labels = np.concatenate([digits.y_train, digits.y_val, digits.y_test])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(load_digits().target))


def test_digits_split_is_deterministic_in_the_seed():
    first, second, other = (
        load_digits_split(seed=0),
        load_digits_split(seed=0),
        load_digits_split(seed=1),
    )
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    assert not np.array_equal(first.x_train, other.x_train)


def test_digits_split_custom_sizes_and_error_when_no_test_images_remain():
    small = load_digits_split(num_train=100, num_val=50)
    assert (len(small.x_train), len(small.x_val), len(small.x_test)) == (100, 50, 1647)
    with pytest.raises(ValueError, match="`num_train` \\+ `num_val`"):
        load_digits_split(num_train=1700, num_val=97)


def test_faithful_has_272_rows_standardized_to_mean_0_sd_1():
    data = load_faithful()
    assert data.shape == (272, 2)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.std(axis=0), 1.0, atol=1e-5)


def test_faithful_raw_columns_match_the_published_statistics():
    raw = load_faithful(standardize=False).astype(np.float64)
    assert raw.shape == (272, 2)
    np.testing.assert_allclose(raw.mean(axis=0), [3.48778, 70.89706], atol=1e-5)
    np.testing.assert_allclose(raw.std(axis=0), [1.13927, 13.56996], atol=1e-5)
    # Long eruptions follow long waits: the classic positive correlation (r = 0.90).
    assert np.corrcoef(raw.T)[0, 1] == pytest.approx(0.9008, abs=1e-3)
