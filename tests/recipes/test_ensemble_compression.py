"""The `ensemble-compression` recipe: end to end at --quick scale, and under MirroredStrategy."""

import os

import numpy as np
import pytest
import tensorflow as tf

import kdtfp
from kdtfp.recipes import ensemble_compression as recipe

SIZES = (25, 50, 100, 200, 1200)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_recipe):
    return run_recipe("ensemble-compression", tmp_path_factory.mktemp("ensemble-compression"))


@pytest.mark.slow
def test_quick_run_writes_every_metric_the_issue_names(quick_run):
    _, record, stdout = quick_run
    metrics = record["metrics"]
    assert record["recipe"] == "ensemble-compression"
    assert 0.9 < metrics["acc_teacher"] <= 1.0
    for n in SIZES:
        for variant in ("dm", "ce", "labels_only", "noise"):
            for key in ("acc", "ll", "agree", "kl"):
                value = metrics[f"{key}_{variant}_n{n}"]
                assert np.isfinite(value), f"{key}_{variant}_n{n}"
    assert "ensemble-compression" in stdout and "headline metric" in stdout


@pytest.mark.slow
def test_derivative_matching_beats_soft_targets_at_small_n(quick_run):
    # The thesis's claim at CI scale (one seed): the teacher's input-gradients help most when
    # the transfer set is small.
    metrics = quick_run[1]["metrics"]
    assert metrics["acc_dm_n25"] > metrics["acc_ce_n25"]
    assert metrics["kl_dm_n25"] < metrics["kl_ce_n25"]


@pytest.mark.slow
def test_quick_run_leaves_a_serving_export_metrics_and_plot(quick_run):
    out, record, _ = quick_run
    assert (out / "metrics.json").exists()
    assert all(os.path.exists(p) for p in record["plots"])
    served = tf.saved_model.load(record["export_path"])
    x = kdtfp.datasets.load_digits_split().x_test[:5]
    probabilities = served.serve(tf.constant(x)).numpy()
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_student_trains_under_mirrored_strategy(mirrored_strategy):
    split = kdtfp.datasets.load_digits_split()
    teacher = kdtfp.teachers.BaggedEnsemble(
        [kdtfp.teachers.mlp(64, (8,), 10, name=f"m{i}") for i in range(2)]
    )
    settings = dict(recipe._settings(quick=True), steps=5)
    x, y = kdtfp.datasets.subset(split.x_train, 25, seed=0, y=split.y_train)  # odd n: uneven shards
    for variant in ("labels_only", "ce", "noise", "dm"):
        student = recipe._train_student(
            teacher, x, y, variant, settings, seed=0, strategy=mirrored_strategy, jit=False
        )
        assert np.all(np.isfinite(np.asarray(student(split.x_test[:4]))))


@pytest.mark.slow
def test_quick_run_under_mirrored_strategy_writes_the_same_metrics(quick_run, tmp_path, run_recipe):
    # The whole recipe from the command line on 2 replicas (logical CPUs without a GPU).
    _, record, _ = run_recipe(
        "ensemble-compression", tmp_path, "--strategy", "mirrored", "--devices", "2"
    )
    assert record["settings"]["replicas"] == 2
    assert set(record["metrics"]) == set(quick_run[1]["metrics"])
    assert abs(record["metrics"]["acc_dm_n1200"] - quick_run[1]["metrics"]["acc_dm_n1200"]) < 0.03
