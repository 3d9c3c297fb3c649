"""`kdtfp run --seed N` is reproducible: two `--quick` runs give identical metrics on CPU."""

from __future__ import annotations

import re

import pytest

from kdtfp.determinism import op_determinism_enabled, set_determinism

# Wall-clock and memory measurements are the only metrics allowed to differ between two runs.
TIMING = re.compile(r"seconds|time|per_second|speed|throughput|rss|memory")
# The two cheapest recipes at --quick scale (about 17 s and 27 s on 2 cores).
RECIPES = ("kd-lda", "compact-predictive")


def _reproducible(record):
    metrics = {k: v for k, v in record["metrics"].items() if not TIMING.search(k)}
    return metrics, record.get("baselines"), record["seed"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_quick_runs_give_identical_metrics(recipe, run_recipe, tmp_path_factory):
    # The first run is shared with tests/recipes (same name and flags); the second is fresh.
    _, first, _ = run_recipe(recipe, tmp_path_factory.mktemp(f"{recipe}-a"))
    _, second, _ = run_recipe(recipe, tmp_path_factory.mktemp(f"{recipe}-b"), fresh=True)
    metrics, baselines, seed = _reproducible(first)
    assert len(metrics) >= 5, f"too few non-timing metrics to compare: {sorted(metrics)}"
    assert _reproducible(second) == (metrics, baselines, seed)


def test_set_determinism_seeds_and_enables_op_determinism(monkeypatch):
    import keras
    from tensorflow.python.framework import config

    monkeypatch.delenv("TF_DETERMINISTIC_OPS", raising=False)  # restored after the test
    assert not op_determinism_enabled()
    try:
        set_determinism(7)
        assert op_determinism_enabled()
        first = keras.ops.convert_to_numpy(keras.random.normal((3,)))
        set_determinism(7)
        second = keras.ops.convert_to_numpy(keras.random.normal((3,)))
        assert first.tolist() == second.tolist()
    finally:
        config.disable_op_determinism()  # process-wide: leave the other tests as they were


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": 0, "op_determinism": 1}, "op_det")],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        set_determinism(**kwargs)
