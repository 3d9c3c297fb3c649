"""Timing helpers shared by the benchmarks (`kdtfp bench NAME`).

A benchmark times its variants in blocks, interleaved (A, B, C, A, B, C, ...), and reports each
variant's median over the blocks; ratios between variants are then formed from samples taken
in the same process (DESIGN.md section 5). The FLOP count is here because it is not specific to
one benchmark.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np


def run_steps(model, iterator, executions: int) -> None:
    """Runs `executions` calls of `model.train_function` (each `steps_per_execution` steps).

    This is exactly what `fit` does per execution, minus callbacks and the progress bar. The
    last call's logs are read back to the host, so all queued work is finished on return.
    """
    logs = None
    for _ in range(executions):
        logs = model.train_function(iterator)
    if logs is not None:
        next(iter(logs.values())).numpy()


def time_block(fn: Callable[[], None]) -> float:
    """Wall-clock seconds of one call of `fn`, with Python's garbage collector paused.

    (A full `gc.collect()` takes ~0.3 s once TensorFlow is loaded, so only the youngest
    generation is collected before the block.)
    """
    gc.collect(0)
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def interleaved_medians(blocks: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict]:
    """Runs the timing blocks interleaved (A, B, C, A, B, C, ...) `repeats` times.

    `blocks[name]()` times one block and returns its cost in the caller's unit (e.g. ms per
    step). Returns `{name: {"median": m, "min": ..., "max": ..., "samples": [...]}}`. The order
    of the variants is rotated every repeat, so no variant always runs right after the same one.
    """
    names = list(blocks)
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(blocks[name]())
    return {
        name: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "samples": values,
        }
        for name, values in samples.items()
    }


def ratio_estimates(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Three estimates of `numerator / denominator` from interleaved samples (same repeat order).

    `of_medians` is the headline; `paired_median` (median over repeats of the ratio of the two
    blocks of one repeat, which ran close in time) and `of_mins` (the least disturbed blocks)
    are less sensitive to load from other processes. If they disagree, the machine was noisy.
    """
    paired = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "of_medians": statistics.median(numerator) / statistics.median(denominator),
        "paired_median": statistics.median(paired),
        "of_mins": min(numerator) / min(denominator),
    }


def step_timer(model, dataset, executions: int, steps_per_execution: int) -> Callable[[], float]:
    """A block timer: `executions` executions on an endless iterator, in ms per training step."""
    iterator = iter(dataset.repeat())
    run_steps(model, iterator, 1)  # warm-up on this iterator (a retrace here is not timed)

    def block() -> float:
        seconds = time_block(lambda: run_steps(model, iterator, executions))
        return 1e3 * seconds / (executions * steps_per_execution)

    return block


def epoch_timer(model, dataset, executions: int) -> Callable[[], float]:
    """A block timer: one full pass over `dataset` (a fresh iterator each time), in ms per epoch."""
    run_steps(model, iter(dataset), 1)

    def block() -> float:
        iterator = iter(dataset)  # creating the iterator (shuffle buffer fill) is part of an epoch
        return 1e3 * time_block(lambda: run_steps(model, iterator, executions))

    return block


def calibrate_executions(model, dataset, target_seconds: float) -> int:
    """Executions per block so that a block of `model` lasts about `target_seconds`."""
    iterator = iter(dataset.repeat())
    run_steps(model, iterator, 1)
    seconds = time_block(lambda: run_steps(model, iterator, 2)) / 2
    return max(1, round(target_seconds / max(seconds, 1e-6)))


def dense_flops(model) -> int:
    """Forward-pass FLOPs per example of an MLP: 2 * fan_in * fan_out per Dense layer (biases and
    activations, O(width), are left out)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape))
    return total


def mlp_arch(input_dim, hidden, num_classes) -> str:
    """An MLP's layer widths, e.g. "64-256-256-10"."""
    return "-".join(str(width) for width in (input_dim, *hidden, num_classes))


def environment() -> dict:
    """Versions and device of this run, for a benchmark's JSON record."""
    import os

    import tensorflow as tf

    import kdtfp

    return {
        "device": "CPU" if not tf.config.list_physical_devices("GPU") else "GPU",
        "cpu_count": os.cpu_count(),
        "keras_version": keras.__version__,
        "tf_version": tf.__version__,
        "kdtfp_version": kdtfp.__version__,
    }


def report(
    output: dict,
    json_path: str | None,
    verbose: bool,
    format_table,
    started: float,
    phases: dict | None = None,
) -> dict:
    """Completes a benchmark's record and hands it out.

    Adds the run's device and CPU count to `output["settings"]`, the library versions,
    `phase_seconds` (when `phases` is given) and `seconds` since `started` (a
    `time.perf_counter()` value); then prints `format_table(output)` when `verbose`, writes
    `output` to `json_path` (directories created) when given, and returns it.
    """
    import json
    import os
    import time

    env = environment()
    output.setdefault("settings", {}).update(device=env["device"], cpu_count=env["cpu_count"])
    output.update({k: v for k, v in env.items() if k.endswith("_version")})
    if phases is not None:
        output["phase_seconds"] = phases
    output["seconds"] = time.perf_counter() - started
    if verbose:
        print(format_table(output))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as handle:
            json.dump(output, handle, indent=2)
    return output
