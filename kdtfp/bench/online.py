"""`kdtfp bench online`: memory and speed of online vs batch distillation of the compact predictive.

Everything runs in one process on the `compact-predictive` recipe's setup
(`kdtfp.recipes.compact_predictive`, METHODS.md 5.4 and 5.7): the thesis's 2-D logistic toy,
prior N(0, 100 I), HMC teachers (`kdtfp.teachers.mcmc`), `MixturePredictive(10)` students
trained by SGD (minibatch 10) on cross-entropy to the teacher at fresh x ~ N(0, 10 I), with
`model.fit`'s train function. At each of two MCMC lengths L (1e3 and 1e5 steps; 500 and 5,000
with `quick`):

* **batch**: `sample_posterior` draws a bag of L samples (L / 4 transitions of 4 chains), kept
  in memory (`stored_floats` = L x D); the targets are the bag's MC predictive
  (`batch_transfer_dataset`), so a step costs O(L);
* **online**: `OnlineChain` (the recipe's C = 64 chains) advances one transition per SGD step
  inside the `tf.data` pipeline (`online_transfer_dataset`) and is run for L SGD steps; it keeps
  only the chains' state (`stored_floats` = C x (D + 1)) whatever L is.

Reported, per variant and length:

* `stored_floats_*`: floats the teacher keeps (the algorithmic memory, exact);
* `peak_rss_growth_mb_*`: growth of the process's peak resident memory over the phase that
  builds and runs the teacher (sampling and storing the bag, including the XLA compilation of
  its sampling loop, which dominates at these sizes; or L online steps), measured with
  Linux's `VmHWM`, reset before each phase through `/proc/self/clear_refs` (or, where that is
  not allowed, the growth of `resource.getrusage().ru_maxrss`, which only ever rises, so the
  phases run in increasing order of expected memory); a few MB of allocator noise is expected;
* `steps_per_second_*`: SGD steps per second of the distillation (interleaved timing blocks of
  equal steps, median; tracing excluded), and `mcmc_seconds_batch_*`, the time of sampling the
  bag (a cost the online variant spreads over its steps).

Ratios: `online_over_batch_steps_per_second_<len>` (online / batch steps per second) and
`online_over_batch_stored_floats_<len>` (online / batch stored floats), with `<len>` the
`short` and `long` length.

Usage:

>>> from kdtfp.bench import online
>>> result = online.run(quick=True, json_path="bench_online.json")
>>> result["online_over_batch_stored_floats_long"], result["online_over_batch_steps_per_second_long"]
"""

from __future__ import annotations

import resource
import time

import numpy as np
import tensorflow as tf

from kdtfp.bench.timing import (
    calibrate_executions,
    interleaved_medians,
    ratio_estimates,
    report,
    run_steps,
    step_timer,
)
from kdtfp.recipes import compact_predictive as recipe
from kdtfp.teachers.mcmc import OnlineChain
from kdtfp.teachers.mcmc_streams import (
    batch_transfer_dataset,
    gaussian_inputs,
    online_transfer_dataset,
)

LABELS = ("short", "long")


def _settings(quick: bool) -> dict:
    settings = recipe._settings(quick)
    settings.update(
        # MCMC lengths, 10x and 100x apart (the recipe's `memory_steps` in the full run).
        lengths=(500, 5_000) if quick else settings["memory_steps"],
        steps_per_execution=50,
        repeats=3 if quick else 9,
        block_seconds=0.1 if quick else 0.3,
        seed=0,
    )
    return settings


# ------------------------------------------------------------------------------ memory
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


class _PeakMemory:
    """Growth of the process's peak resident memory over a phase, in MB."""

    def __init__(self):
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            self._reset()
            self._peak()
        except OSError:
            self.method = "resource.getrusage ru_maxrss (monotone)"

    @staticmethod
    def _reset():
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def _peak(self):
        if self.method.startswith("VmHWM"):
            peak = _status_mb("VmHWM")
            if not np.isfinite(peak):
                raise OSError("no VmHWM")
            return peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def measure(self, fn):
        """`(fn(), peak RSS growth in MB)`: peak during `fn` minus resident memory before it."""
        if self.method.startswith("VmHWM"):
            self._reset()
            before = _status_mb("VmRSS")
        else:
            before = self._peak()
        value = fn()
        return value, max(0.0, self._peak() - before)


# ------------------------------------------------------------------------------- run
def run(quick: bool = False, json_path: str | None = None, verbose: bool = True) -> dict:
    """Runs the online-vs-batch benchmark and returns (and optionally writes) its results.

    Args:
        quick: MCMC lengths 500 and 5,000 (instead of 1e3 and 1e5), fewer timing repeats (about
            25 s on 2 CPU cores); same model and data.
        json_path: where to write the results as JSON (directories are created).
        verbose: print progress and a table.

    Returns:
        A dict with, for `len` in (`short`, `long`): `mcmc_steps_<len>`,
        `stored_floats_{online,batch}_<len>`, `peak_rss_growth_mb_{online,batch}_<len>`,
        `steps_per_second_{online,batch}_<len>`, `mcmc_seconds_batch_<len>`, the ratios
        `online_over_batch_steps_per_second_<len>` and `online_over_batch_stored_floats_<len>`;
        `times_ms` (ms per SGD step), `ratio_estimates`, timing samples, settings, versions.
    """
    started = time.perf_counter()
    settings = _settings(quick)
    seed = settings["seed"]
    log = print if verbose else (lambda *_args, **_kwargs: None)
    strategy = tf.distribute.get_strategy()
    memory = _PeakMemory()
    spe = settings["steps_per_execution"]
    out, phases, models, datasets = {}, {}, {}, {}

    x, y, _, _ = recipe.thesis_toy(seed)
    dim = x.shape[1]
    sampler = gaussian_inputs(np.zeros(dim), settings["transfer_variance"])

    # 1. Online: one chain (C chains in parallel), L SGD steps at each length.
    phase = time.perf_counter()
    chain = OnlineChain(
        x,
        y,
        num_chains=settings["online_chains"],
        num_burnin_steps=settings["burn_in"],
        prior_scale=settings["prior_scale"],
        num_leapfrog_steps=settings["num_leapfrog_steps"],
        thin=settings["online_thin"],
        seed=seed + 1,
    )
    datasets["online"] = online_transfer_dataset(chain, sampler, settings["batch_size"], seed=seed)
    # The recipe's student and optimizer; fit for one execution (builds and traces, not timed).
    models["online"] = recipe._train(datasets["online"], dim, settings, spe, seed, strategy, False)
    for label, length in zip(LABELS, settings["lengths"], strict=True):
        iterator = iter(datasets["online"])  # a fresh run of the chain from its burnt-in state
        _, growth = memory.measure(lambda it=iterator, n=length: run_steps(
            models["online"], it, max(1, n // spe)))  # fmt: skip
        out[f"mcmc_steps_{label}"] = int(length)
        out[f"stored_floats_online_{label}"] = int(chain.stored_floats)
        out[f"peak_rss_growth_mb_online_{label}"] = growth
        log(
            f"[bench online] online, {length} steps: {chain.stored_floats} floats stored, peak "
            f"RSS growth {growth:.1f} MB"
        )
    phases["online"] = time.perf_counter() - phase

    # 2. Batch: a bag of L samples at each length, then its distillation stream. A tiny bag
    # first, not measured: TensorFlow's one-off XLA set-up would otherwise land in the first
    # length's peak. Each length still compiles its own sampling loop (a few tens of MB).
    phase = time.perf_counter()
    recipe._problem(x, y, sampler, dict(settings, samples_per_chain=4, burn_in=10), seed)
    for label, length in zip(LABELS, settings["lengths"], strict=True):
        per_chain = max(2, length // settings["num_chains"])
        length_settings = dict(settings, samples_per_chain=per_chain)

        def build(length_settings=length_settings):
            problem = recipe._problem(x, y, sampler, length_settings, seed)
            data = batch_transfer_dataset(
                problem["posterior"].bag, sampler, settings["batch_size"], seed=seed
            )
            run_steps_model = recipe._train(data, dim, settings, spe, seed, strategy, False)
            return problem, data, run_steps_model

        (problem, data, model), growth = memory.measure(build)
        kind = f"batch_{label}"
        models[kind], datasets[kind] = model, data
        out[f"stored_floats_batch_{label}"] = int(problem["posterior"].stored_floats)
        out[f"peak_rss_growth_mb_batch_{label}"] = growth
        out[f"mcmc_seconds_batch_{label}"] = problem["seconds"]
        out[f"bag_samples_{label}"] = int(problem["posterior"].bag.shape[0])
        log(
            f"[bench online] batch, {out[f'bag_samples_{label}']} samples: "
            f"{out[f'stored_floats_batch_{label}']} floats stored, peak RSS growth {growth:.1f} "
            f"MB (sampling {problem['seconds']:.1f} s)"
        )
        del problem
    phases["batch"] = time.perf_counter() - phase

    # 3. Steps per second: interleaved blocks of equal steps, same student and batch size.
    phase = time.perf_counter()
    executions = sorted(
        calibrate_executions(models["online"], datasets["online"], settings["block_seconds"])
        for _ in range(3)
    )[1]
    timers = {kind: step_timer(models[kind], datasets[kind], executions, spe) for kind in models}
    stats = interleaved_medians(timers, settings["repeats"])
    phases["timing"] = time.perf_counter() - phase
    times = {kind: s["median"] for kind, s in stats.items()}

    estimates = {}
    for label in LABELS:
        batch = f"batch_{label}"
        out[f"steps_per_second_online_{label}"] = 1e3 / times["online"]
        out[f"steps_per_second_batch_{label}"] = 1e3 / times[batch]
        out[f"online_over_batch_steps_per_second_{label}"] = times[batch] / times["online"]
        estimates[f"online_over_batch_steps_per_second_{label}"] = ratio_estimates(
            stats[batch]["samples"], stats["online"]["samples"]
        )
        out[f"online_over_batch_stored_floats_{label}"] = (
            out[f"stored_floats_online_{label}"] / out[f"stored_floats_batch_{label}"]
        )
    output = {
        "benchmark": "online",
        "quick": bool(quick),
        **out,
        "times_ms": times,
        "ratio_estimates": estimates,
        "timing_samples_ms": {kind: s["samples"] for kind, s in stats.items()},
        "rss_method": memory.method,
        "settings": {
            **{
                key: list(value) if isinstance(value, tuple) else value
                for key, value in settings.items()
            },
            "executions_per_block": executions,
            "data": "the thesis's 2-D logistic toy (24 points), transfer x ~ N(0, 10 I)",
            "dim": int(dim),
            "student": f"MixturePredictive({settings['components']}), SGD",
            "jit_compile": False,
        },
    }
    return report(output, json_path, verbose, format_table, started=started, phases=phases)


def format_table(output: dict) -> str:
    """A readable summary of `run`'s result."""
    settings = output["settings"]
    lines = [
        f"kdtfp bench online  (keras {output['keras_version']}, tf {output['tf_version']}, "
        f"{settings['device']} x{settings['cpu_count']}, {settings['student']}, batch "
        f"{settings['batch_size']}, {settings['online_chains']} online chains, repeats "
        f"{settings['repeats']}, jit off)",
        "",
        f"{'variant':<10}{'MCMC steps':>12}{'stored floats':>15}{'peak RSS +MB':>14}"
        f"{'steps/s':>10}{'sampling s':>12}",
    ]
    for label in LABELS:
        for kind in ("online", "batch"):
            sampling = output.get(f"mcmc_seconds_{kind}_{label}")
            lines.append(
                f"{kind:<10}{output[f'mcmc_steps_{label}']:>12,}"
                f"{output[f'stored_floats_{kind}_{label}']:>15,}"
                f"{output[f'peak_rss_growth_mb_{kind}_{label}']:>14.1f}"
                f"{output[f'steps_per_second_{kind}_{label}']:>10,.0f}"
                + (f"{sampling:>12.1f}" if sampling is not None else f"{'(in steps)':>12}")
            )
    lines += ["", f"{'ratio (online / batch)':<36}{'value':>8}{'paired':>8}{'of mins':>9}"]
    for label in LABELS:
        name = f"online_over_batch_steps_per_second_{label}"
        estimate = output["ratio_estimates"][name]
        lines.append(
            f"{'steps/s at ' + str(output[f'mcmc_steps_{label}']) + ' steps':<36}"
            f"{output[name]:>8.3f}{estimate['paired_median']:>8.3f}{estimate['of_mins']:>9.3f}"
        )
    for label in LABELS:
        lines.append(
            f"{'stored floats at ' + str(output[f'mcmc_steps_{label}']) + ' steps':<36}"
            f"{output[f'online_over_batch_stored_floats_{label}']:>8.4f}"
        )
    lines.append(f"peak RSS measured by {output['rss_method']}")
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in output["phase_seconds"].items())
    lines.append(f"total {output['seconds']:.1f} s ({phases})")
    return "\n".join(lines)
