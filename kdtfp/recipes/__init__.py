"""Recipes: one module per reproduction, data -> teacher -> student -> metrics -> export.

Each module defines `NAME`, `DESCRIPTION` and `run(config: RunConfig) -> Result`.
"""

from __future__ import annotations

import importlib

from kdtfp.recipes.base import Result, RunConfig, write_result

#: recipe name -> (module path, one-line description). Recipes are imported on demand.
RECIPES = {
    "ensemble-compression": (
        "kdtfp.recipes.ensemble_compression",
        "bagged MLP ensemble -> 64-16-10 MLP with/without derivative matching, vs transfer-set size (digits)",
    ),
    "kd-lda": (
        "kdtfp.recipes.kd_lda",
        "constrained-VI distillation of an MLP into a topic model (LDA vs KD-LDA penalty and dual ascent), digits as word counts",
    ),
    "kd-arhmm": (
        "kdtfp.recipes.kd_arhmm",
        "constrained-VI KD of a GRU into a 3-state AR-HMM: outcome AUROC of state features vs plain AR-HMM (synthetic switching AR)",
    ),
    "compact-predictive": (
        "kdtfp.recipes.compact_predictive",
        "MCMC posterior predictive (HMC, 10^4 samples) -> mixture of 10 logistic regressors, batch vs online distillation (2-D toy, breast_cancer)",
    ),
    "rbm-nade": (
        "kdtfp.recipes.rbm_nade",
        "RBM 64-16 -> NADE 64-50 on binarised digits; log Z by NADE importance/bridge sampling vs block-Gibbs AIS at equal compute, against exact enumeration",
    ),
    "bkd": (
        "kdtfp.recipes.bkd",
        "Bayesian KD: SGLD posterior of a student under a teacher-informed Dirichlet prior, vs KD, MC dropout, VI",
    ),
    "helmholtz": (
        "kdtfp.recipes.helmholtz",
        "shared-noise distillation of a width-8 Helmholtz machine into width 2 on Old Faithful, exact likelihoods and KL by enumerating 2^8 latent states",
    ),
    "hvae-datafree": (
        "kdtfp.recipes.hvae_datafree",
        "data-free shared-noise distillation of a 3-layer hierarchical VAE (width 128 -> 16) on binarised digits, vs ELBO on data, on teacher samples, local distillation",
    ),
    "vrnn": (
        "kdtfp.recipes.vrnn",
        "VRNN teacher (GRU 64) -> student (GRU 16) with shared z-noise and teacher-forced strokes, vs local distillation and training on data (synthetic pen strokes)",
    ),
    "continual-vae": (
        "kdtfp.recipes.continual_vae",
        "conditional VAE learns digits 5-9 after 0-4 while distilling its previous copy with shared noise; vs fine-tuning and generative replay",
    ),
}


def get(name):
    """The recipe module called `name`."""
    if name not in RECIPES:
        raise ValueError(
            f"`RECIPE`: unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))} (or 'all')."
        )
    return importlib.import_module(RECIPES[name][0])


__all__ = ["RECIPES", "Result", "RunConfig", "get", "write_result"]
