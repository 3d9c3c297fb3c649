"""The `vrnn` recipe end to end at --quick scale from the command line."""

import os

import numpy as np
import pytest
import tensorflow as tf

MODELS = ("teacher", "surrogate", "local", "data")
STUDENTS = ("surrogate", "local", "data")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_recipe):
    return run_recipe("vrnn", tmp_path_factory.mktemp("vrnn"))


@pytest.mark.slow
def test_quick_run_writes_every_metric_the_issue_names(quick_run):
    _, record, stdout = quick_run
    metrics = record["metrics"]
    assert record["recipe"] == "vrnn"
    names = [f"nll_{m}" for m in MODELS] + [f"iwae_nll_{m}" for m in MODELS]
    names += [f"prior_kl_{s}" for s in STUDENTS] + [f"kl_bound_{s}" for s in STUDENTS]
    for name in names:
        assert np.isfinite(metrics[name]), name
    assert record["headline"]["ours"] == metrics["nll_surrogate"]
    assert record["baselines"]["nll_local"] == metrics["nll_local"]
    assert "vrnn" in stdout and "headline metric" in stdout


@pytest.mark.slow
def test_bounds_are_ordered_and_the_teacher_is_best(quick_run):
    metrics = quick_run[1]["metrics"]
    for name in MODELS:
        # Per-step NLL bounds of strokes (two Gaussian offsets with sd 1 and a pen bit) lie
        # above the noise floor log(2 pi) and the IWAE bound is the tighter one.
        assert np.log(2 * np.pi) < metrics[f"iwae_nll_{name}"] < metrics[f"nll_{name}"] + 0.05
    assert all(metrics["nll_teacher"] < metrics[f"nll_{s}"] for s in STUDENTS)
    for name in STUDENTS:
        assert metrics[f"kl_bound_{name}"] > 0 and metrics[f"prior_kl_{name}"] > 0
    # Shared-noise distillation fits the teacher's stroke conditionals better than a student
    # that never sees the teacher.
    assert metrics["kl_bound_surrogate"] < metrics["kl_bound_data"]
    assert metrics["prior_kl_local"] < metrics["prior_kl_surrogate"]


@pytest.mark.slow
def test_quick_run_leaves_a_serving_export_and_a_plot(quick_run):
    out, record, _ = quick_run
    assert (out / "metrics.json").exists()
    assert record["plots"] and all(os.path.exists(p) for p in record["plots"])
    served = tf.saved_model.load(record["export_path"])
    strokes = served.sample(tf.constant(8)).numpy()
    assert strokes.shape == (8, record["settings"]["length"], 3)
    assert set(np.unique(strokes[..., 0])) <= {0.0, 1.0}
    log_p = served.log_prob(tf.constant(strokes)).numpy()
    assert log_p.shape == (8,) and np.all(np.isfinite(log_p))
    codes = served.encode(tf.constant(strokes)).numpy()
    assert codes.shape == (8, record["settings"]["length"], record["settings"]["latent_size"])


def test_recipe_models_train_under_mirrored_strategy(mirrored_strategy):
    from kdtfp.datasets.strokes import pen_strokes
    from kdtfp.recipes import vrnn as recipe

    settings = dict(
        recipe._settings(quick=True),
        length=6,
        teacher_units=8,
        student_units=4,
        batch_size=16,
        teacher_epochs=1,
        student_steps=2,
        refit_steps=2,
    )
    x = pen_strokes(60, length=6, seed=0).x_train
    teacher = recipe._train_teacher(x, settings, 0, mirrored_strategy, jit=False)
    student, history = recipe._distill(teacher, settings, 0, mirrored_strategy, False, local=False)
    assert np.isfinite(history["output_kl"]) and np.isfinite(history["latent_loss"])
    recipe._refit_posterior(student, x, settings, mirrored_strategy, jit=False)
    assert np.all(np.isfinite(student.log_prob(x[:4]).numpy()))
