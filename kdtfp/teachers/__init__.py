"""Teacher builders: MLPs, bagged ensembles, and MCMC posteriors of Bayesian logistic regression."""

from kdtfp.teachers.ensemble import BaggedEnsemble, fit_bagged
from kdtfp.teachers.gru import gru_classifier
from kdtfp.teachers.mcmc import (
    OnlineChain,
    PosteriorSamples,
    laplace_approximation,
    logistic_log_posterior,
    mc_predictive_log_probs,
    sample_posterior,
)
from kdtfp.teachers.mcmc_streams import batch_transfer_dataset, online_transfer_dataset
from kdtfp.teachers.mlp import mlp

__all__ = [
    "BaggedEnsemble",
    "OnlineChain",
    "PosteriorSamples",
    "batch_transfer_dataset",
    "fit_bagged",
    "gru_classifier",
    "laplace_approximation",
    "logistic_log_posterior",
    "mc_predictive_log_probs",
    "mlp",
    "online_transfer_dataset",
    "sample_posterior",
]
