"""`kdtfp bench logz`: error and time of the three log-partition estimators at equal compute.

Everything runs in one process on one RBM whose log Z is exact (DESIGN.md section 5): the
`rbm-nade` recipe's setup at its `--quick` training scale (`kdtfp.recipes.rbm_nade`: sklearn
digits binarised at intensity >= 8, an RBM 64-16 trained with PCD-1 for 100 epochs, exact log Z
by enumerating the 2^16 hidden states, a NADE 64-50 distilled from it by maximum likelihood on
persistent Gibbs chains for 3,000 steps), 30 repeats per estimate. `quick` trains both models
for fewer steps and makes 6 repeats; the estimators, budgets and model sizes are the same.

The estimators (`kdtfp.estimators`), each at budgets of 1e3, 1e4 and 1e5 energy evaluations E
(one D x H product) per estimate:

* `nade_is`: importance sampling with the NADE proposal;
* `bridge`: bridge sampling between the NADE and RBM chains started at its draws (its Gibbs
  sweeps per RBM sample tuned on the exact value, as in the recipe);
* `ais`: block-Gibbs AIS from the base-rate model (its chains x temperatures split tuned on the
  exact value, which favours the baseline).

Reported per estimator and budget, over `repeats` independent estimates: `rmse` and `bias` of
log Z_hat - log Z (nats) and `seconds_per_estimate` (median over interleaved timing blocks of
the tuned configuration, divided by the repeats made in one vectorised call); and the ratios
`ais_over_is_rmse_<budget>` (AIS RMSE / IS RMSE) and `ais_over_is_time_<budget>` (AIS seconds
/ IS seconds at the same budget), likewise `bridge_over_is_*`. The one-off costs (training the
RBM, distilling the NADE) are reported apart in `phase_seconds`.

Usage:

>>> from kdtfp.bench import logz
>>> result = logz.run(quick=True, json_path="bench_logz.json")
>>> result["ais_over_is_rmse_1e4"], result["ais_over_is_time_1e4"]
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import tensorflow as tf

from kdtfp import estimators as est
from kdtfp.bench.timing import interleaved_medians, ratio_estimates, report, time_block
from kdtfp.recipes import rbm_nade as recipe

METHODS = recipe.METHODS  # ("nade_is", "bridge", "ais")
BUDGETS = (1e3, 1e4, 1e5)
BASELINE = "nade_is"


def _settings(quick: bool) -> dict:
    """The recipe's `--quick` settings (its full training, 400 RBM epochs and 30,000 NADE steps,
    takes minutes); `quick` trains shorter still and makes fewer repeats."""
    settings = recipe._settings(True)
    settings.update(
        budgets=BUDGETS,
        square_steps=0,
        ais_bases=("base_rate",),
        timing_repeats=3 if quick else 5,
        seed=0,
    )
    if quick:
        settings.update(
            rbm_epochs=20,
            rbm_learning_rate=1e-2,
            nade_steps=600,
            nade_learning_rate=3e-3,
            stream_chains=200,
            stream_burn_in=100,
            repeats=6,
            bridge_sweeps=(3,),
            ais_chains=(8, 32),
        )
    else:
        settings.update(repeats=30, bridge_sweeps=(1, 3, 10))
    return settings


def _candidates(method, budget, rbm, nade, settings):
    """`(knob, estimate_fn(seed))` for every configuration of `method` that fits `budget`."""
    repeats = settings["repeats"]
    if method == "nade_is":
        return [(None, lambda s: est.importance_sampling(rbm, nade, budget, repeats, seed=s))]
    if method == "bridge":
        pair = 2 * nade.cost_per_sample(rbm.num_hidden) + 2
        return [
            (
                sweeps,
                lambda s, sweeps=sweeps: est.bridge_sampling(
                    rbm, nade, budget, repeats, sweeps=sweeps, seed=s
                ),
            )
            for sweeps in settings["bridge_sweeps"]
            if budget >= pair + 2 * sweeps
        ]
    base = settings["base_rate"]
    return [
        (
            chains,
            lambda s, chains=chains: est.annealed_importance_sampling(
                rbm, budget, chains, repeats, base_visible_bias=base, seed=s
            ),
        )
        for chains in settings["ais_chains"]
        if 5 <= budget // (2 * chains) <= settings["ais_max_temperatures"]
    ]


def run(quick: bool = False, json_path: str | None = None, verbose: bool = True) -> dict:
    """Runs the log-partition benchmark and returns (and optionally writes) its results.

    Args:
        quick: shorter training and fewer repeats (about 20-30 s on 2 CPU cores).
        json_path: where to write the results as JSON (directories are created).
        verbose: print progress and a table.

    Returns:
        A dict with `logz_exact`, `results[method][budget_key]` (`rmse`, `bias`,
        `seconds_per_estimate`, `cost_E`, `knob`, the per-repeat `errors` and timing samples),
        the ratios `ais_over_is_rmse_<b>`, `ais_over_is_time_<b>`, `bridge_over_is_rmse_<b>`,
        `bridge_over_is_time_<b>` for each budget key `b` (`1e3`, `1e4`, `1e5`),
        `ratio_estimates`, settings, versions and phase times.
    """
    started = time.perf_counter()
    settings = _settings(quick)
    seed = settings["seed"]
    log = print if verbose else (lambda *_args, **_kwargs: None)
    strategy = tf.distribute.get_strategy()
    phases = {}

    phase = time.perf_counter()
    x_train, _, x_test = recipe._binarised_digits(seed, settings["threshold"])
    rbm = recipe._train_rbm(x_train, settings, seed, strategy, jit=False)
    log_z = rbm.log_partition()
    phases["rbm"] = time.perf_counter() - phase
    phase = time.perf_counter()
    nade = recipe._distill(rbm, settings, seed, strategy, jit=False)
    phases["distill"] = time.perf_counter() - phase
    ll_rbm = float(rbm.log_prob(x_test, log_z).mean())
    ll_nade = float(np.mean(nade.log_prob(x_test)))
    log(
        f"[bench logz] RBM 64-{settings['rbm_hidden']} exact log Z {log_z:.3f}; test LL RBM "
        f"{ll_rbm:.3f}, NADE 64-{settings['nade_hidden']} {ll_nade:.3f} "
        f"({phases['rbm']:.1f} + {phases['distill']:.1f} s)"
    )
    settings["base_rate"] = est.base_rate_bias(x_train)

    # 1. Error: every configuration once (this also traces them); the oracle picks the knob.
    phase = time.perf_counter()
    chosen, results = {}, {method: {} for method in METHODS}
    for b_index, budget in enumerate(settings["budgets"]):
        key = recipe._budget_key(budget)
        for method in METHODS:
            runs = [
                (fn(1000 * seed + b_index), knob, fn)
                for knob, fn in _candidates(method, budget, rbm, nade, settings)
            ]
            estimate, knob, fn = min(runs, key=lambda r: r[0].rmse(log_z))
            errors = estimate.errors(log_z)
            results[method][key] = {
                "rmse": estimate.rmse(log_z),
                "bias": float(errors.mean()),
                "cost_E": float(estimate.cost),
                "knob": knob,
                "ci_coverage": estimate.coverage(log_z),
                "errors": errors.tolist(),
            }
            chosen[(method, key)] = fn
    phases["errors"] = time.perf_counter() - phase

    # 2. Time: the tuned configurations in interleaved blocks, per budget (fresh seeds).
    phase = time.perf_counter()
    repeats = settings["repeats"]
    stats = {}
    seeds = itertools.count(7)

    def block(fn):
        return lambda: time_block(lambda: fn(next(seeds))) / repeats

    for budget in settings["budgets"]:
        key = recipe._budget_key(budget)
        timers = {method: block(chosen[(method, key)]) for method in METHODS}
        stats[key] = interleaved_medians(timers, settings["timing_repeats"])
        for method in METHODS:
            results[method][key]["seconds_per_estimate"] = stats[key][method]["median"]
            results[method][key]["timing_samples_s"] = stats[key][method]["samples"]
        log(
            f"[bench logz] {budget:.0e} E: "
            + ", ".join(
                f"{m} RMSE {results[m][key]['rmse']:.3f} in "
                f"{1e3 * results[m][key]['seconds_per_estimate']:.1f} ms"
                for m in METHODS
            )
        )
    phases["timing"] = time.perf_counter() - phase

    ratios, estimates = {}, {}
    for budget in settings["budgets"]:
        key = recipe._budget_key(budget)
        base = results[BASELINE][key]
        for method in ("ais", "bridge"):
            entry = results[method][key]
            ratios[f"{method}_over_is_rmse_{key}"] = entry["rmse"] / base["rmse"]
            ratios[f"{method}_over_is_time_{key}"] = (
                entry["seconds_per_estimate"] / base["seconds_per_estimate"]
            )
            estimates[f"{method}_over_is_time_{key}"] = ratio_estimates(
                stats[key][method]["samples"], stats[key][BASELINE]["samples"]
            )
    output = {
        "benchmark": "logz",
        "quick": bool(quick),
        "logz_exact": float(log_z),
        "exact_cost_E": float(2 ** settings["rbm_hidden"]),
        "ll_test_rbm": ll_rbm,
        "ll_test_nade": ll_nade,
        **ratios,
        "results": results,
        "ratio_estimates": estimates,
        "budget_keys": [recipe._budget_key(b) for b in settings["budgets"]],
        "settings": {
            **{
                key: list(value) if isinstance(value, tuple) else value
                for key, value in settings.items()
                if key != "base_rate"
            },
            "data": "sklearn digits binarised at intensity >= 8 (load_digits_split train set)",
            "rbm": f"{x_train.shape[1]}-{settings['rbm_hidden']} (PCD-1)",
            "nade": f"{x_train.shape[1]}-{settings['nade_hidden']}",
            "unit": "E = one D x H product of the RBM",
        },
    }
    return report(output, json_path, verbose, format_table, started=started, phases=phases)


def format_table(output: dict) -> str:
    """A readable summary of `run`'s result."""
    settings = output["settings"]
    lines = [
        f"kdtfp bench logz  (keras {output['keras_version']}, tf {output['tf_version']}, "
        f"{settings['device']} x{settings['cpu_count']}, RBM {settings['rbm']}, NADE "
        f"{settings['nade']}, exact log Z {output['logz_exact']:.3f}, {settings['repeats']} "
        f"repeats)",
        "",
        f"{'estimator':<10}{'budget E':>10}{'RMSE':>9}{'bias':>9}{'ms/estimate':>13}  knob",
    ]
    for method in METHODS:
        for key in output["budget_keys"]:
            entry = output["results"][method][key]
            knob = "" if entry["knob"] is None else str(entry["knob"])
            knob = {"bridge": "sweeps ", "ais": "chains "}.get(method, "") + knob
            lines.append(
                f"{method:<10}{key:>10}{entry['rmse']:>9.4f}{entry['bias']:>9.4f}"
                f"{1e3 * entry['seconds_per_estimate']:>13.2f}  {knob}"
            )
    lines += ["", f"{'ratio':<28}" + "".join(f"{key:>9}" for key in output["budget_keys"])]
    for name in (
        "ais_over_is_rmse",
        "ais_over_is_time",
        "bridge_over_is_rmse",
        "bridge_over_is_time",
    ):
        values = "".join(f"{output[f'{name}_{key}']:>9.3f}" for key in output["budget_keys"])
        lines.append(f"{name:<28}{values}")
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in output["phase_seconds"].items())
    lines.append(f"total {output['seconds']:.1f} s ({phases})")
    return "\n".join(lines)
