"""`kdtfp bench recovery`: the record's fields are there, finite and positive.

No assertion reads a timing threshold (DESIGN.md section 5): the seconds lost to a kill and the
throughputs are what the benchmark reports, not what a test checks. The benchmark launches
local worker clusters in subprocesses, so it is marked slow.
"""

from __future__ import annotations

import json

import pytest
from bench_checks import finite_positive

from kdtfp import cli
from kdtfp.bench import recovery as bench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "out" / "recovery.json"
    result = bench.run(quick=True, json_path=str(json_path), verbose=False)
    record = json.loads(json_path.read_text())
    assert record["kill"]["seconds_lost"] == pytest.approx(result["kill"]["seconds_lost"])
    return record


def test_registered_in_the_cli():
    assert cli.BENCHMARKS["recovery"] == "kdtfp.bench.recovery"


def test_quick_run_reports_the_cost_of_a_kill_and_the_throughputs(record):
    assert record["benchmark"] == "recovery" and record["quick"] is True
    kill, speed = record["kill"], record["throughput"]
    for key in ("seconds_lost", "startup_seconds", "first_step_seconds"):
        assert finite_positive(kill[key]), (key, kill[key])
    # The parts are parts of the whole.
    assert kill["startup_seconds"] + kill["first_step_seconds"] < kill["seconds_lost"]
    survivor = kill["survivor_exit_seconds"]
    assert survivor is None or finite_positive(survivor)
    for key, value in speed.items():
        assert finite_positive(value), (key, value)
    assert speed["speedup_2_workers"] == pytest.approx(
        speed["steps_per_second_2_workers"] / speed["steps_per_second_1_worker"]
    )
    assert record["settings"]["cpu_count"] >= 1 and record["tf_version"]
    assert set(record["phase_seconds"]) == {"one_worker", "two_workers", "kill_and_restart"}


def test_quick_run_resumes_with_the_uninterrupted_sample_count(record):
    kill = record["kill"]
    assert kill["num_samples"] == kill["num_samples_uninterrupted"] > 0
    assert kill["killed_at_step"] == 10  # epoch 1, batch 3 of 6 steps per epoch
    assert kill["steps_redone"] == 2  # last backup at step 8: steps 7 and 8 run twice
    assert kill["multiplier"] == pytest.approx(kill["multiplier_uninterrupted"], rel=5e-2)
