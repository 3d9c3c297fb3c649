"""`kdtfp bench online`: the result's shape, finiteness, positivity and memory invariants.

No assertion here reads a timing threshold: speed is what the benchmark reports, not what a
test checks (DESIGN.md section 5). Stored floats are exact bookkeeping, so they are checked.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bench_checks import finite_positive

from kdtfp import cli
from kdtfp.bench import online as bench


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "out" / "online.json"
    result = bench.run(quick=True, json_path=str(json_path), verbose=False)
    record = json.loads(json_path.read_text())
    assert record["stored_floats_batch_long"] == result["stored_floats_batch_long"]
    return record


def test_quick_run_writes_every_rate_ratio_and_memory(record):
    assert record["benchmark"] == "online" and record["quick"] is True
    for label in bench.LABELS:
        for key in (
            f"steps_per_second_online_{label}",
            f"steps_per_second_batch_{label}",
            f"online_over_batch_steps_per_second_{label}",
            f"online_over_batch_stored_floats_{label}",
            f"mcmc_seconds_batch_{label}",
            f"stored_floats_online_{label}",
            f"stored_floats_batch_{label}",
        ):
            assert finite_positive(record[key]), (key, record.get(key))
        for kind in ("online", "batch"):
            growth = record[f"peak_rss_growth_mb_{kind}_{label}"]
            assert math.isfinite(growth) and growth >= 0
        estimates = record["ratio_estimates"][f"online_over_batch_steps_per_second_{label}"]
        assert set(estimates) == {"of_medians", "paired_median", "of_mins"}
        assert all(finite_positive(v) for v in estimates.values())
    for kind in ("online", "batch_short", "batch_long"):
        assert finite_positive(record["times_ms"][kind]), kind
        samples = record["timing_samples_ms"][kind]
        assert len(samples) == record["settings"]["repeats"]
        assert record["times_ms"][kind] == pytest.approx(float(np.median(samples)))
    times = record["times_ms"]
    assert record["online_over_batch_steps_per_second_long"] == pytest.approx(
        times["batch_long"] / times["online"]
    )
    assert record["steps_per_second_online_short"] == pytest.approx(1e3 / times["online"])
    assert record["keras_version"] and record["tf_version"] and record["rss_method"]


def test_online_memory_is_independent_of_the_number_of_mcmc_steps(record):
    settings = record["settings"]
    short, long = record["mcmc_steps_short"], record["mcmc_steps_long"]
    assert short < long and [short, long] == settings["lengths"]
    dim = settings["dim"]
    # Online: the chains' states and step sizes, whatever the length.
    expected = settings["online_chains"] * (dim + 1)
    assert record["stored_floats_online_short"] == record["stored_floats_online_long"] == expected
    # Batch: the bag, L x D floats, grows in proportion to the length.
    for label, length in (("short", short), ("long", long)):
        assert record[f"bag_samples_{label}"] == length
        assert record[f"stored_floats_batch_{label}"] == length * dim
        assert record[f"online_over_batch_stored_floats_{label}"] == pytest.approx(
            expected / (length * dim)
        )
    assert record["stored_floats_batch_long"] > record["stored_floats_batch_short"]


def test_cli_registers_the_benchmark():
    args = cli._parser().parse_args(["bench", "online", "--quick", "--json", "out.json"])
    assert cli.BENCHMARKS[args.name] == "kdtfp.bench.online" and args.quick
