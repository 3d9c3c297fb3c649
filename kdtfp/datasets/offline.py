"""Offline data sets: everything ships with scikit-learn or with kdtfp; nothing is downloaded."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class Split:
    """Train / validation / test arrays of one classification data set."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))


def load_digits_split(num_train=1200, num_val=197, seed=0) -> Split:
    """sklearn's 8x8 digits (1,797 images) with pixels scaled to [0, 1] (divided by 16).

    A fixed random permutation (`seed`) gives `num_train` training, `num_val` validation and the
    remaining test images (400 with the defaults). Labels are int32 in 0..9.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    if num_train + num_val >= len(x):
        raise ValueError(
            f"`num_train` + `num_val` must leave test images; got {num_train} + {num_val} >= {len(x)}."
        )
    order = np.random.default_rng(seed).permutation(len(x))
    train, val, test = np.split(order, [num_train, num_train + num_val])
    return Split(x[train], y[train], x[val], y[val], x[test], y[test])


def load_faithful(standardize=True) -> np.ndarray:
    """Old Faithful (272 x [eruptions, waiting], minutes), shipped with kdtfp.

    With `standardize=True` each column is standardised with its population statistics, as in
    Chen et al.'s code (eruptions mean 3.48778, sd 1.13927; waiting mean 70.89706, sd 13.56996).
    """
    with resources.files("kdtfp.datasets").joinpath("faithful.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    data = np.array([[float(r["eruptions"]), float(r["waiting"])] for r in rows], dtype="float64")
    if standardize:
        data = (data - data.mean(axis=0)) / data.std(axis=0)
    return data.astype("float32")
