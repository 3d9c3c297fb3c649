"""Transfer streams for the MCMC teachers: `(x, soft_targets)` datasets for `model.fit`.

`batch_transfer_dataset` serves the Monte Carlo predictive of a stored bag of samples,
`online_transfer_dataset` that of the running chains' current states (see `kdtfp.teachers.mcmc`);
`gaussian_inputs` is the thesis's transfer distribution `x ~ N(mean, covariance)`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kdtfp.teachers.mcmc import (
    OnlineChain,
    _check_int,
    _check_positive,
    _seed_pair,
    _soft_targets,
)


def gaussian_inputs(mean, covariance):
    """An input sampler `(seed [2], n) -> [n, D]` drawing `x ~ N(mean, covariance)`.

    Args:
        mean: `[D]`. covariance: a scalar variance (times I) or a `[D, D]` positive-definite
            matrix. The thesis's transfer distribution is `gaussian_inputs(np.zeros(2), 10.0)`.
    """
    mean = np.asarray(mean, "float32")
    if mean.ndim != 1 or not np.all(np.isfinite(mean)):
        raise ValueError(f"`mean` must be a finite [D] vector. Received shape {mean.shape}.")
    covariance = np.asarray(covariance, "float64")
    if covariance.ndim == 0:
        covariance = _check_positive("covariance", float(covariance)) * np.eye(len(mean))
    if covariance.shape != (len(mean), len(mean)):
        raise ValueError(
            f"`covariance` must be a scalar or [D, D] = {(len(mean),) * 2}. Received {covariance.shape}."
        )
    try:
        scale = np.linalg.cholesky(covariance).astype("float32")
    except np.linalg.LinAlgError:
        raise ValueError("`covariance` must be positive definite.") from None

    def sample(seed, n):
        noise = tf.random.stateless_normal([n, len(mean)], seed=seed)
        return mean + tf.matmul(noise, scale, transpose_b=True)

    return sample


def _check_stream(input_sampler, batch_size):
    if not callable(input_sampler):
        raise ValueError(
            f"`input_sampler` must be callable (seed, n) -> [n, D]. Received {input_sampler!r}."
        )
    return _check_int("batch_size", batch_size, 1)


def batch_transfer_dataset(samples, input_sampler, batch_size: int, seed: int = 0):
    """An endless `(x [b, D], targets [b, 2])` dataset: fresh inputs, MC-predictive targets.

    `x` comes from `input_sampler` with a stateless seed per batch; `targets = [1 - g(x), g(x)]`
    with `g` the MC predictive of the stored bag `samples` `[S, D]`. Feed it to `model.fit` with
    `keras.losses.CategoricalCrossentropy(from_logits=True)` and `steps_per_epoch`.
    """
    batch_size = _check_stream(input_sampler, batch_size)
    bag = tf.constant(np.asarray(samples, "float32"))
    if bag.shape.rank != 2:
        raise ValueError(f"`samples` must be [S, D]. Received shape {bag.shape}.")
    base = _seed_pair(seed)

    def make(index):
        x = input_sampler(tf.stack([base[0], tf.cast(index, tf.int32)]), batch_size)
        return x, _soft_targets(bag, x)

    return tf.data.Dataset.counter().map(make)


def online_transfer_dataset(chain: OnlineChain, input_sampler, batch_size: int, seed: int = 0):
    """An endless `(x [b, D], targets [b, 2])` dataset whose targets come from the running chains.

    Every batch advances `chain` by one element (`thin` transitions of all `C` chains) and uses
    `q_t(x) = (1/C) sum_c sigmoid(w_{t,c} . x)` at the new state as the target, `[1 - q_t, q_t]`.
    Nothing but the chains' current state is stored (`chain.stored_floats`).
    """
    batch_size = _check_stream(input_sampler, batch_size)
    if not isinstance(chain, OnlineChain):
        raise ValueError(f"`chain` must be an OnlineChain. Received {type(chain).__name__}.")
    base = _seed_pair(seed)
    indices = tf.data.Dataset.counter()

    def make(index, state):
        x = input_sampler(tf.stack([base[0], tf.cast(index, tf.int32)]), batch_size)
        return x, _soft_targets(state, x)

    return tf.data.Dataset.zip(indices, chain.states()).map(make)
