"""Keras callbacks: posterior sample collection, dual ascent, schedules, the NaN guard."""

from kdtfp.callbacks.dual_ascent import DualAscent, MultiplierSchedule
from kdtfp.callbacks.nan_guard import NaNGuard, NumericalFailureError, with_nan_guard
from kdtfp.callbacks.posterior import PosteriorSampler
from kdtfp.callbacks.schedules import LossWeightSchedule, TemperatureSchedule

__all__ = [
    "DualAscent",
    "LossWeightSchedule",
    "MultiplierSchedule",
    "NaNGuard",
    "NumericalFailureError",
    "PosteriorSampler",
    "TemperatureSchedule",
    "with_nan_guard",
]
