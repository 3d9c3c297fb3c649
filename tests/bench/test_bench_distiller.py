"""`kdtfp bench distiller`: the result's shape, and that the compared variants optimise one loss.

No assertion here reads a timing value: machines are noisy, and speed is what the benchmark
reports, not what a test checks (DESIGN.md section 5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_checks import finite_positive

from kdtfp.bench import distiller as bench
from kdtfp.bench import timing
from kdtfp.bench.distiller import RATIOS
from kdtfp.bench.distiller_variants import loss_on_batch, make_student, make_variant
from kdtfp.teachers import mlp

TIMES = (
    "handwritten_overhead_bound",
    "kdtfp_overhead_bound",
    "keras_distiller_overhead_bound",
    "kdtfp_jit_overhead_bound",
    "kdtfp_dm_overhead_bound",
    "handwritten_compute_bound",
    "kdtfp_compute_bound",
    "keras_distiller_compute_bound",
    "kdtfp_dm_compute_bound",
    "kdtfp_recompute_epoch",
    "kdtfp_cached_epoch",
    "cache_build",
)


@pytest.mark.slow
def test_quick_run_writes_every_ratio_time_and_setting(tmp_path):
    json_path = tmp_path / "bench" / "distiller.json"
    result = bench.run(quick=True, json_path=str(json_path), verbose=False)
    record = json.loads(json_path.read_text())

    assert record["benchmark"] == "distiller" and record["quick"] is True
    for key in RATIOS + ("teacher_flops_per_example", "student_flops_per_example"):
        assert finite_positive(record[key]), (key, record.get(key))
        assert record[key] == pytest.approx(result[key])
    # Infinite when the cached epoch is not faster, which a loaded machine can make happen.
    assert record["cache_break_even_epochs"] > 0
    for name in RATIOS:
        assert set(record["ratio_estimates"][name]) == {"of_medians", "paired_median", "of_mins"}
        assert all(finite_positive(v) for v in record["ratio_estimates"][name].values()), name
    for key in TIMES:
        assert finite_positive(record["times_ms"][key]), (key, record["times_ms"].get(key))
    for goal in (
        "ratio_vs_handwritten",
        "ratio_vs_keras_distiller",
        "cache_speedup",
        "dm_overhead",
    ):
        assert goal in record["goals"] and isinstance(record["goals_met"][goal], bool)

    # What was compared: FLOPs are exact, and the variants optimise the same loss.
    assert record["teacher_flops_per_example"] == 2 * (64 * 1024 + 1024 * 1024 + 1024 * 10)
    assert record["student_flops_per_example"] == 2 * (64 * 32 + 32 * 10)
    assert record["loss_check_max_abs_diff"] < 1e-4
    settings = record["settings"]
    assert settings["batch_size"] >= 512 and settings["steps_per_execution"] > 1
    assert settings["jit_compile"] is False
    assert record["keras_version"] and record["tf_version"]


def test_interleaved_medians_rotates_the_order_and_takes_medians():
    calls = []
    costs = {"a": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 30.0, 20.0])}

    def block(name):
        def run():
            calls.append(name)
            return next(costs[name])

        return run

    result = timing.interleaved_medians({"a": block("a"), "b": block("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert result["a"]["median"] == 2.0 and result["b"]["median"] == 20.0
    assert result["a"]["samples"] == [3.0, 1.0, 2.0]
    assert (result["b"]["min"], result["b"]["max"]) == (10.0, 30.0)


def test_ratio_estimates_pairs_samples_of_the_same_repeat():
    estimates = timing.ratio_estimates([2.0, 4.0, 9.0], [1.0, 4.0, 3.0])
    assert estimates["of_medians"] == pytest.approx(4.0 / 3.0)
    assert estimates["paired_median"] == pytest.approx(2.0)  # median of 2, 1, 3
    assert estimates["of_mins"] == pytest.approx(2.0)


def test_dense_flops_counts_two_flops_per_weight_of_every_dense_kernel():
    assert timing.dense_flops(mlp(64, (256, 256), 10)) == 2 * (64 * 256 + 256 * 256 + 256 * 10)


def test_variants_compute_the_same_soft_target_loss_from_the_same_weights():
    settings = bench.Settings()
    teacher = mlp(64, (256, 256), 10, name="teacher", seed=0)
    reference = make_student(settings)
    x = np.random.default_rng(0).standard_normal((64, 64)).astype("float32")
    losses = {
        kind: loss_on_batch(make_variant(kind, settings, teacher, reference), x, x)
        for kind in ("handwritten", "kdtfp", "keras_distiller", "kdtfp_jit")
    }
    # Reference: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean, in NumPy.
    t = np.asarray(teacher(x)) / settings.temperature
    s = np.asarray(reference(x)) / settings.temperature
    log_p = (
        t
        - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - t.max(-1, keepdims=True)
    )
    log_q = (
        s
        - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - s.max(-1, keepdims=True)
    )
    expected = settings.temperature**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
    for kind, value in losses.items():
        assert value == pytest.approx(expected, rel=1e-4), kind
