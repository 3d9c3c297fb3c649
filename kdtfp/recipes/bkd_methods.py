"""The five students of the `bkd` recipe, each trained the same way and summarised alike.

Every method returns probability samples `q` of shape `[r, N, K]` on the inputs it is asked
about (`r = 1` for point estimates), so one function turns them into the METHODS.md 4.5
summaries and one set of metrics scores them all:

* `labels` — the student trained on labels only (λ = 0);
* `kd` — the KD student: the MAP of the BKD posterior, `CE(labels) + λ·CE(teacher)` by Adam;
* `bkd` — SGLD chains started at the KD student, sampling that posterior (Fang et al., 2024);
* `mc_dropout` — KD with dropout, predicting with dropout on (Gal & Ghahramani, 2016);
* `vi` — KD with mean-field variational layers (`kdtfp.layers.MeanFieldDense`), KL / N.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kdtfp.callbacks import PosteriorSampler
from kdtfp.distribute import safe_steps_per_execution
from kdtfp.layers import MeanFieldDense
from kdtfp.losses import TeacherDirichletPosterior
from kdtfp.metrics import log_softmax
from kdtfp.models import PosteriorEnsemble, parallel_chains, repeat_targets, split_chain_samples
from kdtfp.optimizers import SGLD
from kdtfp.predictive import stochastic_probability_samples

METHODS = ("labels", "kd", "bkd", "mc_dropout", "vi")
METHOD_NAMES = {
    "labels": "labels only",
    "kd": "KD (MAP)",
    "bkd": "BKD (SGLD)",
    "mc_dropout": "KD + MC dropout",
    "vi": "KD + mean-field VI",
}
#: Methods whose predictions are distributions (the others give r = 1).
SAMPLING_METHODS = ("bkd", "mc_dropout", "vi")


def build_student(input_dim, hidden, num_classes, kind="mlp", seed=0, data_size=None, option=None):
    """The small student: `input_dim -> hidden (relu) -> num_classes` logits.

    `kind="mlp"` plain; `"dropout"` with a dropout layer of rate `option` (default 0.2) after
    the hidden layer; `"vi"` with mean-field variational dense layers of prior standard
    deviation `option` (default 1) whose KL is weighted by `1 / data_size`.
    """
    inputs = keras.Input((input_dim,), name="inputs")
    if kind == "vi":
        vi = dict(kl_weight=1.0 / data_size, prior_stddev=1.0 if option is None else option)
        h = MeanFieldDense(hidden, activation="relu", seed=seed, **vi)(inputs)
        logits = MeanFieldDense(num_classes, seed=seed + 1, **vi)(h)
        return keras.Model(inputs, logits, name="student_vi")
    init = keras.initializers.GlorotUniform
    h = keras.layers.Dense(hidden, "relu", kernel_initializer=init(seed), name="hidden")(inputs)
    if kind == "dropout":
        h = keras.layers.Dropout(0.2 if option is None else option, seed=seed, name="dropout")(h)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(seed + 1), name="logits")(h)
    return keras.Model(inputs, logits, name=f"student_{kind}")


def _dataset(x, targets, batch, seed):
    return (
        tf.data.Dataset.from_tensor_slices((x, targets))
        .repeat()
        .shuffle(4096, seed=seed)
        .batch(batch, drop_remainder=True)
    )


def train_point(
    x, targets, kind, settings, strategy, seed, lam, temperature, jit=False, option=None
):
    """Adam on the BKD negative log posterior (λ = 0: labels only); returns the student."""
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        student = build_student(
            x.shape[1], settings["hidden"], targets.shape[1] - 1, kind, seed, len(x), option
        )
        student.compile(
            optimizer=keras.optimizers.Adam(settings["learning_rate"]),
            loss=TeacherDirichletPosterior(lam=lam, temperature=temperature),
            steps_per_execution=safe_steps_per_execution(20, strategy),
            jit_compile=jit,
        )
    student.fit(
        _dataset(x, targets, settings["batch"], seed),
        steps_per_epoch=settings["adam_steps"],
        epochs=1,
        verbose=0,
        shuffle=False,  # the tf.data pipeline shuffles
    )
    return student


def sample_bkd(kd_student, x, targets, settings, strategy, seed, lam, temperature, step_size):
    """`settings["chains"]` SGLD chains from the KD student, run side by side in one `fit`.

    The chains are copies of the KD student inside `kdtfp.models.parallel_chains` (one model,
    one step for all chains, `SGLD(data_size=N * chains)` so that each chain takes exactly the
    single-chain step). `PosteriorSampler` drops the first 20 % of `settings["sgld_steps"]`
    steps and keeps every `thin`-th state.

    Returns:
        `(ensemble, sampler)`: a `kdtfp.models.PosteriorEnsemble` of the student holding every
        chain's samples, and the per-chain samples combined in a `PosteriorSampler`
        (diagnostics).
    """
    steps, thin, chains = settings["sgld_steps"], settings["thin"], settings["chains"]
    burn_in = steps // 5
    keras.utils.set_random_seed(seed + 1000)
    with strategy.scope():
        student = keras.models.clone_model(kd_student)
        student.set_weights(kd_student.get_weights())
        model = parallel_chains(student, chains)
        model.compile(
            optimizer=SGLD(step_size, data_size=len(x) * chains, seed=seed + 1000),
            loss=TeacherDirichletPosterior(lam=lam, temperature=temperature),
            # One execution per kept sample: the sampler sees one batch end per `thin` steps.
            steps_per_execution=safe_steps_per_execution(thin, strategy),
        )
    sampler = PosteriorSampler(
        burn_in=burn_in, thin=thin, max_samples=(steps - burn_in) // thin, verbose=0
    )
    model.fit(
        _dataset(x, repeat_targets(targets, chains), settings["batch"], seed),
        steps_per_epoch=steps,
        epochs=1,
        verbose=0,
        shuffle=False,  # the tf.data pipeline shuffles
        callbacks=[sampler],
    )
    sampler = PosteriorSampler.combine(split_chain_samples(sampler, chains))
    return PosteriorEnsemble.from_sampler(student, sampler), sampler


def probability_samples(method, model, x, num_samples=100):
    """`[r, N, K]` class probabilities of one method's student at `x`.

    BKD: every posterior sample of the `PosteriorEnsemble` (`num_samples` is ignored). MC
    dropout: `num_samples` dropout masks per example in ONE call on `x` repeated `num_samples`
    times (masks are drawn per row). VI: `num_samples` calls, one weight draw each. The point
    methods give `r = 1`.
    """
    x = np.asarray(x, np.float32)
    if method == "bkd":
        return np.asarray(model.sample_probs(x), np.float64)
    if method == "mc_dropout":
        tiled = np.tile(x, (num_samples, 1))
        q = stochastic_probability_samples(model, tiled, 1, batch_size=None)[0]
        return q.reshape(num_samples, len(x), -1)
    if method == "vi":
        return stochastic_probability_samples(model, x, num_samples, batch_size=None)
    return np.exp(log_softmax(np.asarray(model(x, training=False), np.float64)))[None]


def rhat_of_probs(q, chains):
    """Split-R-hat of the predicted probabilities across chains, as Gelman et al. define it.

    `q` is `[chains * n, N, K]` with the chains one after another. Returns `(median, max)` over
    the `N * K` predicted probabilities of `sqrt(tfp.mcmc.potential_scale_reduction(...))`:
    TFP returns the variance ratio, whose square root is the usual R-hat (compare with 1.01 /
    1.1). On what the user sees, not on the weights, whose symmetries never mix. Probabilities
    that never vary (NaN ratios) are left out.
    """
    import tensorflow_probability as tfp

    n, remainder = divmod(q.shape[0], chains)
    if remainder or n < 4:
        raise ValueError(
            f"`q` holds {q.shape[0]} samples: need a multiple of chains={chains}, >= 4 each."
        )
    states = q.reshape(chains, n, -1).transpose(1, 0, 2)  # [n, chains, N*K]
    ratio = tfp.mcmc.potential_scale_reduction(tf.constant(states), split_chains=True).numpy()
    rhat = np.sqrt(ratio[np.isfinite(ratio)])
    if rhat.size == 0:
        raise ValueError("R-hat is undefined: no predicted probability varies over the samples.")
    return float(np.median(rhat)), float(np.max(rhat))
