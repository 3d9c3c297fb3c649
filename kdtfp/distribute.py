"""Distribution strategies for recipes: one place that turns `--strategy/--devices` into a strategy.

Logical CPU devices must be configured before TensorFlow initialises its runtime, so call
`make_strategy` first thing in a process, and only once (DESIGN.md rule 6).
"""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("default", "mirrored")


def safe_steps_per_execution(steps_per_execution, strategy=None):
    """`steps_per_execution`, or 1 on a multi-replica strategy.

    Keras 3 (checked on 3.15 / TF 2.21) fails with "You must feed a value for placeholder tensor
    ... while/cond" when `steps_per_execution > 1` under `MirroredStrategy`, even for a plain
    Sequential model (keras-team/keras#19246, open).
    """
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1 and steps_per_execution != 1:
        return 1
    return steps_per_execution


def make_strategy(name="default", devices=None):
    """Returns a `tf.distribute.Strategy`.

    Args:
        name: `"default"` (no distribution) or `"mirrored"` (`MirroredStrategy` over `devices`
            replicas: the GPUs if there are enough, else that many logical CPU devices).
        devices: number of replicas for `"mirrored"` (default: all GPUs, or 2 CPUs without GPU).
    """
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {name!r}.")
    if name == "default":
        if devices not in (None, 1):
            raise ValueError(f"`devices`={devices} needs `strategy='mirrored'`.")
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if devices is None:
        devices = len(gpus) if gpus else 2
    devices = int(devices)
    if devices < 1:
        raise ValueError(f"`devices` must be >= 1, got {devices}.")
    if gpus:
        if devices > len(gpus):
            raise ValueError(f"`devices`={devices} but only {len(gpus)} GPU(s) exist.")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(devices)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        # Must come before anything initialises the runtime (list_logical_devices does).
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )
    except RuntimeError as error:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != devices:
            raise ValueError(
                f"`devices`={devices}: TensorFlow is already initialised with {existing} CPU device(s); "
                "choose the strategy before any TensorFlow work, once per process."
            ) from error
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)])
