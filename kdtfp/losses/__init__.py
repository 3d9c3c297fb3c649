"""Distillation objectives as `keras.losses.Loss` objects (replica scaling comes from Keras)."""

from kdtfp.losses.density import BernoulliNegativeLogLikelihood, LogDensitySquaredError
from kdtfp.losses.derivative_matching import DerivativeMatching
from kdtfp.losses.dirichlet_posterior import TeacherDirichletPosterior
from kdtfp.losses.score_matching import AverageScoreMatching, InputScores, score_rows
from kdtfp.losses.shared_noise import BernoulliKL, GaussianKL, GaussianW2, PerExampleMean
from kdtfp.losses.similarity import SimilarityPreserving
from kdtfp.losses.soft_target import SoftTargetKL

__all__ = [
    "BernoulliKL",
    "GaussianKL",
    "GaussianW2",
    "PerExampleMean",
    "AverageScoreMatching",
    "InputScores",
    "score_rows",
    "BernoulliNegativeLogLikelihood",
    "DerivativeMatching",
    "LogDensitySquaredError",
    "SoftTargetKL",
    "TeacherDirichletPosterior",
    "SimilarityPreserving",
]
