"""Schedules of a `Distiller`'s term weights and temperatures, applied at each epoch's start."""

from __future__ import annotations

import keras


class _EpochSchedule(keras.callbacks.Callback):
    """Sets one distiller value to `schedule(epoch)` at each epoch start and logs it."""

    kind = "value"

    def __init__(self, target, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(f"`schedule` must be a function epoch -> value, got {schedule!r}.")
        self.target = target
        self.schedule = schedule
        self.verbose = verbose

    def _apply(self, distiller, value):
        raise NotImplementedError

    def _read(self, distiller):
        raise NotImplementedError

    def _distiller(self):
        from kdtfp.distill.distiller import Distiller

        if not isinstance(self.model, Distiller):
            raise ValueError(
                f"This schedule drives a kdtfp.Distiller, not {type(self.model).__name__}."
            )
        return self.model

    def on_epoch_begin(self, epoch, logs=None):
        value = float(self.schedule(epoch))
        self._apply(self._distiller(), value)
        if self.verbose:
            print(f"Epoch {epoch + 1}: {self.kind} of {self.target!r} = {value:.4g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[f"{self.target}_{self.kind}"] = self._read(self._distiller())


class LossWeightSchedule(_EpochSchedule):
    """Sets the weight of one `Distiller` term to `schedule(epoch)` at the start of every epoch.

    The weight lives in the distiller's `term_weights` variable, so its current value is saved
    with the model and survives `BackupAndRestore` (the schedule is a pure function of the epoch).
    The value is logged as `"{term}_weight"`.

    Args:
        term: an objective's name or `"student_loss"`.
        schedule: function `epoch (int, from 0) -> weight (float >= 0)`.
        verbose: print the new value each epoch.

    Example:

    >>> warm_up = kdtfp.callbacks.LossWeightSchedule("derivative_matching", lambda e: min(1.0, e / 5) * 10.0)
    >>> distiller.fit(x, epochs=20, callbacks=[warm_up])
    """

    kind = "weight"

    def __init__(self, term, schedule, verbose=0):
        super().__init__(term, schedule, verbose)

    @property
    def term(self):
        return self.target

    def _apply(self, distiller, value):
        distiller.set_term_weight(self.target, value)

    def _read(self, distiller):
        return distiller.term_weight(self.target)


class TemperatureSchedule(_EpochSchedule):
    """Sets the temperature of one `Distiller` objective to `schedule(epoch)` each epoch.

    The temperature lives in the distiller's `{objective}_temperature` variable, so it is saved
    with the model and survives `BackupAndRestore` (the schedule is a pure function of the
    epoch, re-applied at the start of the epoch a resumed `fit` begins with). The value is
    logged as `"{objective}_temperature"`.

    Args:
        objective: the name of an objective whose loss has a temperature (e.g. `SoftTargetKL`).
        schedule: function `epoch -> temperature (finite float > 0)`.
        verbose: print the new value each epoch.

    Example:

    >>> anneal = kdtfp.callbacks.TemperatureSchedule("soft_target_kl", lambda e: max(1.0, 8.0 * 0.8**e))
    """

    kind = "temperature"

    def __init__(self, objective, schedule, verbose=0):
        super().__init__(objective, schedule, verbose)

    @property
    def objective(self):
        return self.target

    def _apply(self, distiller, value):
        if not 0 < value < float("inf"):
            raise ValueError(
                f"TemperatureSchedule: `temperature` must be a finite number > 0, got {value}."
            )
        distiller.temperature_variable(self.target).assign(value)

    def _read(self, distiller):
        return float(distiller.temperature_variable(self.target).numpy())
