"""Schedules of a `Distiller`'s term weights and temperatures, applied at each epoch's start."""

from __future__ import annotations

import keras


def _check_schedule(schedule):
    if not callable(schedule):
        raise ValueError(f"`schedule` must be a function epoch -> value, got {schedule!r}.")
    return schedule


def _distiller(model):
    from kdtfp.distill.distiller import Distiller

    if not isinstance(model, Distiller):
        raise ValueError(f"This schedule drives a kdtfp.Distiller, not {type(model).__name__}.")
    return model


class LossWeightSchedule(keras.callbacks.Callback):
    """Sets the weight of one `Distiller` term to `schedule(epoch)` at the start of every epoch.

    The weight lives in the distiller's `term_weights` variable, so its current value is saved
    with the model and survives `BackupAndRestore` (the schedule is a pure function of the epoch).

    Args:
        term: an objective's name or `"student_loss"`.
        schedule: function `epoch (int, from 0) -> weight (float >= 0)`.
        verbose: print the new value each epoch.

    Example:

    >>> warm_up = kdtfp.callbacks.LossWeightSchedule("derivative_matching", lambda e: min(1.0, e / 5) * 10.0)
    >>> distiller.fit(x, epochs=20, callbacks=[warm_up])
    """

    def __init__(self, term, schedule, verbose=0):
        super().__init__()
        self.term = term
        self.schedule = _check_schedule(schedule)
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        value = float(self.schedule(epoch))
        _distiller(self.model).set_term_weight(self.term, value)
        if self.verbose:
            print(f"Epoch {epoch + 1}: weight of {self.term!r} = {value:.4g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[f"{self.term}_weight"] = self.model.term_weight(self.term)


class TemperatureSchedule(keras.callbacks.Callback):
    """Sets the temperature of one `Distiller` objective to `schedule(epoch)` each epoch.

    Args:
        objective: the name of an objective whose loss has a temperature (e.g. `SoftTargetKL`).
        schedule: function `epoch -> temperature (float > 0)`.

    Example:

    >>> anneal = kdtfp.callbacks.TemperatureSchedule("soft_target_kl", lambda e: max(1.0, 8.0 * 0.8**e))
    """

    def __init__(self, objective, schedule, verbose=0):
        super().__init__()
        self.objective = objective
        self.schedule = _check_schedule(schedule)
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        value = float(self.schedule(epoch))
        if not 0 < value < float("inf"):
            raise ValueError(
                f"TemperatureSchedule: `temperature` must be > 0, schedule gave {value} at epoch {epoch}."
            )
        _distiller(self.model).temperature_variable(self.objective).assign(value)
        if self.verbose:
            print(f"Epoch {epoch + 1}: temperature of {self.objective!r} = {value:.4g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[f"{self.objective}_temperature"] = float(
                self.model.temperature_variable(self.objective).numpy()
            )
