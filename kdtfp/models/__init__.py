"""Students (and model teachers) as `keras.Model`s."""

from kdtfp.models.arhmm import AutoregressiveHMM
from kdtfp.models.conditional_vae import ConditionalVAE, export_conditional_vae
from kdtfp.models.gaussian_mixture import GaussianMixtureDensity, NegativeLogLikelihood
from kdtfp.models.generative import Node, SharedNoiseModel, export_generative
from kdtfp.models.helmholtz import HelmholtzMachine
from kdtfp.models.hierarchical_vae import HierarchicalVAE, export_hvae
from kdtfp.models.mixture_predictive import MixturePredictive
from kdtfp.models.nade import NADE, NADEConditionals, export_nade
from kdtfp.models.parallel_chains import parallel_chains, repeat_targets, split_chain_samples
from kdtfp.models.posterior_ensemble import PosteriorEnsemble
from kdtfp.models.rbm import RBM, ContrastiveDivergence
from kdtfp.models.topic_model import TopicModel, export_topic_model
from kdtfp.models.vrnn import VRNN, export_vrnn

__all__ = [
    "AutoregressiveHMM",
    "ConditionalVAE",
    "export_conditional_vae",
    "ContrastiveDivergence",
    "GaussianMixtureDensity",
    "HelmholtzMachine",
    "HierarchicalVAE",
    "export_hvae",
    "MixturePredictive",
    "NADE",
    "NADEConditionals",
    "NegativeLogLikelihood",
    "Node",
    "SharedNoiseModel",
    "export_generative",
    "PosteriorEnsemble",
    "RBM",
    "TopicModel",
    "VRNN",
    "export_vrnn",
    "export_nade",
    "export_topic_model",
    "parallel_chains",
    "repeat_targets",
    "split_chain_samples",
]
