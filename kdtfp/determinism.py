"""Reproducible runs: one call that seeds every generator and makes TensorFlow ops deterministic."""

from __future__ import annotations

import numbers
import os


def set_determinism(seed: int, op_determinism: bool = True) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras with `seed` and turns on op determinism.

    The same program run twice on the same hardware and software then gives bit-identical
    results (on CPU this is what `kdtfp run --seed N` relies on). It does

    ```python
    os.environ["TF_DETERMINISTIC_OPS"] = "1"    # inherited by worker processes started later
    keras.utils.set_random_seed(seed)           # random, numpy.random, tf.random, keras.random
    tf.config.experimental.enable_op_determinism()
    ```

    With op determinism on, TensorFlow picks deterministic kernels, forces `tf.data` to keep
    element order (`deterministic=True` in every `map`/`interleave`), and raises
    `UnimplementedError` for the few ops that have no deterministic kernel (on GPU). It does not
    seed `numpy.random.default_rng()` generators: kdtfp passes explicit seeds to those. It is
    a process-wide switch that stays on; `op_determinism=False` only seeds.

    Args:
        seed: int >= 0.
        op_determinism: also enable TensorFlow op determinism (default True).

    Example:

    >>> kdtfp.determinism.set_determinism(0)
    >>> kdtfp.determinism.op_determinism_enabled()
    True
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0. Received: seed={seed!r}")
    if not isinstance(op_determinism, bool):
        raise ValueError(
            f"`op_determinism` must be True or False. Received: op_determinism={op_determinism!r}"
        )
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    if op_determinism:
        os.environ["TF_DETERMINISTIC_OPS"] = "1"
        tf.config.experimental.enable_op_determinism()


def op_determinism_enabled() -> bool:
    """Whether TensorFlow op determinism is on in this process."""
    # Not exported under tf.config in TF 2.21; the flag `enable_op_determinism` sets.
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())
