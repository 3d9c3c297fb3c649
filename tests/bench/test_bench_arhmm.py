"""`kdtfp bench arhmm`: the result's shape, positivity and finiteness, and agreement with TFP.

No assertion here reads a timing threshold: machines are noisy, and speed is what the benchmark
reports, not what a test checks (DESIGN.md section 5). The agreement of our log-likelihood with
`tfd.HiddenMarkovModel` (1e-4 relative) is a correctness check and is asserted in every cell.
"""

from __future__ import annotations

import json
import math

import pytest
from bench_checks import finite_positive

from kdtfp.bench import arhmm as bench


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "out" / "arhmm.json"
    result = bench.run(quick=True, json_path=str(json_path), verbose=False)
    record = json.loads(json_path.read_text())
    assert record["min_ratio"] == pytest.approx(result["min_ratio"])
    assert bench.format_table(record)  # the table formats from the JSON record too
    return record


def test_quick_run_covers_every_quick_cell(record):
    assert record["benchmark"] == "arhmm" and record["quick"] is True
    settings = record["settings"]
    assert settings["steps"] == [48, 512] and settings["states"] == [4]
    expected = {
        bench.cell_name(steps, states, jit)
        for steps in settings["steps"]
        for states in settings["states"]
        for jit in (False, True)
    }
    assert set(record["cells"]) == expected == set(record["ratios"])
    assert record["keras_version"] and record["tf_version"] and record["tfp_version"]


def test_quick_run_writes_finite_positive_times_rates_and_ratios(record):
    for name, cell in record["cells"].items():
        for key in (
            "ours_ms",
            "tfp_ms",
            "ours_steps_per_second",
            "tfp_steps_per_second",
            "ratio",
        ):
            assert finite_positive(cell[key]), (name, key, cell.get(key))
        assert set(cell["ratio_estimates"]) == {"of_medians", "paired_median", "of_mins"}
        assert all(finite_positive(v) for v in cell["ratio_estimates"].values()), name
        for variant in bench.VARIANTS:
            samples = cell["timing_samples_ms"][variant]
            assert len(samples) == record["settings"]["repeats"], (name, variant)
            assert all(finite_positive(v) for v in samples), (name, variant)
        # The headline numbers are the medians they are said to be.
        steps = cell["batch_size"] * cell["steps"]
        assert cell["ratio"] == pytest.approx(cell["tfp_ms"] / cell["ours_ms"])
        assert cell["ratio"] == pytest.approx(cell["ratio_estimates"]["of_medians"])
        assert cell["ours_steps_per_second"] == pytest.approx(1e3 * steps / cell["ours_ms"])
        assert isinstance(cell["goal_met"], bool)
        assert record["ratios"][name] == cell["ratio"]
    assert record["min_ratio"] == min(record["ratios"].values())
    assert record["goals"] == {"ratio": ">= 1", "max_rel_diff": "<= 0.0001"}
    assert isinstance(record["goals_met"]["ratio"], bool)


def test_our_log_likelihood_agrees_with_tfd_hidden_markov_model_in_every_cell(record):
    for name, cell in record["cells"].items():
        assert math.isfinite(cell["max_rel_diff"]) and cell["max_rel_diff"] <= 1e-4, name
        assert cell["agree"] is True, name
        assert math.isfinite(cell["mean_log_likelihood_per_step"]), name
    assert record["disagreements"] == [] and record["goals_met"]["max_rel_diff"] is True
    assert record["max_rel_diff"] == max(c["max_rel_diff"] for c in record["cells"].values())
