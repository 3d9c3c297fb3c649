"""Recipe `ensemble-compression`: a bagged MLP ensemble distilled into a small MLP, with and
without derivative matching, over transfer-set sizes (Papamakarios 2015, part A; METHODS.md §5.6).

Teacher: 10 bagged MLPs 64-100-100-10 on sklearn digits (pixels / 16). Student: 64-16-10. For
each transfer-set size n (25, 50, 100, 200 and all 1,200 training images) four students are
trained for the same number of steps:

* `labels_only` — cross-entropy on the n true labels (no teacher);
* `ce` — soft targets only: KL(teacher || student) at T = 1 (the cross-entropy to the teacher);
* `noise` — soft targets on the n images plus 10 Gaussian-noise copies of each (sigma 0.4);
* `dm` — soft targets + λ · derivative matching (one Rademacher projection per example).

Metrics per n on the 400 test images: accuracy, mean test log-likelihood, agreement with the
teacher and KL(teacher || student), averaged over seeds (1 seed with --quick, 5 without). All
variants share the steps, optimizer and global batch of a given n. Without --quick each variant
has one hyperparameter chosen on the 197 validation images from a grid of two (labels only:
learning rate; soft targets: temperature; noise inputs: sigma; derivative matching: λ).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from kdtfp import datasets, metrics
from kdtfp.distill import Distiller
from kdtfp.distribute import safe_steps_per_execution, shard_by_data
from kdtfp.export import export_student, versioned_export_path
from kdtfp.losses import DerivativeMatching, SoftTargetKL
from kdtfp.recipes.base import Result, RunConfig, Timer
from kdtfp.teachers import BaggedEnsemble, fit_bagged, mlp

NAME = "ensemble-compression"

SIZES = (25, 50, 100, 200, 1200)
VARIANTS = ("labels_only", "ce", "noise", "dm")
COLORS = {"labels_only": "tab:gray", "ce": "tab:blue", "noise": "tab:orange", "dm": "tab:red"}
VARIANT_NAMES = {
    "labels_only": "labels only",
    "ce": "soft targets",
    "noise": "soft targets + noise inputs",
    "dm": "soft targets + derivative matching",
}


def _settings(quick):
    return {
        "members": 10,
        "teacher_hidden": (100, 100),
        "student_hidden": (16,),
        "teacher_epochs": 15 if quick else 40,
        "steps": 600 if quick else 1500,
        "learning_rate": 1e-2,
        "max_batch": 32,
        "seeds": 1 if quick else 5,
        # One hyperparameter per variant, chosen on the validation images in the full run; every
        # variant gets a grid of the same size so that no method is tuned more than another.
        "grids": {
            "labels_only": (1e-2,) if quick else (3e-3, 1e-2),  # learning rate
            "ce": (1.0,) if quick else (1.0, 4.0),  # temperature
            "noise": (0.4,) if quick else (0.2, 0.4),  # noise sigma
            "dm": (1.0,) if quick else (1.0, 10.0),  # lambda
        },
        "noise_copies": 10,
    }


def _batch_size(n, settings, replicas):
    """One global batch for every variant of a transfer set of `n` real inputs.

    A multiple of 8 (so 1, 2, 4 or 8 replicas see identical global batches) and of the replica
    count: Keras reduces the first batch across replicas when it builds a model under a
    strategy, and uneven shards (13 + 12) fail there.
    """
    batch = max(8, min(n, settings["max_batch"]) // 8 * 8)
    return max(replicas, batch // replicas * replicas)


def _train_student(teacher, x, y, variant, settings, seed, strategy, jit, hyper=None):
    """Trains one 64-16-10 student on the transfer set `(x, y)`; returns it.

    `hyper` is the variant's tuned value (see `_settings()["grids"]`); None takes the first.
    """
    hyper = settings["grids"][variant][0] if hyper is None else hyper
    batch = _batch_size(len(x), settings, strategy.num_replicas_in_sync)
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        student = mlp(x.shape[1], settings["student_hidden"], 10, name="student", seed=seed)
        if variant == "labels_only":
            model = student
            model.compile(
                optimizer=keras.optimizers.Adam(hyper),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                steps_per_execution=safe_steps_per_execution(10, strategy),
                jit_compile=jit,
            )
        else:
            temperature = hyper if variant == "ce" else 1.0
            objectives = [(SoftTargetKL(temperature=temperature), 1.0)]
            if variant == "dm":
                objectives.append((DerivativeMatching(mode="projection", num_projections=1), hyper))
            model = Distiller(student, teacher, objectives, seed=seed)
            model.compile(
                optimizer=keras.optimizers.Adam(settings["learning_rate"]),
                steps_per_execution=safe_steps_per_execution(10, strategy),
                jit_compile=jit,
            )
    if variant == "noise":
        x = np.concatenate(
            [
                x,
                datasets.gaussian_noise(x, settings["noise_copies"], hyper, seed=seed),
            ]
        )
    elements = (x, y) if variant == "labels_only" else x
    # Global batches; on several workers each keeps its replicas' share of every batch.
    dataset = shard_by_data(
        tf.data.Dataset.from_tensor_slices(elements)
        .repeat()
        .shuffle(2048, seed=seed)
        .batch(batch, drop_remainder=True)
    )
    model.fit(dataset, steps_per_epoch=settings["steps"], epochs=1, verbose=0, shuffle=False)
    return student


def _logits(model, x):
    # A direct call, not `predict`: predict traces a new function for every new student.
    return np.asarray(model(x, training=False))


def _evaluate(student, x, y, teacher_logits):
    logits = _logits(student, x)
    return {
        "acc": metrics.accuracy(logits, y),
        "ll": metrics.mean_log_likelihood(logits, y),
        "agree": metrics.agreement(logits, teacher_logits),
        "kl": metrics.kl_divergence(teacher_logits, logits),
    }


def _plot(sizes, table, teacher_accuracy, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANTS:
        style = {"marker": "o", "label": VARIANT_NAMES[variant], "color": COLORS[variant]}
        left.plot(sizes, [table[f"acc_{variant}_n{n}"] for n in sizes], **style)
        right.plot(sizes, [table[f"kl_{variant}_n{n}"] for n in sizes], **style)
    left.axhline(teacher_accuracy, color="black", linestyle="--", label="teacher (10-MLP ensemble)")
    left.set(
        xscale="log",
        xlabel="transfer-set size n",
        ylabel="test accuracy",
        title="Student accuracy vs n",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="transfer-set size n",
        ylabel="KL(teacher || student), nats",
        title="Distance to the teacher",
    )
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(config: RunConfig) -> Result:
    strategy = config.strategy or tf.distribute.get_strategy()
    settings = _settings(config.quick)
    split = datasets.load_digits_split(seed=config.seed)
    result = Result(recipe=NAME, seed=config.seed, settings=dict(settings, sizes=SIZES))

    with Timer() as teacher_timer:
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            members = [
                mlp(split.input_dim, settings["teacher_hidden"], 10, name=f"member_{i}")
                for i in range(settings["members"])
            ]
            teacher = BaggedEnsemble(members, name="teacher")
        fit_bagged(
            teacher,
            split.x_train,
            split.y_train,
            epochs=settings["teacher_epochs"],
            seed=config.seed,
        )
    teacher_test = _logits(teacher, split.x_test)
    teacher_val = _logits(teacher, split.x_val)
    table = {
        "acc_teacher": metrics.accuracy(teacher_test, split.y_test),
        "ll_teacher": metrics.mean_log_likelihood(teacher_test, split.y_test),
        "teacher_seconds": teacher_timer.seconds,
    }
    config.log(
        f"[{NAME}] teacher: test accuracy {table['acc_teacher']:.4f} ({teacher_timer.seconds:.1f} s)"
    )

    runs = {}  # (variant, n) -> list of metric dicts over seeds
    chosen = {}  # (variant, n) -> tuned values over seeds
    final_student = None
    for n in SIZES:
        for repeat in range(settings["seeds"]):
            seed = config.seed + repeat
            x, y = datasets.subset(split.x_train, n, seed=seed, y=split.y_train)
            for variant in VARIANTS:
                grid = settings["grids"][variant]
                best = None
                for hyper in grid:
                    student = _train_student(
                        teacher, x, y, variant, settings, seed, strategy, config.jit, hyper=hyper
                    )
                    if len(grid) > 1:
                        val_logits = _logits(student, split.x_val)
                        score = (
                            metrics.accuracy(val_logits, split.y_val),
                            -metrics.kl_divergence(teacher_val, val_logits),
                        )
                    else:
                        score = (0.0, 0.0)
                    if best is None or score > best[0]:
                        best = (score, hyper, student)
                _, hyper, student = best
                chosen.setdefault((variant, n), []).append(hyper)
                if variant == "dm":
                    final_student = student
                runs.setdefault((variant, n), []).append(
                    _evaluate(student, split.x_test, split.y_test, teacher_test)
                )
        line = ", ".join(f"{v} {np.mean([r['acc'] for r in runs[(v, n)]]):.3f}" for v in VARIANTS)
        config.log(f"[{NAME}] n={n}: test accuracy {line}")

    for (variant, n), records in runs.items():
        for key in records[0]:
            values = [record[key] for record in records]
            table[f"{key}_{variant}_n{n}"] = float(np.mean(values))
            if len(values) > 1:
                table[f"{key}_{variant}_n{n}_sd"] = float(np.std(values, ddof=1))
    for n in SIZES:
        table[f"dm_gain_n{n}"] = table[f"acc_dm_n{n}"] - table[f"acc_ce_n{n}"]
        for variant in VARIANTS:
            table[f"tuned_{variant}_n{n}"] = float(np.mean(chosen[(variant, n)]))

    result.metrics = table
    result.baselines = {
        key: value
        for key, value in table.items()
        if key.startswith(("acc_ce_", "acc_labels_only_", "acc_noise_", "acc_teacher"))
    }
    result.headline = {
        "metric": "test accuracy at n=25",
        "ours": table["acc_dm_n25"],
        "baseline": table["acc_ce_n25"],
        "baseline_name": "soft targets only",
    }

    os.makedirs(config.out, exist_ok=True)
    plot_path = os.path.join(config.out, "accuracy_vs_n.png")
    _plot(SIZES, table, table["acc_teacher"], plot_path)
    result.plots.append(plot_path)
    # The exported student: soft targets + derivative matching on the whole training set.
    result.export_path = export_student(
        final_student, versioned_export_path(os.path.join(config.out, "export"))
    )
    return result
