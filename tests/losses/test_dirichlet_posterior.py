"""`kdtfp.losses.TeacherDirichletPosterior`: NumPy and `tfd.Dirichlet` references, the KD minimiser,
gradients, serialisation, `fit` and replica invariance, and bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from kdtfp.losses import SoftTargetKL, TeacherDirichletPosterior

tfd = tfp.distributions

LAMS = [0.0, 1.0, 5.0, 32.0]
TEMPERATURES = [0.5, 1.0, 4.0]
SHAPES = [(1, 2), (8, 10), (32, 100)]


def log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def reference_loss(labels, teacher_logits, student_logits, lam, temperature, temper_student=False):
    """Per-example -log q_y - lam * sum_k p_k log q_k in float64."""
    log_q = log_softmax(student_logits)
    p = softmax(np.asarray(teacher_logits, np.float64) / temperature)
    tempered_log_q = log_softmax(np.asarray(student_logits, np.float64) / temperature)
    prior_log_q = tempered_log_q if temper_student else log_q
    nll = -np.take_along_axis(log_q, np.asarray(labels)[..., None], axis=-1)[..., 0]
    return nll - lam * np.sum(p * prior_log_q, axis=-1)


def reference_gradient(labels, teacher_logits, student_logits, lam, temperature, temper_student):
    """d loss / d s per example: (q - e_y) + lam * (q - p)  [ / T and q_T when tempered]."""
    classes = student_logits.shape[-1]
    q = softmax(student_logits)
    p = softmax(np.asarray(teacher_logits, np.float64) / temperature)
    one_hot = np.eye(classes)[labels]
    if temper_student:
        return (q - one_hot) + lam / temperature * (softmax(student_logits / temperature) - p)
    return (q - one_hot) + lam * (q - p)


def random_problem(shape, scale, seed):
    rng = np.random.default_rng(seed)
    teacher = (scale * rng.standard_normal(shape)).astype("float32")
    student = (scale * rng.standard_normal(shape)).astype("float32")
    labels = rng.integers(0, shape[-1], shape[:-1]).astype("int32")
    return labels, teacher, student


def extreme_problem(shape, seed):
    rng = np.random.default_rng(seed)
    teacher = (1e4 * rng.choice([-1.0, 1.0], size=shape)).astype("float32")
    student = (1e4 * rng.choice([-1.0, 1.0], size=shape)).astype("float32")
    labels = rng.integers(0, shape[-1], shape[:-1]).astype("int32")
    return labels, teacher, student


# ---------------------------------------------------------------------- (a) NumPy reference


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("lam", LAMS)
def test_loss_matches_numpy_per_example_and_mean_for_dict_and_packed_targets(lam, temperature):
    for index, shape in enumerate(SHAPES):
        labels, teacher, student = random_problem(shape, 3.0, seed=index)
        expected = reference_loss(labels, teacher, student, lam, temperature)
        per_example_loss = TeacherDirichletPosterior(lam, temperature, reduction=None)
        packed = TeacherDirichletPosterior.targets(labels, teacher)
        assert packed.shape == (shape[0], shape[1] + 1) and packed.dtype == np.float32
        from_packed = np.asarray(per_example_loss(packed, student))
        from_dict = np.asarray(
            per_example_loss({"labels": labels, "teacher_logits": teacher}, student)
        )
        np.testing.assert_allclose(from_packed, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(from_dict, from_packed)
        mean = TeacherDirichletPosterior(lam, temperature)(packed, student)
        np.testing.assert_allclose(float(mean), expected.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tempered_student_prior_matches_numpy(temperature):
    labels, teacher, student = random_problem((16, 7), 3.0, seed=40)
    loss = TeacherDirichletPosterior(3.0, temperature, temper_student=True, reduction=None)
    value = np.asarray(loss(loss.targets(labels, teacher), student))
    expected = reference_loss(labels, teacher, student, 3.0, temperature, temper_student=True)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def test_sequence_outputs_with_leading_time_axis_match_numpy():
    labels, teacher, student = random_problem((4, 6, 5), 2.0, seed=41)
    loss = TeacherDirichletPosterior(2.0, 2.0, reduction=None)
    value = np.asarray(loss(loss.targets(labels, teacher), student))
    assert value.shape == (4, 6)
    np.testing.assert_allclose(
        value, reference_loss(labels, teacher, student, 2.0, 2.0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("temper_student", [False, True])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_loss_and_gradient_are_finite_and_match_numpy_at_extreme_logits(
    temperature, temper_student
):
    labels, teacher, student = extreme_problem((16, 10), seed=3)
    loss = TeacherDirichletPosterior(
        5.0, temperature, temper_student=temper_student, reduction=None
    )
    targets = loss.targets(labels, teacher)
    student_variable = tf.Variable(student)
    with tf.GradientTape() as tape:
        value = loss(targets, student_variable)
    gradient = tape.gradient(value, student_variable).numpy()
    value = np.asarray(value)
    expected = reference_loss(labels, teacher, student, 5.0, temperature, temper_student)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(gradient))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(
        gradient,
        reference_gradient(labels, teacher, student, 5.0, temperature, temper_student),
        atol=1e-5,
    )


def test_probability_inputs_give_the_same_loss_as_logits():
    labels, teacher, student = random_problem((8, 6), 2.0, seed=5)
    expected = np.asarray(
        TeacherDirichletPosterior(4.0, 2.0, reduction=None)(
            TeacherDirichletPosterior.targets(labels, teacher), student
        )
    )
    from_probs = TeacherDirichletPosterior(
        4.0, 2.0, from_logits=False, teacher_from_logits=False, reduction=None
    )
    value = from_probs(
        {"labels": labels, "teacher_probs": softmax(teacher).astype("float32")},
        softmax(student).astype("float32"),
    )
    np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-4, atol=1e-5)


def test_teacher_probabilities_with_exact_zeros_are_finite():
    loss = TeacherDirichletPosterior(2.0, 3.0, teacher_from_logits=False, reduction=None)
    teacher = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], np.float32)
    student = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]], np.float32)
    labels = np.array([0, 2])
    value = np.asarray(loss({"labels": labels, "teacher_probs": teacher}, student))
    # softmax(log p / T) keeps zero-probability classes at zero.
    tempered = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    log_q = log_softmax(student)
    expected = -log_q[[0, 1], labels] - 2.0 * np.sum(tempered * log_q, axis=-1)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


# ---------------------------------------------------------------------- (b) Dirichlet posterior


@pytest.mark.parametrize("lam, temperature", [(0.0, 1.0), (1.0, 1.0), (5.0, 2.0), (20.0, 0.5)])
def test_loss_is_minus_log_dirichlet_prior_minus_log_categorical_up_to_a_constant(lam, temperature):
    rng = np.random.default_rng(int(lam * 10 + temperature * 100))
    labels, teacher, student_a = random_problem((12, 6), 2.0, seed=int(lam) + 50)
    student_b = (2.0 * rng.standard_normal(student_a.shape)).astype("float32")
    concentration = 1.0 + lam * softmax(teacher.astype(np.float64) / temperature)
    prior = tfd.Dirichlet(tf.constant(concentration, tf.float64))

    def negative_log_posterior(student):
        logits = tf.constant(student, tf.float64)
        q = tf.nn.softmax(logits)
        likelihood = tfd.Categorical(logits=logits).log_prob(labels)
        return -(prior.log_prob(q) + likelihood).numpy()

    loss = TeacherDirichletPosterior(lam, temperature, reduction=None)
    targets = loss.targets(labels, teacher)
    value_a = np.asarray(loss(targets, student_a), np.float64)
    value_b = np.asarray(loss(targets, student_b), np.float64)
    posterior_a = negative_log_posterior(student_a)
    posterior_b = negative_log_posterior(student_b)
    # The constant (the Dirichlet normaliser log B(1 + lam p)) cancels in differences ...
    np.testing.assert_allclose(value_a - value_b, posterior_a - posterior_b, rtol=1e-5, atol=1e-4)
    # ... and is exactly log B(1 + lam p) (-log Dir = -lam sum p log q + log B), teacher-only.
    log_beta = tf.math.lbeta(tf.constant(concentration, tf.float64)).numpy()
    np.testing.assert_allclose(value_a + log_beta, posterior_a, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------- (c) minimiser = KD


def minimise_over_logits(loss_fn, shape, steps=3000):
    """Free logits minimising `loss_fn` (convex in the logits), by Adam with a decaying step."""
    logits = tf.Variable(tf.zeros(shape))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.5, 400, 0.5))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = loss_fn(logits)
        optimizer.apply_gradients([(tape.gradient(value, logits), logits)])

    for _ in range(steps):
        step()
    return softmax(logits.numpy())


@pytest.mark.parametrize("lam", [0.5, 4.0])
def test_minimiser_over_the_simplex_is_the_kd_solution(lam):
    labels, teacher, _ = random_problem((4, 5), 2.0, seed=60)
    loss = TeacherDirichletPosterior(lam, 1.0, reduction="sum")
    targets = loss.targets(labels, teacher)
    q_bkd = minimise_over_logits(lambda s: loss(targets, s), teacher.shape)

    # Closed form: q* = (e_y + lam p) / (1 + lam) = (1 - alpha) e_y + alpha p, alpha = lam / (1 + lam).
    p = softmax(teacher)
    closed_form = (np.eye(5)[labels] + lam * p) / (1.0 + lam)
    np.testing.assert_allclose(q_bkd, closed_form, atol=1e-5)

    # Hinton's KD with alpha = lam / (1 + lam) at T = 1 has the same minimiser.
    alpha = lam / (1.0 + lam)
    labels_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    soft_target = SoftTargetKL(1.0, reduction="sum")
    q_kd = minimise_over_logits(
        lambda s: (1.0 - alpha) * labels_ce(labels, s) + alpha * soft_target(teacher, s),
        teacher.shape,
    )
    np.testing.assert_allclose(q_kd, closed_form, atol=1e-5)


# ---------------------------------------------------------------------- (d) gradient


@pytest.mark.parametrize("temper_student", [False, True])
@pytest.mark.parametrize("lam, temperature", [(0.0, 1.0), (1.0, 1.0), (5.0, 2.0), (10.0, 4.0)])
def test_gradient_matches_hand_written_numpy_gradient(lam, temperature, temper_student):
    labels, teacher, student = random_problem((8, 10), 3.0, seed=70)
    loss = TeacherDirichletPosterior(lam, temperature, temper_student=temper_student)
    student_variable = tf.Variable(student)
    with tf.GradientTape() as tape:
        value = loss(loss.targets(labels, teacher), student_variable)
    gradient = tape.gradient(value, student_variable).numpy()
    expected = reference_gradient(labels, teacher, student, lam, temperature, temper_student)
    np.testing.assert_allclose(gradient, expected / len(student), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.9, 2.0), (0.3, 4.0)])
def test_tempered_form_has_the_gradient_of_hinton_kd_with_lam_alpha_t_squared_over_one_minus_alpha(
    alpha, temperature
):
    labels, teacher, student = random_problem((8, 10), 3.0, seed=71)
    student_variable = tf.Variable(student)
    labels_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape(persistent=True) as tape:
        kd = (1.0 - alpha) * labels_ce(labels, student_variable) + alpha * SoftTargetKL(
            temperature
        )(teacher, student_variable)
        bkd = TeacherDirichletPosterior(
            alpha * temperature**2 / (1.0 - alpha), temperature, temper_student=True
        )({"labels": labels, "teacher_logits": teacher}, student_variable)
    np.testing.assert_allclose(
        tape.gradient(kd, student_variable).numpy(),
        (1.0 - alpha) * tape.gradient(bkd, student_variable).numpy(),
        rtol=1e-4,
        atol=1e-6,
    )


# ---------------------------------------------------------------------- (e) Keras integration


def test_config_round_trip_and_keras_serialization():
    loss = TeacherDirichletPosterior(
        lam=2.5, temperature=3.0, temper_student=True, reduction="sum", name="bkd"
    )
    config = loss.get_config()
    assert config == {
        "name": "bkd",
        "reduction": "sum",
        "lam": 2.5,
        "temperature": 3.0,
        "from_logits": True,
        "teacher_from_logits": True,
        "temper_student": True,
    }
    clone = TeacherDirichletPosterior.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == "kdtfp>TeacherDirichletPosterior"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, TeacherDirichletPosterior)
    assert restored.get_config() == config
    labels, teacher, student = random_problem((4, 5), 2.0, seed=80)
    targets = loss.targets(labels, teacher)
    np.testing.assert_allclose(float(restored(targets, student)), float(loss(targets, student)))


def test_default_reduction_is_sum_over_batch_size_and_config_reads_variables():
    loss = TeacherDirichletPosterior(1.0, 2.0)
    assert loss.reduction == "sum_over_batch_size"
    loss.temperature = keras.Variable(3.0, trainable=False)  # as a Distiller schedule would
    assert loss.get_config()["temperature"] == 3.0
    labels, teacher, student = random_problem((4, 5), 2.0, seed=81)
    expected = reference_loss(labels, teacher, student, 1.0, 3.0).mean()
    np.testing.assert_allclose(float(loss(loss.targets(labels, teacher), student)), expected, 1e-5)


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )


def tiny_data(n=16):
    rng = np.random.default_rng(90)
    x = rng.standard_normal((n, 4)).astype("float32")
    labels = rng.integers(0, 3, n).astype("int32")
    teacher = (2.0 * rng.standard_normal((n, 3))).astype("float32")
    return x, labels, teacher


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_fit_step_equals_a_manual_gradient_step_with_packed_targets(jit_compile):
    x, labels, teacher = tiny_data()
    loss = TeacherDirichletPosterior(3.0, 2.0)
    model = tiny_model()
    initial = [np.array(w) for w in model.get_weights()]
    with tf.GradientTape() as tape:
        value = loss(loss.targets(labels, teacher), model(x))
    gradients = tape.gradient(value, model.trainable_weights)
    expected = [w - 0.1 * g.numpy() for w, g in zip(initial, gradients, strict=True)]

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=jit_compile)
    history = model.fit(
        x, loss.targets(labels, teacher), batch_size=16, epochs=1, shuffle=False, verbose=0
    )
    np.testing.assert_allclose(history.history["loss"][0], float(value), rtol=1e-5)
    for a, b in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fit_on_a_tf_data_pipeline_packing_targets_in_map():
    x, labels, teacher = tiny_data()
    loss = TeacherDirichletPosterior(1.0, 1.0)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, labels, teacher))
        .map(lambda xb, yb, tb: (xb, loss.targets(yb, tb)))
        .batch(8)
    )
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    losses = model.fit(dataset, epochs=5, shuffle=False, verbose=0).history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def one_sgd_step(strategy, x, targets):
    with strategy.scope():
        model = tiny_model(seed=3)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=TeacherDirichletPosterior(4.0, 2.0))
    initial = [np.array(w) for w in model.get_weights()]
    model.fit(x, targets, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return initial, [np.array(w) for w in model.get_weights()]


def test_one_step_on_two_replicas_equals_one_step_on_one_device(mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    x, labels, teacher = tiny_data()
    targets = TeacherDirichletPosterior.targets(labels, teacher)
    single_initial, single = one_sgd_step(tf.distribute.get_strategy(), x, targets)
    mirrored_initial, mirrored = one_sgd_step(mirrored_strategy, x, targets)
    for a, b in zip(single_initial, mirrored_initial, strict=True):
        np.testing.assert_array_equal(a, b)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(single, single_initial, strict=True))
    assert moved > 1e-3
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored, strict=True))
    assert difference < 1e-5, difference


def test_works_as_the_student_loss_of_a_distiller_with_cached_teacher_logits():
    from kdtfp.distill import Distiller

    x, labels, _ = tiny_data()
    teacher = tiny_model(seed=5)
    teacher_logits = np.asarray(teacher(x))
    loss = TeacherDirichletPosterior(2.0, 2.0)
    distiller = Distiller(tiny_model(seed=6), teacher, [], student_loss=loss)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    expected = float(loss(loss.targets(labels, teacher_logits), distiller.student(x)))
    history = distiller.fit(
        x, loss.targets(labels, teacher_logits), batch_size=16, epochs=1, verbose=0
    ).history
    np.testing.assert_allclose(history["student_loss"][0], expected, rtol=1e-5)


# ---------------------------------------------------------------------- (f) bad input


@pytest.mark.parametrize("lam", [-1.0, -1e-9, float("nan"), float("inf"), "a"])
def test_bad_lam_raises_value_error_naming_lam(lam):
    with pytest.raises(ValueError, match="`lam`"):
        TeacherDirichletPosterior(lam=lam)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises_value_error_naming_temperature(temperature):
    with pytest.raises(ValueError, match="`temperature`"):
        TeacherDirichletPosterior(lam=1.0, temperature=temperature)


def test_teacher_with_a_different_class_count_raises_naming_teacher_logits():
    loss = TeacherDirichletPosterior(1.0)
    labels, teacher, _ = random_problem((4, 5), 1.0, seed=100)
    student = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="`teacher_logits`"):
        loss({"labels": labels, "teacher_logits": teacher}, student)
    with pytest.raises(ValueError, match="`teacher_logits`"):
        loss(loss.targets(labels, teacher), student)
    with pytest.raises(ValueError, match="`teacher_logits`"):  # raw logits, labels forgotten
        loss(teacher, np.zeros((4, 5), np.float32))


def test_class_count_mismatch_raises_at_trace_time_inside_fit():
    x, labels, _ = tiny_data()
    model = tiny_model()
    model.compile(optimizer="sgd", loss=TeacherDirichletPosterior(1.0))
    targets = TeacherDirichletPosterior.targets(labels, np.zeros((16, 4), np.float32))
    with pytest.raises(ValueError, match="`teacher_logits`"):
        model.fit(x, targets, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "teacher_probs",
    [
        [[0.5, 0.4, 0.0], [0.2, 0.2, 0.6]],  # sums to 0.9
        [[1.2, -0.2, 0.0], [0.2, 0.2, 0.6]],  # negative
    ],
)
def test_teacher_probabilities_that_are_not_a_distribution_raise_naming_teacher_probs(
    teacher_probs,
):
    loss = TeacherDirichletPosterior(1.0, teacher_from_logits=False)
    with pytest.raises(ValueError, match="`teacher_probs`"):
        loss(
            {"labels": np.array([0, 1]), "teacher_probs": np.array(teacher_probs, np.float32)},
            np.zeros((2, 3), np.float32),
        )


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0], [0.5, 1.0]])
def test_labels_outside_the_classes_raise_naming_labels(labels):
    teacher = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="`labels`"):
        TeacherDirichletPosterior.targets(np.array(labels), teacher)
    with pytest.raises(ValueError, match="`labels`"):
        TeacherDirichletPosterior(1.0)(
            {"labels": np.array(labels), "teacher_logits": teacher}, np.zeros((2, 3), np.float32)
        )


def test_targets_with_mismatched_shapes_or_non_finite_teacher_raise():
    with pytest.raises(ValueError, match="`labels`"):
        TeacherDirichletPosterior.targets(np.zeros(3, int), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="`teacher_logits`"):
        TeacherDirichletPosterior.targets(np.zeros(1, int), np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="`teacher_logits`"):
        TeacherDirichletPosterior.targets(np.zeros(2, int), np.zeros(2, np.float32))


def test_dict_with_wrong_keys_raises_naming_the_expected_keys():
    with pytest.raises(ValueError, match="teacher_probs"):
        TeacherDirichletPosterior(1.0, teacher_from_logits=False)(
            {"labels": np.array([0]), "teacher_logits": np.zeros((1, 3), np.float32)},
            np.zeros((1, 3), np.float32),
        )
