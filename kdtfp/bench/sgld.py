"""`kdtfp bench sgld`: the cost of a Langevin step against an Adam step, as ratios.

Everything is measured in one process on the same model, data and batches (DESIGN.md section
5): the BKD digits student of METHODS.md 4.7 (a 64-16-10 MLP) on `kdtfp.datasets.load_digits_split()`
with the loss `kdtfp.losses.TeacherDirichletPosterior(lam=5, temperature=2)` and packed targets
from a fixed, randomly initialised teacher (64-256-256-10; only its logits matter here, and they
are computed once). The variants differ only in the optimizer:

* `adam`: `keras.optimizers.Adam` (the optimizer that finds the mode before sampling);
* `sgld`: `kdtfp.optimizers.SGLD` (one posterior state per step);
* `psgld`: `kdtfp.optimizers.PSGLD` (RMSprop-preconditioned).

All start from identical weights and are timed after warm-up (tracing excluded) in interleaved
blocks (A, B, C, A, B, C, ...) of equal steps; each variant's median over the blocks is used.
Reported:

* `sgld_step_ratio` = SGLD ms/step / Adam ms/step (goal <= 1.15; METHODS.md 4.7 measured 1.10
  for a hand-written SGLD), and `psgld_step_ratio` likewise;
* `chain_step_ratio` = (ms/step of `chains` SGLD chains run side by side in one
  `kdtfp.models.parallel_chains` model) / `chains` / Adam ms/step: the cost of one chain-step
  when chains share a step (METHODS.md 4.7 measured 1.60 / 24 chains side by side for its
  prototype, which drew the noise per chain), and `chain_samples_per_second`;
* `samples_per_second`: SGLD steps per second, i.e. posterior states per second at thin = 1;
* `sampler_overhead_ratio`: a `fit` of SGLD steps with a `kdtfp.callbacks.PosteriorSampler`
  (burn-in 0, thin = `sampler_thin`) / the same `fit` without it (same model and steps; both
  blocks include `fit`'s own per-call cost), and `kept_samples_per_second`, the snapshots the
  sampler kept per second of that `fit`.

On a shared machine other processes' load moves single blocks by tens of percent, so each
ratio is also given as `ratio_estimates[name]` (of medians, paired median, of minima); when
they disagree by more than the goal's margin, run again on a quieter machine.

Usage:

>>> from kdtfp.bench import sgld
>>> result = sgld.run(quick=True, json_path="bench_sgld.json")
>>> result["sgld_step_ratio"], result["samples_per_second"]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from kdtfp.bench.timing import (
    calibrate_executions,
    dense_flops,
    interleaved_medians,
    mlp_arch,
    ratio_estimates,
    report,
    step_timer,
    time_block,
)
from kdtfp.callbacks import PosteriorSampler
from kdtfp.datasets import load_digits_split
from kdtfp.losses import TeacherDirichletPosterior
from kdtfp.models import parallel_chains, repeat_targets
from kdtfp.optimizers import PSGLD, SGLD
from kdtfp.teachers import mlp

GOALS = {"sgld_step_ratio": ("<=", 1.15)}

# Every ratio reported: name -> (numerator, denominator), both keys of `times_ms`.
RATIO_TERMS = {
    "sgld_step_ratio": ("sgld", "adam"),
    "psgld_step_ratio": ("psgld", "adam"),
    "sampler_overhead_ratio": ("sgld_fit_sampler", "sgld_fit"),
}
RATIOS = tuple(RATIO_TERMS)
VARIANTS = ("adam", "sgld", "psgld")


@dataclass(frozen=True)
class Settings:
    """What is benchmarked; `quick` only changes how long, never what."""

    student_hidden: tuple = (16,)
    teacher_hidden: tuple = (256, 256)
    lam: float = 5.0
    temperature: float = 2.0
    batch_size: int = 64
    steps_per_execution: int = 8
    adam_learning_rate: float = 3e-4
    sgld_learning_rate: float = 1e-5
    sampler_thin: int = 8  # one snapshot per execution
    chains: int = 8  # chains side by side in the parallel-chains variant
    repeats: int = 21  # interleaved timing blocks per variant
    block_seconds: float = 0.15  # target length of one timing block
    seed: int = 0

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(repeats=5, block_seconds=0.06)
        return cls()


def _student(settings, num_classes):
    return mlp(64, settings.student_hidden, num_classes, name="student", seed=settings.seed)


def _optimizer(kind, settings, data_size):
    if kind == "adam":
        return keras.optimizers.Adam(settings.adam_learning_rate)
    cls = SGLD if kind == "sgld" else PSGLD
    return cls(settings.sgld_learning_rate, data_size=data_size, seed=settings.seed)


def _variant(kind, settings, reference, loss, data_size):
    model = keras.models.clone_model(reference)
    model.set_weights(reference.get_weights())
    model.compile(
        optimizer=_optimizer(kind, settings, data_size),
        loss=loss,
        steps_per_execution=settings.steps_per_execution,
        jit_compile=False,
    )
    return model


def _fit_timer(model, dataset, steps, callbacks_factory):
    """A block timer: one `fit` of `steps` steps on `dataset` (finite), in ms per step."""
    take = dataset.repeat().take(steps)
    fit = dict(epochs=1, verbose=0, shuffle=False)
    model.fit(take, callbacks=callbacks_factory(), **fit)  # warm-up

    def block() -> float:
        callbacks = callbacks_factory()
        seconds = time_block(lambda: model.fit(take, callbacks=callbacks, **fit))
        return 1e3 * seconds / steps

    return block


def run(quick: bool = False, json_path: str | None = None, verbose: bool = True) -> dict:
    """Runs the SGLD benchmark and returns (and optionally writes) its results.

    Args:
        quick: fewer repeats and shorter blocks (about 10-20 s on 2 CPU cores); same model
            and data.
        json_path: where to write the results as JSON (directories are created).
        verbose: print progress and a table.

    Returns:
        A dict with `sgld_step_ratio`, `psgld_step_ratio`, `sampler_overhead_ratio`,
        `samples_per_second`, `kept_samples_per_second`, the raw medians in `times_ms`
        (ms per step), `ratio_estimates`, the timing samples, settings, versions and
        `goals`/`goals_met`.
    """
    started = time.perf_counter()
    settings = Settings.for_run(quick)
    log = print if verbose else (lambda *_args, **_kwargs: None)
    keras.utils.set_random_seed(settings.seed)
    phases = {}

    phase = time.perf_counter()
    split = load_digits_split()
    x, y = split.x_train, split.y_train
    num_classes = int(y.max()) + 1
    teacher = mlp(64, settings.teacher_hidden, num_classes, name="teacher", seed=settings.seed + 10)
    teacher_logits = teacher.predict(x, batch_size=512, verbose=0)
    targets = TeacherDirichletPosterior.targets(y, teacher_logits)
    loss = TeacherDirichletPosterior(lam=settings.lam, temperature=settings.temperature)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, targets))
        .shuffle(len(x), seed=settings.seed, reshuffle_each_iteration=False)
        .batch(settings.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    reference = _student(settings, num_classes)
    models = {kind: _variant(kind, settings, reference, loss, len(x)) for kind in VARIANTS}
    # The same batches with targets repeated for every chain ([B, chains, 1 + K]).
    chain_dataset = dataset.map(lambda xb, tb: (xb, repeat_targets(tb, settings.chains)))
    models["sgld_chains"] = parallel_chains(reference, settings.chains)
    models["sgld_chains"].compile(
        optimizer=SGLD(
            settings.sgld_learning_rate, data_size=len(x) * settings.chains, seed=settings.seed
        ),
        loss=loss,
        steps_per_execution=settings.steps_per_execution,
        jit_compile=False,
    )
    datasets = {kind: dataset for kind in VARIANTS} | {"sgld_chains": chain_dataset}
    check_batch = next(iter(dataset))
    initial_losses = [float(loss(check_batch[1], models[k](check_batch[0]))) for k in VARIANTS]
    for kind, model in models.items():  # builds and traces (not timed)
        model.fit(
            datasets[kind].take(settings.steps_per_execution), epochs=1, verbose=0, shuffle=False
        )
    phases["build"] = time.perf_counter() - phase

    # 1. Step time: interleaved blocks of equal steps on endless iterators over the same batches.
    phase = time.perf_counter()
    # Median of three calibrations: one slow moment on a shared machine would shorten every block.
    executions = sorted(
        calibrate_executions(models["adam"], dataset, settings.block_seconds) for _ in range(3)
    )[1]
    log(
        f"[bench sgld] steps: {executions} executions x {settings.steps_per_execution} steps per "
        f"block, {settings.repeats} repeats"
    )
    timers = {
        kind: step_timer(model, datasets[kind], executions, settings.steps_per_execution)
        for kind, model in models.items()
    }
    stats = interleaved_medians(timers, settings.repeats)
    phases["steps"] = time.perf_counter() - phase

    # 2. PosteriorSampler overhead: `fit` with and without it, on the SGLD model.
    phase = time.perf_counter()
    fit_steps = executions * settings.steps_per_execution
    samplers = []

    def with_sampler():
        sampler = PosteriorSampler(
            burn_in=0, thin=settings.sampler_thin, max_samples=10**9, verbose=0
        )
        samplers.append(sampler)
        return [sampler]

    log(f"[bench sgld] PosteriorSampler(thin={settings.sampler_thin}): fit of {fit_steps} steps")
    fit_timers = {
        "sgld_fit": _fit_timer(models["sgld"], dataset, fit_steps, list),
        "sgld_fit_sampler": _fit_timer(models["sgld"], dataset, fit_steps, with_sampler),
    }
    stats.update(interleaved_medians(fit_timers, settings.repeats))
    kept_per_fit = len(samplers[-1])
    phases["sampler"] = time.perf_counter() - phase

    times = {name: s["median"] for name, s in stats.items()}
    ratios = {name: times[a] / times[b] for name, (a, b) in RATIO_TERMS.items()}
    estimates = {
        name: ratio_estimates(stats[a]["samples"], stats[b]["samples"])
        for name, (a, b) in RATIO_TERMS.items()
    }
    per_chain = [t / settings.chains for t in stats["sgld_chains"]["samples"]]
    ratios["chain_step_ratio"] = times["sgld_chains"] / settings.chains / times["adam"]
    estimates["chain_step_ratio"] = ratio_estimates(per_chain, stats["adam"]["samples"])
    fit_seconds = times["sgld_fit_sampler"] * fit_steps / 1e3
    output = {
        "benchmark": "sgld",
        "quick": bool(quick),
        **ratios,
        "samples_per_second": 1e3 / times["sgld"],
        "psgld_samples_per_second": 1e3 / times["psgld"],
        "chain_samples_per_second": 1e3 * settings.chains / times["sgld_chains"],
        "kept_samples_per_second": kept_per_fit / fit_seconds,
        "goals": {name: f"{op} {value}" for name, (op, value) in GOALS.items()},
        "goals_met": {
            name: bool(ratios[name] <= value if op == "<=" else ratios[name] >= value)
            for name, (op, value) in GOALS.items()
        },
        "times_ms": times,
        "ratio_estimates": estimates,
        "timing_samples_ms": {name: s["samples"] for name, s in stats.items()},
        "initial_loss_max_abs_diff": max(initial_losses) - min(initial_losses),
        "student_parameters": int(sum(np.prod(w.shape) for w in reference.trainable_weights)),
        "student_flops_per_example": dense_flops(reference),
        "settings": {
            **{
                key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(settings).items()
            },
            "executions_per_block": executions,
            "fit_steps_per_block": fit_steps,
            "kept_samples_per_fit": kept_per_fit,
            "data": "sklearn digits, load_digits_split() training set",
            "data_size": len(x),
            "student": mlp_arch(64, settings.student_hidden, num_classes),
            "teacher": mlp_arch(64, settings.teacher_hidden, num_classes) + " (random, fixed)",
            "loss": f"TeacherDirichletPosterior(lam={settings.lam}, temperature={settings.temperature})",
            "jit_compile": False,
        },
    }
    return report(output, json_path, verbose, format_table, started=started, phases=phases)


def format_table(output: dict) -> str:
    """A readable summary of `run`'s result."""
    settings = output["settings"]
    times = output["times_ms"]
    lines = [
        f"kdtfp bench sgld  (keras {output['keras_version']}, tf {output['tf_version']}, "
        f"{settings['device']} x{settings['cpu_count']}, student {settings['student']}, "
        f"batch {settings['batch_size']}, steps_per_execution {settings['steps_per_execution']}, "
        f"repeats {settings['repeats']}, jit off)",
        "",
        f"{'variant':<28}{'ms/step':>10}",
    ]
    for name in (*VARIANTS, "sgld_chains", "sgld_fit", "sgld_fit_sampler"):
        lines.append(f"{name:<28}{times[name]:>10.4f}")
    lines += ["", f"{'ratio (of medians)':<28}{'value':>8}{'paired':>8}{'of mins':>9}  goal"]
    for name in (*RATIOS, "chain_step_ratio"):
        estimate = output["ratio_estimates"][name]
        if name in output["goals"]:
            goal = f"{output['goals'][name]} ({'met' if output['goals_met'][name] else 'MISSED'})"
        else:
            goal = "(information)"
        lines.append(
            f"{name:<28}{output[name]:>8.3f}{estimate['paired_median']:>8.3f}"
            f"{estimate['of_mins']:>9.3f}  {goal}"
        )
    lines += [
        "",
        f"SGLD posterior states per second (thin 1): {output['samples_per_second']:,.0f}; "
        f"PSGLD: {output['psgld_samples_per_second']:,.0f}; {settings['chains']} chains side by "
        f"side: {output['chain_samples_per_second']:,.0f}",
        f"kept samples per second with PosteriorSampler(thin={settings['sampler_thin']}): "
        f"{output['kept_samples_per_second']:,.0f}",
        f"initial loss check (max |difference| between variants): "
        f"{output['initial_loss_max_abs_diff']:.2e}",
    ]
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in output["phase_seconds"].items())
    lines.append(f"total {output['seconds']:.1f} s ({phases})")
    return "\n".join(lines)
