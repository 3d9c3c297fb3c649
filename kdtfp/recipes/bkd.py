"""Recipe `bkd`: Bayesian knowledge distillation with SGLD posterior samples (Fang et al., 2024;
METHODS.md section 4.7).

The student's posterior under the teacher-informed Dirichlet prior is sampled with SGLD chains
started at the KD solution (its mode; METHODS.md 4.4). Five students are compared
(`bkd_methods.METHODS`): labels only, KD, BKD, KD + MC dropout and KD + mean-field VI, all with
the same λ, T (chosen for KD), student architecture and Adam steps. Each method that samples
has one hyperparameter tuned on the validation NLL from a grid of the same size (BKD: the SGLD
step; MC dropout: the dropout rate; VI: the prior standard deviation), and all three predict
from the same number of samples (BKD's kept SGLD states).

A. Synthetic data with known class probabilities (`kdtfp.datasets.softmax_truth`, split
   train:test:val = 7:2:1; teacher a 2x128 MLP; student a 16-unit MLP). Metrics per method:
   label coverage of the 95 % credible sets beside the oracle sets' coverage (the same rule on
   the true probabilities, METHODS.md 4.7), coverage of the true probabilities by the per-class
   95 % intervals and their mean width, NLL, ECE, accuracy; R-hat of the predicted probabilities.
   Label coverage is given for both set rules: the smallest set (`coverage_credible_set`) and
   the bisection rule of the authors' code (`coverage_credible_set_bisection`, METHODS.md 4.5).
B. sklearn digits (teacher 5 bagged MLPs 64-256-256-10, student 64-16-10): accuracy, NLL, ECE,
   AUROC of the mean deviance for flagging errors, and the mean deviance on `x + γ·N(0, 1)`
   (γ on the 0-16 pixel scale) for γ in {0, 0.5, 1, 2, 4}. Plots: reliability diagram,
   deviance vs γ, interval examples. The BKD posterior is exported as a SavedModel.

`--quick` runs one synthetic configuration and shorter chains; the full run runs the four
configurations of METHODS.md (linear/nonlinear x K in {2, 5}) over 2 seeds and tunes λ, T and
the SGLD step (and the baselines' counterparts) on the validation NLL.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from kdtfp import datasets, metrics
from kdtfp.export import export_posterior, versioned_export_path
from kdtfp.losses import TeacherDirichletPosterior
from kdtfp.predictive import summarize_probability_samples
from kdtfp.recipes import bkd_plots
from kdtfp.recipes.base import Result, RunConfig, Timer
from kdtfp.recipes.bkd_methods import (
    METHODS,
    probability_samples,
    rhat_of_probs,
    sample_bkd,
    train_point,
)
from kdtfp.teachers import BaggedEnsemble, fit_bagged, mlp

NAME = "bkd"

GAMMAS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: (kind, classes, input dim) of the synthetic configurations.
CONFIGS = (("linear", 2, 5), ("linear", 5, 10), ("nonlinear", 2, 10), ("nonlinear", 5, 5))
QUICK_CONFIGS = (("nonlinear", 5, 5),)


def _settings(quick):
    return {
        "configs": QUICK_CONFIGS if quick else CONFIGS,
        "seeds": 1 if quick else 2,
        "synthetic_examples": 3000,
        "teacher_hidden": (128, 128),
        "teacher_epochs": 30 if quick else 60,
        "digits_members": 3 if quick else 5,
        "digits_teacher_hidden": (256, 256),
        "digits_teacher_epochs": 15 if quick else 40,
        "student": {
            "hidden": 16,
            "learning_rate": 1e-2,
            "batch": 64,
            "adam_steps": 1000 if quick else 2000,
            # Chains run side by side in one model (kdtfp.models.parallel_chains); `kdtfp bench
            # sgld` measured 0.35 Adam steps per chain-step with 8 chains.
            "chains": 4 if quick else 8,
            "sgld_steps": 2000 if quick else 4000,
            "thin": 20 if quick else 40,  # 320 (quick) / 640 (full) kept samples
        },
        # Grids searched on the validation NLL in the full run (the quick run takes the first).
        # λ and T: METHODS.md 4.7's KD grid plus T = 1 (the best validation NLL on digits in our
        # trials). SGLD steps: the quick values are those the full grid picked most often.
        "lam_grid": (1.0,) if quick else (1.0, 5.0, 10.0),
        "temperature_grid": (1.0,) if quick else (1.0, 2.0, 4.0),
        "step_grid": {
            "synthetic": (3e-4,) if quick else (3e-5, 1e-4, 3e-4),
            "digits": (1e-4,) if quick else (3e-5, 1e-4, 3e-4),
        },
        "dropout_grid": (0.2,) if quick else (0.05, 0.1, 0.2),
        "vi_prior_grid": (1.0,) if quick else (0.3, 1.0, 3.0),
        "level": 0.95,
    }


def _logits(model, x):
    return np.asarray(model(x, training=False), np.float64)


def _score(q, y, level, probs_true=None):
    """Metrics of one method's probability samples `q` `[r, N, K]` on labels `y` (and on the
    true probabilities where known)."""
    summary = summarize_probability_samples(q, level)
    mean_probs = summary["mean_probs"]
    record = {
        "acc": float(np.mean(mean_probs.argmax(-1) == y)),
        "nll": metrics.negative_log_likelihood(mean_probs, y),
        "ece": metrics.expected_calibration_error(mean_probs, y),
        "coverage_credible_set": metrics.coverage_credible_set(summary["credible_set"], y),
        "coverage_credible_set_bisection": metrics.coverage_credible_set(
            metrics.credible_set_bisection(q, level), y
        ),
        "set_size": float(summary["credible_set"].sum(-1).mean()),
        "mean_deviance": float(summary["deviance"].mean()),
        "deviance_auroc": metrics.deviance_auroc(summary["deviance"], mean_probs.argmax(-1) == y),
    }
    if probs_true is not None and q.shape[0] > 1:
        record["coverage_true_prob"] = metrics.interval_coverage(
            summary["lower"], summary["upper"], probs_true
        )
        record["interval_width"] = float(np.mean(summary["upper"] - summary["lower"]))
    return record, summary


def _validation_nll(method, model, split, num_samples):
    q = probability_samples(method, model, split.x_val, num_samples)
    return metrics.negative_log_likelihood(q.mean(0), split.y_val)


def _train_all(split, teacher_logits_train, settings, part, strategy, seed, jit):
    """Trains every method. Grids of more than one value are searched on the validation NLL:
    λ and T for KD (and reused by every other method), then each sampling method's own
    hyperparameter. Returns the models, BKD's sampler and the chosen values."""
    student_settings = settings["student"]
    x, y = split.x_train, split.y_train
    targets = TeacherDirichletPosterior.targets(y, teacher_logits_train)

    def best_of(method, candidates, num_samples=1):
        """`(value, model)` of the lowest validation NLL among `(value, build)` candidates."""
        scored = [(value, build()) for value, build in candidates]
        nll = [_validation_nll(method, model, split, num_samples) for _, model in scored]
        return scored[int(np.argmin(nll))]

    def point(kind, lam, temperature, option=None):
        return train_point(
            x, targets, kind, student_settings, strategy, seed, lam, temperature, jit, option
        )

    grid = [(lam, t) for lam in settings["lam_grid"] for t in settings["temperature_grid"]]
    (lam, temperature), kd = best_of(
        "kd", [(value, lambda value=value: point("mlp", *value)) for value in grid]
    )
    models = {"kd": kd, "labels": point("mlp", 0.0, temperature)}

    def chains(step):
        return sample_bkd(kd, x, targets, student_settings, strategy, seed, lam, temperature, step)

    sampled = {step: chains(step) for step in settings["step_grid"][part]}
    step, models["bkd"] = best_of(
        "bkd", [(step, lambda step=step: sampled[step][0]) for step in sampled]
    )
    sampler = sampled[step][1]
    # The baselines predict from as many samples as BKD keeps.
    num_samples = len(sampler)
    rate, models["mc_dropout"] = best_of(
        "mc_dropout",
        [
            (rate, lambda rate=rate: point("dropout", lam, temperature, rate))
            for rate in settings["dropout_grid"]
        ],
        num_samples,
    )
    prior, models["vi"] = best_of(
        "vi",
        [
            (prior, lambda prior=prior: point("vi", lam, temperature, prior))
            for prior in settings["vi_prior_grid"]
        ],
        num_samples,
    )
    chosen = {
        "lam": lam,
        "temperature": temperature,
        "sgld_step": step,
        "dropout_rate": rate,
        "vi_prior_stddev": prior,
        "samples": float(num_samples),
    }
    return models, sampler, chosen


def _evaluate(models, x, y, settings, num_samples, probs_true=None):
    records, summaries, samples = {}, {}, {}
    for method in METHODS:
        q = probability_samples(method, models[method], x, num_samples)
        records[method], summaries[method] = _score(q, y, settings["level"], probs_true)
        samples[method] = q
    return records, summaries, samples


def _synthetic(config, settings, strategy, table, log):
    runs = {}
    for kind, classes, dim in settings["configs"]:
        tag = f"{kind[:3]}_k{classes}_d{dim}"
        for repeat in range(settings["seeds"]):
            seed = config.seed + repeat
            data = datasets.softmax_truth(
                settings["synthetic_examples"], dim, classes, kind, seed=seed
            )
            split = data.split
            keras.utils.set_random_seed(seed)
            with strategy.scope():
                teacher = mlp(dim, settings["teacher_hidden"], classes, name="teacher", seed=seed)
                teacher.compile(
                    optimizer=keras.optimizers.Adam(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                )
            teacher.fit(
                split.x_train,
                split.y_train,
                epochs=settings["teacher_epochs"],
                batch_size=settings["student"]["batch"],
                verbose=0,
            )
            models, sampler, chosen = _train_all(
                split,
                _logits(teacher, split.x_train),
                settings,
                "synthetic",
                strategy,
                seed,
                config.jit,
            )
            records, _, samples = _evaluate(
                models, split.x_test, split.y_test, settings, len(sampler), data.probs_test
            )
            records["bkd"]["rhat_probs_median"], records["bkd"]["rhat_probs_max"] = rhat_of_probs(
                samples["bkd"], settings["student"]["chains"]
            )
            _warn_if_unmixed(f"synthetic {tag}", records["bkd"]["rhat_probs_median"], log)
            teacher_test = _logits(teacher, split.x_test)
            records["teacher"] = {
                "acc": metrics.accuracy(teacher_test, split.y_test),
                "nll": -metrics.mean_log_likelihood(teacher_test, split.y_test),
            }
            records["oracle"] = {
                "coverage_credible_set": metrics.coverage_oracle_set(
                    data.probs_test, split.y_test, settings["level"]
                ),
                "coverage_credible_set_bisection": metrics.coverage_credible_set(
                    metrics.credible_set_bisection(data.probs_test[None], settings["level"]),
                    split.y_test,
                ),
                "nll": metrics.negative_log_likelihood(data.probs_test, split.y_test),
                "acc": float(np.mean(data.probs_test.argmax(-1) == split.y_test)),
            }
            records["chosen"] = chosen
            runs.setdefault(tag, []).append(records)
            log(
                f"[{NAME}] synthetic {tag} seed {seed}: label coverage BKD "
                f"{records['bkd']['coverage_credible_set']:.3f} (oracle "
                f"{records['oracle']['coverage_credible_set']:.3f}), true-prob coverage "
                f"BKD {records['bkd']['coverage_true_prob']:.3f} / MC dropout "
                f"{records['mc_dropout']['coverage_true_prob']:.3f} / VI "
                f"{records['vi']['coverage_true_prob']:.3f}"
            )
    # Per configuration: mean over seeds; overall: mean over configurations.
    overall = {}
    for tag, seed_records in runs.items():
        for group in seed_records[0]:
            for key in seed_records[0][group]:
                value = float(np.mean([r[group][key] for r in seed_records]))
                # e.g. syn_acc_bkd_non_k5_d5, syn_chosen_lam_non_k5_d5
                stem = f"chosen_{key}" if group == "chosen" else f"{key}_{group}"
                name = f"syn_{stem}_{tag}"
                table[name] = value
                overall.setdefault(f"syn_{stem}", []).append(value)
    for name, values in overall.items():
        table[name] = float(np.mean(values))


def _warn_if_unmixed(part, rhat_median, log):
    if rhat_median > 1.1:
        log(
            f"[{NAME}] warning: {part}: the SGLD chains have not mixed (median R-hat of the "
            f"predicted probabilities {rhat_median:.2f} > 1.1); intervals reflect the chains' "
            "spread, not the full posterior. Longer chains or a larger step help."
        )


def _digits(config, settings, strategy, table, log):
    seed = config.seed
    split = datasets.load_digits_split(seed=seed)
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        members = [
            mlp(split.input_dim, settings["digits_teacher_hidden"], 10, name=f"member_{i}")
            for i in range(settings["digits_members"])
        ]
        teacher = BaggedEnsemble(members, name="teacher")
    fit_bagged(
        teacher, split.x_train, split.y_train, epochs=settings["digits_teacher_epochs"], seed=seed
    )
    teacher_test = _logits(teacher, split.x_test)
    table["digits_acc_teacher"] = metrics.accuracy(teacher_test, split.y_test)
    models, sampler, chosen = _train_all(
        split, _logits(teacher, split.x_train), settings, "digits", strategy, seed, config.jit
    )
    records, summaries, samples = _evaluate(
        models, split.x_test, split.y_test, settings, len(sampler)
    )
    rhat_median, rhat_max = rhat_of_probs(samples["bkd"], settings["student"]["chains"])
    diagnostics = sampler.summary()  # on the weights: split-R-hat and ESS over all chains
    records["bkd"].update(
        rhat_probs_median=rhat_median,
        rhat_probs_max=rhat_max,
        rhat_weights_max=float(np.sqrt(diagnostics["max_rhat"])),  # TFP's ratio -> R-hat
        ess_weights_min=diagnostics["min_ess"],
    )
    _warn_if_unmixed("digits", rhat_median, log)
    for method, record in records.items():
        for key, value in record.items():
            table[f"digits_{key}_{method}"] = value
    for key, value in chosen.items():
        table[f"digits_chosen_{key}"] = value

    # Deviance under input noise x + γ N(0, 1) on the 0-16 pixel scale (pixels here are / 16).
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(split.x_test.shape).astype("float32")
    curves = {method: [] for method in METHODS}
    for gamma in GAMMAS:
        x_noisy = split.x_test + (gamma / 16.0) * noise
        for method in METHODS:
            if gamma == 0:  # the clean test set, already summarised above
                deviance = summaries[method]["deviance"].mean()
            else:
                q = probability_samples(method, models[method], x_noisy, len(sampler))
                deviance = summarize_probability_samples(q, settings["level"])["deviance"].mean()
            curves[method].append(float(deviance))
            table[f"digits_deviance_gamma{gamma:g}_{method}"] = float(deviance)
    for method in METHODS:
        table[f"digits_deviance_rises_{method}"] = float(np.all(np.diff(curves[method]) > 0))
    log(
        f"[{NAME}] digits: accuracy BKD {table['digits_acc_bkd']:.4f} vs KD "
        f"{table['digits_acc_kd']:.4f}; deviance AUROC BKD {table['digits_deviance_auroc_bkd']:.3f}"
        f"; deviance vs gamma (BKD) {', '.join(f'{d:.3f}' for d in curves['bkd'])}"
    )
    return split, models, summaries, curves


def run(config: RunConfig) -> Result:
    strategy = config.strategy or tf.distribute.get_strategy()
    settings = _settings(config.quick)
    result = Result(recipe=NAME, seed=config.seed, settings=_plain_settings(settings))
    table = {}
    with Timer() as synthetic_timer:
        _synthetic(config, settings, strategy, table, config.log)
    with Timer() as digits_timer:
        split, models, summaries, curves = _digits(config, settings, strategy, table, config.log)
    table["synthetic_seconds"] = synthetic_timer.seconds
    table["digits_seconds"] = digits_timer.seconds

    # The headline names of the issue: BKD's values, baselines beside them.
    headline_keys = {
        "coverage_credible_set": "syn_coverage_credible_set_bkd",
        "coverage_oracle_set": "syn_coverage_credible_set_oracle",
        "coverage_credible_set_bisection": "syn_coverage_credible_set_bisection_bkd",
        "coverage_true_prob": "syn_coverage_true_prob_bkd",
        "interval_width": "syn_interval_width_bkd",
        "acc_bkd": "digits_acc_bkd",
        "acc_kd": "digits_acc_kd",
        "nll_bkd": "digits_nll_bkd",
        "ece_bkd": "digits_ece_bkd",
        "deviance_auroc": "digits_deviance_auroc_bkd",
    }
    for name, key in headline_keys.items():
        table[name] = table[key]
    result.metrics = table
    result.baselines = {
        key: value
        for key, value in table.items()
        if any(key.endswith(f"_{m}") or f"_{m}_" in key for m in METHODS if m != "bkd")
    }
    result.headline = {
        "metric": "digits test accuracy (BKD posterior mean vs KD)",
        "ours": table["acc_bkd"],
        "baseline": table["acc_kd"],
        "baseline_name": "KD (the posterior mode)",
    }

    os.makedirs(config.out, exist_ok=True)
    result.plots = bkd_plots.plot_all(split, summaries, curves, GAMMAS, config.out)
    result.export_path = export_posterior(
        models["bkd"], versioned_export_path(os.path.join(config.out, "export"))
    )
    return result


def _plain_settings(settings):
    plain = dict(settings)
    plain["configs"] = [list(c) for c in settings["configs"]]
    return plain
