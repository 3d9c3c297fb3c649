"""Recipe `rbm-nade`: an RBM distilled into a NADE, which then estimates the RBM's log Z
(Papamakarios 2015, part C; METHODS.md 5.5 and 5.8).

Data: sklearn digits binarised at intensity >= 8 (1,200 train / 197 validation / 400 test).
Teacher: an RBM 64-16 trained with PCD-1, small enough for exact log Z (2^16 hidden states).
Student: a NADE 64-50 trained by maximum likelihood on an endless `tf.data` stream of samples
from persistent block-Gibbs chains of the RBM (`kdtfp.distill.rbm_nade`).

Evaluation, all against exact values:

* test log-likelihood of the RBM (exact: -F - log Z) and of the NADE;
* KL(RBM || NADE) by Monte Carlo over exact RBM samples (the enumeration of the hidden states
  gives p(h), then v | h) with exact log-densities on both sides; KL(NADE || RBM) likewise;
* log Z by NADE importance sampling, NADE bridge sampling and block-Gibbs AIS at matched
  budgets of energy evaluations E (one D x H product; see `kdtfp.estimators`), each over
  `repeats` independent runs: RMSE |log Z_hat - log Z| and the coverage of the +-3 sigma
  delta-method intervals. Each estimator's one knob is tuned on the exact value (an oracle,
  which favours the baselines): AIS's chains x temperatures split (and its base model in the
  full run), bridge's Gibbs sweeps per RBM sample.

`logz_err_*` are RMSEs at the headline budget (1e4 E); `logz_rmse_<method>_<budget>` at every
budget. The distillation itself is a one-off cost reported separately (`distill_cost_E`).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from kdtfp import datasets
from kdtfp import estimators as est
from kdtfp.distill.rbm_nade import distill_rbm_into_nade
from kdtfp.distribute import safe_steps_per_execution
from kdtfp.export import versioned_export_path
from kdtfp.models.nade import NADE, export_nade
from kdtfp.models.rbm import RBM
from kdtfp.recipes.base import Result, RunConfig, Timer

NAME = "rbm-nade"
DESCRIPTION = (
    "RBM 64-16 -> NADE 64-50 on binarised digits; log Z by NADE importance/bridge sampling vs "
    "block-Gibbs AIS at equal compute, against exact enumeration"
)
METHODS = ("nade_is", "bridge", "ais")
LABELS = {
    "nade_is": "NADE importance sampling",
    "bridge": "NADE bridge sampling",
    "ais": "AIS (block Gibbs, best split)",
    "ais_uniform": "AIS, uniform base",
}
COLORS = {
    "nade_is": "tab:red",
    "bridge": "tab:orange",
    "ais": "tab:blue",
    "ais_uniform": "tab:gray",
}
HEADLINE_BUDGET = 1e4


def _settings(quick):
    return {
        "threshold": 0.5,  # pixels / 16 >= 0.5, i.e. intensity >= 8
        "rbm_hidden": 16,
        "rbm_epochs": 100 if quick else 400,
        "rbm_learning_rate": 1e-2 if quick else 3e-3,
        "rbm_batch": 100,
        "pcd_chains": 100,
        "nade_hidden": 50,
        "nade_steps": 3000 if quick else 30000,
        "nade_batch": 100,
        "nade_learning_rate": 2e-3 if quick else 1e-3,
        "stream_chains": 1000,
        "stream_burn_in": 200,
        "square_steps": 0 if quick else 10000,
        "budgets": (1e3, 1e4, 1e5),
        "repeats": 20 if quick else 50,
        # AIS splits of each budget: chains x temperatures (temperatures = budget / (2 chains)),
        # capped at `ais_max_temperatures` (a sequential loop) in the quick run.
        "ais_chains": (2, 8, 32, 128) if quick else (1, 2, 8, 32, 128, 512),
        "ais_max_temperatures": 5000 if quick else 10**6,
        "ais_bases": ("base_rate",) if quick else ("base_rate", "uniform"),
        "bridge_sweeps": (3, 10) if quick else (1, 3, 10, 30),
        "kl_samples": 10000 if quick else 100000,
    }


def _binarised_digits(seed, threshold):
    split = datasets.load_digits_split(seed=seed)
    return tuple(
        (x >= threshold).astype("float32") for x in (split.x_train, split.x_val, split.x_test)
    )


def _train_rbm(x_train, settings, seed, strategy, jit):
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        rbm = RBM(
            x_train.shape[1],
            settings["rbm_hidden"],
            cd_steps=1,
            persistent=True,
            num_chains=settings["pcd_chains"],
            seed=seed,
        )
        # Start the visible biases at the data's base rates (Hinton's practical guide).
        rbm.visible_bias.assign(est.base_rate_bias(x_train).astype("float32"))
        rbm.compile(
            optimizer=keras.optimizers.Adam(settings["rbm_learning_rate"]),
            steps_per_execution=safe_steps_per_execution(12, strategy),
            jit_compile=jit,
        )
    rbm.fit(
        x_train,
        batch_size=settings["rbm_batch"],
        epochs=settings["rbm_epochs"],
        verbose=0,
        shuffle=True,
    )
    return rbm


def _distill(rbm, settings, seed, strategy, jit, loss="likelihood", steps=None, log_z=None):
    keras.utils.set_random_seed(seed)
    steps = steps or settings["nade_steps"]
    with strategy.scope():
        nade = NADE(rbm.num_visible, settings["nade_hidden"], name=f"nade_{loss}")
        schedule = keras.optimizers.schedules.CosineDecay(
            settings["nade_learning_rate"], steps, alpha=0.05
        )
        optimizer = keras.optimizers.Adam(schedule)
    distill_rbm_into_nade(
        rbm,
        nade,
        steps=steps,
        batch_size=settings["nade_batch"],
        loss=loss,
        optimizer=optimizer,
        log_z=log_z,
        seed=seed,
        jit_compile=jit,
        num_chains=settings["stream_chains"],
        burn_in=settings["stream_burn_in"],
    )
    return nade


def _mean_se(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def _budget_key(budget):
    return f"{budget:.0e}".replace("+0", "").replace("+", "")


def _estimate_all(rbm, nade, x_train, log_z, settings, seed):
    """Every estimator at every budget; returns {(method, budget): (best LogZEstimate, knob)}."""
    repeats = settings["repeats"]
    base_rate = est.base_rate_bias(x_train)
    runs = {}
    for b_index, budget in enumerate(settings["budgets"]):
        run_seed = 1000 * seed + b_index
        runs[("nade_is", budget)] = (
            est.importance_sampling(rbm, nade, budget, repeats=repeats, seed=run_seed),
            None,
        )
        candidates = [
            (est.bridge_sampling(rbm, nade, budget, repeats=repeats, sweeps=s, seed=run_seed), s)
            for s in settings["bridge_sweeps"]
            if budget >= 2 * nade.cost_per_sample(rbm.num_hidden) + 2 + 2 * s
        ]
        runs[("bridge", budget)] = min(candidates, key=lambda c: c[0].rmse(log_z))
        for base in settings["ais_bases"]:
            bias = base_rate if base == "base_rate" else None
            candidates = [
                (
                    est.annealed_importance_sampling(
                        rbm, budget, chains, repeats=repeats, base_visible_bias=bias, seed=run_seed
                    ),
                    chains,
                )
                for chains in settings["ais_chains"]
                if 5 <= budget // (2 * chains) <= settings["ais_max_temperatures"]
            ]
            name = "ais" if base == "base_rate" else "ais_uniform"
            runs[(name, budget)] = min(candidates, key=lambda c: c[0].rmse(log_z))
    return runs


def _plot(runs, budgets, log_z, exact_cost, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in (*METHODS, "ais_uniform") if (m, budgets[0]) in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        rmse = [runs[(method, b)][0].rmse(log_z) for b in budgets]
        style = "--" if method == "ais_uniform" else "-"
        left.plot(budgets, rmse, style, marker="o", color=COLORS[method], label=LABELS[method])
    left.axvline(exact_cost, color="black", linestyle=":", label="exact enumeration cost")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="compute per estimate (energy evaluations E = D x H products)",
        ylabel="RMSE of log Z estimate (nats)",
        title="log Z error vs compute",
    )
    left.legend(fontsize=8)
    headline = min(budgets, key=lambda b: abs(np.log(b / HEADLINE_BUDGET)))
    for offset, method in enumerate(METHODS):
        estimate = runs[(method, headline)][0]
        index = np.arange(len(estimate.log_z))
        right.errorbar(
            index + 0.25 * offset,
            estimate.log_z - log_z,
            yerr=estimate.num_sigmas * estimate.std_err,
            fmt="o",
            markersize=3,
            color=COLORS[method],
            label=LABELS[method],
        )
    right.axhline(0.0, color="black")
    right.set(
        xlabel="repeat",
        ylabel="log Z_hat - log Z (nats), +-3 sigma",
        title=f"Estimates at {headline:.0e} E",
    )
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(config: RunConfig) -> Result:
    strategy = config.strategy or tf.distribute.get_strategy()
    settings = _settings(config.quick)
    result = Result(recipe=NAME, seed=config.seed, settings=dict(settings))
    x_train, x_val, x_test = _binarised_digits(config.seed, settings["threshold"])
    table = {}

    with Timer() as timer:
        rbm = _train_rbm(x_train, settings, config.seed, strategy, config.jit)
        log_z = rbm.log_partition()
    table.update(
        logz_exact=log_z,
        ll_train_rbm=float(rbm.log_prob(x_train, log_z).mean()),
        ll_test_rbm=float(rbm.log_prob(x_test, log_z).mean()),
        rbm_seconds=timer.seconds,
    )
    config.log(
        f"[{NAME}] RBM 64-{settings['rbm_hidden']}: exact log Z {log_z:.3f}, test LL "
        f"{table['ll_test_rbm']:.3f} ({timer.seconds:.1f} s)"
    )

    with Timer() as timer:
        nade = _distill(rbm, settings, config.seed, strategy, config.jit)
    table["distill_seconds"] = timer.seconds
    table["distill_cost_E"] = 2.0 * (
        settings["nade_steps"] * settings["nade_batch"]
        + settings["stream_burn_in"] * settings["stream_chains"]
    )
    table["ll_test_nade"], table["ll_test_nade_se"] = _mean_se(nade.log_prob(x_test))
    table["ll_test_rbm_se"] = _mean_se(rbm.log_prob(x_test, log_z))[1]
    exact = rbm.exact_sample(settings["kl_samples"], seed=config.seed + 1)
    table["kl_rbm_nade"], table["kl_rbm_nade_se"] = _mean_se(
        rbm.log_prob(exact, log_z) - np.asarray(nade.log_prob(exact), np.float64)
    )
    samples, log_q = nade.sample(settings["kl_samples"], seed=config.seed + 2)
    table["kl_nade_rbm"], table["kl_nade_rbm_se"] = _mean_se(
        np.asarray(log_q, np.float64) - rbm.log_prob(samples.numpy(), log_z)
    )
    config.log(
        f"[{NAME}] NADE 64-{settings['nade_hidden']}: test LL {table['ll_test_nade']:.3f} "
        f"(RBM {table['ll_test_rbm']:.3f}), KL(RBM||NADE) {table['kl_rbm_nade']:.4f} "
        f"({table['distill_seconds']:.1f} s)"
    )
    if settings["square_steps"]:
        square = _distill(rbm, settings, config.seed, strategy, config.jit, loss="square",
                          steps=settings["square_steps"], log_z=log_z)  # fmt: skip
        table["ll_test_nade_square"] = _mean_se(square.log_prob(x_test))[0]
        table["kl_rbm_nade_square"] = _mean_se(
            rbm.log_prob(exact, log_z) - np.asarray(square.log_prob(exact), np.float64)
        )[0]

    with Timer() as timer:
        runs = _estimate_all(rbm, nade, x_train, log_z, settings, config.seed)
    table["estimator_seconds"] = timer.seconds
    table["exact_cost_E"] = float(2 ** settings["rbm_hidden"])
    for (method, budget), (estimate, knob) in runs.items():
        key = _budget_key(budget)
        table[f"logz_rmse_{method}_{key}"] = estimate.rmse(log_z)
        table[f"logz_bias_{method}_{key}"] = float(estimate.errors(log_z).mean())
        table[f"ci_coverage_{method}_{key}"] = estimate.coverage(log_z)
        if knob is not None:
            table[f"tuned_{method}_{key}"] = float(knob)
    key = _budget_key(HEADLINE_BUDGET)
    for method in METHODS:
        table[f"logz_err_{method}"] = table[f"logz_rmse_{method}_{key}"]
    table["is_ci_coverage"] = table[f"ci_coverage_nade_is_{key}"]
    table["bridge_ci_coverage"] = table[f"ci_coverage_bridge_{key}"]
    table["is_ci_repeats"] = float(settings["repeats"])
    for budget in settings["budgets"]:
        budget_key = _budget_key(budget)
        table[f"ais_over_is_rmse_{budget_key}"] = (
            table[f"logz_rmse_ais_{budget_key}"] / table[f"logz_rmse_nade_is_{budget_key}"]
        )
    config.log(
        f"[{NAME}] log Z RMSE at {HEADLINE_BUDGET:.0e} E over {settings['repeats']} repeats: "
        + ", ".join(f"{m} {table[f'logz_err_{m}']:.4f}" for m in METHODS)
        + f"; IS ±3σ coverage {table['is_ci_coverage']:.2f} ({timer.seconds:.1f} s)"
    )

    result.metrics = table
    result.baselines = {
        k: v
        for k, v in table.items()
        if k.startswith(("logz_rmse_ais", "logz_err_ais", "ll_test_rbm"))
    }
    result.headline = {
        "metric": f"log Z RMSE at {HEADLINE_BUDGET:.0e} E",
        "ours": table["logz_err_nade_is"],
        "baseline": table["logz_err_ais"],
        "baseline_name": "block-Gibbs AIS (best split)",
    }
    os.makedirs(config.out, exist_ok=True)
    plot_path = os.path.join(config.out, "logz_error_vs_compute.png")
    _plot(runs, settings["budgets"], log_z, table["exact_cost_E"], plot_path)
    result.plots.append(plot_path)
    result.export_path = export_nade(
        nade, versioned_export_path(os.path.join(config.out, "export"))
    )
    return result
