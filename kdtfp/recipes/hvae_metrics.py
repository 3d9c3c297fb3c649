"""Sample-quality metrics and plots of the `hvae-datafree` recipe (METHODS 3.7).

* `mmd_rbf(x, y)`: the unbiased estimate of MMD^2 with a Gaussian (RBF) kernel whose bandwidth
  is the median pairwise distance of the pooled samples (the median heuristic);
* `one_nn_accuracy(x, y)`: the leave-one-out 1-nearest-neighbour two-sample accuracy (0.5 when
  the two samples are indistinguishable, 1.0 when they are perfectly separated);
* `plot_sample_grids(...)`: one grid of 8x8 images per model.
"""

from __future__ import annotations

import numpy as np


def _squared_distances(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _check_pair(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must be [N, D] and [M, D]; got {x.shape} and {y.shape}.")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"`x` and `y` need >= 2 rows each; got {len(x)} and {len(y)}.")
    return x, y


def median_bandwidth(x, y):
    """The median of the pairwise Euclidean distances between distinct rows of `[x; y]`."""
    pooled = np.concatenate([x, y])
    d = _squared_distances(pooled, pooled)[np.triu_indices(len(pooled), 1)]
    median = float(np.sqrt(np.median(d)))
    return median if median > 0 else 1.0


def mmd_rbf(x, y, bandwidth=None):
    """Unbiased MMD^2 between samples `x` [N, D] and `y` [M, D] with
    `k(a, b) = exp(-|a - b|^2 / (2 h^2))`, `h` = `bandwidth` or the median heuristic.

    Example:

    >>> mmd_rbf(model_samples, test_digits)     # ~0 when the distributions agree
    """
    x, y = _check_pair(x, y)
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"`bandwidth` must be > 0, got {bandwidth!r}.")
    gamma = 1.0 / (2.0 * h * h)
    kxx = np.exp(-gamma * _squared_distances(x, x))
    kyy = np.exp(-gamma * _squared_distances(y, y))
    kxy = np.exp(-gamma * _squared_distances(x, y))
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2.0 * kxy.mean()
    )


def one_nn_accuracy(x, y, seed=0):
    """Leave-one-out 1-NN two-sample accuracy of `[x; y]` labelled by origin (0.5 is ideal).

    Each row is classified by its nearest other row (Euclidean); ties between equidistant
    neighbours, frequent with binary images, are broken at random (`seed`).
    """
    x, y = _check_pair(x, y)
    pooled = np.concatenate([x, y])
    labels = np.concatenate([np.zeros(len(x)), np.ones(len(y))])
    d = _squared_distances(pooled, pooled)
    d += np.random.default_rng(seed).uniform(0.0, 1e-6, d.shape)
    np.fill_diagonal(d, np.inf)
    return float(np.mean(labels[np.argmin(d, axis=1)] == labels))


def plot_sample_grids(samples, path, rows=6, cols=6, title=None):
    """Saves one grid of `rows x cols` 8x8 images per entry of `samples` (title -> `[n, 64]`
    in [0, 1]), with an optional figure `title`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(samples), figsize=(2.6 * len(samples), 3.0))
    axes = np.atleast_1d(axes)
    for axis, (title, images) in zip(axes, samples.items(), strict=True):
        images = np.asarray(images)[: rows * cols].reshape(-1, 8, 8)
        grid = np.full((rows * 9 + 1, cols * 9 + 1), 0.35)
        for index, image in enumerate(images):
            r, c = divmod(index, cols)
            grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = image
        axis.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
