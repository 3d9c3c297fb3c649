"""`SimilarityPreserving`: NumPy references, invariances, bounds and bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.losses import SimilarityPreserving


def numpy_gram(a, kernel, bandwidth=None):
    a = np.asarray(a, np.float64)
    if kernel == "dot":
        g = a @ a.T
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        return g / np.maximum(norms, 1e-12)
    if kernel == "cosine":
        unit = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T
    d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    if bandwidth is None:
        off = d2[~np.eye(len(a), dtype=bool)]
        variance = np.sort(off)[(len(off) - 1) // 2]  # lower median, as the loss
    else:
        variance = bandwidth**2
    return np.exp(-d2 / (2 * variance))


def numpy_sp(teacher, student, kernel="dot", bandwidth=None):
    b = len(teacher)
    diff = numpy_gram(teacher, kernel, bandwidth) - numpy_gram(student, kernel, bandwidth)
    return float((diff**2).sum() / b**2)


def features(seed=0, b=9, dt=7, ds=4):
    rng = np.random.default_rng(seed)
    teacher = np.maximum(rng.standard_normal((b, dt)), 0.0).astype("float32")  # ReLU-like
    student = rng.dirichlet(np.ones(ds), size=b).astype("float32")  # simplex, like topics
    return teacher, student


@pytest.mark.parametrize(
    "kernel,bandwidth", [("dot", None), ("cosine", None), ("rbf", None), ("rbf", 0.7)]
)
def test_similarity_preserving_matches_numpy(kernel, bandwidth):
    teacher, student = features()
    loss = SimilarityPreserving(kernel=kernel, bandwidth=bandwidth)
    value = float(loss(teacher, student))
    np.testing.assert_allclose(value, numpy_sp(teacher, student, kernel, bandwidth), rtol=1e-5)
    assert value > 0


def test_dot_kernel_normalises_rows_of_the_gram_matrix_not_of_the_features():
    # Tung & Mori: G = A A^T, then G[i, :] / ||G[i, :]||; a feature-row normalisation differs.
    teacher, student = features(1)
    value = float(SimilarityPreserving()(teacher, student))
    cosine = float(SimilarityPreserving("cosine")(teacher, student))
    assert abs(value - cosine) > 1e-4
    np.testing.assert_allclose(value, numpy_sp(teacher, student, "dot"), rtol=1e-5)


@pytest.mark.parametrize("kernel", ["dot", "cosine", "rbf"])
def test_loss_is_invariant_to_feature_scale_where_the_kernel_is(kernel):
    teacher, student = features(2)
    loss = SimilarityPreserving(kernel)
    base = float(loss(teacher, student))
    for scale_t, scale_s in [(1e-3, 1.0), (1.0, 50.0), (1e3, 1e-2)]:
        scaled = float(loss(teacher * scale_t, student * scale_s))
        np.testing.assert_allclose(scaled, base, rtol=2e-4, atol=1e-7)


def test_rbf_with_a_fixed_bandwidth_depends_on_scale():
    teacher, student = features(3)
    loss = SimilarityPreserving("rbf", bandwidth=1.0)
    assert abs(float(loss(teacher, student)) - float(loss(teacher * 10, student))) > 1e-3


@pytest.mark.parametrize("kernel", ["dot", "cosine", "rbf"])
def test_loss_ignores_the_order_of_feature_columns_and_is_zero_for_the_same_features(kernel):
    teacher, student = features(4)
    loss = SimilarityPreserving(kernel)
    permuted = student[:, ::-1]
    np.testing.assert_allclose(
        float(loss(teacher, permuted)), float(loss(teacher, student)), rtol=1e-5
    )
    assert float(loss(student, 3.0 * permuted)) < 1e-10


def test_dot_loss_lies_between_zero_and_four_over_b():
    rng = np.random.default_rng(5)
    for b in (2, 8, 32):
        teacher = rng.standard_normal((b, 6)).astype("float32")
        value = float(SimilarityPreserving()(teacher, -teacher[:, :3] + 0.1))
        assert 0.0 <= value <= 4.0 / b + 1e-6


def test_zero_feature_rows_give_finite_values_and_gradients():
    teacher, student = features(6)
    teacher[0] = 0.0
    student = tf.Variable(np.vstack([np.zeros((1, 4)), student[1:]]).astype("float32"))
    for kernel in ("dot", "cosine", "rbf"):
        with tf.GradientTape() as tape:
            value = SimilarityPreserving(kernel)(teacher, student)
        gradient = tape.gradient(value, student)
        assert np.isfinite(float(value)) and np.all(np.isfinite(gradient.numpy())), kernel


def test_single_example_batch_gives_zero():
    teacher, student = features(7, b=1)
    for kernel in ("dot", "cosine", "rbf"):
        assert float(SimilarityPreserving(kernel)(teacher, student)) == pytest.approx(0.0)


def test_value_is_divided_by_the_replica_count_inside_a_replica(mirrored_strategy):
    # Keras skips the division for a scalar `call` output; the loss returns [1] to get it.
    teacher, student = features(8, b=4)
    loss = SimilarityPreserving()
    expected = numpy_sp(teacher, student)
    values = mirrored_strategy.run(lambda: loss(tf.constant(teacher), tf.constant(student)))
    for value in mirrored_strategy.experimental_local_results(values):
        np.testing.assert_allclose(float(value), expected / 2, rtol=1e-5)


def test_config_round_trip():
    loss = SimilarityPreserving("rbf", bandwidth=2.0, name="sp")
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, SimilarityPreserving)
    assert (clone.kernel, clone.bandwidth, clone.name) == ("rbf", 2.0, "sp")


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"kernel": "euclid"}, "kernel"),
        ({"kernel": "rbf", "bandwidth": 0.0}, "bandwidth"),
        ({"kernel": "rbf", "bandwidth": float("nan")}, "bandwidth"),
        ({"kernel": "dot", "bandwidth": 1.0}, "bandwidth"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SimilarityPreserving(**kwargs)


def test_bad_calls_are_named():
    teacher, student = features(9)
    loss = SimilarityPreserving()
    with pytest.raises(ValueError, match="sample_weight"):
        loss(teacher, student, sample_weight=np.ones(len(student)))
    with pytest.raises(ValueError, match="rows"):
        loss(teacher[:-1], student)
    with pytest.raises(ValueError, match=r"\[batch, features\]"):
        loss(teacher[..., None], student)
