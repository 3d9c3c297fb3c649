"""Distilling an RBM into a NADE on a stream of RBM samples (Papamakarios 2015, METHODS.md 5.5).

The teacher is intractable (its log Z is unknown in general) but easy to sample by block Gibbs;
the student is a NADE trained with `model.fit` on an endless `tf.data` stream of samples from
persistent Gibbs chains (`kdtfp.datasets.rbm_stream.sample_stream`), or on exact samples when the RBM
is small enough to enumerate.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kdtfp.datasets.rbm_stream import sample_stream
from kdtfp.distribute import safe_steps_per_execution
from kdtfp.losses.density import BernoulliNegativeLogLikelihood, LogDensitySquaredError
from kdtfp.models.nade import NADE
from kdtfp.models.rbm import RBM, exact_samples

LOSSES = ("likelihood", "square")
STREAMS = ("gibbs", "exact")


def rbm_stream(rbm, batch_size, loss="likelihood", stream="gibbs", log_z=None, seed=0, **gibbs):
    """The `(x, y_true)` training stream for `distill_rbm_into_nade`.

    * `loss="likelihood"`: elements `(x, x)`, for `BernoulliNegativeLogLikelihood`;
    * `loss="square"`: elements `(x, concat(x, log p(x)))` with `log p = -F(x) - log_z`, for
      `LogDensitySquaredError` (`log_z` is computed exactly if None; pass an estimate for RBMs
      too large to enumerate).

    `stream="gibbs"` uses persistent block-Gibbs chains (`gibbs` are the keyword arguments of
    `sample_stream`: num_chains, burn_in, sweeps_per_batch); `stream="exact"` draws exact
    samples by enumerating the hidden states (H <= 20), 100 batches at a time.
    """
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
    if stream not in STREAMS:
        raise ValueError(f"`stream` must be one of {STREAMS}, got {stream!r}.")
    if loss == "square" and log_z is None:
        log_z = rbm.log_partition()
    target_log_z = log_z if loss == "square" else None
    if stream == "gibbs":
        dataset = sample_stream(rbm, batch_size, seed=seed, log_z=target_log_z, **gibbs)
    else:
        kernel, visible_bias, hidden_bias = (
            tf.constant(p, tf.float32) for p in rbm.numpy_parameters()
        )
        block = 100 * batch_size

        def exact_block(index):
            # A fresh block of exact samples per call (numpy inside the pipeline).
            return tf.numpy_function(
                lambda i: exact_samples(rbm_params, block, seed=[seed, int(i)]),
                [index],
                tf.float32,
            )

        rbm_params = rbm.numpy_parameters()
        dataset = (
            tf.data.Dataset.counter()
            .map(exact_block)
            .map(lambda v: tf.ensure_shape(v, [block, rbm.num_visible]))
            .unbatch()
            .batch(batch_size, drop_remainder=True)
        )
        if target_log_z is not None:
            dataset = dataset.map(
                lambda v: (
                    v,
                    -(
                        -tf.linalg.matvec(v, visible_bias)
                        - tf.reduce_sum(tf.nn.softplus(v @ kernel + hidden_bias), -1)
                    )
                    - target_log_z,
                )
            )
    if loss == "likelihood":
        dataset = dataset.map(lambda v: (v, v))
    else:
        dataset = dataset.map(lambda v, log_p: (v, tf.concat([v, log_p[:, None]], axis=-1)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def distill_rbm_into_nade(
    rbm,
    nade,
    steps,
    batch_size=100,
    loss="likelihood",
    stream="gibbs",
    optimizer=None,
    log_z=None,
    seed=0,
    steps_per_execution=50,
    jit_compile=False,
    verbose=0,
    **gibbs,
):
    """Trains `nade` (compiled here) on RBM samples with `nade.fit`; returns the History.

    Args:
        rbm: the frozen teacher, a `kdtfp.models.rbm.RBM`.
        nade: the student, a `kdtfp.models.nade.NADE` with `num_inputs == rbm.num_visible`.
        steps: int >= 1 optimizer steps.
        batch_size: samples per step.
        loss: "likelihood" (maximum likelihood = KL(RBM || NADE) + const, the default) or
            "square" (0.5 (log q - log p)^2 with `log p = -F - log Z`; see `rbm_stream`).
        stream: "gibbs" (persistent chains) or "exact" (enumeration, H <= 20).
        optimizer: a Keras optimizer (default Adam(1e-3)).
        log_z: the RBM's log Z for the square loss (exact if None).
        seed: stream seed.
        steps_per_execution, jit_compile, verbose: as in `compile`/`fit`.
        **gibbs: `sample_stream` settings (num_chains, burn_in, sweeps_per_batch).
    """
    if not isinstance(rbm, RBM):
        raise ValueError(f"`rbm` must be a kdtfp RBM, got {type(rbm).__name__}.")
    if not isinstance(nade, NADE):
        raise ValueError(f"`nade` must be a kdtfp NADE, got {type(nade).__name__}.")
    if nade.num_inputs != rbm.num_visible:
        raise ValueError(
            f"`nade` has num_inputs={nade.num_inputs} but the RBM has {rbm.num_visible} visible units."
        )
    if int(steps) < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    dataset = rbm_stream(rbm, batch_size, loss=loss, stream=stream, log_z=log_z, seed=seed, **gibbs)
    objective = (
        BernoulliNegativeLogLikelihood() if loss == "likelihood" else LogDensitySquaredError()
    )
    strategy = nade.distribute_strategy
    with strategy.scope():
        nade.compile(
            optimizer=optimizer or keras.optimizers.Adam(1e-3),
            loss=objective,
            steps_per_execution=safe_steps_per_execution(
                min(int(steps_per_execution), int(steps)), strategy
            ),
            jit_compile=jit_compile,
        )
    return nade.fit(dataset, steps_per_epoch=int(steps), epochs=1, verbose=verbose, shuffle=False)
