"""Keras 3 layers over TensorFlow Probability (Bayesian layers, distribution heads, latents)."""

from kdtfp.layers.mean_field import MeanFieldDense

__all__ = ["MeanFieldDense"]
