"""Switching-AR sequences: shapes, the generating process, the outcome design and bad input."""

import numpy as np
import pytest

from kdtfp.datasets.sequences import longest_run, switching_ar


def test_switching_ar_splits_shapes_and_dtypes():
    data = switching_ar(100, length=20, dim=3, seed=0)
    assert data.x_train.shape == (60, 20, 3) and data.x_train.dtype == np.float32
    assert data.x_val.shape == (15, 20, 3) and data.x_test.shape == (25, 20, 3)
    assert data.regimes_train.shape == (60, 20) and data.regimes_train.dtype == np.int32
    assert set(np.unique(data.y_train)) <= {0, 1} and data.y_test.shape == (25,)
    assert np.all((data.probs_test > 0) & (data.probs_test < 1))
    assert (data.good_regime, data.bad_regime) == (2, 3)
    assert np.all(np.isfinite(data.x_train))


def test_switching_ar_is_reproducible_and_seed_dependent():
    a, b, c = (switching_ar(50, length=10, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_regimes_follow_the_ar_model_with_the_stated_noise():
    data = switching_ar(400, length=30, seed=0)
    x, z = data.x_train.astype(np.float64), data.regimes_train
    coefficients, bias, scale = (data.params[k] for k in ("coefficients", "bias", "scale"))
    residual = x[:, 1:] - np.einsum("ntij,ntj->nti", coefficients[z[:, 1:]], x[:, :-1])
    standardised = (residual - bias[z[:, 1:]]) / scale[z[:, 1:]]
    assert abs(standardised.mean()) < 0.02 and abs(standardised.std() - 1.0) < 0.02
    # Sticky switching: episodes last about 1 / (1 - 0.9) steps, each regime is visited.
    assert 0.05 < np.mean(z[:, 1:] != z[:, :-1]) < 0.12
    assert set(np.unique(z)) == {0, 1, 2, 3}


def test_outcome_depends_on_the_bad_share_of_quiet_time_not_on_quiet_time():
    data = switching_ar(2000, length=48, seed=0)
    z, y = data.regimes_train, data.y_train
    bad = (z == data.bad_regime).mean(1)
    good = (z == data.good_regime).mean(1)
    assert np.corrcoef(bad - good, y)[0, 1] > 0.4
    # Only through the (rarer) long bad episodes does quiet time itself matter.
    assert abs(np.corrcoef(bad + good, y)[0, 1]) < 0.2


def test_longest_run():
    regimes = np.array([[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(longest_run(regimes, 1), [3, 0])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_sequences": 5}, "num_sequences"),
        ({"length": 1}, "length"),
        ({"dim": 4}, "dim"),
        ({"num_regimes": 2}, "num_regimes"),
        ({"stay_probability": 1.0}, "stay_probability"),
        ({"fractions": (1, 0, 1)}, "fractions"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        switching_ar(**{"num_sequences": 50, **kwargs})
