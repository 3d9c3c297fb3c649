"""`kdtfp.losses.DerivativeMatching`: Jacobian rows, loss value and the projected estimator."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.losses import DerivativeMatching

D, I, B = 5, 4, 3  # noqa: E741 -- input size, classes, batch (the thesis's notation)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def linear_softmax(seed, input_dim=D, classes=I):
    """Weights of `log_softmax(x W + b)`, float32 for TF and float64 for the NumPy reference."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((input_dim, classes)).astype("float32")
    b = rng.standard_normal(classes).astype("float32")
    return w, b


def tf_log_probs(w, b):
    def log_prob_fn(x):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        return tf.nn.log_softmax(flat @ w + b, axis=-1)

    return log_prob_fn


def closed_form_jacobian(x, w, b):
    """d log_softmax_i / dx = W[:, i] - sum_k p_k W[:, k]; returns [batch, classes, inputs]."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    flat = x.reshape(len(x), -1)
    p = softmax(flat @ w + b)  # [B, I]
    expected_column = p @ w.T  # [B, D] = sum_k p_k W[:, k]
    return w.T[None, :, :] - expected_column[:, None, :]


def inputs(seed, shape=(B, D)):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def test_exact_rows_equal_closed_form_jacobian_of_linear_softmax():
    w, b = linear_softmax(0)
    x = inputs(1)
    rows = DerivativeMatching("exact").input_gradient_rows(tf_log_probs(w, b), x)
    assert tuple(rows.shape) == (B, I, D)
    np.testing.assert_allclose(rows.numpy(), closed_form_jacobian(x, w, b), rtol=1e-5, atol=1e-5)


def test_exact_rows_equal_numpy_finite_differences_of_a_tanh_network():
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((D, 6)), rng.standard_normal((6, I))

    def numpy_log_probs(x):
        z = np.tanh(x @ w1) @ w2
        return (
            z
            - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - z.max(-1, keepdims=True)
        )

    def log_prob_fn(x):
        return tf.nn.log_softmax(tf.tanh(x @ w1.astype("float32")) @ w2.astype("float32"), axis=-1)

    x = inputs(3).astype(np.float64)
    eps = 1e-5
    numeric = np.zeros((B, I, D))
    for d in range(D):
        step = np.zeros(D)
        step[d] = eps
        numeric[:, :, d] = (numpy_log_probs(x + step) - numpy_log_probs(x - step)) / (2 * eps)
    rows = DerivativeMatching("exact").input_gradient_rows(log_prob_fn, x.astype("float32"))
    np.testing.assert_allclose(rows.numpy(), numeric, rtol=1e-4, atol=1e-4)


def exact_loss(x, student, teacher):
    """1 / (2 I D) * sum_i ||J_f,i - J_g,i||^2, averaged over the batch, in NumPy."""
    difference = closed_form_jacobian(x, *student) - closed_form_jacobian(x, *teacher)
    return np.mean(np.sum(difference**2, axis=(1, 2)) / (2 * I * D))


def test_exact_loss_equals_half_mean_squared_jacobian_difference():
    student, teacher = linear_softmax(4), linear_softmax(5)
    x = inputs(6)
    loss = DerivativeMatching("exact")
    student_rows = loss.input_gradient_rows(tf_log_probs(*student), x)
    teacher_rows = loss.input_gradient_rows(tf_log_probs(*teacher), x)
    np.testing.assert_allclose(
        float(loss(teacher_rows, student_rows)), exact_loss(x, student, teacher), rtol=1e-5
    )


def test_exact_loss_is_zero_for_identical_models():
    model = linear_softmax(7)
    x = inputs(8)
    loss = DerivativeMatching("exact")
    rows = loss.input_gradient_rows(tf_log_probs(*model), x)
    assert float(loss(rows, rows)) == 0.0


def test_directions_are_scaled_rademacher_vectors_and_deterministic_in_the_seed():
    loss = DerivativeMatching("projection", num_projections=500)
    seed = tf.constant([1, 2], dtype=tf.int32)
    v = loss.directions(B, I, seed).numpy()
    assert v.shape == (B, 500, I)
    np.testing.assert_allclose(np.abs(v), 1.0 / np.sqrt(I), rtol=1e-6)
    np.testing.assert_array_equal(v, loss.directions(B, I, seed).numpy())
    assert not np.array_equal(v, loss.directions(B, I, tf.constant([1, 3], dtype=tf.int32)).numpy())
    # E[v v^T] = identity / I.
    second_moment = np.einsum("bpi,bpj->ij", v, v) / (B * 500)
    np.testing.assert_allclose(second_moment, np.eye(I) / I, atol=0.03)


@pytest.mark.parametrize("num_projections", [1, 3])
def test_projection_rows_equal_directions_times_exact_jacobian(num_projections):
    w, b = linear_softmax(9)
    x = inputs(10)
    loss = DerivativeMatching("projection", num_projections=num_projections)
    v = loss.directions(B, I, tf.constant([5, 6], dtype=tf.int32))
    rows = loss.input_gradient_rows(tf_log_probs(w, b), x, v)
    assert tuple(rows.shape) == (B, num_projections, D)
    expected = np.einsum("bpi,bid->bpd", v.numpy(), closed_form_jacobian(x, w, b))
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_projected_estimate_mean_equals_exact_loss():
    # E_v ||v^T (J_f - J_g)||^2 = ||J_f - J_g||_F^2 / I: the projected loss is unbiased.
    student, teacher = linear_softmax(11), linear_softmax(12)
    x = inputs(13)
    projections = 2000
    loss = DerivativeMatching("projection", num_projections=projections)
    v = loss.directions(B, I, tf.constant([7, 8], dtype=tf.int32))
    student_rows = loss.input_gradient_rows(tf_log_probs(*student), x, v).numpy()
    teacher_rows = loss.input_gradient_rows(tf_log_probs(*teacher), x, v).numpy()

    estimate = float(loss(teacher_rows, student_rows))
    exact = exact_loss(x, student, teacher)
    # One single-direction estimate per direction index p (averaged over the batch): the loss is
    # their mean, so its standard error is their standard deviation / sqrt(P).
    per_direction = 0.5 * np.mean((student_rows - teacher_rows) ** 2, axis=2).mean(axis=0)
    np.testing.assert_allclose(per_direction.mean(), estimate, rtol=1e-4)
    standard_error = per_direction.std(ddof=1) / np.sqrt(projections)
    assert abs(estimate - exact) < 4.0 * standard_error, (estimate, exact, standard_error)
    # And the tolerance is meaningful: the single-direction estimates do vary.
    assert per_direction.std() > 0.05 * exact


def test_projected_estimate_averaged_over_seeds_equals_exact_loss_with_one_projection():
    student, teacher = linear_softmax(14), linear_softmax(15)
    x = inputs(16)
    loss = DerivativeMatching("projection", num_projections=1)

    @tf.function
    def estimate(seed):
        v = loss.directions(B, I, seed)
        student_rows = loss.input_gradient_rows(tf_log_probs(*student), x, v)
        teacher_rows = loss.input_gradient_rows(tf_log_probs(*teacher), x, v)
        return loss(teacher_rows, student_rows)

    estimates = np.array([float(estimate(tf.constant([seed, 0], tf.int32))) for seed in range(400)])
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - exact_loss(x, student, teacher)) < 4.0 * standard_error


def test_directions_are_sliced_per_replica_from_the_global_draw(mirrored_strategy):
    # On N replicas each replica takes its slice of the global batch's directions, so a 2-replica
    # step uses the same direction per example as a 1-device step on the same global batch.
    loss = DerivativeMatching("projection", num_projections=3)
    seed = tf.constant([3, 4], dtype=tf.int32)
    global_directions = loss.directions(4, I, seed).numpy()

    @tf.function
    def per_replica():
        return mirrored_strategy.run(lambda: loss.directions(2, I, seed))

    local = mirrored_strategy.experimental_local_results(per_replica())
    np.testing.assert_array_equal(np.concatenate([t.numpy() for t in local]), global_directions)


def test_rank_three_inputs_give_flattened_rows():
    w, b = linear_softmax(17, input_dim=16)
    x = inputs(18, shape=(B, 4, 4))
    exact = DerivativeMatching("exact").input_gradient_rows(tf_log_probs(w, b), x)
    assert tuple(exact.shape) == (B, I, 16)
    np.testing.assert_allclose(exact.numpy(), closed_form_jacobian(x, w, b), rtol=1e-5, atol=1e-5)
    projected_loss = DerivativeMatching("projection", num_projections=3)
    v = projected_loss.directions(B, I, tf.constant([1, 1], dtype=tf.int32))
    projected = projected_loss.input_gradient_rows(tf_log_probs(w, b), x, v)
    assert tuple(projected.shape) == (B, 3, 16)


def test_bad_mode_raises_value_error_naming_mode():
    with pytest.raises(ValueError, match="`mode`"):
        DerivativeMatching(mode="approximate")


@pytest.mark.parametrize("num_projections", [0, -2])
def test_non_positive_num_projections_raises_value_error(num_projections):
    with pytest.raises(ValueError, match="`num_projections`"):
        DerivativeMatching(mode="projection", num_projections=num_projections)


def test_derivative_matching_config_round_trip():
    loss = DerivativeMatching(mode="projection", num_projections=7, name="dm")
    config = loss.get_config()
    assert config["mode"] == "projection" and config["num_projections"] == 7
    clone = DerivativeMatching.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == "kdtfp>DerivativeMatching"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, DerivativeMatching)
    assert restored.get_config() == config
    assert restored.uses_input_gradients
