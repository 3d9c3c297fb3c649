"""Several independent SGLD chains of one student, run side by side in one Keras model."""

from __future__ import annotations

import keras
import numpy as np

from kdtfp.distill.checks import single_symbolic_input


def parallel_chains(student: keras.Model, num_chains: int, name: str | None = None) -> keras.Model:
    """`num_chains` copies of `student` in one functional model whose output stacks theirs.

    Each copy (`keras.models.clone_model`) starts from the student's current weights, e.g. the
    KD solution, and owns its weights, so one `fit` with `kdtfp.optimizers.SGLD` advances
    `num_chains` independent chains at the cost of one larger step (on CPUs the step time of a
    small student is mostly fixed overhead, which the chains now share). Shapes:

    ```
    inputs [B, ...] -> outputs [B, C, K]        # C = num_chains, chain c = copy c
    ```

    Training it as C separate chains. Give every chain the same targets: repeat
    `y_true` along a chain axis, `[B, C, ...]` (`repeat_targets`). A Keras loss with the
    default `"sum_over_batch_size"` reduction then averages over `B * C` entries, so the
    gradient reaching copy `c` is its own mean batch gradient divided by C: use
    `SGLD(data_size=N * C)` so that `N * C * g / C = N * g`: each copy's drift is exactly the
    single-chain drift (tested), and its noise, drawn per weight, is independent of the other
    copies' (though not the numbers C separate runs would draw).

    Samples. A `kdtfp.callbacks.PosteriorSampler` on this model records all copies' weights per
    snapshot, copy after copy (`model.trainable_weights` lists copy 0's weights, then copy 1's,
    ...); `split_chain_samples(sampler, num_chains)` turns that into one sampler per chain in
    the student's weight order (for `PosteriorSampler.combine`, R-hat and prediction).

    Args:
        student: a built functional or sequential `keras.Model` with one input.
        num_chains: int >= 1.
        name: the model's name (default `"{student.name}_chains"`).

    Example:

    >>> chains = kdtfp.models.parallel_chains(kd_student, 4)
    >>> chains.compile(optimizer=kdtfp.optimizers.SGLD(1e-4, data_size=4 * len(x)), loss=loss)
    >>> chains.fit(x, kdtfp.models.repeat_targets(y_packed, 4), callbacks=[sampler])
    >>> posterior = kdtfp.callbacks.PosteriorSampler.combine(split_chain_samples(sampler, 4))
    """
    if isinstance(num_chains, bool) or int(num_chains) != num_chains or num_chains < 1:
        raise ValueError(f"`num_chains` must be an int >= 1. Received: num_chains={num_chains!r}")
    symbolic = single_symbolic_input(student)
    if symbolic is None:
        raise ValueError(
            "`student` must be a functional or sequential keras.Model with one input (a "
            "subclassed model has no symbolic input to clone from)."
        )
    inputs = keras.Input(shape=tuple(symbolic.shape[1:]), dtype=symbolic.dtype, name="inputs")
    weights = student.get_weights()
    outputs = []
    for chain in range(int(num_chains)):
        copy = keras.models.clone_model(student)
        copy.name = f"{student.name}_chain_{chain}"
        copy.set_weights(weights)
        out = copy(inputs)
        outputs.append(keras.layers.Reshape((1, *out.shape[1:]), name=f"chain_{chain}")(out))
    stacked = outputs[0] if num_chains == 1 else keras.layers.Concatenate(axis=1)(outputs)
    return keras.Model(inputs, stacked, name=name or f"{student.name}_chains")


def repeat_targets(targets, num_chains: int):
    """`targets` `[B, ...]` repeated along a new chain axis 1: `[B, num_chains, ...]`.

    NumPy arrays give NumPy arrays; tensors give tensors (usable in `tf.data` `map`).
    """
    if isinstance(targets, np.ndarray):
        return np.repeat(targets[:, None], num_chains, axis=1)
    return keras.ops.repeat(keras.ops.expand_dims(targets, 1), num_chains, axis=1)


def split_chain_samples(sampler, num_chains: int):
    """One `PosteriorSampler` per chain from a sampler that recorded a `parallel_chains` model.

    Sample `i` of chain `c` is the slice of weights `[c * V, (c + 1) * V)` of the recorded
    sample `i`, with `V = len(recorded sample) / num_chains` (the student's trainable weights,
    in the student's order).
    """
    from kdtfp.callbacks import PosteriorSampler

    samples = sampler.samples
    if not samples:
        raise ValueError("`sampler` holds no samples.")
    per_chain, remainder = divmod(len(samples[0]), num_chains)
    if remainder:
        raise ValueError(
            f"A recorded sample has {len(samples[0])} arrays, not a multiple of "
            f"num_chains={num_chains}."
        )
    chains = []
    for chain in range(num_chains):
        single = PosteriorSampler(sampler.burn_in, sampler.thin, len(samples), verbose=0)
        single._buffer = [s[chain * per_chain : (chain + 1) * per_chain] for s in samples]
        if sampler.weight_names:  # the first copy's names serve every chain (for to_arviz)
            single.weight_names = list(sampler.weight_names[:per_chain])
        chains.append(single)
    return chains
