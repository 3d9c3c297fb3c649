"""Synthetic pen strokes for the `vrnn` recipe (METHODS.md 3.8): noisy Lissajous curves and
spirals written as `(pen-up bit, dx, dy)` steps, the IAM-OnDB layout of Chen et al.'s VRNN.

Every sequence has the same length `T` (no padding and no mask): `x[n, t] = (pen_t, dx_t, dy_t)`
where `(dx_t, dy_t)` is the pen's offset from point `t - 1` to point `t` and `pen_t = 1` means
that the pen is lifted after point `t` (the next offset is a jump across a gap of the curve). The
last step always has `pen = 1` (end of the drawing).

```
kind 0, Lissajous:  p(s) = (A sin(a s + phi), B sin(b s)),   a, b in {1, 2, 3},  A, B ~ U(15, 25)
kind 1, spiral:     p(s) = r(s) (cos(d w s + th), sin(d w s + th)),  r(s) = r0 + (r1 - r0) s / 2pi,
                    r0 ~ U(1, 4), r1 ~ U(18, 26), w ~ U(1.5, 3) turns, d = +-1
s on a grid of T + 1 + gaps points over [0, 2 pi) (Lissajous, random start) or [0, 2 pi]
lifts: 0, 1 or 2 pen lifts at random steps (4 <= t < T - 4 when T >= 10); each skips `gap` ~ {2, 3, 4} grid points
dx_t, dy_t = p(s_t) - p(s_{t-1}) + noise * N(0, 1)        (pen-down offsets have rms ~ 4)
```
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

KINDS = ("lissajous", "spiral")


@dataclass(frozen=True)
class StrokeData:
    """Pen strokes `x_* [N, T, 3]` float32 with columns `(pen, dx, dy)`, `pen` in {0, 1}, and
    each sequence's curve kind `kind_* [N]` int32 (0 Lissajous, 1 spiral), split into
    train / val / test."""

    x_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray
    kind_train: np.ndarray
    kind_val: np.ndarray
    kind_test: np.ndarray


def _check(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _curve(rng, kind, s):
    """Points `[len(s), 2]` of one curve of `kind` on the parameter grid `s` in [0, 2 pi]."""
    if kind == 0:
        a, b = rng.choice([1, 2, 3], size=2, replace=False)
        amp_x, amp_y = rng.uniform(15.0, 25.0, size=2)
        phase = rng.uniform(0.0, 2 * np.pi)
        start = rng.uniform(0.0, 2 * np.pi)
        u = s + start
        return np.stack([amp_x * np.sin(a * u + phase), amp_y * np.sin(b * u)], -1)
    r0, r1 = rng.uniform(1.0, 4.0), rng.uniform(18.0, 26.0)
    turns, direction = rng.uniform(1.5, 3.0), rng.choice([-1.0, 1.0])
    theta0 = rng.uniform(0.0, 2 * np.pi)
    radius = r0 + (r1 - r0) * s / (2 * np.pi)
    angle = direction * turns * s + theta0
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)


def pen_strokes(
    num_sequences: int = 1000,
    length: int = 50,
    seed: int = 0,
    noise: float = 0.5,
    fractions=(0.6, 0.2, 0.2),
) -> StrokeData:
    """Samples `num_sequences` pen-stroke sequences of `length` steps (see the module docstring).

    Deterministic given `seed`; half the sequences (at random) are Lissajous curves, half spirals.

    Args:
        num_sequences: N >= 3.
        length: T >= 2 steps per sequence (every sequence has exactly T steps).
        seed: NumPy seed.
        noise: standard deviation (>= 0) of the Gaussian noise added to each offset.
        fractions: train / val / test shares (three positive numbers).

    Returns:
        `StrokeData`.

    Example:

    >>> data = pen_strokes(500, length=50, seed=0)
    >>> data.x_train.shape  # (300, 50, 3): (pen, dx, dy) per step
    """
    n = _check("num_sequences", num_sequences, 3)
    t_len = _check("length", length, 2)
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"`noise` must be a finite float >= 0. Received: noise={noise!r}")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(~(fractions > 0)):
        raise ValueError(f"`fractions` must be three positive numbers, got {fractions!r}.")
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, 2, size=n)
    x = np.zeros((n, t_len, 3))
    for i in range(n):
        candidates = np.arange(4, t_len - 4) if t_len >= 10 else np.arange(1, t_len - 1)
        count = rng.integers(0, min(2, len(candidates)) + 1)
        lifts = np.sort(rng.choice(candidates, count, replace=False))
        gaps = rng.integers(2, 5, size=len(lifts))
        # Step t (1-based over T offsets) advances one grid point, plus the gap after a lift.
        advance = np.ones(t_len, int)
        advance[lifts + 1] += gaps
        index = np.concatenate([[0], np.cumsum(advance)])
        grid = np.linspace(0.0, 2 * np.pi, index[-1] + 1)
        points = _curve(rng, kinds[i], grid)[index]
        x[i, :, 1:] = np.diff(points, axis=0) + noise * rng.standard_normal((t_len, 2))
        x[i, lifts, 0] = 1.0
        x[i, -1, 0] = 1.0
    bounds = (np.cumsum(fractions / fractions.sum())[:2] * n).astype(int)
    parts = np.split(np.arange(n), bounds)
    x, kinds = x.astype("float32"), kinds.astype("int32")
    return StrokeData(*(x[p] for p in parts), *(kinds[p] for p in parts))


def stroke_points(x: np.ndarray) -> list:
    """Splits sequences `x [T, 3]` into strokes for plotting: a list of `[L, 2]` point arrays
    (cumulative sums of the offsets, starting at the origin, a new stroke after each pen lift)."""
    x = np.asarray(x, dtype=float)
    points = np.concatenate([[[0.0, 0.0]], np.cumsum(x[:, 1:], axis=0)])
    strokes, start = [], 0
    for t in range(len(x)):
        if x[t, 0] > 0.5 or t == len(x) - 1:
            strokes.append(points[start : t + 2])
            start = t + 2
    return [s for s in strokes if len(s) > 1]
