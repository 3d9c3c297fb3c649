"""Keras callbacks: posterior sample collection, loss-weight and temperature schedules."""

from kdtfp.callbacks.dual_ascent import DualAscent, MultiplierSchedule
from kdtfp.callbacks.posterior import PosteriorSampler
from kdtfp.callbacks.schedules import LossWeightSchedule, TemperatureSchedule

__all__ = [
    "LossWeightSchedule",
    "PosteriorSampler",
    "TemperatureSchedule",
    "DualAscent",
    "MultiplierSchedule",
]
