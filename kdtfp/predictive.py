"""Posterior predictive summaries of a classifier from weight samples (METHODS.md section 4.5)."""

from __future__ import annotations

import numpy as np

from kdtfp.metrics.classification import log_softmax
from kdtfp.metrics.uncertainty import credible_set


def _xlogx(q):
    """`q * log(q)` with `0 * log(0) = 0` (xlogy-style, no NaN at q = 0)."""
    safe = np.where(q > 0, q, 1.0)
    return np.where(q > 0, q * np.log(safe), 0.0)


def predict_distribution(
    model,
    samples,
    x,
    level: float = 0.95,
    batch_size: int | None = 256,
    from_logits: bool = True,
) -> dict:
    """Posterior predictive summaries of a classifier over weight samples.

    For each sample `j` the sample's weights are assigned to `model.trainable_weights` (same
    order and shapes as `PosteriorSampler` records them) and `q^(j) = softmax(model(x))`
    (or the output itself with `from_logits=False`) is computed by calling the model in batches. The
    model's original weights are restored afterwards, also on error.

    With `r` samples, `q` of shape [r, N, K] and `alpha = 1 - level`:

    * `mean_probs` [N, K]: `mean_j q^(j)`, the posterior-mean probabilities.
    * `lower`, `upper` [N, K]: per-class equal-tailed intervals, the `alpha/2` and
      `1 - alpha/2` sample quantiles of `q_k^(j)` over `j` (`np.quantile`, linear interpolation).
    * `credible_set` [N, K] bool: smallest set of classes whose `mean_probs` sum to >= `level`
      (`kdtfp.metrics.credible_set`: the top-mass rule of METHODS.md 4.7; Fang et al.'s code
      thresholds by bisection instead, which can add the borderline class).
    * `deviance` [N]: mean deviance `(1/r) sum_j sum_k -2 q_k^(j) log q_k^(j)` (twice the mean
      entropy, in nats; `0 log 0 = 0`).

    Memory: holds all `r * N * K` probabilities (float64) on the host.

    Args:
        model: a `keras.Model` whose trainable weights match each sample.
        samples: sequence of samples; each a list of arrays, one per trainable weight.
        x: an array of inputs `[N, ...]`.
        level: credible level in (0, 1).
        batch_size: examples per model call.
        from_logits: the model outputs logits (softmax applied) rather than probabilities.

    Returns:
        dict of NumPy arrays `mean_probs`, `lower`, `upper`, `credible_set`, `deviance`.
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1). Received: level={level!r}")
    q = weight_sample_probs(model, samples, x, batch_size=batch_size, from_logits=from_logits)
    return summarize_probability_samples(q, level)


def weight_sample_probs(
    model, samples, x, batch_size: int | None = 256, from_logits: bool = True
) -> np.ndarray:
    """Class probabilities `[r, N, K]` (float64) of `model` under each of `r` weight samples.

    Each sample is assigned to `model.trainable_weights` in turn and `model(x)` is run in batches
    (softmax applied when `from_logits`); the original weights are restored afterwards, also on
    error. `kdtfp.models.PosteriorEnsemble` computes the same inside one TensorFlow graph.
    """
    variables = list(model.trainable_weights)
    samples = check_weight_samples(samples, variables)
    original = [np.array(var.numpy(), copy=True) for var in variables]
    probs = []
    try:
        for sample in samples:
            for var, value in zip(variables, sample, strict=True):
                var.assign(np.asarray(value, dtype=var.dtype))
            out = _forward(model, x, batch_size, training=False)
            probs.append(np.exp(log_softmax(out)) if from_logits else out)
    finally:
        for var, value in zip(variables, original, strict=True):
            var.assign(value)
    return np.stack(probs)


def check_weight_samples(samples, variables) -> list:
    """`samples` as a list, checked against `variables`: one array per variable, same shapes.

    Raises ValueError naming the first sample and weight that do not fit.
    """
    try:
        samples = list(samples)
    except TypeError:
        raise ValueError(
            f"`samples` must be a sequence of weight lists, got {type(samples).__name__}."
        ) from None
    if not samples:
        raise ValueError("`samples` must hold at least one weight sample; received none.")
    for j, sample in enumerate(samples):
        if len(sample) != len(variables):
            raise ValueError(
                f"`samples[{j}]` has {len(sample)} arrays but the model has {len(variables)} "
                "trainable weights."
            )
        for v, (var, value) in enumerate(zip(variables, sample, strict=True)):
            if tuple(np.shape(value)) != tuple(var.shape):
                raise ValueError(
                    f"`samples[{j}][{v}]` has shape {np.shape(value)}, but trainable weight "
                    f"{var.path!r} has shape {tuple(var.shape)}."
                )
    return samples


def stochastic_probability_samples(
    model, x, num_samples: int, batch_size: int | None = 256, from_logits: bool = True
):
    """Class probabilities of `num_samples` stochastic forward passes, `[num_samples, N, K]`.

    Each pass calls `model(x_batch, training=True)`, so dropout stays on (MC dropout, Gal &
    Ghahramani 2016) and variational layers such as `kdtfp.layers.MeanFieldDense` draw fresh
    weights. Use it with `summarize_probability_samples` to get the same summaries as
    `predict_distribution` for these baselines. Layers whose training mode changes more than
    the noise (batch normalisation) would also run in training mode: do not use it for them.
    """
    if int(num_samples) < 1:
        raise ValueError(f"`num_samples` must be >= 1. Received: num_samples={num_samples!r}")
    passes = []
    for _ in range(int(num_samples)):
        out = _forward(model, x, batch_size, training=True)
        passes.append(np.exp(log_softmax(out)) if from_logits else out)
    return np.stack(passes)


def _forward(model, x, batch_size, training):
    """`model(x)` in batches as float64 NumPy. Direct calls, not `model.predict`: predict costs
    a fixed ~0.1 s per call, which dominates when it runs once per posterior sample."""
    x = np.asarray(x)
    batch_size = batch_size or len(x)
    batches = [
        np.asarray(model(x[i : i + batch_size], training=training), np.float64)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(batches)


def summarize_probability_samples(q, level: float = 0.95) -> dict:
    """Posterior predictive summaries from probability samples `q`, `[r, N, K]`.

    The summaries of `predict_distribution` (see there): `mean_probs`, `lower`, `upper`,
    `credible_set` and `deviance`, whatever produced the samples (SGLD weight samples, MC
    dropout or variational forward passes).
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1). Received: level={level!r}")
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 3 or q.shape[0] < 1:
        raise ValueError(f"`q` must have shape [samples, N, K] with samples >= 1, got {q.shape}.")
    alpha = 1.0 - float(level)
    mean_probs = q.mean(axis=0)
    return {
        "mean_probs": mean_probs,
        "lower": np.quantile(q, alpha / 2, axis=0),
        "upper": np.quantile(q, 1 - alpha / 2, axis=0),
        "credible_set": credible_set(mean_probs, level),
        "deviance": (-2.0 * _xlogx(q).sum(axis=-1)).mean(axis=0),
    }
