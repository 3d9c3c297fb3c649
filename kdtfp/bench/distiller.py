"""`kdtfp bench distiller`: the cost of `kdtfp.Distiller` against its baselines, as ratios.

Everything is measured in one process, on the same models, data, optimizer, batch size and
`steps_per_execution`, following METHODS.md section 5.6 ("Benchmarking the Distiller"):
steps are timed after warm-up (building, tracing and compiling excluded), the variants of a
comparison are timed in interleaved blocks (A, B, C, A, B, C, ...) and each variant's median
over the blocks is used. Ratios are ours / baseline, so lower is better for every ratio but
`cache_speedup`.

Two model settings are used, both with a small student (64-32-10), batch 512 and
`steps_per_execution=8`:

* **compute-bound**: a big teacher (64-1024-1024-10, ~475x the student's forward FLOPs), where
  the teacher's matmuls dominate the step. Here: `cache_speedup` (an epoch recomputing the
  teacher / an epoch on `kdtfp.distill.teacher_cached_dataset`), `dm_overhead` (soft targets +
  projected derivative matching / soft targets only) and, for information, the two
  framework ratios.
* **overhead-bound**: the teacher of METHODS.md's reference measurement (64-256-256-10). A CPU
  step of this size is mostly fixed Keras/TensorFlow cost, so this is where a framework's own
  per-step overhead shows, and where the headline `ratio_vs_handwritten`,
  `ratio_vs_keras_distiller` and `ratio_jit` are measured (with a big teacher any overhead
  would hide behind the teacher's compute, which would flatter kdtfp).

The variants:

* `kdtfp`: `kdtfp.Distiller(student, teacher, [(SoftTargetKL(T), 1.0)])`.
* `handwritten`: a `keras.Model` subclass whose `compute_loss` computes the same
  `T^2 * KL(softmax(t/T) || softmax(s/T))`, batch-mean, by hand with `keras.ops`.
* `keras_distiller`: `keras.distillation.Distiller` with
  `LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence())` (a Loss object, so it
  applies softmax and T^2; the default string loss does not, DESIGN.md rule 11) and
  `student_loss_weight=0.0`, so that it optimises the same loss.
* `kdtfp_jit`: `kdtfp` compiled with `jit_compile=True`.
* `kdtfp_dm`: `kdtfp` with `DerivativeMatching(mode="projection", num_projections=1)` added.
* `kdtfp_cached`: `kdtfp` trained on `teacher_cached_dataset`.

On a shared machine other processes' load moves single blocks by tens of percent, so each
ratio is also given as `ratio_estimates[name]`: of medians (the headline), the median of the
per-repeat paired ratios, and of minima. When they disagree by more than the goal's margin,
the run was too noisy to decide that goal; run it again on a quiet machine.

Before timing, every variant's loss on one batch is computed from identical weights; their
largest difference is reported as `loss_check_max_abs_diff` (the variants must optimise the
same objective for the ratios to mean anything).

Usage:

>>> from kdtfp.bench import distiller
>>> result = distiller.run(quick=True, json_path="bench_distiller.json")
>>> result["ratio_vs_handwritten"], result["cache_speedup"]
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from kdtfp.bench.distiller_variants import loss_on_batch, make_student, make_variant
from kdtfp.bench.timing import (
    calibrate_executions,
    dense_flops,
    epoch_timer,
    interleaved_medians,
    mlp_arch,
    ratio_estimates,
    report,
    step_timer,
)
from kdtfp.distill import teacher_cached_dataset
from kdtfp.teachers import mlp

GOALS = {
    "ratio_vs_handwritten": ("<=", 1.05),
    "ratio_vs_keras_distiller": ("<=", 1.0),
    "cache_speedup": (">=", 1.5),
    "dm_overhead": ("<=", 3.0),
}

# Every ratio reported: name -> (numerator, denominator), both keys of `times_ms`. The order is
# the order of the table.
RATIO_TERMS = {
    "ratio_vs_handwritten": ("kdtfp_overhead_bound", "handwritten_overhead_bound"),
    "ratio_vs_keras_distiller": ("kdtfp_overhead_bound", "keras_distiller_overhead_bound"),
    "cache_speedup": ("kdtfp_recompute_epoch", "kdtfp_cached_epoch"),
    "dm_overhead": ("kdtfp_dm_compute_bound", "kdtfp_compute_bound"),
    "ratio_jit": ("kdtfp_jit_overhead_bound", "kdtfp_overhead_bound"),
    "ratio_vs_handwritten_compute_bound": ("kdtfp_compute_bound", "handwritten_compute_bound"),
    "ratio_vs_keras_distiller_compute_bound": (
        "kdtfp_compute_bound",
        "keras_distiller_compute_bound",
    ),
    "dm_overhead_overhead_bound": ("kdtfp_dm_overhead_bound", "kdtfp_overhead_bound"),
}
RATIOS = tuple(RATIO_TERMS)


@dataclass(frozen=True)
class Settings:
    """What is benchmarked; `quick` only changes how long, never what."""

    input_dim: int = 64
    num_classes: int = 10
    student_hidden: tuple = (32,)
    teacher_hidden: tuple = (1024, 1024)  # compute-bound setting
    overhead_teacher_hidden: tuple = (256, 256)  # overhead-bound setting (METHODS.md 5.6)
    batch_size: int = 512
    steps_per_execution: int = 8
    temperature: float = 4.0
    learning_rate: float = 1e-3
    num_examples: int = 8192  # data behind the step timings (repeated)
    epoch_examples: int = 32768  # one epoch of the cache comparison
    repeats: int = 21  # interleaved timing blocks per variant
    block_seconds: float = 0.15  # target length of one timing block (the DM blocks run ~3x longer)
    seed: int = 0

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(num_examples=4096, epoch_examples=8192, repeats=5, block_seconds=0.08)
        return cls()


def _warm_up(model, dataset, settings):
    """Builds the model and traces its train function with one short `fit` (not timed)."""
    model.fit(dataset.take(settings.steps_per_execution), epochs=1, verbose=0, shuffle=False)


# ---------------------------------------------------------------------- the benchmark


def _plain_dataset(x, settings):
    return (
        tf.data.Dataset.from_tensor_slices(x)
        .batch(settings.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def _time_group(variants, dataset, settings, calibrate_on, log):
    """Interleaved ms/step medians of `variants` (all on `dataset`), equal steps per block."""
    executions = calibrate_executions(variants[calibrate_on], dataset, settings.block_seconds)
    log(
        f"  {executions} executions x {settings.steps_per_execution} steps per block, {settings.repeats} repeats"
    )
    timers = {
        name: step_timer(model, dataset, executions, settings.steps_per_execution)
        for name, model in variants.items()
    }
    return interleaved_medians(timers, settings.repeats), executions


def run(quick: bool = False, json_path: str | None = None, verbose: bool = True) -> dict:
    """Runs the Distiller benchmark and returns (and optionally writes) its results.

    Args:
        quick: fewer repeats and shorter blocks (< 60 s on 2 CPU cores); same models and data.
        json_path: where to write the results as JSON (directories are created).
        verbose: print progress and a table.

    Returns:
        A dict with the ratios (`ratio_vs_handwritten`, `ratio_vs_keras_distiller`,
        `cache_speedup`, `dm_overhead`, `ratio_jit`, plus `*_compute_bound` /
        `*_overhead_bound` companions), the raw medians in `times_ms` (ms per step, or ms per
        epoch for `*_epoch`), FLOP counts, settings, versions and `goals`/`goals_met`.
    """
    started = time.perf_counter()
    settings = Settings.for_run(quick)
    log = print if verbose else (lambda *_args, **_kwargs: None)
    keras.utils.set_random_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    x = rng.standard_normal((settings.num_examples, settings.input_dim)).astype("float32")
    x_epoch = rng.standard_normal((settings.epoch_examples, settings.input_dim)).astype("float32")
    x_check = x[: settings.batch_size]

    big_teacher = mlp(
        settings.input_dim,
        settings.teacher_hidden,
        settings.num_classes,
        name="teacher_big",
        seed=settings.seed,
    )
    small_teacher = mlp(
        settings.input_dim,
        settings.overhead_teacher_hidden,
        settings.num_classes,
        name="teacher_small",
        seed=settings.seed + 10,
    )
    reference_student = make_student(settings)
    dataset = _plain_dataset(x, settings)
    times, medians, blocks, phases = {}, {}, {}, {}

    # Every model is built from the same initial student weights; their losses on one batch are
    # compared before any of them takes a step.
    phase = time.perf_counter()
    overhead = {
        kind: make_variant(
            kind, settings, small_teacher, reference_student, jit_compile=(kind == "kdtfp_jit")
        )
        for kind in ("handwritten", "kdtfp", "keras_distiller", "kdtfp_jit", "kdtfp_dm")
    }
    compute = {
        kind: make_variant(kind, settings, big_teacher, reference_student)
        for kind in ("handwritten", "kdtfp", "keras_distiller", "kdtfp_dm")
    }
    big_teacher(x_check[:1], training=False)  # first eager call (kernel setup) not counted below
    build_start = time.perf_counter()
    cached_dataset = teacher_cached_dataset(
        big_teacher, x_epoch, batch_size=settings.batch_size, shuffle=True, seed=settings.seed
    )
    cache_build_ms = 1e3 * (time.perf_counter() - build_start)
    recompute_dataset = (
        tf.data.Dataset.from_tensor_slices(x_epoch)
        .shuffle(len(x_epoch), seed=settings.seed, reshuffle_each_iteration=True)
        .batch(settings.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    cached_model = make_variant("kdtfp_cached", settings, big_teacher, reference_student)
    cached_batch = next(iter(cached_dataset.take(1)))
    loss_checks = [
        [loss_on_batch(m, x_check, x_check) for k, m in overhead.items() if k != "kdtfp_dm"],
        [loss_on_batch(m, x_check, x_check) for k, m in compute.items() if k != "kdtfp_dm"],
        [
            loss_on_batch(compute["kdtfp"], cached_batch["inputs"], cached_batch["inputs"]),
            loss_on_batch(cached_model, cached_batch, cached_batch["inputs"]),
        ],
    ]
    phases["build"] = time.perf_counter() - phase

    # 1. overhead-bound: framework overhead per step, and jit (small teacher).
    # 2. compute-bound: the same framework ratios, and derivative matching (big teacher).
    groups = (
        ("overhead_bound", settings.overhead_teacher_hidden, overhead),
        ("compute_bound", settings.teacher_hidden, compute),
    )
    for group, teacher_hidden, variants in groups:
        arch = mlp_arch(settings.input_dim, teacher_hidden, settings.num_classes)
        log(f"[bench distiller] {group.replace('_', '-')}: teacher {arch}")
        phase = time.perf_counter()
        for model in variants.values():
            _warm_up(model, dataset, settings)
        phases[f"{group}_warm_up"] = time.perf_counter() - phase
        phase = time.perf_counter()
        result, blocks[group] = _time_group(variants, dataset, settings, "kdtfp", log)
        for name, stats in result.items():
            times[f"{name}_{group}"] = stats["median"]
            medians[f"{name}_{group}"] = stats
        phases[f"{group}_timing"] = time.perf_counter() - phase

    # 3. compute-bound epochs: recomputing the teacher vs teacher_cached_dataset (same Distiller
    # class, same shuffle/batch/prefetch pipeline; the cached one also carries the outputs).
    log("[bench distiller] epochs: recompute the teacher vs teacher_cached_dataset")
    phase = time.perf_counter()
    _warm_up(cached_model, cached_dataset, settings)
    executions = math.ceil(
        settings.epoch_examples / settings.batch_size / settings.steps_per_execution
    )
    timers = {
        "kdtfp_recompute_epoch": epoch_timer(compute["kdtfp"], recompute_dataset, executions),
        "kdtfp_cached_epoch": epoch_timer(cached_model, cached_dataset, executions),
    }
    for name, stats in interleaved_medians(timers, settings.repeats).items():
        times[name] = stats["median"]
        medians[name] = stats
    times["cache_build"] = cache_build_ms
    phases["epochs"] = time.perf_counter() - phase

    # 4. ratios: numerator / denominator, both medians over the interleaved blocks.
    ratios = {name: times[a] / times[b] for name, (a, b) in RATIO_TERMS.items()}
    estimates = {
        name: ratio_estimates(medians[a]["samples"], medians[b]["samples"])
        for name, (a, b) in RATIO_TERMS.items()
    }
    saved_per_epoch = times["kdtfp_recompute_epoch"] - times["kdtfp_cached_epoch"]
    loss_diff = max(max(group) - min(group) for group in loss_checks)

    output = {
        "benchmark": "distiller",
        "quick": bool(quick),
        **ratios,
        "goals": {name: f"{op} {value}" for name, (op, value) in GOALS.items()},
        "goals_met": {
            name: bool(ratios[name] <= value if op == "<=" else ratios[name] >= value)
            for name, (op, value) in GOALS.items()
        },
        "times_ms": times,
        "ratio_estimates": estimates,
        "timing_samples_ms": {name: stats["samples"] for name, stats in medians.items()},
        "cache_break_even_epochs": cache_build_ms / saved_per_epoch
        if saved_per_epoch > 0
        else float("inf"),
        "teacher_flops_per_example": dense_flops(big_teacher),
        "overhead_teacher_flops_per_example": dense_flops(small_teacher),
        "student_flops_per_example": dense_flops(reference_student),
        "loss_check_max_abs_diff": loss_diff,
        "settings": {
            **{
                key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(settings).items()
            },
            "executions_per_block": blocks,
            "epoch_steps": math.ceil(settings.epoch_examples / settings.batch_size),
            "optimizer": "Adam",
            "data": "synthetic N(0, I) inputs",
            "jit_compile": False,
            "jit_compile_note": "jit_compile=False for every variant except kdtfp_jit (True), timed for ratio_jit",
        },
    }
    return report(output, json_path, verbose, format_table, started=started, phases=phases)


def format_table(output: dict) -> str:
    """A readable summary of `run`'s result."""
    settings = output["settings"]
    times = output["times_ms"]
    student, teacher, overhead_teacher = (
        mlp_arch(settings["input_dim"], settings[key], settings["num_classes"])
        for key in ("student_hidden", "teacher_hidden", "overhead_teacher_hidden")
    )
    lines = [
        f"kdtfp bench distiller  (keras {output['keras_version']}, tf {output['tf_version']}, "
        f"{settings['device']} x{settings['cpu_count']}, batch {settings['batch_size']}, "
        f"steps_per_execution {settings['steps_per_execution']}, repeats {settings['repeats']}, jit off unless noted)",
        f"student {student}: {output['student_flops_per_example']:,} FLOPs/example; "
        f"teacher {teacher}: {output['teacher_flops_per_example']:,} "
        f"(compute-bound), {overhead_teacher}: "
        f"{output['overhead_teacher_flops_per_example']:,} (overhead-bound)",
        "",
        f"{'variant':<22}{'overhead-bound ms/step':>24}{'compute-bound ms/step':>24}",
    ]
    for name in ("handwritten", "kdtfp", "keras_distiller", "kdtfp_jit", "kdtfp_dm"):
        a = times.get(f"{name}_overhead_bound")
        b = times.get(f"{name}_compute_bound")
        lines.append(f"{name:<22}{_fmt(a):>24}{_fmt(b):>24}")
    lines += [
        "",
        f"epoch of {settings['epoch_steps']} steps: recompute teacher {times['kdtfp_recompute_epoch']:.1f} ms, "
        f"cached {times['kdtfp_cached_epoch']:.1f} ms; building the cache {times['cache_build']:.1f} ms "
        f"(pays back after {output['cache_break_even_epochs']:.2f} epochs)",
        "",
        f"{'ratio (of medians)':<40}{'value':>8}{'paired':>8}{'of mins':>9}  goal",
    ]
    for name in RATIOS:
        estimate = output["ratio_estimates"][name]
        if name in output["goals"]:
            goal = f"{output['goals'][name]} ({'met' if output['goals_met'][name] else 'MISSED'})"
        else:
            goal = "(information)"
        lines.append(
            f"{name:<40}{output[name]:>8.3f}{estimate['paired_median']:>8.3f}{estimate['of_mins']:>9.3f}  {goal}"
        )
    lines.append(
        f"loss check (max |difference| between variants): {output['loss_check_max_abs_diff']:.2e}"
    )
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in output["phase_seconds"].items())
    lines.append(f"total {output['seconds']:.1f} s ({phases})")
    return "\n".join(lines)


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"
