"""Synthetic pen strokes: shapes, determinism, pen bits, offsets and bad input."""

import numpy as np
import pytest

from kdtfp.datasets.strokes import pen_strokes, stroke_points


def test_pen_strokes_splits_shapes_and_dtypes():
    data = pen_strokes(100, length=30, seed=0)
    assert data.x_train.shape == (60, 30, 3) and data.x_train.dtype == np.float32
    assert data.x_val.shape == (20, 30, 3) and data.x_test.shape == (20, 30, 3)
    assert data.kind_train.shape == (60,) and data.kind_train.dtype == np.int32
    assert set(np.unique(np.concatenate([data.kind_train, data.kind_test]))) == {0, 1}
    assert np.all(np.isfinite(data.x_train))


@pytest.mark.parametrize("length", [2, 3, 9])
def test_short_strokes_end_with_a_lift(length):
    x = pen_strokes(30, length=length, seed=0).x_train
    assert x.shape == (18, length, 3) and np.all(x[:, -1, 0] == 1.0)


def test_pen_strokes_are_deterministic_given_the_seed():
    a, b, c = (pen_strokes(40, length=20, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.kind_test, b.kind_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_pen_bits_are_binary_and_end_every_drawing():
    x = pen_strokes(200, length=50, seed=1).x_train
    pen = x[..., 0]
    assert set(np.unique(pen)) == {0.0, 1.0}
    assert np.all(pen[:, -1] == 1.0)
    lifts = pen[:, :-1].sum(1)  # 0, 1 or 2 lifts before the end
    assert set(np.unique(lifts)) == {0.0, 1.0, 2.0}


def test_offsets_are_smooth_pen_down_and_jump_after_a_lift():
    x = pen_strokes(400, length=50, seed=2, noise=0.0).x_train
    down = x[:, 1:, 0] == 0
    offsets = np.linalg.norm(x[:, 1:, 1:], axis=-1)
    after_lift = x[:, :-1, 0] == 1
    # A jump skips 2-4 grid points: its offset is larger than a pen-down step on average.
    assert offsets[after_lift].mean() > 2.0 * offsets[down & ~after_lift].mean()
    rms = np.sqrt(np.mean(x[..., 1:][x[..., 0] == 0] ** 2))
    assert 2.0 < rms < 6.0
    # Noise adds to each offset with the stated standard deviation.
    noisy = pen_strokes(400, length=50, seed=2, noise=0.5).x_train
    np.testing.assert_allclose(np.std(noisy[..., 1:] - x[..., 1:]), 0.5, rtol=0.05)


def test_stroke_points_split_at_pen_lifts():
    x = np.zeros((6, 3), np.float32)
    x[:, 1] = 1.0
    x[2, 0] = 1.0  # lift after point 3: the next offset is a jump
    x[-1, 0] = 1.0
    strokes = stroke_points(x)
    assert [len(s) for s in strokes] == [4, 3]
    np.testing.assert_allclose(strokes[0][:, 0], [0, 1, 2, 3])
    np.testing.assert_allclose(strokes[1][:, 0], [4, 5, 6])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_sequences": 2}, "num_sequences"),
        ({"length": 1}, "length"),
        ({"length": 2.5}, "length"),
        ({"noise": -1.0}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"fractions": (0.5, 0.5)}, "fractions"),
        ({"fractions": (0.5, 0.5, 0.0)}, "fractions"),
    ],
)
def test_pen_strokes_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        pen_strokes(**{"num_sequences": 20, **kwargs})
