"""`TopicModel`: LDA with topic assignments summed out, fitted by ADVI with an amortised encoder.

Model (METHODS.md section 2.3), for documents `d` given as word counts `n_d` [V]:

```
beta_k  ~ Dirichlet(eta * 1_V),    k = 1..K            # topics (global)
theta_d ~ Dirichlet(alpha * 1_K)                       # topic proportions (local)
log p(n_d | theta_d, beta) = sum_v n_dv * log sum_k theta_dk * beta_kv   (+ a multinomial
                             coefficient that does not depend on the parameters; left out)
```

Variational family: logistic-normal, `theta = SoftmaxCentered(u)`, `u ~ Normal(m, s)` on
`R^(K-1)` (likewise `beta_k` on `R^(V-1)`). `q(beta)` is mean-field ADVI whose `m`, `s` are
weights of the model; `q(theta_d | n_d)` is amortised: an encoder maps `log1p(n_d)` to `m`, `s`.
"""

from __future__ import annotations

import math
import numbers
import os

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from kdtfp.seed_state import SavesSeedState

tfb = tfp.bijectors

FEATURE_MODES = ("softmax_mean", "sample_mean")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_positive(name, value):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and value > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return float(value)


def check_counts(x, vocab_size, argument="x"):
    """Raises `ValueError` unless `x` is a `[documents, vocab_size]` array of finite,
    non-negative integer counts (any float or int dtype)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[-1] != vocab_size:
        raise ValueError(
            f"`{argument}` must be word counts of shape [documents, {vocab_size}] (the "
            f"vocabulary size), got shape {x.shape}."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{argument}` contains NaN/Inf: word counts must be finite.")
    if np.any(x < 0):
        raise ValueError(f"`{argument}` has negative entries (minimum {x.min()}): counts are >= 0.")
    if np.any(x != np.round(x)):
        raise ValueError(f"`{argument}` has non-integer entries: word counts must be integers.")


def _normal_log_prob(u, loc, scale):
    return -0.5 * ops.square((u - loc) / scale) - ops.log(scale) - _HALF_LOG_2PI


def _log_softmax_centered(u):
    """`log SoftmaxCentered(u)` (stable): `log_softmax([u, 0])`, `[..., D] -> [..., D + 1]`."""
    zeros = ops.zeros_like(u[..., :1])
    return ops.log_softmax(ops.concatenate([u, zeros], axis=-1), axis=-1)


def logistic_normal_log_prob(u, loc, scale):
    """`log q(p)` of `p = SoftmaxCentered(u)`, `u ~ Normal(loc, scale)` `[..., D]`, as a
    density on the first `D` coordinates of the simplex (the coordinates of
    `tfd.Dirichlet.log_prob`):

    ```
    log q(p) = sum_i log Normal(u_i; loc_i, scale_i) - sum_{k=1}^{D+1} log p_k
    ```

    since `det d p_{1:D} / d u = det(diag(p_{1:D}) - p_{1:D} p_{1:D}^T) = prod_{k=1}^{D+1} p_k`.
    `tfd.TransformedDistribution(..., tfb.SoftmaxCentered())` gives this minus `0.5 log(D + 1)`
    (its log-det is the volume on the embedded simplex): same gradients, another value.
    Returns `(log q, log p)`, shapes `[...]` and `[..., D + 1]`.
    """
    log_p = _log_softmax_centered(u)
    log_q = ops.sum(_normal_log_prob(u, loc, scale), axis=-1) - ops.sum(log_p, axis=-1)
    return log_q, log_p


def dirichlet_log_prob(log_p, concentration):
    """`log Dirichlet(p; concentration * 1)` from `log p` `[..., D]` (symmetric, stable)."""
    size = log_p.shape[-1]
    normaliser = math.lgamma(size * concentration) - size * math.lgamma(concentration)
    return normaliser + (concentration - 1.0) * ops.sum(log_p, axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class TopicModel(SavesSeedState, keras.Model):
    """Latent Dirichlet allocation with marginalised assignments, by ADVI + an amortised encoder.

    See the module docstring for the model. Calling the model on counts `x` `[B, V]`:

    ```python
    u_beta  = beta_loc + softplus(beta_rho) * eps_beta          # [S, K, V-1], eps ~ N(0, 1)
    m, s    = encoder(log1p(x))                                  # [B, K-1] each
    u_theta = m + s * eps_theta                                  # [S, B, K-1]
    log_theta, log_beta = log SoftmaxCentered(u_theta), log SoftmaxCentered(u_beta)
    loglik[s, d]  = sum_v x_dv * logsumexp_k(log_theta[s, d, k] + log_beta[s, k, v])
    local[s, d]   = loglik + log Dir(theta; alpha) - log q(theta | x_d)
    global[s]     = sum_k log Dir(beta_k; eta) - log q(beta_k)
    elbo_hat      = N * mean_d mean_s local + mean_s global      # corpus ELBO, unbiased
    add_loss(-elbo_hat / (N * tokens_per_document))              # per document (or token)
    return features(x)                                           # [B, K]
    ```

    **Scaling.** With `N = corpus_size` the added loss is `mean_d(-local_d) + (-global) / N`,
    i.e. the corpus negative ELBO divided by `N` (per document), and further by
    `tokens_per_document` when given (per token, METHODS.md 2.3: keeps a useful constraint
    weight independent of document length). Each minibatch adds its local terms as a mean and
    the global KL once, divided by `N`, so an epoch's sum of gradients is the corpus ELBO's.
    `add_loss` terms are divided by the replica count under `tf.distribute` by Keras.

    **Densities** of `theta` and `beta` are on the first `K-1` (`V-1`) simplex coordinates for
    both prior and `q` (`logistic_normal_log_prob`), so the ELBO's value is right, not only its
    gradient (METHODS.md 2.7). Noise is `keras.random.normal` with a `SeedGenerator` built in
    `build` (the same on every replica; DESIGN rule 7). `S = num_samples` Monte Carlo samples.

    **Features** (`features(x)`, and what `call` returns): with
    `feature_mode="softmax_mean"` (default) `SoftmaxCentered(m)`, the softmax of the mean of
    `q(theta | x)` (deterministic; its median, a cheap proxy of `E_q[theta]`); with
    `"sample_mean"` the average of `theta` over the `S` samples of the call (training) or over
    `num_feature_samples` fixed-seed samples (otherwise), an unbiased MC estimate of
    `E_q[theta]`.

    Per-document ADVI (optimising `m`, `s` per test document) is not implemented: the encoder
    gives test features in one pass (the amortisation gap is part of the result).

    Args:
        num_topics: K >= 2.
        vocab_size: V >= 2.
        corpus_size: N >= 1, training documents (the rescaling of the minibatch ELBO).
        alpha: Dirichlet concentration of `theta` (> 0).
        eta: Dirichlet concentration of the topics `beta_k` (> 0).
        encoder_units: hidden widths of the encoder (softplus), a tuple of ints >= 1.
        num_samples: S >= 1, Monte Carlo samples per call.
        tokens_per_document: > 0; the loss is divided by it (mean training-document length
            for a per-token loss; 1 for per document).
        feature_mode: `"softmax_mean"` or `"sample_mean"`.
        num_feature_samples: samples of `features` at inference with `"sample_mean"`.
        topic_init_stddev: standard deviation of the random initial topic means.
        seed: int or None, seeds the initial weights and the noise.

    Example:

    >>> lda = TopicModel(num_topics=12, vocab_size=64, corpus_size=len(x), tokens_per_document=x.sum(1).mean())
    >>> lda.compile(optimizer=keras.optimizers.Adam(1e-2))
    >>> lda.fit(x, batch_size=128, epochs=200)                  # loss = negative ELBO per token
    >>> lda.perplexity(x_test), lda.top_words(5), lda.features(x_test)
    """

    def __init__(
        self,
        num_topics,
        vocab_size,
        corpus_size,
        alpha=1.0,
        eta=0.1,
        encoder_units=(64,),
        num_samples=4,
        tokens_per_document=1.0,
        feature_mode="softmax_mean",
        num_feature_samples=32,
        topic_init_stddev=1.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_topics = _check_int("num_topics", num_topics, 2)
        self.vocab_size = _check_int("vocab_size", vocab_size, 2)
        self.corpus_size = _check_int("corpus_size", corpus_size, 1)
        self.alpha = _check_positive("alpha", alpha)
        self.eta = _check_positive("eta", eta)
        self.encoder_units = tuple(
            _check_int("encoder_units", units, 1) for units in (encoder_units or ())
        )
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.tokens_per_document = _check_positive("tokens_per_document", tokens_per_document)
        if feature_mode not in FEATURE_MODES:
            raise ValueError(
                f"`feature_mode` must be one of {FEATURE_MODES}. Received: {feature_mode!r}"
            )
        self.feature_mode = feature_mode
        self.num_feature_samples = _check_int("num_feature_samples", num_feature_samples, 1)
        self.topic_init_stddev = _check_positive("topic_init_stddev", topic_init_stddev)
        if seed is not None and not isinstance(seed, numbers.Integral):
            raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
        self.seed = seed

        def init(offset):
            return keras.initializers.GlorotUniform(seed=None if seed is None else seed + offset)

        self.hidden_layers = [
            keras.layers.Dense(units, activation="softplus", kernel_initializer=init(i))
            for i, units in enumerate(self.encoder_units)
        ]
        k = self.num_topics - 1
        self.loc_layer = keras.layers.Dense(k, kernel_initializer=init(100), name="theta_loc")
        self.scale_layer = keras.layers.Dense(
            k,
            kernel_initializer=init(101),
            bias_initializer=keras.initializers.Constant(-2.0),  # softplus(-2) = 0.13
            name="theta_scale",
        )
        self.softmax_centered = tfb.SoftmaxCentered()

    # ------------------------------------------------------------------ weights

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.vocab_size:
            raise ValueError(
                f"TopicModel: `x` must have {self.vocab_size} columns (`vocab_size`), got "
                f"input shape {tuple(input_shape)}."
            )
        k, v = self.num_topics, self.vocab_size
        self.beta_loc = self.add_weight(
            name="beta_loc",
            shape=(k, v - 1),
            initializer=keras.initializers.RandomNormal(
                stddev=self.topic_init_stddev, seed=self.seed
            ),
        )
        self.beta_rho = self.add_weight(
            name="beta_rho",
            shape=(k, v - 1),
            initializer=keras.initializers.Constant(math.log(math.expm1(0.01))),
        )
        shape = (None, v)
        for layer in self.hidden_layers:
            layer.build(shape)
            shape = (None, layer.units)
        self.loc_layer.build(shape)
        self.scale_layer.build(shape)
        # Created in `build`, inside the strategy scope: every replica draws the same noise.
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="topic_model_seed")
        self.built = True

    # ------------------------------------------------------------------ variational pieces

    def encode(self, x, training=None):
        """`(m, s)`: mean and standard deviation of `q(u_theta | x)`, `[B, K-1]` each."""
        h = ops.log1p(ops.cast(x, "float32"))
        for layer in self.hidden_layers:
            h = layer(h, training=training)
        return self.loc_layer(h), ops.softplus(self.scale_layer(h)) + 1e-4

    @property
    def beta_scale(self):
        return ops.softplus(self.beta_rho) + 1e-6

    def topics(self):
        """`SoftmaxCentered(beta_loc)`, `[K, V]` NumPy: the topics at the mean of `q(u_beta)`
        (the median of `q(beta)`, used as the point estimate by `perplexity` and `top_words`)."""
        return np.asarray(self.softmax_centered.forward(ops.convert_to_tensor(self.beta_loc)))

    def top_words(self, n=10, vocabulary=None):
        """The `n` most probable words of each topic (indices, or `vocabulary[i]` if given),
        most probable first: a list of K lists."""
        n = _check_int("n", n, 1)
        order = np.argsort(-self.topics(), axis=-1)[:, :n]
        if vocabulary is None:
            return [row.tolist() for row in order]
        if len(vocabulary) != self.vocab_size:
            raise ValueError(
                f"`vocabulary` has {len(vocabulary)} words but `vocab_size` is {self.vocab_size}."
            )
        return [[vocabulary[i] for i in row] for row in order]

    def elbo_terms(self, x, theta_noise, beta_noise):
        """Every Monte Carlo term of the ELBO for given standard-normal noise.

        Args:
            x: counts `[B, V]`.
            theta_noise: `[S, B, K-1]`; beta_noise: `[S, K, V-1]` (or None: use `beta_loc`,
                i.e. the point `beta = topics()` and no global terms).

        Returns a dict of float32 tensors: `log_likelihood`, `log_prior_theta`, `log_q_theta`
        (`[S, B]`), `log_prior_beta`, `log_q_beta` (`[S]`, summed over topics; zeros when
        `beta_noise` is None), `log_theta` `[S, B, K]` and `theta_loc` `[B, K-1]` (the encoder's `m`).
        """
        x = ops.cast(x, "float32")
        loc, scale = self.encode(x)
        u_theta = loc[None] + scale[None] * ops.cast(theta_noise, "float32")
        log_q_theta, log_theta = logistic_normal_log_prob(u_theta, loc[None], scale[None])
        log_prior_theta = dirichlet_log_prob(log_theta, self.alpha)
        beta_loc = ops.cast(self.beta_loc, "float32")
        if beta_noise is None:
            log_beta = _log_softmax_centered(beta_loc)[None]  # [1, K, V]
            log_q_beta = log_prior_beta = ops.zeros((1,), "float32")
        else:
            u_beta = beta_loc[None] + self.beta_scale[None] * ops.cast(beta_noise, "float32")
            log_q_beta, log_beta = logistic_normal_log_prob(
                u_beta, beta_loc[None], self.beta_scale[None]
            )
            log_q_beta = ops.sum(log_q_beta, axis=-1)
            log_prior_beta = ops.sum(dirichlet_log_prob(log_beta, self.eta), axis=-1)
        # log sum_k theta_dk beta_kv for every (s, d, v): [S, B, K, 1] + [S, 1, K, V].
        log_word = ops.logsumexp(log_theta[..., None] + log_beta[:, None], axis=-2)
        log_likelihood = ops.sum(x[None] * log_word, axis=-1)
        return {
            "log_likelihood": log_likelihood,
            "log_prior_theta": log_prior_theta,
            "log_q_theta": log_q_theta,
            "log_prior_beta": log_prior_beta,
            "log_q_beta": log_q_beta,
            "log_theta": log_theta,
            "theta_loc": loc,
        }

    def _noise(self, shape):
        return keras.random.normal(shape, dtype="float32", seed=self.seed_generator)

    def negative_elbo(self, terms):
        """The loss `call` adds: `-(mean_d local + global / N) / tokens_per_document`."""
        local = ops.mean(
            terms["log_likelihood"] + terms["log_prior_theta"] - terms["log_q_theta"], axis=0
        )
        global_term = ops.mean(terms["log_prior_beta"] - terms["log_q_beta"])
        per_document = -(ops.mean(local) + global_term / float(self.corpus_size))
        return per_document / self.tokens_per_document

    # ------------------------------------------------------------------ Keras entry points

    def call(self, x, training=None):
        batch = ops.shape(x)[0]
        s, k, v = self.num_samples, self.num_topics, self.vocab_size
        terms = self.elbo_terms(x, self._noise((s, batch, k - 1)), self._noise((s, k, v - 1)))
        self.add_loss(self.negative_elbo(terms))
        if self.feature_mode == "sample_mean":
            return ops.mean(ops.exp(terms["log_theta"]), axis=0)
        return ops.exp(_log_softmax_centered(terms["theta_loc"]))

    def features(self, x, training=None, seed=0):
        """Topic proportions of documents `x` `[B, V]` -> `[B, K]` (see "Features"). No loss is
        added. With `"sample_mean"` outside training, `seed` fixes the draws."""
        loc, scale = self.encode(x, training=training)
        if self.feature_mode == "softmax_mean":
            return ops.exp(_log_softmax_centered(loc))
        shape = ops.shape(loc)
        noise = keras.random.normal(
            (self.num_feature_samples, shape[0], shape[1]), dtype="float32", seed=seed
        )
        return ops.mean(ops.exp(_log_softmax_centered(loc[None] + scale[None] * noise)), axis=0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_topics)

    # ------------------------------------------------------------------ evaluation

    def log_likelihood_bound(self, x, num_samples=16, seed=0, batch_size=512):
        """Per-document lower bound on `log p(n_d | beta)` at the point `beta = topics()`:

        ```
        bound_d = E_q(theta|n_d)[log p(n_d | theta, beta) + log Dir(theta; alpha) - log q(theta | n_d)]
        ```

        (multinomial coefficient left out), by `num_samples` fixed-seed MC samples. `[D]` NumPy.
        """
        check_counts(x, self.vocab_size)
        x = np.asarray(x, np.float32)
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            noise = keras.random.normal(
                (num_samples, len(chunk), self.num_topics - 1), seed=seed + start
            )
            terms = self.elbo_terms(chunk, noise, None)
            local = terms["log_likelihood"] + terms["log_prior_theta"] - terms["log_q_theta"]
            out.append(np.asarray(ops.mean(local, axis=0), np.float64))
        return np.concatenate(out)

    def perplexity(self, x, bound=True, num_samples=16, seed=0, batch_size=512):
        """Per-token perplexity of held-out documents `x`, `exp(-sum_d L_d / sum_d n_d)`.

        With `bound=True`, `L_d = log_likelihood_bound(x)` (an ELBO: the perplexity is an upper
        bound on the model's, amortisation gap included). With `bound=False`, the plug-in
        `L_d = sum_v n_dv log sum_k thetā_dk beta_kv` with `thetā = features(x)` and
        `beta = topics()`, exact for a model whose topics are all equal.
        """
        check_counts(x, self.vocab_size)
        x = np.asarray(x, np.float64)
        tokens = x.sum()
        if tokens <= 0:
            raise ValueError("`x` holds no tokens: perplexity needs documents with words.")
        if bound:
            total = self.log_likelihood_bound(x, num_samples, seed, batch_size).sum()
        else:
            theta = np.asarray(self.features(x.astype(np.float32), seed=seed), np.float64)
            word_probs = theta @ self.topics().astype(np.float64)
            total = np.sum(x * np.log(np.maximum(word_probs, 1e-300)))
        return float(np.exp(-total / tokens))

    # ------------------------------------------------------------------ fit and config

    def check_inputs(self, x):
        """Bad-input check run before any step (also by `ConstrainedVIDistiller.fit`)."""
        if isinstance(x, np.ndarray):
            check_counts(x, self.vocab_size)

    def fit(self, x=None, y=None, **kwargs):
        """`keras.Model.fit` after checking that `x` holds word counts (NumPy `x`)."""
        self.check_inputs(x)
        return super().fit(x, y, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_topics": self.num_topics,
                "vocab_size": self.vocab_size,
                "corpus_size": self.corpus_size,
                "alpha": self.alpha,
                "eta": self.eta,
                "encoder_units": list(self.encoder_units),
                "num_samples": self.num_samples,
                "tokens_per_document": self.tokens_per_document,
                "feature_mode": self.feature_mode,
                "num_feature_samples": self.num_feature_samples,
                "topic_init_stddev": self.topic_init_stddev,
                "seed": self.seed,
            }
        )
        return config


def export_topic_model(model, path):
    """Writes `model` (a trained `TopicModel`) as a SavedModel that serves with TensorFlow alone.

    Endpoints, each taking word counts `[None, V]` float32:

    * `serve` and `topic_proportions`: `features(x)`, `[None, K]`;
    * `word_probabilities`: `features(x) @ topics()`, the plug-in `p(word | document)`, `[None, V]`;
    * `log_likelihood`: the plug-in `sum_v x_v log p(v | document)` per document, `[None]`.

    Returns `path`. Load with `tf.saved_model.load(path)` where kdtfp is not installed.
    """
    if not isinstance(model, TopicModel):
        raise ValueError(f"`model` must be a TopicModel, got {type(model).__name__}.")
    from kdtfp.export import checked

    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"`path`={path!r} is a file; give a directory for the SavedModel.")
    spec = tf.TensorSpec((None, model.vocab_size), tf.float32, name="counts")
    archive = keras.export.ExportArchive()
    archive.track(model)

    def proportions(counts):
        return tf.cast(model.features(counts, training=False), tf.float32)

    def word_probabilities(counts):
        topics = tf.exp(_log_softmax_centered(tf.cast(model.beta_loc, tf.float32)))
        return tf.matmul(proportions(counts), topics)

    def log_likelihood(counts):
        probs = tf.maximum(word_probabilities(counts), 1e-30)
        return tf.reduce_sum(counts * tf.math.log(probs), axis=-1)

    endpoints = {
        "serve": proportions,
        "topic_proportions": proportions,
        "word_probabilities": word_probabilities,
        "log_likelihood": log_likelihood,
    }
    for name, function in endpoints.items():
        archive.add_endpoint(name, checked(function, spec), input_signature=[spec])
    archive.write_out(path, verbose=False)
    return path
