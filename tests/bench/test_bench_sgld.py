"""`kdtfp bench sgld`: the result's shape, positivity and finiteness.

No assertion here reads a timing threshold: machines are noisy, and speed is what the benchmark
reports, not what a test checks (DESIGN.md section 5).
"""

from __future__ import annotations

import json

import pytest
from bench_checks import finite_positive

from kdtfp import cli
from kdtfp.bench import sgld as bench


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "out" / "sgld.json"
    result = bench.run(quick=True, json_path=str(json_path), verbose=False)
    record = json.loads(json_path.read_text())
    assert record["sgld_step_ratio"] == pytest.approx(result["sgld_step_ratio"])
    return record


def test_quick_run_writes_every_ratio_rate_and_time(record):
    assert record["benchmark"] == "sgld" and record["quick"] is True
    keys = (
        "sgld_step_ratio",
        "psgld_step_ratio",
        "sampler_overhead_ratio",
        "samples_per_second",
        "psgld_samples_per_second",
        "kept_samples_per_second",
        "chain_step_ratio",
        "chain_samples_per_second",
    )
    for key in keys:
        assert finite_positive(record[key]), (key, record.get(key))
    for name in bench.RATIOS:
        assert set(record["ratio_estimates"][name]) == {"of_medians", "paired_median", "of_mins"}
        assert all(finite_positive(v) for v in record["ratio_estimates"][name].values()), name
    for name in ("adam", "sgld", "psgld", "sgld_chains", "sgld_fit", "sgld_fit_sampler"):
        assert finite_positive(record["times_ms"][name]), name
        assert len(record["timing_samples_ms"][name]) == record["settings"]["repeats"]
    # The headline numbers are the medians they are said to be.
    times = record["times_ms"]
    assert record["sgld_step_ratio"] == pytest.approx(times["sgld"] / times["adam"])
    assert record["samples_per_second"] == pytest.approx(1e3 / times["sgld"])
    chains = record["settings"]["chains"]
    assert record["chain_step_ratio"] == pytest.approx(
        times["sgld_chains"] / chains / times["adam"]
    )
    assert record["goals"] == {"sgld_step_ratio": "<= 1.15"}
    assert isinstance(record["goals_met"]["sgld_step_ratio"], bool)


def test_quick_run_compares_the_bkd_digits_student_from_identical_weights(record):
    assert record["initial_loss_max_abs_diff"] == 0.0
    assert record["student_parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    settings = record["settings"]
    assert settings["student"] == "64-16-10" and settings["data_size"] == 1200
    assert settings["steps_per_execution"] > 1 and settings["jit_compile"] is False
    # PosteriorSampler(thin = steps_per_execution) keeps one snapshot per execution.
    assert (
        settings["kept_samples_per_fit"]
        == settings["fit_steps_per_block"] // settings["sampler_thin"]
    )
    assert record["keras_version"] and record["tf_version"]


def test_cli_registers_the_benchmark():
    args = cli._parser().parse_args(["bench", "sgld", "--quick", "--json", "out.json"])
    assert cli.BENCHMARKS[args.name] == "kdtfp.bench.sgld" and args.quick
