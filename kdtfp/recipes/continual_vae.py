"""Recipe `continual-vae`: continual learning of a conditional VAE by distilling its own previous
copy with shared noise (Chen et al., CVPR 2023; METHODS.md 3.4 and 3.8).

Data: sklearn digits binarised at intensity >= 8; task 0 = digits 0-4, task 1 = digits 5-9
(the split's 1,200 training and 400 test images, each divided by task).

1. A `ConditionalVAE` (latent 10, one hidden layer of 128, one-hot task input) learns task 0 by
   ELBO. Its test IWAE on task 0 is `iwae_task0_before`.
2. From that model, three runs learn task 1 for the same steps, on the same batches of task-1
   data, with the same old-task share `s` of each batch's loss (paired by seed):
   * `finetune`: ELBO on task 1 only;
   * `replay`: generative replay, `(1 - s) ELBO(task 1) + s ELBO(teacher's task-0 samples)`;
   * `distill` (ours, `kdtfp.distill.ContinualVAEDistiller`): `(1 - s) ELBO(task 1) + s [output
     KL + lambda W2(encoders)]` on task-0 generations of the frozen previous model, shared noise.
3. Metrics per method: test IWAE (k samples) per task (`iwae_task{0,1}_{method}`), the task-0
   drop `drop_task0_{method} = iwae_task0_before - iwae_task0_{method}`, and the share of 1,000
   task-0 generations that an MLP digit classifier (trained here on binarised digits) labels 0-4
   (`share04_{method}`, `share04_before`); MMD^2 (RBF, median heuristic; `mmd_task0_*`) and
   leave-one-out 1-NN two-sample accuracy (`nn1_task0_*`, 0.5 ideal) between task-0
   generations and the task-0 test digits.

The full run adds distillation with lambda = 0 and 0.1 (`*_distill_lambda0`,
`*_distill_lambda0p1`), everything else equal.

Goals (issue 6): `drop_task0_distill <= drop_task0_finetune / 2` and `iwae_task1_distill >=
iwae_task1_finetune - 2`. The full run repeats everything over `seeds` seeds and reports means
with `*_se` standard errors (paired differences for the goals). The distilled model is exported
(`kdtfp.models.conditional_vae.export_conditional_vae`: `sample(n, task)`, `log_prob(x, task)`,
`encode(x, task)`).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from kdtfp import datasets
from kdtfp.distill.continual import ContinualVAEDistiller, continual_dataset, frozen_copy
from kdtfp.distribute import safe_steps_per_execution
from kdtfp.export import versioned_export_path
from kdtfp.models.conditional_vae import ConditionalVAE, export_conditional_vae
from kdtfp.recipes import hvae_metrics
from kdtfp.recipes.base import Result, RunConfig, Timer
from kdtfp.teachers import mlp

NAME = "continual-vae"
DESCRIPTION = (
    "conditional VAE learns digits 5-9 after 0-4 while distilling its previous copy with shared "
    "noise; vs fine-tuning and generative replay"
)
METHODS = ("finetune", "replay", "distill")
LABELS = {
    "before": "after task 0",
    "finetune": "fine-tuning",
    "replay": "generative replay",
    "distill": "shared-noise distillation",
}


def _settings(quick):
    return {
        "threshold": 0.5,  # pixels / 16 >= 0.5, i.e. intensity >= 8
        "latent_size": 10,
        "hidden_units": 128,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "task0_steps": 1500 if quick else 4000,
        "task1_steps": 1000 if quick else 3000,
        "old_task_share": 0.5,
        "latent_weight": 1.0,
        # Extra distillation runs with other lambdas (`*_distill_lambda0`, `*_distill_lambda0p1`):
        # METHODS 3.8 finds lambda the main lever; lambda = 0 leaves the encoder unprotected.
        "extra_latent_weights": () if quick else (0.0, 0.1),
        "latent_divergence": "w2",
        "seeds": 1 if quick else 3,
        "iwae_k": 100 if quick else 1000,
        "share_samples": 1000,
        "mmd_samples": 500,
        "classifier_epochs": 30 if quick else 60,
    }


def _data(seed, threshold):
    split = datasets.load_digits_split(seed=seed)
    binary = {
        "x_train": (split.x_train >= threshold).astype("float32"),
        "x_test": (split.x_test >= threshold).astype("float32"),
        "y_train": split.y_train,
        "y_test": split.y_test,
    }
    for part in ("train", "test"):
        x, y = binary[f"x_{part}"], binary[f"y_{part}"]
        binary[f"task0_{part}"] = x[y < 5]
        binary[f"task1_{part}"] = x[y >= 5]
    return binary


def _train_classifier(data, settings, seed):
    keras.utils.set_random_seed(seed)
    classifier = mlp(64, (64,), 10, name="digit_classifier", seed=seed)
    classifier.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.fit(
        data["x_train"],
        data["y_train"],
        batch_size=64,
        epochs=settings["classifier_epochs"],
        verbose=0,
    )
    logits = classifier.predict(data["x_test"], batch_size=512, verbose=0)
    return classifier, float(np.mean(logits.argmax(-1) == data["y_test"]))


def _task0_dataset(x, batch_size, seed):
    return (
        tf.data.Dataset.from_tensor_slices({"x": x, "task": np.zeros(len(x), np.int32)})
        .repeat()
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=False)
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
    )


def _compile(model, settings, strategy, jit):
    model.compile(
        optimizer=keras.optimizers.Adam(settings["learning_rate"]),
        steps_per_execution=safe_steps_per_execution(50, strategy),
        jit_compile=jit,
    )


def _fit(model, dataset, steps, strategy):
    history = model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return {k: float(v[-1]) for k, v in history.history.items()}


def _train_task0(data, settings, seed, strategy, jit):
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = ConditionalVAE(
            settings["latent_size"], settings["hidden_units"], num_tasks=2, data_size=64,
            seed=seed, name="cvae",
        )  # fmt: skip
        _compile(model, settings, strategy, jit)
    dataset = _task0_dataset(data["task0_train"], settings["batch_size"], seed)
    _fit(model, dataset, settings["task0_steps"], strategy)
    return model


def _variant_name(latent_weight):
    return "distill_lambda" + f"{latent_weight:g}".replace(".", "p")


def _learn_task1(base, method, data, settings, seed, strategy, jit, latent_weight=None):
    """A copy of `base` learns task 1 by `method`; returns `(model, last metrics)`."""
    if latent_weight is None:
        latent_weight = settings["latent_weight"]
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = frozen_copy(base)
        model.trainable = True
        previous = frozen_copy(base)
        distiller = ContinualVAEDistiller(
            model,
            previous,
            old_task_share=settings["old_task_share"],
            latent_weight=latent_weight,
            method=method,
            latent_divergence=settings["latent_divergence"],
            name=f"continual_{method}",
        )
        _compile(distiller, settings, strategy, jit)
    # The same batches and noise for every method (paired by seed).
    dataset = continual_dataset(
        model, data["task1_train"], new_task=1, old_task=0,
        batch_size=settings["batch_size"], seed=seed,
    )  # fmt: skip
    return model, _fit(distiller, dataset, settings["task1_steps"], strategy)


def _evaluate(model, data, classifier, settings, seed):
    k = settings["iwae_k"]
    scores = {
        f"iwae_task{t}": float(np.mean(model.log_prob(data[f"task{t}_test"], t, k=k, seed=seed)))
        for t in (0, 1)
    }
    samples = np.asarray(model.sample(settings["share_samples"], task=0, seed=(seed, 5)))
    labels = classifier.predict(samples, batch_size=1000, verbose=0).argmax(-1)
    scores["share04"] = float(np.mean(labels < 5))
    # Two-sample scores of task-0 generations against the task-0 test digits (METHODS 3.8).
    test = data["task0_test"]
    scores["mmd_task0"] = hvae_metrics.mmd_rbf(samples[: settings["mmd_samples"]], test)
    scores["nn1_task0"] = hvae_metrics.one_nn_accuracy(samples[: len(test)], test, seed=seed)
    return scores


def _mean_se(values):
    values = np.asarray(values, np.float64)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def _plot(models, path, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task = 8
    rows = list(models)
    figure, axes = plt.subplots(len(rows), 2, figsize=(10, 0.8 * len(rows) + 0.7))
    for row, name in enumerate(rows):
        for task in (0, 1):
            probs = np.asarray(
                models[name].sample(per_task, task=task, seed=(seed, 11), probabilities=True)
            )
            strip = np.concatenate([p.reshape(8, 8) for p in probs], axis=1)
            ax = axes[row, task]
            ax.imshow(strip, cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if task == 0:
                ax.set_ylabel(LABELS[name], rotation=0, ha="right", va="center", fontsize=8)
            if row == 0:
                ax.set_title(f"task {task} ({'0-4' if task == 0 else '5-9'}) samples", fontsize=9)
    figure.suptitle("Decoder means p(x | z, task), z ~ N(0, I), same z in every row", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(config: RunConfig) -> Result:
    strategy = config.strategy or tf.distribute.get_strategy()
    settings = _settings(config.quick)
    result = Result(recipe=NAME, seed=config.seed, settings=dict(settings))
    data = _data(config.seed, settings["threshold"])
    classifier, classifier_acc = _train_classifier(data, settings, config.seed)
    config.log(f"[{NAME}] digit classifier test accuracy {classifier_acc:.3f}")

    runs = []
    with Timer() as timer:
        for replicate in range(settings["seeds"]):
            seed = 100 * config.seed + replicate
            base = _train_task0(data, settings, seed, strategy, config.jit)
            scores = {"before": _evaluate(base, data, classifier, settings, seed)}
            models = {"before": base}
            losses = {}
            for method in METHODS:
                models[method], losses[method] = _learn_task1(
                    base, method, data, settings, seed, strategy, config.jit
                )
                scores[method] = _evaluate(models[method], data, classifier, settings, seed)
            for weight in settings["extra_latent_weights"]:
                model, _ = _learn_task1(
                    base, "distill", data, settings, seed, strategy, config.jit, weight
                )
                scores[_variant_name(weight)] = _evaluate(model, data, classifier, settings, seed)
            runs.append(scores)
            line = ", ".join(
                f"{m} t0 {s['iwae_task0']:.2f} t1 {s['iwae_task1']:.2f} 0-4 {s['share04']:.2f}"
                for m, s in scores.items()
            )
            config.log(f"[{NAME}] seed {seed}: {line}")

    table = {"classifier_test_accuracy": classifier_acc}
    per_seed = {}
    variants = [_variant_name(w) for w in settings["extra_latent_weights"]]
    for method in ("before", *METHODS, *variants):
        for key in ("iwae_task0", "iwae_task1", "share04", "mmd_task0", "nn1_task0"):
            name = f"{key}_{method}"
            per_seed[name] = [r[method][key] for r in runs]
        if method != "before":
            per_seed[f"drop_task0_{method}"] = [
                r["before"]["iwae_task0"] - r[method]["iwae_task0"] for r in runs
            ]
    # Paired differences for the goals.
    per_seed["drop_ratio_distill_finetune"] = [
        (r["before"]["iwae_task0"] - r["distill"]["iwae_task0"])
        / (r["before"]["iwae_task0"] - r["finetune"]["iwae_task0"])
        for r in runs
    ]
    per_seed["task1_gap_distill_finetune"] = [
        r["finetune"]["iwae_task1"] - r["distill"]["iwae_task1"] for r in runs
    ]
    for name, values in per_seed.items():
        table[name], se = _mean_se(values)
        if settings["seeds"] > 1:
            table[f"{name}_se"] = se
    table["goal_forgetting_half_of_finetune"] = float(
        table["drop_task0_distill"] <= 0.5 * table["drop_task0_finetune"]
    )
    table["goal_task1_within_2_nats"] = float(table["task1_gap_distill_finetune"] <= 2.0)
    table["seconds_train_eval"] = timer.seconds
    for name, value in losses["distill"].items():
        table[f"last_{name}_distill"] = value

    result.metrics = table
    result.baselines = {
        "finetune": {k: v for k, v in table.items() if k.endswith("_finetune")},
        "replay": {k: v for k, v in table.items() if k.endswith("_replay")},
    }
    result.headline = {
        "metric": "drop_task0 (task-0 test IWAE lost by learning task 1, nats; lower is better)",
        "ours": table["drop_task0_distill"],
        "baseline": table["drop_task0_finetune"],
        "baseline_name": "fine-tuning",
    }

    os.makedirs(config.out, exist_ok=True)
    plot_path = os.path.join(config.out, "continual_vae_samples.png")
    _plot(models, plot_path, seed)
    result.plots = [plot_path]
    result.export_path = export_conditional_vae(
        models["distill"],
        versioned_export_path(os.path.join(config.out, "export")),
        k=settings["iwae_k"],
    )
    config.log(
        f"[{NAME}] headline metric: task-0 IWAE drop distill {table['drop_task0_distill']:.2f} vs "
        f"fine-tuning {table['drop_task0_finetune']:.2f} vs replay "
        f"{table['drop_task0_replay']:.2f}; task-1 IWAE distill {table['iwae_task1_distill']:.2f}"
        f" vs fine-tuning {table['iwae_task1_finetune']:.2f}"
    )
    return result
