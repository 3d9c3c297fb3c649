"""`SafeCompile`: the `compile` override every kdtfp training model shares."""

from __future__ import annotations

import warnings

import keras


class SafeCompile:
    """Mixin for `keras.Model` subclasses: `steps_per_execution` falls back to 1 on several
    replicas, where Keras 3 fails with more (keras-team/keras#19246), with a warning.

    Overriding `compile` makes Keras skip re-compiling a loaded model unless
    `compile_from_config` is overridden too; its body here is Keras's own (trainer.py).
    List it before `keras.Model`: `class Distiller(SafeCompile, keras.Model)`.
    """

    def compile(self, *args, steps_per_execution=1, **kwargs):
        from kdtfp.distribute import safe_steps_per_execution

        safe = safe_steps_per_execution(steps_per_execution, self.distribute_strategy)
        if safe != steps_per_execution:
            replicas = self.distribute_strategy.num_replicas_in_sync
            warnings.warn(
                f"steps_per_execution={steps_per_execution} fails under a {replicas}-replica "
                "strategy in Keras 3 (keras-team/keras#19246); using 1.",
                stacklevel=2,
            )
        super().compile(*args, steps_per_execution=safe, **kwargs)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)
