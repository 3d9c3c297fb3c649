"""Recipe `hvae-datafree`: data-free distillation of a hierarchical VAE with shared noise
(Chen et al., CVPR 2023; METHODS 3.7).

Data: sklearn digits binarised at intensity >= 8 (1,200 train / 197 validation / 400 test).
Models: `HierarchicalVAE` z3:4 -> z2:8 -> z1:16 -> x:64 with a Bernoulli decoder (METHODS 3.7,
newer than the issue's Gaussian decoder) and MLP conditionals; teacher width 128 trained by ELBO
with KL warm-up; students width 16 (the generative conditionals; every inference network has
width 128, since it only serves evaluation).

Students, each with the same optimiser, batch and number of steps:

* `surrogate` (ours): `SharedNoiseDistiller(latent_weight=0.1, latent_divergence="w2")` on
  `teacher.noise_dataset`: no real digit touches it;
* `data`: ELBO (with warm-up) on the real training digits;
* `teacher_samples`: ELBO on teacher samples (the naive data-free baseline);
* `local`: local distillation, each conditional fitted at the teacher's parents
  (`SharedNoiseDistiller(local=True)` with the Gaussian KL, weight 1: METHODS 3.3's definition).

Distillation never trains a student's encoder: every student refits its encoder by ELBO with its
decoder frozen (`HierarchicalVAE.fit_encoder`, same steps for all) before evaluation.

Metrics: test IWAE (`iwae_*`, k = `iwae_k`); `kl_<student>` = mean over teacher samples x of
IWAE_T(x) - IWAE_S(x), an importance-sampling estimate of KL(p_T || p_S) (both sides are
bounds, so it is approximate); MMD^2 (RBF, median heuristic) and leave-one-out 1-NN two-sample
accuracy (0.5 ideal) between generated binary digits and the test digits, in pixels. With
`seeds` > 1, each metric is the mean over seeds and `<metric>_se` its standard error.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from kdtfp import datasets
from kdtfp.distill.shared_noise import SharedNoiseDistiller
from kdtfp.distribute import safe_steps_per_execution
from kdtfp.export import versioned_export_path
from kdtfp.models.hierarchical_vae import HierarchicalVAE, export_hvae
from kdtfp.recipes import hvae_metrics
from kdtfp.recipes.base import Result, RunConfig, Timer

NAME = "hvae-datafree"
DESCRIPTION = (
    "data-free shared-noise distillation of a hierarchical VAE (width 128 -> 16) on binarised "
    "digits vs real-data ELBO, ELBO on teacher samples and local distillation"
)
STUDENTS = ("surrogate", "data", "teacher_samples", "local")
LABELS = {
    "teacher": "teacher (128)",
    "surrogate": "shared noise (ours)",
    "data": "ELBO on real data",
    "teacher_samples": "ELBO on teacher samples",
    "local": "local distillation",
}


def _settings(quick):
    return {
        "threshold": 0.5,  # pixels / 16 >= 0.5, i.e. intensity >= 8
        "latent_sizes": (4, 8, 16),
        "teacher_hidden": 128,
        "student_hidden": 16,
        "encoder_hidden": 128,
        "batch": 100,
        "learning_rate": 1e-3,
        "teacher_steps": 1500 if quick else 10000,
        "student_steps": 800 if quick else 6000,
        "warmup_fraction": 0.2,
        "encoder_steps": 400 if quick else 2000,
        "latent_weight": 0.1,
        "teacher_sample_pool": 20000 if quick else 100000,
        "iwae_k": 100 if quick else 1000,
        "kl_samples": 200 if quick else 1000,
        "quality_samples": 400,
        "seeds": 1 if quick else 2,
    }


def _binarised_digits(seed, threshold):
    split = datasets.load_digits_split(seed=seed)
    return tuple(
        (x >= threshold).astype("float32") for x in (split.x_train, split.x_val, split.x_test)
    )


def _model(settings, hidden, steps, seed):
    return HierarchicalVAE(
        latent_sizes=settings["latent_sizes"],
        data_size=64,
        hidden_units=hidden,
        encoder_hidden_units=settings["encoder_hidden"],
        kl_warmup_steps=int(settings["warmup_fraction"] * steps),
        num_importance_samples=settings["iwae_k"],
        seed=seed,
    )


def _optimizer(settings, steps):
    schedule = keras.optimizers.schedules.CosineDecay(settings["learning_rate"], steps, alpha=0.1)
    return keras.optimizers.Adam(schedule)


def _data_stream(x, batch, seed):
    return (
        tf.data.Dataset.from_tensor_slices(np.asarray(x, np.float32))
        .shuffle(len(x), seed=seed)
        .repeat()
        .batch(batch, drop_remainder=True)
        .prefetch(2)
    )


def _train_elbo(x, hidden, steps, settings, seed, strategy, jit):
    """A VAE of width `hidden` trained by ELBO with warm-up on the rows of `x`."""
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = _model(settings, hidden, steps, seed)
        model.compile(
            optimizer=_optimizer(settings, steps),
            steps_per_execution=safe_steps_per_execution(50, strategy),
            jit_compile=jit,
        )
    model.fit(_data_stream(x, settings["batch"], seed), steps_per_epoch=steps, epochs=1, verbose=0)
    return model


def _distill(teacher, settings, seed, strategy, jit, local):
    """A student distilled data-free: shared noise (ours) or local distillation."""
    keras.utils.set_random_seed(seed)
    steps = settings["student_steps"]
    with strategy.scope():
        student = _model(settings, settings["student_hidden"], steps, seed)
        for layer in student.encoder_layers:  # distillation never trains the encoder
            layer.trainable = False
        distiller = SharedNoiseDistiller(
            student,
            teacher,
            latent_weight=1.0 if local else settings["latent_weight"],
            latent_divergence="kl" if local else "w2",
            local=local,
        )
        distiller.compile(
            optimizer=_optimizer(settings, steps),
            steps_per_execution=safe_steps_per_execution(50, strategy),
            jit_compile=jit,
        )
    distiller.fit(
        teacher.noise_dataset(settings["batch"], seed=seed),
        steps_per_epoch=steps,
        epochs=1,
        verbose=0,
    )
    for layer in student.encoder_layers:
        layer.trainable = True
    return student


def _samples(model, n, chunk=5000):
    parts = [np.asarray(model.sample(min(chunk, n - i))) for i in range(0, n, chunk)]
    return np.concatenate(parts).astype("float32")


def _mean_se(values):
    values = np.asarray(values, np.float64)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def _one_seed(seed, x_train, x_test, settings, strategy, jit, log):
    """Trains the teacher and the four students for one seed; returns `(metrics, (samples,
    shared-noise decoder means), surrogate student)`."""
    table, timings = {}, {}
    with Timer() as timer:
        teacher = _train_elbo(x_train, settings["teacher_hidden"], settings["teacher_steps"],
                              settings, seed, strategy, jit)  # fmt: skip
    timings["teacher"] = timer.seconds
    tf.random.set_seed(seed + 1)
    pool = _samples(teacher, settings["teacher_sample_pool"])
    models = {"teacher": teacher}
    for method in STUDENTS:
        with Timer() as timer:
            if method == "surrogate":
                student = _distill(teacher, settings, seed + 1, strategy, jit, local=False)
            elif method == "local":
                student = _distill(teacher, settings, seed + 1, strategy, jit, local=True)
            else:
                x = x_train if method == "data" else pool
                student = _train_elbo(x, settings["student_hidden"], settings["student_steps"],
                                      settings, seed + 1, strategy, jit)  # fmt: skip
            student.fit_encoder(x_train, settings["encoder_steps"], settings["batch"],
                                settings["learning_rate"], seed=seed, jit_compile=jit)  # fmt: skip
        timings[method] = timer.seconds
        models[method] = student

    tf.random.set_seed(seed + 2)
    x_kl = _samples(teacher, settings["kl_samples"])
    k = settings["iwae_k"]
    iwae_kl = {name: np.asarray(m.log_prob(x_kl, k=k), np.float64) for name, m in models.items()}
    n_quality = min(settings["quality_samples"], len(x_test))
    generated = {}
    for name, model in models.items():
        key = "teacher" if name == "teacher" else f"student_{name}"
        table[f"iwae_{key}"] = float(np.mean(model.log_prob(x_test, k=k)))
        generated[name] = _samples(model, n_quality)
        table[f"mmd_{name}"] = hvae_metrics.mmd_rbf(generated[name], x_test[:n_quality])
        table[f"nn1_accuracy_{name}"] = hvae_metrics.one_nn_accuracy(
            generated[name], x_test[:n_quality], seed=seed
        )
        if name != "teacher":
            gap = iwae_kl["teacher"] - iwae_kl[name]
            table[f"kl_{name}"], table[f"kl_{name}_sample_se"] = _mean_se(gap)
            table[f"{name}_seconds"] = timings[name]
    for name in STUDENTS[1:]:
        # Paired over the same teacher samples: > 0 when ours is closer to the teacher.
        paired = iwae_kl["surrogate"] - iwae_kl[name]
        table[f"kl_{name}_minus_surrogate"], table[f"kl_{name}_minus_surrogate_sample_se"] = (
            _mean_se(paired)
        )
    table["teacher_seconds"] = timings["teacher"]
    table["iwae_gap_surrogate"] = table["iwae_teacher"] - table["iwae_student_surrogate"]
    log(
        f"[{NAME}] seed {seed}: test IWAE(k={k}) teacher {table['iwae_teacher']:.2f}; "
        + ", ".join(
            f"{m} {table[f'iwae_student_{m}']:.2f} (KL {table[f'kl_{m}']:.2f})" for m in STUDENTS
        )
    )
    # Decoder means of every model driven by the same noise: shared-noise students should
    # reproduce the teacher image by image (drawn last: the metrics above do not depend on it).
    noise = teacher.sample_noise(36, seed=tf.constant([seed, 3]))
    shared = {
        LABELS[name]: np.asarray(tf.sigmoid(model.generate(noise)["x"]["logits"]))
        for name, model in models.items()
    }
    return table, (generated, shared), models["surrogate"]


def run(config: RunConfig) -> Result:
    strategy = config.strategy or tf.distribute.get_strategy()
    settings = _settings(config.quick)
    result = Result(recipe=NAME, seed=config.seed, settings=dict(settings))
    result.settings["latent_sizes"] = list(settings["latent_sizes"])
    x_train, _, x_test = _binarised_digits(config.seed, settings["threshold"])

    tables, first = [], None
    for offset in range(settings["seeds"]):
        seed = config.seed + 17 * offset
        table, generated, surrogate = _one_seed(
            seed, x_train, x_test, settings, strategy, config.jit, config.log
        )
        tables.append(table)
        first = first or (generated, surrogate)
    metrics = {}
    for key in tables[0]:
        metrics[key], se = _mean_se([t[key] for t in tables])
        if len(tables) > 1 and not key.endswith(("_se", "seconds")):
            metrics[f"{key}_se"] = se
    baselines = [m for m in STUDENTS if m != "surrogate"]
    best = min(baselines, key=lambda m: metrics[f"kl_{m}"])
    metrics["surrogate_best_kl"] = float(all(metrics["kl_surrogate"] < metrics[f"kl_{m}"]
                                              for m in baselines))  # fmt: skip
    metrics["surrogate_within_5_nats"] = float(metrics["iwae_gap_surrogate"] <= 5.0)
    metrics["seeds"] = float(settings["seeds"])
    result.metrics = metrics
    result.baselines = {
        k: v
        for k, v in metrics.items()
        if any(k.endswith(f"_{m}") for m in ("teacher", *baselines))
    }
    result.headline = {
        "metric": "KL(p_T || p_S) estimate on teacher samples (nats)",
        "ours": metrics["kl_surrogate"],
        "baseline": metrics[f"kl_{best}"],
        "baseline_name": LABELS[best],
    }
    config.log(
        f"[{NAME}] KL(p_T||p_S): "
        + ", ".join(f"{m} {metrics[f'kl_{m}']:.3f}" for m in STUDENTS)
        + f"; surrogate IWAE within {metrics['iwae_gap_surrogate']:.2f} nats of the teacher"
    )

    os.makedirs(config.out, exist_ok=True)
    (generated, shared), surrogate = first
    grids = {"test digits": x_test}
    grids.update({LABELS[name]: images for name, images in generated.items()})
    path = os.path.join(config.out, "sample_grids.png")
    result.plots.append(hvae_metrics.plot_sample_grids(grids, path))
    path = os.path.join(config.out, "shared_noise_means.png")
    title = "decoder means p(x = 1 | z1) of every model driven by the same noise"
    result.plots.append(hvae_metrics.plot_sample_grids(shared, path, title=title))
    result.export_path = export_hvae(
        surrogate, versioned_export_path(os.path.join(config.out, "export"))
    )
    return result
