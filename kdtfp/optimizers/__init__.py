"""Langevin samplers as Keras 3 optimizers: each `fit` step draws one posterior sample."""

from kdtfp.optimizers.sgld import PSGLD, SGLD

__all__ = ["PSGLD", "SGLD"]
