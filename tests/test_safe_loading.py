"""Every class kdtfp registers with Keras loads with `safe_mode=True`; no `Lambda` layer anywhere.

The registry is walked after importing every kdtfp module, and each registered class must have
an entry in `FACTORIES` (a small example of it): a new class without one fails
`test_every_registered_class_loads_in_safe_mode[NewClass]`, so add its factory here.

* models: saved to a `.keras` file and loaded with `keras.saving.load_model(safe_mode=True)`;
  same class, same config, same weights, and no `keras.layers.Lambda` among their layers;
* layers, losses, metrics, optimizers, callbacks, objectives:
  `serialize_keras_object` -> `deserialize_keras_object(safe_mode=True)`; same class and config.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import pkgutil
import re

import keras
import numpy as np
import pytest

import kdtfp

PACKAGE = "kdtfp"
SOURCE = pathlib.Path(kdtfp.__file__).parent


def _import_all():
    for module in pkgutil.walk_packages(kdtfp.__path__, f"{PACKAGE}."):
        importlib.import_module(module.name)


_import_all()
CLASSES = {
    key.split(">", 1)[1]: value
    for key, value in keras.saving.get_custom_objects().items()
    if key.startswith(f"{PACKAGE}>") and inspect.isclass(value)
}


# ---------------------------------------------------------------------- small examples


def _mlp(input_dim=4, classes=3, name="mlp", seed=0):
    from kdtfp.teachers.mlp import mlp

    return mlp(input_dim, (5,), classes, name=name, seed=seed)


def _called(model, x):
    model(x)
    return model


def _random(*shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype("float32")


def _counts(n=4, vocab=10):
    return np.random.default_rng(0).integers(0, 5, size=(n, vocab)).astype("float32")


def _topic_model(cls=None):
    cls = cls or CLASSES["TopicModel"]
    return _called(cls(3, 10, corpus_size=20, encoder_units=(4,), seed=0), _counts())


def _posterior_ensemble(cls):
    student = _mlp()
    rng = np.random.default_rng(0)
    samples = [
        [
            (w.numpy() + 0.1 * rng.standard_normal(w.shape)).astype("float32")
            for w in student.trainable_weights
        ]
        for _ in range(3)
    ]
    return _called(cls(student, samples, level=0.9), _random(2, 4))


def _mixture_predictive(cls=None):
    model = (cls or CLASSES["MixturePredictive"])(3, seed=0)
    model.build((None, 2))
    return model


def _shared_noise_pair():
    helmholtz = CLASSES["HelmholtzMachine"]
    keras.utils.set_random_seed(0)
    teacher = helmholtz(hidden_units=6, latent_units=2, layers=2, seed=0, name="teacher")
    student = helmholtz(hidden_units=4, latent_units=2, layers=2, seed=1, name="student")
    return student, teacher


def _conditional_vae(name):
    return CLASSES["ConditionalVAE"](latent_size=2, hidden_units=6, data_size=8, seed=0, name=name)


FACTORIES = {
    # models
    "AutoregressiveHMM": lambda cls: _called(
        cls(2, observation_dim=2, num_sequences=4, seed=0), _random(2, 5, 2)
    ),
    "BaggedEnsemble": lambda cls: _called(
        cls([_mlp(name="m0", seed=1), _mlp(name="m1", seed=2)]), _random(2, 4)
    ),
    "ConditionalVAE": lambda cls: _conditional_vae("cvae"),
    "ConstrainedVIDistiller": lambda cls: _called(cls(_topic_model(), multiplier=2.0), _counts()),
    "ContinualVAEDistiller": lambda cls: cls(_conditional_vae("new"), _conditional_vae("old")),
    "Distiller": lambda cls: cls(
        _mlp(name="student"),
        _mlp(name="teacher", seed=1),
        objectives=[(CLASSES["SoftTargetKL"](temperature=2.0), 1.0)],
        student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ),
    "GaussianMixtureDensity": lambda cls: cls(3, dim=2, seed=0),
    "HelmholtzMachine": lambda cls: _shared_noise_pair()[1],
    "HierarchicalVAE": lambda cls: cls(latent_sizes=(2, 3), data_size=8, hidden_units=6, seed=0),
    "InputScores": lambda cls: cls(_mixture_predictive()),
    "MixturePredictive": _mixture_predictive,
    "NADE": lambda cls: cls(6, 4),
    "PosteriorEnsemble": _posterior_ensemble,
    "RBM": lambda cls: cls(6, 3, cd_steps=2, persistent=True, num_chains=5, seed=0),
    "SharedNoiseDistiller": lambda cls: cls(*_shared_noise_pair(), latent_weight=0.5),
    "TopicModel": _topic_model,
    "VRNN": lambda cls: cls(hidden_units=6, latent_size=2, length=5, seed=0),
    # layers
    "BernoulliLatent": lambda cls: cls(3, hidden_units=(4,), seed=0),
    "BernoulliRoot": lambda cls: cls(3, seed=0),
    "GaussianLatent": lambda cls: cls(3, hidden_units=(4,), scale=0.5, seed=0),
    "GaussianRoot": lambda cls: cls(3, learn=True, seed=0),
    "MeanFieldDense": lambda cls: cls(3, kl_weight=0.1, prior_stddev=0.5, seed=0),
    "NADEConditionals": lambda cls: cls(4),
    # losses
    "AverageScoreMatching": lambda cls: cls(score_weight=0.3, kl_weight=1.0),
    "BernoulliKL": lambda cls: cls(),
    "BernoulliNegativeLogLikelihood": lambda cls: cls(),
    "ContrastiveDivergence": lambda cls: cls(),
    "DerivativeMatching": lambda cls: cls(mode="projection", num_projections=2),
    "GaussianKL": lambda cls: cls(),
    "GaussianW2": lambda cls: cls(),
    "LogDensitySquaredError": lambda cls: cls(),
    "NegativeLogLikelihood": lambda cls: cls(),
    "PerExampleMean": lambda cls: cls(),
    "SimilarityPreserving": lambda cls: cls(kernel="dot"),
    "SoftTargetKL": lambda cls: cls(temperature=3.0),
    "TeacherDirichletPosterior": lambda cls: cls(lam=0.5, temperature=2.0),
    # metrics
    "BrierScore": lambda cls: cls(),
    "CredibleSetCoverage": lambda cls: cls(level=0.9),
    "DevianceAUROC": lambda cls: cls(num_thresholds=50),
    "ExpectedCalibrationError": lambda cls: cls(num_bins=10),
    # optimizers
    "PSGLD": lambda cls: cls(1e-3, data_size=100, rho=0.9),
    "SGLD": lambda cls: cls(1e-3, data_size=100, seed=3),
    # objectives and callbacks
    "DistillationObjective": lambda cls: cls(CLASSES["SoftTargetKL"](2.0), weight=0.5),
    "FeatureDistillation": lambda cls: cls("t_hidden", "s_hidden", weight=0.1, projection=True),
    "NaNGuard": lambda cls: cls("last.weights.h5", check_every=2),
}


# ---------------------------------------------------------------------- checks


def _normalised(config):
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _all_layers(model):
    return list(model._flatten_layers(include_self=True, recursive=True))


def _assert_no_lambda(model):
    lambdas = [layer.path for layer in _all_layers(model) if isinstance(layer, keras.layers.Lambda)]
    assert not lambdas, f"Lambda layers in {type(model).__name__}: {lambdas}"


def test_the_registry_holds_the_core_classes():
    # Guards the walk itself: an import failure or a renamed package would make it vacuous.
    assert {"Distiller", "SoftTargetKL", "SGLD", "TopicModel", "NaNGuard"} <= set(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_registered_class_loads_in_safe_mode(name, tmp_path):
    cls = CLASSES[name]
    if name not in FACTORIES:
        pytest.fail(
            f"kdtfp>{name} ({cls.__module__}) has no entry in tests/test_safe_loading.py "
            "FACTORIES: add a small example of it there."
        )
    keras.utils.set_random_seed(0)
    obj = FACTORIES[name](cls)
    assert type(obj) is cls, f"the factory of {name} made a {type(obj).__name__}"
    if isinstance(obj, keras.Model):
        path = tmp_path / f"{name}.keras"
        obj.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        assert type(loaded) is cls
        assert _normalised(loaded.get_config()) == _normalised(obj.get_config())
        assert obj.weights, f"{name}: the example has no weights (build it)"
        assert len(loaded.weights) == len(obj.weights)
        for before, after in zip(obj.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(after.numpy(), before.numpy(), err_msg=before.path)
        _assert_no_lambda(obj)
        _assert_no_lambda(loaded)
    else:
        config = keras.saving.serialize_keras_object(obj)
        assert config["registered_name"] == f"{PACKAGE}>{name}"
        loaded = keras.saving.deserialize_keras_object(
            json.loads(json.dumps(config)), safe_mode=True
        )
        assert type(loaded) is cls
        assert _normalised(loaded.get_config()) == _normalised(obj.get_config())


def test_every_public_keras_class_of_kdtfp_is_registered():
    kinds = (
        keras.layers.Layer,
        keras.losses.Loss,
        keras.metrics.Metric,
        keras.optimizers.Optimizer,
        keras.regularizers.Regularizer,
    )
    missing = []
    for info in pkgutil.walk_packages(kdtfp.__path__, f"{PACKAGE}."):
        if info.name.startswith(f"{PACKAGE}.bench"):  # benchmark baselines are never saved
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and value.__module__ == module.__name__
                and issubclass(value, kinds)
                and not name.startswith("_")
                and keras.saving.get_registered_name(value) != f"{PACKAGE}>{name}"
            ):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"not registered with package='kdtfp': {missing}"


def test_no_lambda_layer_in_the_source():
    pattern = re.compile(r"\bLambda\s*\(|layers\.Lambda\b")
    hits = [
        f"{path.relative_to(SOURCE.parent)}:{number}"
        for path in sorted(SOURCE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, f"keras.layers.Lambda used at {hits}"
