"""Students (and model teachers) as `keras.Model`s."""

from kdtfp.models.parallel_chains import parallel_chains, repeat_targets, split_chain_samples
from kdtfp.models.posterior_ensemble import PosteriorEnsemble

__all__ = ["PosteriorEnsemble", "parallel_chains", "repeat_targets", "split_chain_samples"]
