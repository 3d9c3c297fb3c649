"""The `kd-arhmm` recipe: its pieces, then end to end at --quick scale through the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kdtfp.recipes import kd_arhmm

METRICS = (
    "auroc_kd_arhmm",
    "auroc_arhmm",
    "auroc_teacher",
    "loglik_kd_arhmm",
    "loglik_arhmm",
    "ari_kd_arhmm",
    "ari_arhmm",
    "gap_teacher_arhmm",
    "auroc_gain",
    "kd_share_of_gap",
    "loglik_relative_drop",
    "constraint_kd_arhmm",
    "constraint_arhmm",
)


def test_state_ari_ignores_label_permutations_and_padding():
    truth = np.array([[0, 0, 1, 1, 2], [2, 2, 0, 1, 1]])
    permuted = np.array([[1, 1, 2, 2, 0], [0, 0, 1, 2, 2]])
    assert kd_arhmm.state_ari(truth, permuted) == pytest.approx(1.0)
    padded = np.array([[1, 1, 2, 2, 0], [0, 0, 1, -1, -1]])
    assert kd_arhmm.state_ari(truth, padded) == pytest.approx(1.0)


def test_auroc_of_features_is_high_for_informative_features_and_half_for_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    informative = (y[:, None] + 0.5 * rng.standard_normal((400, 3))).astype("float32")
    noise = rng.standard_normal((400, 3)).astype("float32")
    assert kd_arhmm.auroc_of_features(informative[:200], y[:200], informative[200:], y[200:]) > 0.9
    assert abs(kd_arhmm.auroc_of_features(noise[:200], y[:200], noise[200:], y[200:]) - 0.5) < 0.1


def test_quick_settings_fit_the_ci_budget():
    quick, full = kd_arhmm._settings(True), kd_arhmm._settings(False)
    assert quick["seeds"] == 1 and full["seeds"] >= 3
    assert quick["batch"] >= 64 and quick["batch"] % 8 == 0  # the SP constraint binds in batches
    assert quick["num_states"] < quick["num_regimes"]  # the students must choose
    assert tf.distribute.get_strategy().num_replicas_in_sync == 1


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_recipe):
    _, record, stdout = run_recipe("kd-arhmm", tmp_path_factory.mktemp("kd_arhmm"))
    return record, stdout


@pytest.mark.slow
def test_quick_run_writes_every_metric_plot_and_export(quick_run):
    record, stdout = quick_run
    assert record["recipe"] == "kd-arhmm"
    for name in METRICS:
        assert np.isfinite(record["metrics"][name]), name
    for name in ("auroc_kd_arhmm", "auroc_arhmm", "auroc_teacher"):
        assert 0.0 <= record["metrics"][name] <= 1.0
    assert "auroc_arhmm" in record["baselines"]
    for plot in record["plots"]:
        assert os.path.getsize(plot) > 10_000
    assert os.path.isdir(record["export_path"])
    assert "kd-arhmm" in stdout


@pytest.mark.slow
def test_quick_run_has_a_gap_to_distil_and_kd_closes_it(quick_run):
    metrics = quick_run[0]["metrics"]
    # The data leave a gap (the lead's condition on METHODS.md 2.6): the teacher's features
    # beat the plain ARHMM's by >= 0.08 AUROC (measured 0.29 at seed 0).
    assert metrics["gap_teacher_arhmm"] >= 0.08
    # The plain ARHMM spends its states on the nuisance regimes: its features carry little.
    assert metrics["auroc_arhmm"] < 0.65
    # The AUROC goal (+0.05; measured +0.33 and +0.31 at seeds 0 and 1).
    assert metrics["auroc_kd_arhmm"] >= metrics["auroc_arhmm"] + 0.05
    # The likelihood goal (within 5 %) is MISSED at this gamma (measured 18-19 % worse per
    # step): a guard against regressions only.
    assert metrics["loglik_relative_drop"] < 0.3


@pytest.mark.slow
def test_exported_arhmm_serves_likelihood_and_marginals_without_kdtfp(quick_run):
    record, _ = quick_run
    script = f"""
import sys
sys.modules["kdtfp"] = None  # `import kdtfp` fails in this process
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load({record["export_path"]!r})
x = tf.constant(np.random.default_rng(0).normal(size=(3, 48, 2)).astype("float32"))
assert loaded.log_likelihood(x).numpy().shape == (3,)
marginals = loaded.posterior_marginals(x).numpy()
assert marginals.shape[:2] == (3, 47) and np.allclose(marginals.sum(-1), 1, atol=1e-5)
assert loaded.features(x).numpy().shape == (3, marginals.shape[-1])
assert loaded.most_likely_states(x).numpy().shape == (3, 47)
print("ok")
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0 and "ok" in completed.stdout, completed.stderr[-3000:]
