"""An endless `tf.data` stream of RBM samples from persistent block-Gibbs chains.

The transfer set of RBM -> NADE distillation (METHODS.md 5.5): the chains are the state of
`Dataset.scan`, so sampling runs inside the input pipeline.
"""

from __future__ import annotations

import tensorflow as tf

from kdtfp.models.rbm import _check_int, _gibbs_chain, free_energy, gibbs_chain


def sample_stream(
    rbm, batch_size, num_chains=1000, burn_in=200, sweeps_per_batch=1, seed=0, log_z=None
):
    """An endless `tf.data.Dataset` of RBM samples from persistent block-Gibbs chains.

    `num_chains` chains start from Bernoulli(sigmoid(visible_bias)) noise and run `burn_in`
    sweeps once; then each element takes the next `batch_size` chains round-robin, advances
    them `sweeps_per_batch` sweeps and emits them ([batch_size, D] float32). The chains are the
    state of `Dataset.scan`, so sampling runs inside the input pipeline (overlapping training
    with `prefetch`) and the RBM's weights are frozen at the time of the call.

    With `log_z` (e.g. `rbm.log_partition()`), elements are `(v, log_p)` with the RBM's
    normalised `log_p = -F(v) - log_z` [batch_size] (for `LogDensitySquaredError`).

    Cost: `2 * sweeps_per_batch` E per emitted sample, plus `2 * burn_in * num_chains` E once.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    num_chains = _check_int("num_chains", num_chains, batch_size)
    burn_in = _check_int("burn_in", burn_in, 0)
    sweeps_per_batch = _check_int("sweeps_per_batch", sweeps_per_batch, 1)
    kernel, visible_bias, hidden_bias = (tf.constant(p, tf.float32) for p in rbm.numpy_parameters())
    base = tf.random.stateless_uniform([num_chains, rbm.num_visible], [int(seed), 1])
    chains = tf.cast(base < tf.sigmoid(visible_bias), tf.float32)
    chains = gibbs_chain(chains, kernel, visible_bias, hidden_bias, burn_in, [int(seed), 2])

    def step(state, counter):
        current, rest = state[:batch_size], state[batch_size:]
        swept = _gibbs_chain(
            current,
            kernel,
            visible_bias,
            hidden_bias,
            tf.constant(sweeps_per_batch),
            tf.stack([tf.cast(counter, tf.int32), int(seed) + 3]),
        )
        return tf.concat([rest, swept], axis=0), swept

    dataset = tf.data.Dataset.counter().scan(chains, step)
    if log_z is not None:
        log_z = float(log_z)
        dataset = dataset.map(
            lambda v: (v, -free_energy(v, kernel, visible_bias, hidden_bias) - log_z)
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
