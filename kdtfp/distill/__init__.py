"""The generic `Distiller`, its objectives, and teacher-output caching."""

from kdtfp.distill.cache import teacher_cached_dataset, teacher_outputs
from kdtfp.distill.constrained_vi import ConstrainedVIDistiller
from kdtfp.distill.continual import ContinualVAEDistiller, continual_dataset, frozen_copy
from kdtfp.distill.distiller import INPUTS, TEACHER_OUTPUTS, Distiller
from kdtfp.distill.objective import DistillationObjective, FeatureDistillation
from kdtfp.distill.shared_noise import SharedNoiseDistiller

__all__ = [
    "INPUTS",
    "TEACHER_OUTPUTS",
    "DistillationObjective",
    "Distiller",
    "FeatureDistillation",
    "teacher_cached_dataset",
    "teacher_outputs",
    "ConstrainedVIDistiller",
    "SharedNoiseDistiller",
    "ContinualVAEDistiller",
    "continual_dataset",
    "frozen_copy",
]
