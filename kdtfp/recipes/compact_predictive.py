"""Recipe `compact-predictive`: an MCMC posterior predictive distilled into a mixture of 10
logistic regressors, batch and online (Papamakarios 2015, part B; METHODS.md §5.4, §5.7).

Teacher: bias-free Bayesian logistic regression, prior N(0, 100 I), sampled with HMC (4 chains
in parallel, per-chain step sizes adapted by dual averaging) — 10^4 stored samples, whose Monte
Carlo predictive `g(x) = mean_s sigmoid(w_s . x)` is the **batch teacher**. Student:
`MixturePredictive(10)`, equal weights, no biases, trained by plain SGD (minibatch 10, learning
rate decayed linearly from 1 to 0, as the thesis's code) on the cross-entropy to the teacher at
fresh transfer inputs each step, with `model.fit` and `CategoricalCrossentropy(from_logits=True)`.

* **batch**: targets `g(x)` from the stored bag (`S x D` floats);
* **online**: nothing stored; `C = 16` HMC chains advance one transition per SGD step inside the
  `tf.data` pipeline, and the target is the average over the chains' current states of
  `sigmoid(w_t . x)` (`C x (D + 1)` floats). The project lead's prototype reached 1.28x the batch
  KL at equal steps with one chain: this recipe keeps equal steps and **averages the parallel
  chains' targets** instead (the chains cost memory O(C), not O(steps)).

Both students see the same transfer inputs (common random numbers), so their KL ratio measures
the cost of the online targets alone.

Problems:

(a) the thesis's 2-D toy: 12 points per class around (-4, 0) and (4, 0) (identity covariance),
    labels drawn from sigmoid(w_true . x) with w_true = (1, 0); transfer inputs x ~ N(0, 10 I).
    KL(MC predictive || student) (Bernoulli, nats, averaged) on a 40 x 40 grid of [-10, 10]^2
    (`kl_batch`, `kl_online`) and on 1,000 held-out points of the same process (`*_test`).
(b) sklearn breast_cancer, standardised on 400 training rows, projected on its first 5 principal
    components, plus a constant input (the bias); 169 test rows; transfer inputs from the
    Gaussian fitted to the training inputs (`bc_*` metrics).

Average score matching (full run only, `settings["score_matching"]`): two more students,
`batch_dm` and `online_dm`, trained by `model.fit` on `KL(teacher || student) + score_weight *
L_ASM` (`kdtfp.losses.AverageScoreMatching` on `InputScores(student)`), where
`L_ASM = sum_y p(y|x)/2 ||grad_x log f(y|x) - grad_x log p(y|x)||^2` (METHODS.md §5.3-5.4); the
teacher's score rows are computed in the `tf.data` pipeline from the bag (batch) or from the
chains' current state (online; the parameter gradient is linear in `(p, grad_x p)`, so the
online targets keep it unbiased). Metrics `kl_batch_dm`, `kl_online_dm` (and `_test`, `bc_`).

Density variant: the toy posterior's samples distilled into `GaussianMixtureDensity(3, 2)` by
maximum likelihood; `density_kl_gmm` = KL(posterior || mixture) on held-out draws with the
posterior normalised by grid quadrature, against one moment-matched Gaussian
(`density_kl_gaussian`).

Memory: `memory_floats_teacher` (the bag) vs `memory_floats_online` (the chains' state); the
online chain is also run alone for 10^3 and 10^5 transitions (10^3 and 10^4 with --quick), its
stored floats and the process's resident-memory growth recorded each time
(`memory_floats_online_short/long`, `rss_growth_mb_online_short/long`). Prediction cost:
time of the MC predictive over that of the student on the same inputs (`predict_time_ratio`).
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from kdtfp.distribute import safe_steps_per_execution
from kdtfp.export import export_student, versioned_export_path
from kdtfp.losses.score_matching import AverageScoreMatching, InputScores, score_rows
from kdtfp.models.gaussian_mixture import GaussianMixtureDensity
from kdtfp.models.mixture_predictive import MixturePredictive
from kdtfp.recipes.base import Result, RunConfig, Timer
from kdtfp.teachers.mcmc import (
    OnlineChain,
    _predictive_log_probs,
    _seed_pair,
    logistic_log_posterior,
    mc_predictive_log_probs,
    sample_posterior,
)
from kdtfp.teachers.mcmc_streams import (
    batch_transfer_dataset,
    gaussian_inputs,
    online_transfer_dataset,
)

NAME = "compact-predictive"
DESCRIPTION = (
    "MCMC posterior predictive (HMC, 10^4 samples) -> mixture of 10 logistic regressors, "
    "batch vs online distillation (2-D toy, breast_cancer)"
)


def _settings(quick):
    return {
        "prior_scale": 10.0,
        "num_chains": 4,
        "samples_per_chain": 2500,  # 10^4 samples in the bag
        "burn_in": 500 if quick else 1000,
        "num_leapfrog_steps": 8,
        "components": 10,
        "batch_size": 10,
        "learning_rate": 1.0,
        "steps": 3000 if quick else 5000,
        "bc_steps": 2000 if quick else 5000,
        "online_chains": 64,
        "online_thin": 1,  # chain transitions per SGD step
        # A second online student with this many times the batch student's SGD steps (the other
        # remedy for the single-state targets' noise); 1 skips it.
        "online_more_steps": 1 if quick else 2,
        "repeats": 1 if quick else 3,
        "transfer_variance": 10.0,
        "bc_pca": 5,
        "memory_steps": (1_000, 10_000) if quick else (1_000, 100_000),
        "grid": 40,
        # Average score matching (METHODS.md §5.3-5.4) as a third pair of students,
        # `batch_dm` / `online_dm`, trained on KL + score_weight * L_ASM (full run only: it
        # would push --quick past its time budget).
        "score_matching": not quick,
        "score_weight": 1.0,
        # Density variant: the toy posterior's samples distilled into a 3-component Gaussian
        # mixture by maximum likelihood, scored by exact KL (log Z by quadrature on a grid).
        "density_components": 3,
        "density_epochs": 10 if quick else 40,
        "density_grid": 300,
    }


# ------------------------------------------------------------------------------------ data
def thesis_toy(seed, per_class=12, test_size=1000):
    """The thesis's 2-D logistic toy: `(x, y, x_test, y_test)`, labels 0/1 (METHODS.md §5.4)."""
    rng = np.random.default_rng(seed)

    def draw(n_per_class):
        x = np.concatenate(
            [
                rng.normal((-4.0, 0.0), 1.0, (n_per_class, 2)),
                rng.normal((4.0, 0.0), 1.0, (n_per_class, 2)),
            ]
        )
        y = (rng.random(len(x)) < 1.0 / (1.0 + np.exp(-x[:, 0]))).astype("int32")
        return x.astype("float32"), y

    x, y = draw(per_class)
    x_test, y_test = draw(test_size // 2)
    return x, y, x_test, y_test


def breast_cancer(seed, num_train=400, components=5):
    """Standardised, PCA-projected breast_cancer with a constant last input (the bias)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.target))
    train, test = order[:num_train], order[num_train:]
    x = data.data.astype("float64")
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    _, _, vt = np.linalg.svd(x[train] - x[train].mean(0), full_matrices=False)
    z = x @ vt[:components].T
    z = np.concatenate([z, np.ones((len(z), 1))], axis=1).astype("float32")
    y = data.target.astype("int32")  # 1 = benign
    return z[train], y[train], z[test], y[test]


def _with_constant(sampler):
    """Appends the constant input to the draws of a Gaussian sampler over the other inputs."""

    def sample(seed, n):
        x = sampler(seed, n)
        return tf.concat([x, tf.ones([n, 1], x.dtype)], axis=1)

    return sample


# -------------------------------------------------------------------------------- training
def _train(dataset, dim, settings, steps, seed, strategy, jit):
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        student = MixturePredictive(settings["components"], seed=seed, name="student")
        student.build((None, dim))
        schedule = keras.optimizers.schedules.PolynomialDecay(
            settings["learning_rate"], steps, end_learning_rate=0.0, power=1.0
        )
        student.compile(
            optimizer=keras.optimizers.SGD(schedule),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
            steps_per_execution=safe_steps_per_execution(50, strategy),
            jit_compile=jit,
        )
    history = student.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    if not np.isfinite(history.history["loss"][-1]):
        raise FloatingPointError(f"The distillation loss became NaN/Inf within {steps} steps.")
    return student


def score_transfer_dataset(samples_or_chain, input_sampler, batch_size, seed=0):
    """An endless `(x [b, D], teacher score rows [b, 2, 1 + D])` dataset for score matching.

    The rows (`kdtfp.losses.score_matching.score_rows`) are the log MC predictive of the stored
    bag `[S, D]` (batch) or of the chains' current state (an `OnlineChain`, advanced one element
    per batch: online) and its input-gradient. The inputs are those of
    `batch_transfer_dataset` / `online_transfer_dataset` with the same `seed`.
    """
    base = _seed_pair(seed)

    def make(index, samples):
        x = input_sampler(tf.stack([base[0], tf.cast(index, tf.int32)]), batch_size)
        return x, score_rows(lambda z: _predictive_log_probs(samples, z), x)

    if isinstance(samples_or_chain, OnlineChain):
        return tf.data.Dataset.zip(tf.data.Dataset.counter(), samples_or_chain.states()).map(make)
    bag = tf.constant(np.asarray(samples_or_chain, "float32"))
    return tf.data.Dataset.counter().map(lambda index: make(index, bag))


def _train_score_matching(dataset, dim, settings, steps, seed, strategy, jit):
    """A `MixturePredictive` fitted on KL(teacher || student) + score_weight * L_ASM."""
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        student = MixturePredictive(settings["components"], seed=seed, name="student")
        scored = InputScores(student, name="scored_student")
        scored.build((None, dim))
        schedule = keras.optimizers.schedules.PolynomialDecay(
            settings["learning_rate"], steps, end_learning_rate=0.0, power=1.0
        )
        scored.compile(
            optimizer=keras.optimizers.SGD(schedule),
            loss=AverageScoreMatching(score_weight=settings["score_weight"], kl_weight=1.0),
            steps_per_execution=safe_steps_per_execution(50, strategy),
            jit_compile=jit,
        )
    history = scored.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    if not np.isfinite(history.history["loss"][-1]):
        raise FloatingPointError(f"The score-matching loss became NaN/Inf within {steps} steps.")
    return student


def _distill(problem, settings, steps, seed, config, strategy):
    """Trains the batch and the online students on the same transfer inputs.

    Returns `(students, chain, seconds)`: `students` maps `"batch"`, `"online"` (and
    `"online_more_steps"` when `settings["online_more_steps"] > 1`) to trained students;
    `chain` is the online teacher; `seconds` the training time of each student.
    """
    dim = problem["x"].shape[1]
    batch_data = batch_transfer_dataset(
        problem["posterior"].bag, problem["sampler"], settings["batch_size"], seed=seed
    )
    chain = OnlineChain(
        problem["x"],
        problem["y"],
        num_chains=settings["online_chains"],
        num_burnin_steps=settings["burn_in"],
        prior_scale=settings["prior_scale"],
        num_leapfrog_steps=settings["num_leapfrog_steps"],
        thin=settings["online_thin"],
        seed=seed + 1,
    )
    online_data = online_transfer_dataset(
        chain, problem["sampler"], settings["batch_size"], seed=seed
    )
    runs = {"batch": (batch_data, steps), "online": (online_data, steps)}
    if settings["online_more_steps"] > 1:
        runs["online_more_steps"] = (online_data, steps * settings["online_more_steps"])
    if settings.get("score_matching"):
        for kind, teacher in (("batch_dm", problem["posterior"].bag), ("online_dm", chain)):
            data = score_transfer_dataset(
                teacher, problem["sampler"], settings["batch_size"], seed=seed
            )
            runs[kind] = (data, steps)
    students, seconds = {}, {}
    for kind, (data, kind_steps) in runs.items():
        train = _train_score_matching if kind.endswith("_dm") else _train
        with Timer() as timer:
            students[kind] = train(data, dim, settings, kind_steps, seed, strategy, config.jit)
        seconds[kind] = timer.seconds
    return students, chain, seconds


# ------------------------------------------------------------------------------ evaluation
def _log_probs(model, x):
    return np.asarray(model(tf.constant(x), training=False), dtype="float64")


def _kl(teacher_log_probs, student_log_probs):
    """Mean Bernoulli KL(teacher || student), nats."""
    p = np.exp(teacher_log_probs)
    return float(np.mean(np.sum(p * (teacher_log_probs - student_log_probs), axis=-1)))


def _accuracy(log_probs, y):
    return float(np.mean(np.argmax(log_probs, axis=-1) == y))


def _nll(log_probs, y):
    return float(-np.mean(log_probs[np.arange(len(y)), y]))


def _grid(settings):
    axis = np.linspace(-10.0, 10.0, settings["grid"], dtype="float32")
    first, second = np.meshgrid(axis, axis)
    return axis, np.stack([first.ravel(), second.ravel()], axis=1)


def _time_call(function, x, min_seconds=0.3, max_calls=200):
    """Seconds per call of `function(x)`, over at least `min_seconds` (or `max_calls` calls)."""
    np.asarray(function(x))  # trace
    calls, start = 0, time.perf_counter()
    while calls < max_calls and (calls == 0 or time.perf_counter() - start < min_seconds):
        np.asarray(function(x))
        calls += 1
    return (time.perf_counter() - start) / calls


def _predict_time_ratio(bag, student, x):
    x = tf.constant(x)
    bag = tf.constant(bag)
    teacher = tf.function(lambda inputs: mc_predictive_log_probs(bag, inputs))
    compact = tf.function(lambda inputs: student(inputs, training=False))
    return _time_call(teacher, x) / _time_call(compact, x)


def _rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def _online_memory(chain, settings):
    """Runs the online chain alone for the short and the long number of transitions.

    The states are consumed inside the tf.data runtime (only a running sum leaves the
    pipeline); the record holds the floats the chain keeps, the floats a stored bag of the same
    run would need, and the growth of the process's resident memory over the run.
    """
    out = {}
    for label, steps in zip(("short", "long"), settings["memory_steps"], strict=True):
        # Ten transitions per element: the same chain, fewer trips through the tf.data runtime.
        states = chain.states(max(1, steps // 10), thin=10)
        states.take(1).reduce(0.0, lambda total, state: total + tf.reduce_sum(state))  # trace
        before = _rss_mb()
        total = states.reduce(0.0, lambda total, state: total + tf.reduce_sum(state))
        out[f"rss_growth_mb_online_{label}"] = _rss_mb() - before
        out[f"memory_floats_online_{label}"] = chain.stored_floats
        out[f"memory_floats_teacher_{label}"] = steps * chain.num_chains * chain.dim
        elements = max(1, steps // 10)
        out[f"mean_state_online_{label}"] = float(total) / (elements * chain.num_chains * chain.dim)
        out[f"mcmc_steps_{label}"] = steps
    return out


def _density_distillation(problem, settings, seed, strategy=None):
    """Distils the posterior's samples (a 2-D bag) into a `GaussianMixtureDensity` by ML.

    Trained on the first 80 % of every chain's draws, scored on the last 20 %:
    `density_kl_gmm` = KL(posterior || mixture) = mean over held-out draws of
    `log p(w | data) - log q(w)`, with the posterior normalised by quadrature of
    `logistic_log_posterior` on a grid around the samples (2-D only); the same for one Gaussian
    fitted by moments (`density_kl_gaussian`), and held-out mean log-likelihoods.
    """
    samples = problem["posterior"].samples  # [R, C, D]
    cut = int(0.8 * samples.shape[0])
    dim = samples.shape[-1]
    if dim != 2:
        raise ValueError(f"The density variant normalises a 2-D posterior on a grid; D = {dim}.")
    train = samples[:cut].reshape(-1, dim)
    held_out = samples[cut:].reshape(-1, dim).astype("float64")
    keras.utils.set_random_seed(seed)
    with (strategy or tf.distribute.get_strategy()).scope():
        gmm = GaussianMixtureDensity(settings["density_components"], dim=dim, seed=seed)
        gmm.init_from_samples(train, seed=seed)
        gmm.compile(optimizer=keras.optimizers.Adam(0.01))
    with Timer() as timer:
        gmm.fit(train, batch_size=256, epochs=settings["density_epochs"], verbose=0)
    log_q = np.asarray(gmm.log_prob(held_out.astype("float32")), "float64")

    # Exact normaliser of the 2-D posterior on a grid covering the samples with a margin.
    log_post = logistic_log_posterior(problem["x"], problem["y"], settings["prior_scale"])
    low, high = samples.reshape(-1, dim).min(0), samples.reshape(-1, dim).max(0)
    margin = 0.5 * (high - low)
    axes = [
        np.linspace(lo - m, hi + m, settings["density_grid"])
        for lo, hi, m in zip(low, high, margin, strict=True)
    ]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim)
    log_grid = np.asarray(log_post(tf.constant(mesh, tf.float32)), "float64")
    cell = np.prod([a[1] - a[0] for a in axes])
    log_z = float(np.logaddexp.reduce(log_grid) + np.log(cell))
    log_p = np.asarray(log_post(tf.constant(held_out, tf.float32)), "float64") - log_z

    mean, cov = train.mean(0), np.cov(train, rowvar=False)
    diff = held_out - mean
    log_gauss = -0.5 * (
        np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff)
        + np.linalg.slogdet(cov)[1]
        + dim * np.log(2 * np.pi)
    )
    return {
        "density_kl_gmm": float(np.mean(log_p - log_q)),
        "density_kl_gaussian": float(np.mean(log_p - log_gauss)),
        "density_ll_gmm": float(np.mean(log_q)),
        "density_ll_gaussian": float(np.mean(log_gauss)),
        "density_ll_exact": float(np.mean(log_p)),
        "density_stored_floats_gmm": int(sum(np.prod(w.shape) for w in gmm.weights)),
        "density_train_seconds": timer.seconds,
    }


# ----------------------------------------------------------------------------------- plots
def _plot(axis, surfaces, x, y, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(
        1, len(surfaces), figsize=(4.2 * len(surfaces) + 1, 4), constrained_layout=True
    )
    levels = np.linspace(0.0, 1.0, 11)
    for panel, (title, surface) in zip(panels, surfaces.items(), strict=True):
        filled = panel.contourf(
            axis, axis, surface.reshape(len(axis), len(axis)), levels=levels, cmap="RdBu_r"
        )
        panel.contour(axis, axis, surface.reshape(len(axis), len(axis)), levels=[0.5], colors="k")
        panel.scatter(*x[y == 1].T, c="tab:red", s=14, edgecolors="k", label="y = 1")
        panel.scatter(*x[y == 0].T, c="tab:blue", s=14, edgecolors="k", label="y = 0")
        panel.set(title=title, xlabel="x1", aspect="equal")
    panels[0].set_ylabel("x2")
    panels[0].legend(fontsize=8, loc="upper left")
    figure.colorbar(filled, ax=list(panels), label="p(y = 1 | x)", shrink=0.85)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------- run
def _problem(x, y, sampler, settings, seed):
    with Timer() as timer:
        posterior = sample_posterior(
            x,
            y,
            num_results=settings["samples_per_chain"],
            num_chains=settings["num_chains"],
            num_burnin_steps=settings["burn_in"],
            prior_scale=settings["prior_scale"],
            num_leapfrog_steps=settings["num_leapfrog_steps"],
            seed=seed,
        )
    return {"x": x, "y": y, "sampler": sampler, "posterior": posterior, "seconds": timer.seconds}


def _evaluate(prefix, problem, students, inputs, labels, table):
    """KLs on every set of `inputs` and test accuracy / NLL, averaged over repeats."""
    bag = problem["posterior"].bag
    for set_name, x in inputs.items():
        teacher = np.asarray(mc_predictive_log_probs(bag, x), dtype="float64")
        for kind in students:
            kls = [_kl(teacher, _log_probs(s, x)) for s in students[kind]]
            table[f"{prefix}kl_{kind}{set_name}"] = float(np.mean(kls))
            if len(kls) > 1:
                table[f"{prefix}kl_{kind}{set_name}_sd"] = float(np.std(kls, ddof=1))
            if kind != "batch":
                table[f"{prefix}kl_{kind}_over_batch{set_name}"] = (
                    table[f"{prefix}kl_{kind}{set_name}"] / table[f"{prefix}kl_batch{set_name}"]
                )
    x_test, y_test = labels
    teacher = np.asarray(mc_predictive_log_probs(bag, x_test), dtype="float64")
    table[f"{prefix}acc_mc"] = _accuracy(teacher, y_test)
    table[f"{prefix}nll_mc"] = _nll(teacher, y_test)
    for kind in students:
        outputs = [_log_probs(s, x_test) for s in students[kind]]
        table[f"{prefix}acc_{kind}"] = float(np.mean([_accuracy(o, y_test) for o in outputs]))
        table[f"{prefix}nll_{kind}"] = float(np.mean([_nll(o, y_test) for o in outputs]))
    summary = problem["posterior"].summary()
    table[f"{prefix}rhat_max"] = summary["max_rhat"]
    table[f"{prefix}ess_min"] = summary["min_ess"]
    table[f"{prefix}acceptance"] = summary["acceptance_rate"]
    table[f"{prefix}mcmc_seconds"] = problem["seconds"]


def run(config: RunConfig) -> Result:
    strategy = config.strategy or tf.distribute.get_strategy()
    settings = _settings(config.quick)
    result = Result(recipe=NAME, seed=config.seed, settings=dict(settings))
    table = {}

    # (a) the thesis's 2-D toy.
    x, y, x_test, y_test = thesis_toy(config.seed)
    toy_sampler = gaussian_inputs(np.zeros(2), settings["transfer_variance"])
    toy = _problem(x, y, toy_sampler, settings, config.seed)
    config.log(f"[{NAME}] toy posterior: {toy['posterior'].summary()} ({toy['seconds']:.1f} s)")
    students, seconds = {}, {}
    for repeat in range(settings["repeats"]):
        seed = config.seed + 100 * repeat
        trained, chain, seconds = _distill(toy, settings, settings["steps"], seed, config, strategy)
        for kind, student in trained.items():
            students.setdefault(kind, []).append(student)
    axis, grid = _grid(settings)
    _evaluate("", toy, students, {"": grid, "_test": x_test}, (x_test, y_test), table)
    for kind, value in seconds.items():
        table[f"train_seconds_{kind}"] = value
    table["memory_floats_teacher"] = toy["posterior"].stored_floats
    table["memory_floats_online"] = chain.stored_floats
    table["memory_floats_student"] = students["batch"][0].stored_floats
    table["predict_time_ratio"] = _predict_time_ratio(
        toy["posterior"].bag, students["batch"][0], grid
    )
    config.log(
        f"[{NAME}] toy grid KL: batch {table['kl_batch']:.4g}, online {table['kl_online']:.4g} "
        f"(ratio {table['kl_online_over_batch']:.3f}); accuracy MC {table['acc_mc']:.3f}, "
        f"batch {table['acc_batch']:.3f}, online {table['acc_online']:.3f}"
    )
    if settings["score_matching"]:
        table["kl_online_dm_over_batch_dm"] = table["kl_online_dm"] / table["kl_batch_dm"]
        config.log(
            f"[{NAME}] toy grid KL with average score matching: batch {table['kl_batch_dm']:.4g}, "
            f"online {table['kl_online_dm']:.4g}"
        )
    table.update(_density_distillation(toy, settings, config.seed, strategy))
    config.log(
        f"[{NAME}] toy posterior density: KL(posterior || GMM-{settings['density_components']}) "
        f"{table['density_kl_gmm']:.4g} vs one Gaussian {table['density_kl_gaussian']:.4g}"
    )

    # (b) breast_cancer.
    bx, by, bx_test, by_test = breast_cancer(config.seed, components=settings["bc_pca"])
    features = bx[:, :-1]
    bc_sampler = _with_constant(gaussian_inputs(features.mean(0), np.cov(features, rowvar=False)))
    cancer = _problem(bx, by, bc_sampler, settings, config.seed)
    config.log(f"[{NAME}] breast_cancer posterior: {cancer['posterior'].summary()}")
    bc_students = {}
    for repeat in range(settings["repeats"]):
        seed = config.seed + 100 * repeat
        trained, bc_chain, _ = _distill(
            cancer, settings, settings["bc_steps"], seed, config, strategy
        )
        for kind, student in trained.items():
            bc_students.setdefault(kind, []).append(student)
    _evaluate("bc_", cancer, bc_students, {"": bx_test}, (bx_test, by_test), table)
    table["bc_memory_floats_teacher"] = cancer["posterior"].stored_floats
    table["bc_memory_floats_online"] = bc_chain.stored_floats
    table["bc_predict_time_ratio"] = _predict_time_ratio(
        cancer["posterior"].bag, bc_students["batch"][0], bx_test
    )
    config.log(
        f"[{NAME}] breast_cancer test KL: batch {table['bc_kl_batch']:.4g}, online "
        f"{table['bc_kl_online']:.4g}; accuracy MC {table['bc_acc_mc']:.3f}, batch "
        f"{table['bc_acc_batch']:.3f}, online {table['bc_acc_online']:.3f}"
    )

    # Online memory does not grow with the number of MCMC steps.
    table.update(_online_memory(chain, settings))
    config.log(
        f"[{NAME}] online chain: {table['memory_floats_online_short']} floats after "
        f"{table['mcmc_steps_short']} steps, {table['memory_floats_online_long']} after "
        f"{table['mcmc_steps_long']} (RSS growth {table['rss_growth_mb_online_short']:.1f} / "
        f"{table['rss_growth_mb_online_long']:.1f} MB)"
    )

    result.metrics = table
    result.baselines = {
        key: table[key]
        for key in ("kl_batch", "acc_mc", "nll_mc", "bc_kl_batch", "bc_acc_mc", "bc_nll_mc")
    }
    result.headline = {
        "metric": "grid KL(MC || student), online (toy)",
        "ours": table["kl_online"],
        "baseline": table["kl_batch"],
        "baseline_name": "batch distillation from 10^4 stored samples",
    }

    os.makedirs(config.out, exist_ok=True)
    plot_path = os.path.join(config.out, "predictive_contours.png")
    bag = toy["posterior"].bag
    _plot(
        axis,
        {
            "MC predictive (10^4 HMC samples)": np.exp(
                np.asarray(mc_predictive_log_probs(bag, grid))[:, 1]
            ),
            "batch student (M = 10)": np.exp(_log_probs(students["batch"][0], grid)[:, 1]),
            "online student (M = 10)": np.exp(_log_probs(students["online"][0], grid)[:, 1]),
        },
        x,
        y,
        plot_path,
    )
    result.plots.append(plot_path)
    # The exported student: the online toy student (the method's point: no stored samples).
    result.export_path = export_student(
        students["online"][0],
        versioned_export_path(os.path.join(config.out, "export")),
        input_signature=tf.TensorSpec([None, 2], tf.float32, name="inputs"),
    )
    return result
