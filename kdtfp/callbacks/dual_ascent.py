"""Dual ascent on a constraint multiplier, and a schedule for a fixed-penalty multiplier."""

from __future__ import annotations

import math

import keras
import numpy as np

FREQUENCIES = ("epoch", "step")


def _check_number(value, argument, minimum_exclusive=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{argument}` must be a number, got {value!r}.") from None
    bound_ok = value > 0.0 if minimum_exclusive else value >= 0.0
    if not (bound_ok and math.isfinite(value)):
        bound = "> 0" if minimum_exclusive else ">= 0"
        raise ValueError(f"`{argument}` must be a finite number {bound}, got {value}.")
    return value


def multiplier_variable(model, multiplier_name="multiplier"):
    """The model's multiplier: attribute `multiplier_name` if it is a Keras variable, else the
    non-trainable weight whose name is `multiplier_name`."""
    candidate = getattr(model, multiplier_name, None)
    if isinstance(candidate, keras.Variable):
        return candidate
    for weight in model.non_trainable_weights:
        if weight.name == multiplier_name:
            return weight
    raise ValueError(
        f"`multiplier_name`={multiplier_name!r}: {type(model).__name__} has no non-trainable "
        "weight of that name (a kdtfp.distill.ConstrainedVIDistiller has 'multiplier')."
    )


class DualAscent(keras.callbacks.Callback):
    """Projected dual ascent on the multiplier `γ` of the constraint `L ≤ ε` during `fit`.

    For `max ELBO s.t. L ≤ ε` (Lagrangian `-ELBO + γ (L - ε)`, minimised over the weights and
    maximised over `γ ≥ 0`), after every epoch (or step):

    ```python
    gamma = max(0, gamma + learning_rate * (L - target))
    ```

    * `frequency="epoch"`: `L` is the epoch's logged constraint metric (`logs[metric]`, the
      batch-size-weighted mean over the epoch, the same on any number of replicas). The
      update is made after the epoch's last batch, before the `on_epoch_end` of any callback,
      so a `BackupAndRestore` saves the updated `γ` whatever the order of the callbacks list.
      (If Keras does not know the number of steps per epoch, e.g. a dataset of unknown
      cardinality, the update falls back to `on_epoch_end`: then list `DualAscent` BEFORE
      `BackupAndRestore`, or a resumed run misses one update.)
    * `frequency="step"`: `L` is the last step's constraint value, read from the model's
      non-trainable weight `last_{metric}` (a `ConstrainedVIDistiller` keeps
      `last_constraint`; under `tf.distribute` it is the mean over replicas). With
      `steps_per_execution > 1` Keras calls batch hooks once per execution, so the update is
      made once per execution, from its last step.

    `γ` is a non-trainable weight of the model (`multiplier_name`), updated here in
    cross-replica context with `assign`, so it is the same on every replica, is saved in
    `.keras` files and checkpoints, and is restored by `keras.callbacks.BackupAndRestore` with
    the other weights: this callback holds no state of its own. (With `frequency="step"` and a
    `BackupAndRestore(save_freq=<steps>)`, list `DualAscent` first so that a backup taken after
    a step holds that step's update.) The new value is logged as
    `"{multiplier_name}_next"` at each epoch end (the logged `multiplier` metric is the value used
    during the epoch).

    Args:
        target: `ε >= 0`, the constraint level.
        learning_rate: `η > 0`, the dual step size.
        frequency: `"epoch"` or `"step"`.
        multiplier_name: the model's multiplier weight (attribute or weight name).
        metric: the constraint metric's name (`"constraint"` for a `ConstrainedVIDistiller`).
        max_multiplier: optional upper bound on `γ` (projection onto `[0, max_multiplier]`).
        verbose: print `γ` at each update (epoch frequency only).

    Example:

    >>> distiller = kdtfp.distill.ConstrainedVIDistiller(topic_model, mode="lagrangian", epsilon=1e-3)
    >>> distiller.fit(x, teacher_features, epochs=50, callbacks=[
    ...     kdtfp.callbacks.DualAscent(target=1e-3, learning_rate=1e5)])
    """

    def __init__(
        self,
        target,
        learning_rate,
        frequency="epoch",
        multiplier_name="multiplier",
        metric="constraint",
        max_multiplier=None,
        verbose=0,
    ):
        super().__init__()
        self.target = _check_number(target, "target")
        self.learning_rate = _check_number(learning_rate, "learning_rate", minimum_exclusive=True)
        if frequency not in FREQUENCIES:
            raise ValueError(f"`frequency` must be one of {FREQUENCIES}, got {frequency!r}.")
        self.frequency = frequency
        self.multiplier_name = str(multiplier_name)
        self.metric = str(metric)
        self.max_multiplier = (
            None if max_multiplier is None else _check_number(max_multiplier, "max_multiplier")
        )
        self.verbose = verbose

    @staticmethod
    def update(gamma, constraint, target, learning_rate, max_multiplier=None):
        """The update rule on plain floats: `max(0, gamma + learning_rate * (constraint - target))`."""
        value = max(0.0, float(gamma) + float(learning_rate) * (float(constraint) - float(target)))
        return value if max_multiplier is None else min(value, float(max_multiplier))

    def _step(self, constraint):
        if not math.isfinite(float(constraint)):
            raise ValueError(
                f"DualAscent: the constraint value is {constraint} (not finite); the multiplier "
                "was not updated."
            )
        variable = multiplier_variable(self.model, self.multiplier_name)
        gamma = float(keras.ops.convert_to_numpy(variable))
        new = self.update(gamma, constraint, self.target, self.learning_rate, self.max_multiplier)
        variable.assign(np.asarray(new, dtype=variable.dtype))
        return new

    def on_epoch_begin(self, epoch, logs=None):
        self._updated_this_epoch = False

    def on_train_batch_end(self, batch, logs=None):
        if self.frequency == "epoch":
            # The epoch's update is made after its last batch, before any `on_epoch_end`: a
            # `BackupAndRestore` listed before this callback then saves the updated multiplier.
            steps = (self.params or {}).get("steps")
            if steps and int(batch) + 1 >= int(steps) and logs and self.metric in logs:
                self._epoch_update(logs)
            return
        name = f"last_{self.metric}"
        last = getattr(self.model, name, None)
        if not isinstance(last, keras.Variable):
            raise ValueError(
                f"DualAscent(frequency='step') reads the model's weight {name!r}, which "
                f"{type(self.model).__name__} does not have; use frequency='epoch'."
            )
        self._step(float(keras.ops.convert_to_numpy(last)))

    def _epoch_update(self, logs):
        if self.metric not in logs:
            raise ValueError(
                f"DualAscent: no metric {self.metric!r} in the logs (keys: {sorted(logs)})."
            )
        new = self._step(float(logs[self.metric]))
        self._updated_this_epoch = True
        if self.verbose:
            print(f"{self.multiplier_name} -> {new:.6g}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.frequency == "epoch" and not getattr(self, "_updated_this_epoch", False):
            self._epoch_update(logs)  # the number of steps was unknown
        variable = multiplier_variable(self.model, self.multiplier_name)
        logs[f"{self.multiplier_name}_next"] = float(keras.ops.convert_to_numpy(variable))


class MultiplierSchedule(keras.callbacks.Callback):
    """Sets a model's multiplier `γ` to `schedule(epoch)` at each epoch start (penalty mode).

    The value lives in the model's non-trainable weight (saved, restored by
    `BackupAndRestore`); the schedule is a pure function of the epoch.

    Args:
        schedule: function `epoch (int, from 0) -> γ (float >= 0)`.
        multiplier_name: the model's multiplier weight.

    Example:

    >>> warm_up = kdtfp.callbacks.MultiplierSchedule(lambda e: 1e3 * min(1.0, e / 10))
    """

    def __init__(self, schedule, multiplier_name="multiplier"):
        super().__init__()
        if not callable(schedule):
            raise ValueError(f"`schedule` must be a function epoch -> value, got {schedule!r}.")
        self.schedule = schedule
        self.multiplier_name = str(multiplier_name)

    def on_epoch_begin(self, epoch, logs=None):
        value = _check_number(self.schedule(epoch), "multiplier")
        variable = multiplier_variable(self.model, self.multiplier_name)
        variable.assign(np.asarray(value, dtype=variable.dtype))
