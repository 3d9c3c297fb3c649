"""Teacher-output caching: run a frozen teacher once over a fixed transfer set."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kdtfp.distill.checks import check_arrays
from kdtfp.distill.distiller import INPUTS, TEACHER_OUTPUTS


def teacher_outputs(teacher, x, batch_size=1024):
    """The teacher's outputs on `x` as a NumPy array, computed in batches with `training=False`."""
    x = np.asarray(x)
    check_arrays(x, "x")
    outputs = [
        np.asarray(teacher(x[start : start + batch_size], training=False))
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs, axis=0)


def teacher_cached_dataset(
    teacher, x, y=None, batch_size=32, shuffle=True, seed=None, outputs_batch_size=1024
):
    """A `tf.data.Dataset` of `({"inputs": x, "teacher_outputs": t}, y)` batches.

    For a frozen teacher and a fixed transfer set the teacher's outputs never change, so they are
    computed once here instead of at every step; a `kdtfp.Distiller` then skips the teacher's
    forward pass for output objectives (derivative matching still runs the teacher, since it needs
    input-gradients). Training on this dataset gives the same result as recomputing the teacher.

    Args:
        teacher: frozen Keras model.
        x: transfer inputs `[n, ...]`; y: optional labels `[n, ...]` for a student loss.
        batch_size: batch size of the returned dataset.
        shuffle: reshuffle each epoch (with `seed`).

    Example:

    >>> dataset = kdtfp.distill.teacher_cached_dataset(teacher, x_transfer, batch_size=64)
    >>> distiller.fit(dataset, epochs=10)
    """
    x = np.asarray(x)
    # teacher_outputs checks x (non-empty, finite) before running the teacher.
    features = {INPUTS: x, TEACHER_OUTPUTS: teacher_outputs(teacher, x, outputs_batch_size)}
    elements = features if y is None else (features, np.asarray(y))
    dataset = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
