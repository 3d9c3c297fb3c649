"""Keras callbacks: loss-weight and temperature schedules."""

from kdtfp.callbacks.schedules import LossWeightSchedule, TemperatureSchedule

__all__ = ["LossWeightSchedule", "TemperatureSchedule"]
