"""Students (and model teachers) as `keras.Model`s."""

from kdtfp.models.posterior_ensemble import PosteriorEnsemble

__all__ = ["PosteriorEnsemble"]
