"""`kdtfp bench arhmm`: log-likelihood throughput of our ARHMM against `tfd.HiddenMarkovModel`.

Everything is measured in one process on the same parameters and batch (DESIGN.md section 5).
For each cell `(T, K, jit)`, an `AutoregressiveHMM(K, order=1)` with D = 2 and fixed random
globals (seeded) scores a batch of `batch_size` sequences of `T + 1` observations (the first
conditioned on, `T` modelled steps) two ways, each a `tf.function` of the batch with
`jit_compile=jit` that computes everything from the model's parameters:

* `ours`: `AutoregressiveHMM.log_likelihood(x)`, i.e. the AR emission densities and the scaled
  forward pass (`kdtfp.models.arhmm.forward_log_likelihood`);
* `tfp`: `tfd.HiddenMarkovModel(...).log_prob(x[:, 1:])` with the same initial and transition
  distributions and, as observation distribution, the AR emissions given the observed previous
  values, `Independent(Normal(A_k x_{t-1} + b_k, sigma_k))`, `[B, T, K]`, with
  `time_varying_observation_distribution=True` (TFP's forward pass is a `foldl` of a
  `logsumexp` over `[B, K, K]`).

Both are checked first: `max_rel_diff` = max over the batch of |ours - tfp| / |tfp| (goal
<= 1e-4 in every cell; a cell over it is flagged in `disagreements`). They are then timed after
warm-up (tracing and XLA compilation excluded) in interleaved blocks (ours, tfp, ours, ...) of
a calibrated number of calls, and each one's median over the blocks is used:

* `ours_steps_per_second`, `tfp_steps_per_second`: sequence-steps per second, `B * T / time`;
* `ratio` = ours throughput / TFP throughput = TFP time / our time (goal >= 1.0 everywhere),
  with `ratio_estimates` (of medians, paired median, of minima: when they disagree, the machine
  was noisy; rerun on a quieter one).

The observations are i.i.d. N(0, 1.5^2) (the sequence values do not change the work done).
The batch is `batch_size` for every T (32: at T = 4096 TFP without XLA takes ~0.15-0.3 s per
call on 2 CPU cores, which still fits the time budget). `quick` runs T in {48, 512}, K = 4 and
fewer repeats (about 20-30 s on 2 CPU cores); the full run all of T in {48, 512, 4096},
K in {4, 16}, jit off and on.

Usage:

>>> from kdtfp.bench import arhmm
>>> result = arhmm.run(quick=True, json_path="bench_arhmm.json")
>>> result["min_ratio"], result["max_rel_diff"]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from kdtfp.bench.timing import interleaved_medians, ratio_estimates, report, time_block
from kdtfp.models.arhmm import AutoregressiveHMM

tfd = tfp.distributions

GOALS = {"ratio": (">=", 1.0), "max_rel_diff": ("<=", 1e-4)}
VARIANTS = ("ours", "tfp")


@dataclass(frozen=True)
class Settings:
    """What is benchmarked; `quick` changes which cells and how long, never how."""

    steps: tuple = (48, 512, 4096)  # T, modelled steps per sequence
    states: tuple = (4, 16)  # K
    jit: tuple = (False, True)
    batch_size: int = 32
    observation_dim: int = 2
    order: int = 1
    repeats: int = 9  # interleaved timing blocks per variant and cell
    block_seconds: float = 0.12  # target length of one timing block
    seed: int = 0

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(steps=(48, 512), states=(4,), repeats=5, block_seconds=0.04)
        return cls()


def cell_name(steps: int, states: int, jit: bool) -> str:
    """The key of one cell, e.g. `T512_K4_jit` or `T48_K16_nojit`."""
    return f"T{steps}_K{states}_{'jit' if jit else 'nojit'}"


def _model(settings, states):
    """An ARHMM with fixed random globals (the posterior means are what both sides score)."""
    model = AutoregressiveHMM(
        states,
        order=settings.order,
        observation_dim=settings.observation_dim,
        num_sequences=settings.batch_size,
        seed=settings.seed,
    )
    rng = np.random.default_rng(settings.seed + states)
    for weight, scale in (
        (model.coefficient_loc, 0.3),
        (model.bias_loc, 1.0),
        (model.log_scale_loc, 0.3),
        (model.initial_loc, 1.0),
        (model.transition_loc, 1.0),
    ):
        weight.assign(rng.normal(0.0, scale, weight.shape).astype("float32"))
    return model


def tfp_hidden_markov_model(model, x):
    """`tfd.HiddenMarkovModel` equal to `model` (AR order 1) on the batch `x` (`[B, T + 1, D]`):
    per-step emissions `N(A_k x_{t-1} + b_k, diag sigma_k^2)`, batch shape `[B]`, `T` steps."""
    if model.order != 1:
        raise ValueError(f"Only AR order 1 is benchmarked; got `order`={model.order}.")
    params = model.parameters()
    mean = tf.einsum("btd,ked->btke", x[:, :-1], params["coefficients"][:, 0]) + params["bias"]
    return tfd.HiddenMarkovModel(
        tfd.Categorical(logits=params["log_initial"]),
        tfd.Categorical(logits=params["log_transition"]),
        tfd.Independent(tfd.Normal(mean, params["scale"]), 1),
        num_steps=x.shape[1] - 1,
        time_varying_observation_distribution=True,
    )


def _functions(model, jit):
    ours = tf.function(lambda x: model.log_likelihood(x), jit_compile=jit)
    theirs = tf.function(
        lambda x: tfp_hidden_markov_model(model, x).log_prob(x[:, 1:]), jit_compile=jit
    )
    return {"ours": ours, "tfp": theirs}


def _call_timer(function, x, target_seconds):
    """A block timer: `calls` calls of `function(x)` (result read back), in ms per call; the
    number of calls is calibrated so that a block lasts about `target_seconds`."""

    def calls_of(count):
        for _ in range(count):
            function(x).numpy()

    one = min(time_block(lambda: calls_of(1)) for _ in range(2))
    calls = max(1, round(target_seconds / max(one, 1e-6)))

    def block() -> float:
        return 1e3 * time_block(lambda: calls_of(calls)) / calls

    return block, calls


def _cell(settings, model, x, steps, states, jit):
    functions = _functions(model, jit)
    phase = time.perf_counter()
    values = {name: function(x).numpy() for name, function in functions.items()}  # traces
    compile_seconds = time.perf_counter() - phase
    reference = values["tfp"].astype(np.float64)
    difference = np.abs(values["ours"].astype(np.float64) - reference)
    max_rel_diff = float(np.max(difference / np.maximum(np.abs(reference), 1e-30)))
    timers, calls = {}, {}
    for name, function in functions.items():
        timers[name], calls[name] = _call_timer(function, x, settings.block_seconds)
    stats = interleaved_medians(timers, settings.repeats)
    times = {name: stats[name]["median"] for name in VARIANTS}
    sequence_steps = settings.batch_size * steps
    ratio = times["tfp"] / times["ours"]
    return {
        "steps": steps,
        "states": states,
        "jit_compile": jit,
        "batch_size": settings.batch_size,
        "ours_ms": times["ours"],
        "tfp_ms": times["tfp"],
        "ours_steps_per_second": 1e3 * sequence_steps / times["ours"],
        "tfp_steps_per_second": 1e3 * sequence_steps / times["tfp"],
        "ratio": ratio,
        "ratio_estimates": ratio_estimates(stats["tfp"]["samples"], stats["ours"]["samples"]),
        "goal_met": bool(ratio >= GOALS["ratio"][1]),
        "max_rel_diff": max_rel_diff,
        "max_abs_diff": float(np.max(difference)),
        "agree": bool(max_rel_diff <= GOALS["max_rel_diff"][1]),
        "mean_log_likelihood_per_step": float(np.mean(reference) / steps),
        "calls_per_block": calls,
        "timing_samples_ms": {name: stats[name]["samples"] for name in VARIANTS},
        "trace_seconds": compile_seconds,
    }


def run(quick: bool = False, json_path: str | None = None, verbose: bool = True) -> dict:
    """Runs the ARHMM log-likelihood benchmark and returns (and optionally writes) its results.

    Args:
        quick: T in {48, 512}, K = 4 and fewer, shorter blocks (about 20-30 s on 2 CPU cores).
        json_path: where to write the results as JSON (directories are created).
        verbose: print progress and a table.

    Returns:
        A dict with `cells` (`{cell_name: {ours_ms, tfp_ms, ours_steps_per_second,
        tfp_steps_per_second, ratio, ratio_estimates, max_rel_diff, agree, goal_met, ...}}`),
        `ratios` (`{cell_name: ratio}`), `min_ratio`, `max_rel_diff`, `disagreements` (cells
        over 1e-4), `goals`/`goals_met`, settings, versions and timings of the run.
    """
    started = time.perf_counter()
    settings = Settings.for_run(quick)
    log = print if verbose else (lambda *_args, **_kwargs: None)
    rng = np.random.default_rng(settings.seed)
    cells = {}
    for states in settings.states:
        model = _model(settings, states)
        for steps in settings.steps:
            shape = (settings.batch_size, steps + settings.order, settings.observation_dim)
            x = tf.constant(rng.normal(0.0, 1.5, shape).astype("float32"))
            for jit in settings.jit:
                name = cell_name(steps, states, jit)
                phase = time.perf_counter()
                cells[name] = _cell(settings, model, x, steps, states, jit)
                cells[name]["seconds"] = time.perf_counter() - phase
                log(
                    f"[bench arhmm] {name}: ratio {cells[name]['ratio']:.2f}, "
                    f"max rel diff {cells[name]['max_rel_diff']:.1e} "
                    f"({cells[name]['seconds']:.1f} s)"
                )
    ratios = {name: cell["ratio"] for name, cell in cells.items()}
    max_rel_diff = max(cell["max_rel_diff"] for cell in cells.values())
    output = {
        "benchmark": "arhmm",
        "quick": bool(quick),
        "cells": cells,
        "ratios": ratios,
        "min_ratio": min(ratios.values()),
        "max_rel_diff": max_rel_diff,
        "disagreements": [name for name, cell in cells.items() if not cell["agree"]],
        "goals": {name: f"{op} {value:g}" for name, (op, value) in GOALS.items()},
        "goals_met": {
            "ratio": all(cell["goal_met"] for cell in cells.values()),
            "max_rel_diff": all(cell["agree"] for cell in cells.values()),
        },
        "settings": {
            **{
                key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(settings).items()
            },
            "data": "i.i.d. N(0, 1.5^2) observations, [batch_size, T + order, D]",
            "ours": "AutoregressiveHMM.log_likelihood (forward_log_likelihood), tf.function",
            "baseline": "tfd.HiddenMarkovModel(time_varying_observation_distribution=True)"
            ".log_prob, tf.function",
            "throughput_unit": "sequence-steps per second (batch_size * T / seconds per call)",
        },
        "tfp_version": tfp.__version__,
    }
    return report(output, json_path, verbose, format_table, started=started)


def format_table(output: dict) -> str:
    """A readable summary of `run`'s result."""
    settings = output["settings"]
    lines = [
        f"kdtfp bench arhmm  (tf {output['tf_version']}, tfp {output['tfp_version']}, "
        f"{settings['device']} x{settings['cpu_count']}, AR order {settings['order']}, "
        f"D {settings['observation_dim']}, batch {settings['batch_size']}, "
        f"repeats {settings['repeats']})",
        "",
        f"{'T':>5}{'K':>4}{'jit':>5}{'ours ms':>10}{'tfp ms':>10}{'ours steps/s':>14}"
        f"{'tfp steps/s':>14}{'ratio':>7}{'paired':>8}{'of mins':>8}{'max rel diff':>14}",
    ]
    for cell in output["cells"].values():
        estimate = cell["ratio_estimates"]
        flags = ("" if cell["goal_met"] else "  < 1") + ("" if cell["agree"] else "  DISAGREE")
        lines.append(
            f"{cell['steps']:>5}{cell['states']:>4}{'on' if cell['jit_compile'] else 'off':>5}"
            f"{cell['ours_ms']:>10.3f}{cell['tfp_ms']:>10.3f}"
            f"{cell['ours_steps_per_second']:>14,.0f}{cell['tfp_steps_per_second']:>14,.0f}"
            f"{cell['ratio']:>7.2f}{estimate['paired_median']:>8.2f}{estimate['of_mins']:>8.2f}"
            f"{cell['max_rel_diff']:>14.1e}{flags}"
        )
    met = output["goals_met"]
    lines += [
        "",
        f"ratio = ours / TFP throughput (of medians), goal {output['goals']['ratio']} "
        f"everywhere: {'met' if met['ratio'] else 'MISSED'} (min {output['min_ratio']:.2f})",
        f"agreement, goal max rel diff {output['goals']['max_rel_diff']}: "
        f"{'met' if met['max_rel_diff'] else 'MISSED'} (max {output['max_rel_diff']:.1e}"
        + (f"; over it: {', '.join(output['disagreements'])}" if output["disagreements"] else "")
        + ")",
        f"total {output['seconds']:.1f} s",
    ]
    return "\n".join(lines)
