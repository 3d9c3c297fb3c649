"""`SafeCompile`: the `compile` and `fit` behaviour every kdtfp trainer shares."""

from __future__ import annotations

import warnings

import keras


class SafeCompile:
    """Mixin for `keras.Model` subclasses: `steps_per_execution` falls back to 1 on several
    replicas, where Keras 3 fails with more (keras-team/keras#19246), with a warning.

    Overriding `compile` makes Keras skip re-compiling a loaded model unless
    `compile_from_config` is overridden too; its body here is Keras's own (trainer.py).
    `fit` puts a `kdtfp.callbacks.NaNGuard()` first among the callbacks unless one is there or
    `nan_guard=False`: a NaN/Inf term or weight raises `NumericalFailureError` naming the step
    and the term, with the last good weights restored (DESIGN rule 12).

    List it before `keras.Model`: `class Distiller(SafeCompile, keras.Model)`.
    """

    def fit(self, *args, nan_guard=True, **kwargs):
        from kdtfp.callbacks.nan_guard import with_nan_guard

        kwargs["callbacks"] = with_nan_guard(kwargs.get("callbacks"), nan_guard)
        return super().fit(*args, **kwargs)

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
