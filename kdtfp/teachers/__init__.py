"""Teacher builders: MLPs and bagged ensembles."""

from kdtfp.teachers.ensemble import BaggedEnsemble, fit_bagged
from kdtfp.teachers.mlp import mlp

__all__ = ["BaggedEnsemble", "fit_bagged", "mlp"]
