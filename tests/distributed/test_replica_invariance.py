"""DESIGN rules 5 and 11: one step on 2 replicas equals one step on 1 device, metrics included.

Every objective is trained for exactly one SGD step on the same global batch, with the same
seeds and initial weights, once under the default strategy and once under the session's
two-CPU `MirroredStrategy`. Keras divides a replica's loss by the number of replicas only for
`keras.losses.Loss` objects; a term built by hand would be doubled on 2 replicas, and a metric
not unscaled would read half (the faults of `keras.distillation`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.distill import (
    DistillationObjective,
    Distiller,
    FeatureDistillation,
    teacher_cached_dataset,
)
from kdtfp.losses import DerivativeMatching, SoftTargetKL
from kdtfp.teachers import mlp

INPUT_DIM, CLASSES, GLOBAL_BATCH = 8, 4, 16


def soft_target():
    return [DistillationObjective(SoftTargetKL(2.0), 1.0)], None


def dm_exact():
    return [DistillationObjective(DerivativeMatching("exact"), 1.0, name="dm_exact")], None


def dm_projection(num_projections):
    def objectives():
        loss = DerivativeMatching("projection", num_projections=num_projections)
        return [DistillationObjective(loss, 1.0, name=f"dm_projection_{num_projections}")], None

    return objectives


def features_with_projection():
    objective = FeatureDistillation(
        "teacher_hidden_0",
        "student_hidden_0",
        loss=keras.losses.MeanSquaredError(),
        weight=0.5,
        projection=True,
    )
    return [objective], None


def student_loss_only():
    return [], keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def string_loss():
    return [DistillationObjective("mean_squared_error", 0.3)], None


def all_objectives():
    objectives = (
        soft_target()[0]
        + dm_exact()[0]
        + dm_projection(1)()[0]
        + dm_projection(3)()[0]
        + features_with_projection()[0]
    )
    return objectives, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def all_objectives_with_string_loss():
    objectives, student_loss = all_objectives()
    return objectives + string_loss()[0], student_loss


CASES = {
    "soft_target_kl": soft_target,
    "derivative_matching_exact": dm_exact,
    "derivative_matching_projection_1": dm_projection(1),
    "derivative_matching_projection_3": dm_projection(3),
    "feature_distillation_projection": features_with_projection,
    "student_loss_sparse_categorical_crossentropy": student_loss_only,
    "all_loss_objects_combined": all_objectives,
    "string_loss_mean_squared_error": string_loss,
    "all_combined_with_string_loss": all_objectives_with_string_loss,
}


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH, INPUT_DIM)).astype("float32")
    y = rng.integers(0, CLASSES, GLOBAL_BATCH).astype("int32")
    return x, y


def one_step(strategy, make_objectives, evaluate=False):
    """Builds everything in `strategy.scope()`, runs one SGD step; returns weights, history.

    With `evaluate`, the metrics of `evaluate` on the same batch after the step are added to the
    history under `evaluate_*` keys.
    """
    keras.utils.set_random_seed(0)
    x, y = data()
    with strategy.scope():
        teacher = mlp(INPUT_DIM, (16,), CLASSES, name="teacher", seed=10)
        student = mlp(INPUT_DIM, (8,), CLASSES, name="student", seed=20)
        objectives, student_loss = make_objectives()
        distiller = Distiller(student, teacher, objectives, student_loss=student_loss, seed=7)
        for projection in distiller.projections:  # deterministic initial projections
            if not projection.built:
                projection.build((None, 8))
            projection.kernel.assign(
                np.random.default_rng(1).standard_normal((8, 16)).astype("float32") * 0.3
            )
        distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    initial = [np.array(w) for w in distiller.get_weights()]
    history = distiller.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0
    ).history
    assert int(distiller.optimizer.iterations.numpy()) == 1
    if evaluate:
        evaluation = distiller.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
        history = dict(history, **{f"evaluate_{key}": [value] for key, value in evaluation.items()})
    return initial, [np.array(w) for w in distiller.get_weights()], history


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_one_step_on_two_replicas_equals_one_step_on_one_device(case, mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    single_initial, single_weights, single_history = one_step(tf.distribute.get_strategy(), case)
    mirrored_initial, mirrored_weights, mirrored_history = one_step(mirrored_strategy, case)

    # Same start, and the step did something.
    for a, b in zip(single_initial, mirrored_initial, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (
        max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(single_weights, single_initial, strict=True)
        )
        > 1e-3
    )

    # Same step: each term's loss and gradient are scaled per replica exactly once.
    assert len(single_weights) == len(mirrored_weights)
    for a, b in zip(mirrored_weights, single_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=0.0, atol=1e-5)

    # Same metrics: no term reads half (or double) on 2 replicas.
    assert set(mirrored_history) == set(single_history)
    for key, values in single_history.items():
        np.testing.assert_allclose(mirrored_history[key], values, rtol=1e-5, atol=1e-6, err_msg=key)


def test_evaluate_after_a_step_reports_the_same_metrics_on_two_replicas(mirrored_strategy):
    _, single_weights, single = one_step(
        tf.distribute.get_strategy(), all_objectives, evaluate=True
    )
    _, mirrored_weights, mirrored = one_step(mirrored_strategy, all_objectives, evaluate=True)
    assert {key for key in single if key.startswith("evaluate_")} >= {
        "evaluate_loss",
        "evaluate_soft_target_kl",
    }
    assert set(mirrored) == set(single)
    for key, values in single.items():
        np.testing.assert_allclose(mirrored[key], values, rtol=1e-5, atol=1e-6, err_msg=key)


def test_teacher_cached_dataset_step_on_two_replicas_equals_one_device(mirrored_strategy):
    results = []
    for strategy in (tf.distribute.get_strategy(), mirrored_strategy):
        keras.utils.set_random_seed(0)
        x, y = data()
        with strategy.scope():
            teacher = mlp(INPUT_DIM, (16,), CLASSES, name="teacher", seed=10)
            student = mlp(INPUT_DIM, (8,), CLASSES, name="student", seed=20)
            distiller = Distiller(
                student,
                teacher,
                [
                    (SoftTargetKL(2.0), 1.0),
                    DistillationObjective(DerivativeMatching("projection", 2), 1.0),
                ],
                student_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                seed=7,
            )
            distiller.compile(optimizer=keras.optimizers.SGD(0.5))
        dataset = teacher_cached_dataset(teacher, x, y, batch_size=GLOBAL_BATCH, shuffle=False)
        history = distiller.fit(dataset, epochs=1, verbose=0).history
        results.append(([np.array(w) for w in student.get_weights()], history))
    (single_weights, single_history), (mirrored_weights, mirrored_history) = results
    for a, b in zip(mirrored_weights, single_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=0.0, atol=1e-5)
    assert set(mirrored_history) == set(single_history)
    for key, values in single_history.items():
        np.testing.assert_allclose(mirrored_history[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
