"""Keras 3 layers over TFP (Bayesian layers, distribution heads, latents with explicit noise)."""

from kdtfp.layers.latent import BernoulliLatent, BernoulliRoot, GaussianLatent, GaussianRoot
from kdtfp.layers.mean_field import MeanFieldDense

__all__ = ["BernoulliLatent", "BernoulliRoot", "GaussianLatent", "GaussianRoot", "MeanFieldDense"]
