"""`kdtfp bench logz`: the result's shape, finiteness, positivity and bookkeeping.

No assertion here reads a timing threshold or an error goal: speed and accuracy are what the
benchmark reports, not what a test checks (DESIGN.md section 5).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bench_checks import finite_positive

from kdtfp import cli
from kdtfp.bench import logz as bench


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "out" / "logz.json"
    result = bench.run(quick=True, json_path=str(json_path), verbose=False)
    record = json.loads(json_path.read_text())
    assert record["ais_over_is_rmse_1e4"] == pytest.approx(result["ais_over_is_rmse_1e4"])
    return record


def test_quick_run_reports_every_estimator_at_three_budgets(record):
    assert record["benchmark"] == "logz" and record["quick"] is True
    assert record["budget_keys"] == ["1e3", "1e4", "1e5"]
    assert set(record["results"]) == {"nade_is", "bridge", "ais"}
    repeats = record["settings"]["repeats"]
    for method, by_budget in record["results"].items():
        assert set(by_budget) == set(record["budget_keys"]), method
        for key, entry in by_budget.items():
            budget = float(key)
            assert finite_positive(entry["rmse"]), (method, key)
            assert finite_positive(entry["seconds_per_estimate"]), (method, key)
            assert math.isfinite(entry["bias"]), (method, key)
            # Each estimate spends at most its budget, and more than half of it.
            assert budget / 2 < entry["cost_E"] <= budget, (method, key)
            errors = np.asarray(entry["errors"])
            assert errors.shape == (repeats,) and np.all(np.isfinite(errors))
            # RMSE and bias are those of the recorded errors; |bias| <= RMSE.
            assert entry["rmse"] == pytest.approx(np.sqrt(np.mean(errors**2)))
            assert entry["bias"] == pytest.approx(errors.mean())
            assert abs(entry["bias"]) <= entry["rmse"] + 1e-12
            samples = entry["timing_samples_s"]
            assert len(samples) == record["settings"]["timing_repeats"]
            assert entry["seconds_per_estimate"] == pytest.approx(float(np.median(samples)))


def test_ratios_are_the_ratios_of_the_reported_numbers(record):
    results = record["results"]
    for key in record["budget_keys"]:
        for method in ("ais", "bridge"):
            rmse = f"{method}_over_is_rmse_{key}"
            seconds = f"{method}_over_is_time_{key}"
            assert finite_positive(record[rmse]) and finite_positive(record[seconds])
            assert record[rmse] == pytest.approx(
                results[method][key]["rmse"] / results["nade_is"][key]["rmse"]
            )
            assert record[seconds] == pytest.approx(
                results[method][key]["seconds_per_estimate"]
                / results["nade_is"][key]["seconds_per_estimate"]
            )
            estimates = record["ratio_estimates"][seconds]
            assert set(estimates) == {"of_medians", "paired_median", "of_mins"}
            assert all(finite_positive(v) for v in estimates.values())


def test_the_rbm_is_exact_and_the_nade_is_a_proper_density(record):
    assert record["exact_cost_E"] == 2.0**16 and record["settings"]["rbm_hidden"] == 16
    assert math.isfinite(record["logz_exact"])
    # Log-likelihoods of binary 64-pixel images: finite, negative, above the uniform's.
    for key in ("ll_test_rbm", "ll_test_nade"):
        assert -64 * math.log(2) < record[key] < 0, key
    assert record["keras_version"] and record["tf_version"]


def test_cli_registers_the_benchmark():
    args = cli._parser().parse_args(["bench", "logz", "--quick", "--json", "out.json"])
    assert cli.BENCHMARKS[args.name] == "kdtfp.bench.logz" and args.quick
