"""kdtfp: knowledge distillation from teacher networks into probabilistic students.

Built on TensorFlow, Keras 3 and TensorFlow Probability. The public pieces:

* `kdtfp.Distiller` — a `keras.Model` that trains a student against a frozen teacher;
* `kdtfp.losses` — distillation objectives as `keras.losses.Loss` objects;
* `kdtfp.optimizers` — SGLD and preconditioned SGLD as Keras 3 optimizers;
* `kdtfp.layers` — Keras 3 layers over TFP (mean-field variational dense layers);
* `kdtfp.models` — students (a posterior ensemble of weight samples);
* `kdtfp.callbacks` — loss-weight and temperature schedules, posterior sample collection;
* `kdtfp.predictive` — posterior predictive summaries from weight or forward samples;
* `kdtfp.teachers` — teacher builders (MLPs, bagged ensembles);
* `kdtfp.datasets` — offline data and transfer-set samplers;
* `kdtfp.metrics` — accuracy, log-likelihood, agreement, KL in float64;
* `kdtfp.estimators` — log-partition estimators (importance, bridge, AIS, exact);
* `kdtfp.distribute.make_strategy` — strategies for `--strategy/--devices/--workers`;
* `kdtfp.export.export_student` — a SavedModel of the student alone.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kdtfp._stack import check_stack  # noqa: E402

check_stack()

from kdtfp import (  # noqa: E402
    callbacks,
    datasets,
    distill,
    distribute,
    estimators,
    export,
    layers,
    losses,
    metrics,
    models,
    optimizers,
    predictive,
    teachers,
)
from kdtfp.distill import DistillationObjective, Distiller, FeatureDistillation  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DistillationObjective",
    "Distiller",
    "FeatureDistillation",
    "callbacks",
    "datasets",
    "distill",
    "distribute",
    "estimators",
    "export",
    "layers",
    "losses",
    "metrics",
    "models",
    "optimizers",
    "predictive",
    "teachers",
]
