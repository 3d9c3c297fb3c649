"""Multilayer perceptrons: the default teachers and students of the classification recipes."""

from __future__ import annotations

import keras


def mlp(input_dim, hidden=(100, 100), num_outputs=10, activation="relu", name="mlp", seed=None):
    """A functional MLP `input_dim -> hidden... -> num_outputs` that outputs logits.

    Hidden layers are named `"{name}_hidden_{i}"` (usable for feature distillation); the output
    layer is `"{name}_logits"` and stays float32 under mixed precision.

    Example:

    >>> teacher = kdtfp.teachers.mlp(64, hidden=(100, 100), num_outputs=10, name="teacher")
    """
    if int(input_dim) < 1 or int(num_outputs) < 1:
        raise ValueError(
            f"`input_dim` and `num_outputs` must be >= 1, got {input_dim}, {num_outputs}."
        )
    inputs = keras.Input(shape=(int(input_dim),), name=f"{name}_inputs")
    h = inputs
    for i, width in enumerate(hidden):
        initializer = keras.initializers.GlorotUniform(seed=None if seed is None else seed + i)
        h = keras.layers.Dense(
            width, activation=activation, kernel_initializer=initializer, name=f"{name}_hidden_{i}"
        )(h)
    initializer = keras.initializers.GlorotUniform(
        seed=None if seed is None else seed + len(hidden)
    )
    logits = keras.layers.Dense(
        num_outputs, kernel_initializer=initializer, dtype="float32", name=f"{name}_logits"
    )(h)
    return keras.Model(inputs, logits, name=name)
