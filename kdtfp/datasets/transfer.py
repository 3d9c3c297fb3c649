"""Transfer-set samplers: the inputs on which a student is taught to mimic its teacher.

Papamakarios (2015) calls their law the *transfer distribution*: real training inputs, samples
from a density model of the inputs, or noise.
"""

from __future__ import annotations

import numpy as np


def _check(x, n, argument="n"):
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("`x` is empty: a transfer set is drawn from at least one example.")
    if int(n) < 1:
        raise ValueError(
            f"`{argument}` must be >= 1, got {n}: an empty transfer set cannot teach anything."
        )
    return x


def _float_dtype(x):
    # Integer inputs (counts, binarised pixels) would round the noise away.
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype("float32")


def subset(x, n, seed=0, y=None):
    """`n` real examples drawn without replacement (all of them if `n >= len(x)`).

    Returns `x_subset` or `(x_subset, y_subset)` when labels `y` are given.
    """
    x = _check(x, n)
    index = np.random.default_rng(seed).permutation(len(x))[: int(n)]
    return x[index] if y is None else (x[index], np.asarray(y)[index])


def gaussian_noise(x, copies=10, sigma=0.4, seed=0, clip=None):
    """`copies` noisy copies of every example, `x + sigma * N(0, I)`, shape `[len(x) * copies, ...]`.

    The copies stay near the data, unlike pure noise inputs; `clip=(low, high)` keeps them in
    range. Label them with the teacher (they have no true labels).
    """
    x = _check(x, copies, "copies")
    if not sigma > 0:
        raise ValueError(f"`sigma` must be > 0, got {sigma}.")
    rng = np.random.default_rng(seed)
    dtype = _float_dtype(x)
    noisy = np.repeat(x, int(copies), axis=0) + sigma * rng.standard_normal(
        (len(x) * int(copies),) + x.shape[1:]
    )
    if clip is not None:
        noisy = np.clip(noisy, *clip)
    return noisy.astype(dtype)


def pixel_kde(x, n, bandwidth=0.1, seed=0, clip=None):
    """`n` samples of a per-pixel (per-feature) Gaussian kernel density estimate of `x`.

    Each feature of each sample is drawn independently: a random training value of that
    feature plus `bandwidth * N(0, 1)`. This keeps every marginal of the data but none of the
    correlations between features, a cheap density model of the inputs.
    """
    x = _check(x, n)
    if not bandwidth > 0:
        raise ValueError(f"`bandwidth` must be > 0, got {bandwidth}.")
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1)
    rows = rng.integers(0, len(x), size=(int(n), flat.shape[1]))
    samples = flat[rows, np.arange(flat.shape[1])] + bandwidth * rng.standard_normal(
        (int(n), flat.shape[1])
    )
    if clip is not None:
        samples = np.clip(samples, *clip)
    return samples.reshape((int(n),) + x.shape[1:]).astype(_float_dtype(x))


def gaussian_inputs(n, shape, mean=0.0, std=1.0, seed=0):
    """`n` pure-noise inputs `N(mean, std^2 I)` of the given per-example `shape`."""
    if int(n) < 1:
        raise ValueError(f"`n` must be >= 1, got {n}.")
    rng = np.random.default_rng(seed)
    return (mean + std * rng.standard_normal((int(n),) + tuple(shape))).astype("float32")
