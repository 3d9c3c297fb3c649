"""`NaNGuard`: stops `fit` at the first non-finite loss, term or weight, restores the last good
weights and leaves them on disk (DESIGN.md rule 12)."""

from __future__ import annotations

import math
import numbers
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

_SUFFIX = ".weights.h5"
# model -> (number of weights, guarded weights, compiled check-and-copy)
_COMPILED = weakref.WeakKeyDictionary()


class NumericalFailureError(FloatingPointError):
    """Raised by `NaNGuard` when training produced a NaN or Inf.

    The message is one line; the attributes carry the same facts for a program:

    * `step`: the 1-based training step (the optimizer's iteration count) that went bad;
    * `cause`: what went bad, e.g. `"term 'soft_target_kl' is NaN"`;
    * `restored_step`: the step whose weights were restored (0 = the weights `fit` started
      from), or None if no good weights were held;
    * `checkpoint_path`: the `.weights.h5` file holding the restored weights, or None.
    """

    def __init__(self, message, step, cause, restored_step, checkpoint_path):
        super().__init__(message)
        self.step = step
        self.cause = cause
        self.restored_step = restored_step
        self.checkpoint_path = checkpoint_path


def _check_int(name, value, minimum=1):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _kind(value):
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


@keras.saving.register_keras_serializable(package="kdtfp")
class NaNGuard(keras.callbacks.Callback):
    """Stops `fit` at the first NaN/Inf loss, distillation term or weight, and rolls back.

    After every `check_every`-th training step it looks at

    1. every value in the batch logs: `loss` and each term a `kdtfp.Distiller` or
       `ConstrainedVIDistiller` reports as its own metric (`soft_target_kl`, `student_loss`,
       `elbo_loss`, `constraint`, ...). Keras logs running means over the epoch, so a single
       non-finite batch makes its term non-finite from that step on;
    2. every floating-point weight of the model after the update (a NaN/Inf gradient shows
       here first: the loss of the step was finite, its update was not).

    If all are finite the weights are copied (tensors on their device, by one traced function)
    as the last good weights, and written to `checkpoint_path` every `checkpoint_every` good checks.
    Weights of frozen sub-layers (a Distiller's teacher) cannot change and are skipped. At the first failure the last
    good weights are put back into the model, written to `checkpoint_path` (so the file on disk
    is always the last good state), and `NumericalFailureError` (a `FloatingPointError`) is
    raised out of `fit` with one line such as

    ```
    kdtfp: training stopped at step 37: term 'soft_target_kl' is NaN; restored weights of
    step 36 (checkpoint /tmp/run/last_good.weights.h5)
    ```

    A distillation term is named in preference to the total `loss` (which is non-finite
    whenever a term is). Steps are the optimizer's iteration count, so they continue across
    `fit` calls and are restored by `BackupAndRestore`; step 0 means the weights `fit` started
    from. With `raise_error=False` the guard instead restores, sets `model.stop_training`, prints
    the line and keeps the error in `self.failure`: `fit` returns normally.

    `kdtfp.Distiller.fit` and `ConstrainedVIDistiller.fit` append a `NaNGuard()` (in memory, no
    file) when no guard is among their callbacks; pass `nan_guard=False` to opt out.

    Cost: a check is one traced call (finite test and copy of the weights, traced once per
    model, ~0.3 s); like any per-step callback the guard makes Keras run batch hooks
    synchronously, so each step finishes before the next starts. With `steps_per_execution > 1` Keras calls batch hooks
    once per execution, so the check (and the rollback point) is per execution. Only the model's
    weights are restored: the optimizer's slots are not, which is why `fit` stops instead of
    continuing. Under multi-worker training only the chief writes the file.

    Args:
        checkpoint_path: optional path ending in `.weights.h5`; written atomically (a temporary
            file in the same directory, then `os.replace`).
        check_every: int >= 1, check every this many steps (1 = every step). A larger value
            costs less and rolls back further.
        checkpoint_every: int >= 0, write the file every this many good checks; 0 writes it only
            when training stops on a failure (no cost while training is healthy).
        raise_error: raise `NumericalFailureError` (default) or only stop training.

    Example:

    >>> guard = kdtfp.callbacks.NaNGuard("run/last_good.weights.h5", checkpoint_every=100)
    >>> try:
    ...     distiller.fit(x, y, epochs=20, callbacks=[guard])
    ... except kdtfp.callbacks.NumericalFailureError as error:
    ...     print(error.step, error.cause)   # the model now holds the last good weights
    """

    def __init__(self, checkpoint_path=None, check_every=1, checkpoint_every=1, raise_error=True):
        super().__init__()
        if checkpoint_path is not None:
            checkpoint_path = os.fspath(checkpoint_path)
            if not checkpoint_path.endswith(_SUFFIX):
                raise ValueError(
                    f"`checkpoint_path` must end in {_SUFFIX!r} (Keras weights file). "
                    f"Received: checkpoint_path={checkpoint_path!r}"
                )
        self.checkpoint_path = checkpoint_path
        self.check_every = _check_int("check_every", check_every)
        self.checkpoint_every = _check_int("checkpoint_every", checkpoint_every, minimum=0)
        if not isinstance(raise_error, bool):
            raise ValueError(f"`raise_error` must be True or False. Received: {raise_error!r}")
        self.raise_error = raise_error
        self.failure = None
        self._reset()

    def _reset(self):
        self._variables = None  # the guarded weights (see `_guarded_variables`)
        self._copies = None  # their last good values (tensors on the same device)
        self._check_and_copy = None
        self._prepared_for = None  # (model, number of weights) the above were made for
        self._good_step = None
        self._last_checked = None
        self._good_checks = 0

    # ------------------------------------------------------------------ helpers

    def _step(self):
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        if iterations is None:
            return None
        return int(keras.ops.convert_to_numpy(iterations))

    def _guarded_variables(self):
        """The model's float weights, less those of frozen sub-layers (a Distiller's teacher):
        they cannot change, so they are neither checked nor copied."""
        frozen = set()
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            if not layer.trainable:
                frozen.update(id(weight) for weight in layer.weights)
        return [
            weight
            for weight in self.model.weights
            if id(weight) not in frozen
            and keras.backend.is_float_dtype(keras.backend.standardize_dtype(weight.dtype))
        ]

    def _prepare(self):
        """(Re)makes the compiled check-and-copy for the current weights.

        It is cached per model (weakly), so the guard that `Distiller.fit` makes anew at each
        call does not trace again (a trace costs ~0.3 s; a traced check ~0.1 ms a step).
        """
        self._good_step = self._copies = None
        count = len(self.model.weights)
        cached = _COMPILED.get(self.model)
        if cached is not None and cached[0] == count:
            _, self._variables, self._check_and_copy = cached
            return
        self._variables = variables = self._guarded_variables()

        @tf.function(autograph=False)
        def check_and_copy():
            # Tensors, not variables: nothing is created under a (multi-worker) strategy.
            values = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
            finite = [tf.reduce_all(tf.math.is_finite(value)) for value in values]
            return tf.reduce_all(tf.stack(finite)), values

        self._check_and_copy = check_and_copy
        try:
            _COMPILED[self.model] = (count, variables, check_and_copy)
        except TypeError:  # a model that cannot be weakly referenced: no cache
            pass

    def _snapshot(self, step):
        """Copies the guarded weights if all are finite; returns None, or what is not finite."""
        key = (id(self.model), len(self.model.weights))
        if key != self._prepared_for:  # kept across `fit` calls: traced once per model
            self._prepared_for = key
            self._prepare()
        if not self._variables:
            return None
        finite, values = self._check_and_copy()
        if bool(finite):
            self._good_step, self._copies = step, values
            return None
        for weight in self._variables:  # only on failure: find the first bad weight
            value = keras.ops.convert_to_numpy(weight)
            if not np.isfinite(value).all():
                kind = "NaN" if np.isnan(value).any() else "Inf"
                return f"weight {weight.path!r} is {kind} after the update (a {kind} gradient)"
        return "a weight is not finite after the update"

    def _bad_terms(self, logs):
        bad = []
        for name, value in (logs or {}).items():
            if isinstance(value, numbers.Real) and not math.isfinite(float(value)):
                bad.append((name, _kind(float(value))))
        terms = [item for item in bad if item[0] != "loss"] or bad
        if not terms:
            return None
        if len(terms) == 1:
            return f"term {terms[0][0]!r} is {terms[0][1]}"
        return (
            "terms " + ", ".join(f"{name!r} ({kind})" for name, kind in terms) + " are not finite"
        )

    def _is_writer(self):
        extended = getattr(self.model.distribute_strategy, "extended", None)
        return bool(getattr(extended, "should_checkpoint", True))

    def _write_checkpoint(self):
        if self.checkpoint_path is None or not self._is_writer():
            return
        directory = os.path.dirname(os.path.abspath(self.checkpoint_path))
        os.makedirs(directory, exist_ok=True)
        temporary = self.checkpoint_path[: -len(_SUFFIX)] + f".tmp{os.getpid()}{_SUFFIX}"
        self.model.save_weights(temporary, overwrite=True)
        os.replace(temporary, self.checkpoint_path)

    # ------------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs=None):
        self._good_step = self._last_checked = None
        self._good_checks = 0
        self.failure = None
        if self.model.weights:  # a subclassed model may be unbuilt but already hold them
            self._snapshot(self._step() or 0)  # the weights `fit` starts from: step 0

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step is None:
            step = (self._last_checked or 0) + 1
        if self._last_checked is not None and step - self._last_checked < self.check_every:
            return
        self._last_checked = step
        cause = self._bad_terms(logs) or self._snapshot(step)
        if cause is not None:
            self._fail(step, cause)
            return
        self._good_checks += 1
        if self.checkpoint_every and self._good_checks % self.checkpoint_every == 0:
            self._write_checkpoint()

    def _fail(self, step, cause):
        restored = None
        if self._good_step is not None:
            for weight, value in zip(self._variables, self._copies, strict=True):
                weight.assign(value)
            restored = self._good_step
            self._write_checkpoint()
        checkpoint = self.checkpoint_path if restored is not None and self.checkpoint_path else None
        if restored is None:
            outcome = "no good weights were held to restore"
        else:
            outcome = f"restored weights of step {restored}"
            if checkpoint:
                outcome += f" (checkpoint {checkpoint})"
        message = f"kdtfp: training stopped at step {step}: {cause}; {outcome}"
        error = NumericalFailureError(message, step, cause, restored, checkpoint)
        self.failure = error
        self.model.stop_training = True
        if self.raise_error:
            raise error
        print(message)

    def get_config(self):
        return {
            "checkpoint_path": self.checkpoint_path,
            "check_every": self.check_every,
            "checkpoint_every": self.checkpoint_every,
            "raise_error": self.raise_error,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


#: Folder of the default guard's checkpoint (`last_good.weights.h5`, written only when training
#: stops on a failure); `kdtfp run` sets it to the recipe's `--out`. None: no file.
DEFAULT_CHECKPOINT_DIR = None


def with_nan_guard(callbacks, enabled=True):
    """`callbacks` as a list with a `NaNGuard()` put first if `enabled` and none is there.

    Used by the `fit` of kdtfp's trainers; `enabled=False` returns the callbacks unchanged.

    Example:

    >>> model.fit(x, y, callbacks=with_nan_guard([sampler]))
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"`nan_guard` must be True or False. Received: nan_guard={enabled!r}")
    if isinstance(callbacks, keras.callbacks.CallbackList) or not enabled:
        return callbacks
    callbacks = list(callbacks or [])
    if not any(isinstance(callback, NaNGuard) for callback in callbacks):
        path = None
        if DEFAULT_CHECKPOINT_DIR is not None:
            path = os.path.join(DEFAULT_CHECKPOINT_DIR, "last_good" + _SUFFIX)
        # First, so that no later callback (BackupAndRestore, PosteriorSampler) saves or
        # records the bad step before the guard restores the last good weights.
        callbacks.insert(0, NaNGuard(path, checkpoint_every=0))
    return callbacks
