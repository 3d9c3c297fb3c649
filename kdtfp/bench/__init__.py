"""Performance benchmarks (`kdtfp bench NAME`): speed as ratios measured in one process.

Each benchmark module exposes `run(quick=False, json_path=None, verbose=True) -> dict`. Speed is
never compared across processes or machines: every number is a ratio between variants timed
on the same models, data and settings, interleaved, in the same run (DESIGN.md section 5).
The timing helpers below are shared by the benchmarks.
"""

from kdtfp.bench.timing import (
    epoch_timer,
    interleaved_medians,
    ratio_estimates,
    run_steps,
    step_timer,
    time_block,
)

__all__ = [
    "epoch_timer",
    "interleaved_medians",
    "ratio_estimates",
    "run_steps",
    "step_timer",
    "time_block",
]
