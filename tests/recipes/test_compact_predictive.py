"""The `compact-predictive` recipe: end to end at --quick scale from the command line, and its
pieces (data, training under MirroredStrategy) at unit-test scale."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kdtfp.recipes import compact_predictive as recipe
from kdtfp.teachers.mcmc import sample_posterior
from kdtfp.teachers.mcmc_streams import gaussian_inputs

KEYS = (
    "kl_batch",
    "kl_online",
    "kl_online_over_batch",
    "kl_batch_test",
    "kl_online_test",
    "acc_mc",
    "acc_batch",
    "acc_online",
    "nll_mc",
    "nll_batch",
    "nll_online",
    "memory_floats_teacher",
    "memory_floats_online",
    "predict_time_ratio",
    "rhat_max",
    "bc_kl_batch",
    "bc_kl_online",
    "bc_acc_mc",
    "bc_acc_batch",
    "bc_acc_online",
    "bc_nll_mc",
    "bc_nll_batch",
    "bc_nll_online",
    "memory_floats_online_short",
    "memory_floats_online_long",
    "rss_growth_mb_online_short",
    "rss_growth_mb_online_long",
    "density_kl_gmm",
    "density_kl_gaussian",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_recipe):
    return run_recipe("compact-predictive", tmp_path_factory.mktemp("compact-predictive"))


@pytest.mark.slow
def test_quick_run_writes_every_metric_the_issue_names(quick_run):
    _, record, _ = quick_run
    metrics = record["metrics"]
    assert record["recipe"] == "compact-predictive"
    for key in KEYS:
        assert np.isfinite(metrics[key]), key
    assert metrics["rhat_max"] < 1.02 and metrics["bc_rhat_max"] < 1.02


@pytest.mark.slow
def test_students_are_close_to_the_mc_predictive_at_a_fraction_of_the_memory(quick_run):
    metrics = quick_run[1]["metrics"]
    # Both students are close to the teacher and predict as well as it does.
    assert metrics["kl_batch"] < 0.01 and metrics["kl_online"] < 0.01
    assert metrics["bc_kl_batch"] < 0.01 and metrics["bc_kl_online"] < 0.01
    for prefix in ("", "bc_"):
        for kind in ("batch", "online"):
            assert metrics[f"{prefix}acc_{kind}"] >= metrics[f"{prefix}acc_mc"] - 0.02
            assert metrics[f"{prefix}nll_{kind}"] <= metrics[f"{prefix}nll_mc"] + 0.02
    # The goal where it holds robustly at CI scale (one seed): on held-out inputs, and on the
    # narrow breast_cancer posterior. The grid ratio at one seed is reported, not asserted.
    assert metrics["kl_online_test"] <= 1.2 * metrics["kl_batch_test"]
    assert metrics["bc_kl_online"] <= 1.2 * metrics["bc_kl_batch"]
    assert metrics["memory_floats_teacher"] == 20000
    assert metrics["memory_floats_online"] < 0.02 * metrics["memory_floats_teacher"]
    assert metrics["predict_time_ratio"] > 5
    # The density variant: a 3-component mixture is closer to the posterior than one Gaussian.
    assert -0.02 < metrics["density_kl_gmm"] < metrics["density_kl_gaussian"]


@pytest.mark.slow
def test_online_memory_does_not_grow_with_the_number_of_mcmc_steps(quick_run):
    metrics = quick_run[1]["metrics"]
    assert metrics["mcmc_steps_long"] >= 10 * metrics["mcmc_steps_short"]
    assert metrics["memory_floats_online_long"] == metrics["memory_floats_online_short"]
    # A stored bag of the long run would need ~10x more floats; the process did not grow by them.
    assert metrics["memory_floats_teacher_long"] == 10 * metrics["memory_floats_teacher_short"]
    assert metrics["rss_growth_mb_online_long"] < 20


@pytest.mark.slow
def test_quick_run_leaves_a_serving_export_metrics_and_plot(quick_run):
    out, record, _ = quick_run
    assert (out / "metrics.json").exists()
    assert all(os.path.exists(p) for p in record["plots"])
    served = tf.saved_model.load(record["export_path"])
    x = tf.constant([[-8.0, 0.0], [0.0, 0.0], [8.0, 3.0]])
    probabilities = served.serve(x).numpy()
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert probabilities[0, 1] < 0.1 and probabilities[2, 1] > 0.9
    np.testing.assert_allclose(served.prob_positive(x).numpy(), probabilities[:, 1], atol=1e-6)


def test_thesis_toy_and_breast_cancer_data():
    x, y, x_test, y_test = recipe.thesis_toy(0)
    assert x.shape == (24, 2) and y.shape == (24,) and x_test.shape == (1000, 2)
    assert set(np.unique(y)) <= {0, 1} and abs(x[:12, 0].mean() + 4) < 1.5
    bx, by, bx_test, by_test = recipe.breast_cancer(0, components=5)
    assert bx.shape == (400, 6) and bx_test.shape == (169, 6)
    np.testing.assert_array_equal(bx[:, -1], 1.0)
    np.testing.assert_allclose(bx[:, 0].mean(), 0.0, atol=1e-5)


def test_batch_and_online_students_train_under_mirrored_strategy(mirrored_strategy):
    x, y, _, _ = recipe.thesis_toy(0)
    settings = dict(recipe._settings(quick=True), steps=50, burn_in=50, online_chains=4)
    posterior = sample_posterior(
        x, y, num_results=20, num_chains=2, num_burnin_steps=0, jit_compile=False
    )
    problem = {
        "x": x,
        "y": y,
        "sampler": gaussian_inputs(np.zeros(2), 10.0),
        "posterior": posterior,
    }
    config = recipe.RunConfig(quick=True, verbose=0)
    students, chain, _ = recipe._distill(problem, settings, 50, 0, config, mirrored_strategy)
    assert set(students) == {"batch", "online"}
    grid = recipe._grid(settings)[1]
    for student in students.values():
        out = np.asarray(student(grid))
        assert out.shape == (1600, 2) and np.all(np.isfinite(out))
    assert chain.stored_floats == 4 * 3


def test_score_transfer_dataset_serves_the_mc_predictive_scores_on_the_same_inputs():
    from kdtfp.losses.score_matching import score_rows
    from kdtfp.teachers.mcmc import mc_predictive_log_probs
    from kdtfp.teachers.mcmc_streams import batch_transfer_dataset

    bag = np.random.default_rng(0).normal(0.0, 1.0, (7, 2)).astype("float32")
    sampler = gaussian_inputs(np.zeros(2), 10.0)
    x, rows = next(iter(recipe.score_transfer_dataset(bag, sampler, 5, seed=3)))
    x_ce, _ = next(iter(batch_transfer_dataset(bag, sampler, 5, seed=3)))
    np.testing.assert_array_equal(x.numpy(), x_ce.numpy())  # common random numbers
    assert rows.shape == (5, 2, 3)
    expected = score_rows(lambda z: mc_predictive_log_probs(bag, z), x)
    np.testing.assert_allclose(rows.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_score_matching_and_density_students_train_at_unit_scale():
    x, y, _, _ = recipe.thesis_toy(0)
    settings = dict(
        recipe._settings(quick=True),
        burn_in=50,
        online_chains=4,
        score_matching=True,
        density_epochs=3,
        density_grid=120,
    )
    posterior = sample_posterior(
        x, y, num_results=250, num_chains=2, num_burnin_steps=100, jit_compile=False
    )
    problem = {"x": x, "y": y, "sampler": gaussian_inputs(np.zeros(2), 10.0)}
    problem["posterior"] = posterior
    config = recipe.RunConfig(quick=True, verbose=0)
    strategy = tf.distribute.get_strategy()
    students, _, _ = recipe._distill(problem, settings, 20, 0, config, strategy)
    assert set(students) == {"batch", "online", "batch_dm", "online_dm"}
    grid = recipe._grid(settings)[1]
    for kind in ("batch_dm", "online_dm"):
        out = np.asarray(students[kind](grid))
        assert out.shape == (1600, 2) and np.all(np.isfinite(out))
    density = recipe._density_distillation(problem, settings, 0)
    assert density["density_stored_floats_gmm"] == 3 * (1 + 2 + 3)
    assert -0.05 < density["density_kl_gmm"] < density["density_kl_gaussian"]
