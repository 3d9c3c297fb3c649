"""The `continual-vae` recipe: end to end at --quick scale from the command line, and under
MirroredStrategy on 2 logical CPUs."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kdtfp.recipes import continual_vae as recipe

METHODS = ("finetune", "replay", "distill")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_recipe):
    return run_recipe("continual-vae", tmp_path_factory.mktemp("continual-vae"))


@pytest.mark.slow
def test_quick_run_writes_every_metric_the_issue_names(quick_run):
    _, record, stdout = quick_run
    metrics = record["metrics"]
    assert record["recipe"] == "continual-vae"
    names = ["iwae_task0_before", "share04_before", "classifier_test_accuracy"]
    names += [f"iwae_task{t}_{m}" for t in (0, 1) for m in METHODS]
    names += [f"{key}_{m}" for key in ("drop_task0", "share04", "mmd_task0", "nn1_task0")
              for m in METHODS]  # fmt: skip
    for name in names:
        assert np.isfinite(metrics[name]), name
    assert metrics["classifier_test_accuracy"] > 0.85
    assert -30 < metrics["iwae_task0_before"] < -10
    assert set(record["baselines"]) == {"finetune", "replay"}
    assert record["headline"]["baseline_name"] == "fine-tuning"
    assert "continual-vae" in stdout and "headline metric" in stdout


@pytest.mark.slow
def test_distillation_forgets_less_than_fine_tuning_and_learns_task1(quick_run):
    # Issue 6's goals at CI scale (one seed): task-0 IWAE drop at most half of fine-tuning's,
    # task-1 IWAE within 2 nats of fine-tuning's; fine-tuning forgets (its samples leave 0-4).
    metrics = quick_run[1]["metrics"]
    assert metrics["drop_task0_finetune"] > 2.0
    assert metrics["drop_task0_distill"] <= 0.5 * metrics["drop_task0_finetune"]
    assert metrics["iwae_task1_distill"] >= metrics["iwae_task1_finetune"] - 2.0
    assert metrics["share04_distill"] > metrics["share04_finetune"] + 0.3
    assert metrics["goal_forgetting_half_of_finetune"] == 1.0


@pytest.mark.slow
def test_quick_run_leaves_a_serving_export_metrics_and_plot(quick_run):
    out, record, _ = quick_run
    assert (out / "metrics.json").exists()
    assert record["plots"] and all(os.path.exists(p) for p in record["plots"])
    served = tf.saved_model.load(record["export_path"])
    samples = served.sample(tf.constant(20), tf.constant(0)).numpy()
    assert samples.shape == (20, 64) and set(np.unique(samples)) <= {0.0, 1.0}
    x = recipe._data(0, 0.5)["task0_test"][:10]
    log_p = served.log_prob(tf.constant(x), tf.zeros([10], tf.int32)).numpy()
    assert np.all(np.isfinite(log_p)) and np.all(log_p < 0)
    assert abs(float(np.mean(log_p)) - record["metrics"]["iwae_task0_distill"]) < 5.0
    assert served.encode(tf.constant(x), tf.zeros([10], tf.int32))["loc"].shape == (10, 10)


@pytest.mark.slow
def test_mirrored_run_writes_the_same_metrics(quick_run, tmp_path, run_recipe):
    _, mirrored, _ = run_recipe(
        "continual-vae", tmp_path, "--strategy", "mirrored", "--devices", "2"
    )
    metrics = quick_run[1]["metrics"]
    assert set(mirrored["metrics"]) == set(metrics)
    for name in ("iwae_task0_distill", "iwae_task1_distill", "iwae_task0_finetune"):
        assert np.isfinite(mirrored["metrics"][name])
    assert mirrored["metrics"]["drop_task0_distill"] < mirrored["metrics"]["drop_task0_finetune"]
