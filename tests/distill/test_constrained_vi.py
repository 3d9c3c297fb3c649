"""`ConstrainedVIDistiller`: loss against a hand computation, replicas, saving, XLA, bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kdtfp.distill import ConstrainedVIDistiller
from kdtfp.losses import SimilarityPreserving

IN, TOPICS, TEACHER_DIM, BATCH = 5, 3, 6, 16


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class ToyStudent(keras.Model):
    """A deterministic stand-in for a VI student: softmax features, a reconstruction loss
    (per example, mean over the batch) and a global term, both through `add_loss`."""

    def __init__(self, units=TOPICS, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.encoder = keras.layers.Dense(
            units, kernel_initializer=keras.initializers.GlorotUniform(seed=1)
        )
        self.decoder = keras.layers.Dense(
            IN, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
        )

    def call(self, x, training=None):
        h = ops.softmax(self.encoder(x))
        self.add_loss(ops.mean(ops.sum(ops.square(self.decoder(h) - x), axis=-1)))
        self.add_loss(0.01 * ops.sum(ops.square(self.decoder.kernel)))
        return h

    def local_and_global(self, x):
        """NumPy: features, mean reconstruction loss, global term."""
        h = np.asarray(ops.softmax(self.encoder(x)))
        reconstruction = np.mean(np.sum((np.asarray(self.decoder(h)) - x) ** 2, axis=-1))
        return h, reconstruction, 0.01 * float(np.sum(np.asarray(self.decoder.kernel) ** 2))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class BlockSimilarity(SimilarityPreserving):
    """Single-device twin of 2 replicas: the mean of the loss over the two halves of a batch."""

    def call(self, y_true, y_pred):
        half = ops.shape(y_pred)[0] // 2
        first = super().call(y_true[:half], y_pred[:half])
        second = super().call(y_true[half:], y_pred[half:])
        return 0.5 * (first + second)


def numpy_sp(teacher, student):
    """Tung & Mori's SP loss with the dot kernel, in float64."""

    def gram(a):
        g = np.asarray(a, np.float64) @ np.asarray(a, np.float64).T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(((gram(teacher) - gram(student)) ** 2).sum() / len(teacher) ** 2)


def data(n=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN)).astype("float32")
    teacher = np.maximum(rng.standard_normal((n, TEACHER_DIM)), 0).astype("float32")
    return x, teacher


def test_loss_is_elbo_plus_multiplier_times_similarity_loss():
    x, teacher = data()
    distiller = ConstrainedVIDistiller(ToyStudent(), multiplier=3.5)
    distiller.compile(optimizer="sgd")
    result = distiller.evaluate(x, teacher, batch_size=BATCH, verbose=0, return_dict=True)
    features, reconstruction, global_term = distiller.student.local_and_global(x)
    constraint = numpy_sp(teacher, features)
    elbo = reconstruction + global_term
    np.testing.assert_allclose(result["constraint"], constraint, rtol=1e-5)
    np.testing.assert_allclose(result["elbo_loss"], elbo, rtol=1e-5)
    np.testing.assert_allclose(result["loss"], elbo + 3.5 * constraint, rtol=1e-5)
    assert result["multiplier"] == pytest.approx(3.5)
    np.testing.assert_allclose(float(distiller.last_constraint.numpy()), constraint, rtol=1e-5)
    np.testing.assert_allclose(distiller.predict(x, verbose=0), features, rtol=1e-6)


def test_gradient_pulls_features_toward_the_teacher_similarity():
    x, teacher = data(64, seed=1)
    results = {}
    for gamma in (0.0, 1000.0):
        keras.utils.set_random_seed(0)
        distiller = ConstrainedVIDistiller(ToyStudent(), multiplier=gamma)
        distiller.compile(optimizer=keras.optimizers.Adam(0.05))
        distiller.fit(
            np.tile(x, (30, 1)), np.tile(teacher, (30, 1)), batch_size=64, shuffle=False, verbose=0
        )
        results[gamma] = distiller.evaluate(x, teacher, batch_size=64, verbose=0, return_dict=True)[
            "constraint"
        ]
    assert results[1000.0] < 0.8 * results[0.0]


def one_step(strategy, constraint):
    keras.utils.set_random_seed(0)
    x, teacher = data()
    with strategy.scope():
        distiller = ConstrainedVIDistiller(ToyStudent(), constraint=constraint, multiplier=5.0)
        distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    history = distiller.fit(
        x, teacher, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
    ).history
    weights = [np.array(w) for w in distiller.student.get_weights()]
    return weights, history, float(distiller.last_constraint.numpy())


def test_one_step_on_two_replicas_equals_the_block_mean_on_one_device(mirrored_strategy):
    # Each replica compares pairs within its half of the batch, so 2 replicas minimise the
    # mean of the two half-batch similarity losses: BlockSimilarity on one device.
    single, single_history, single_last = one_step(tf.distribute.get_strategy(), BlockSimilarity())
    mirrored, mirrored_history, mirrored_last = one_step(mirrored_strategy, SimilarityPreserving())
    for a, b in zip(mirrored, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert (
        set(mirrored_history)
        == set(single_history)
        >= {
            "loss",
            "elbo_loss",
            "constraint",
            "multiplier",
        }
    )
    for key, values in single_history.items():
        np.testing.assert_allclose(mirrored_history[key], values, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(mirrored_last, single_last, rtol=1e-5)
    # The full-batch loss on one device is a different objective (pairs across halves).
    full, _, _ = one_step(tf.distribute.get_strategy(), SimilarityPreserving())
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(full, single, strict=True)) > 1e-4


def test_keras_file_round_trip_keeps_multiplier_weights_and_settings(tmp_path):
    x, teacher = data()
    distiller = ConstrainedVIDistiller(
        ToyStudent(),
        constraint=SimilarityPreserving("rbf"),
        multiplier=2.0,
        mode="lagrangian",
        epsilon=0.01,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(0.01))
    with pytest.warns(UserWarning, match="DualAscent"):
        distiller.fit(x, teacher, batch_size=8, epochs=1, verbose=0)
    distiller.set_multiplier(7.25)
    path = tmp_path / "cvi.keras"
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ConstrainedVIDistiller)
    assert loaded.multiplier_value() == pytest.approx(7.25)
    assert (loaded.mode, loaded.epsilon, loaded.constraint.kernel) == ("lagrangian", 0.01, "rbf")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), distiller.predict(x, verbose=0))
    result = loaded.evaluate(x, teacher, batch_size=BATCH, verbose=0, return_dict=True)
    assert result["multiplier"] == pytest.approx(7.25)


def test_feature_fn_method_name_is_used_and_saved(tmp_path):
    x, teacher = data()
    student = ToyStudent()
    student.doubled = lambda inputs, training=None: 2.0 * student(inputs, training=training)
    distiller = ConstrainedVIDistiller(student, feature_fn="doubled")
    np.testing.assert_allclose(np.asarray(distiller(x)), 2.0 * np.asarray(student(x)), rtol=1e-6)
    assert distiller.get_config()["feature_fn"] == "doubled"


def test_jit_compile_true_trains_on_cpu():
    x, teacher = data(32)
    distiller = ConstrainedVIDistiller(ToyStudent(), multiplier=10.0)
    distiller.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=True)
    history = distiller.fit(x, teacher, batch_size=16, epochs=3, verbose=0).history
    assert all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < history["loss"][0]


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"epsilon": -0.1}, "epsilon"),
        ({"multiplier": -1.0}, "multiplier"),
        ({"multiplier": float("inf")}, "multiplier"),
        ({"mode": "dual"}, "mode"),
        ({"constraint": "mse"}, "constraint"),
        ({"feature_fn": "no_such_method"}, "feature_fn"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ConstrainedVIDistiller(ToyStudent(), **kwargs)


def test_bad_fit_inputs_fail_before_any_step():
    x, teacher = data()
    distiller = ConstrainedVIDistiller(ToyStudent())
    distiller.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="rows"):
        distiller.fit(x, teacher[:-1], verbose=0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x"):
        distiller.fit(bad, teacher, verbose=0)
    with pytest.raises(ValueError, match="teacher"):
        distiller.fit(x, verbose=0)
