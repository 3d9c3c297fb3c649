"""Performance benchmarks (`kdtfp bench NAME`): speed as ratios measured in one process.

Each benchmark module exposes `run(quick=False, json_path=None, verbose=True) -> dict`. Speed is
never compared across processes or machines: every number is a ratio between variants timed
on the same models, data and settings, interleaved, in the same run (DESIGN.md section 5).
"""

from kdtfp.bench.distiller import interleaved_medians, run_steps, time_block

__all__ = ["interleaved_medians", "run_steps", "time_block"]
