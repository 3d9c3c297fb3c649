"""`GaussianMixtureDensity`: a K-component full-covariance Gaussian mixture density student,
fitted by maximum likelihood with `model.fit` (Papamakarios 2015, part B's density variant;
METHODS.md §5.4)."""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="kdtfp")
class NegativeLogLikelihood(keras.losses.Loss):
    """`-y_pred` averaged over the batch, where `y_pred` are log-densities `[B]` (`y_true` unused).

    A `keras.losses.Loss`, so Keras divides it by the number of replicas under `tf.distribute`.
    """

    def __init__(self, reduction="sum_over_batch_size", name="negative_log_likelihood", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        del y_true
        return -ops.cast(y_pred, "float32")


@keras.saving.register_keras_serializable(package="kdtfp")
class GaussianMixtureDensity(keras.Model):
    """A mixture of `K` full-covariance Gaussians in `D` dimensions, fitted to samples by ML.

    ```
    p(x) = sum_k pi_k N(x; mu_k, L_k L_k^T),   pi = softmax(mixture_logits)
    L_k = fill_triangular(scale_params_k) with softplus(.) + 1e-5 on its diagonal
    ```

    Parameters are `add_weight`s (`mixture_logits` `[K]`, `locs` `[K, D]`, `scale_params`
    `[K, D (D + 1) / 2]`); the constraint is applied in `distribution()`, which builds the
    `tfd.MixtureSameFamily` object on demand. `call(x)` `[B, D]` returns `log p(x)` `[B]` (float32)
    and `fit(x)` (no targets) maximises the mean log-likelihood of the samples: `compute_loss`
    is `NegativeLogLikelihood()(None, log p(x))`, a Keras Loss, so the step is replica-correct.

    Use it to distil a density known only by samples (an MCMC bag of posterior samples, a
    predictive over observations) into a closed form: `fit` on the samples, then `log_prob`,
    `sample`, or `kl_divergence_estimate` on held-out samples.

    Args:
        num_components: `K >= 1`.
        dim: `D >= 1`, the event size.
        init_scale: initial standard deviation of every component (a positive number).
        loc_initializer: initializer of `locs` (default: standard normal with `seed`); for a
            quicker fit, `init_from_samples(x)` puts the means on `K` of the samples.
        seed: optional int seed of the initializers and of `sample`.

    Example:

    >>> gmm = GaussianMixtureDensity(3, dim=2)
    >>> gmm.compile(optimizer=keras.optimizers.Adam(0.05))
    >>> gmm.fit(samples, batch_size=256, epochs=50)
    >>> gmm.log_prob(x_held_out)
    """

    def __init__(
        self,
        num_components: int = 3,
        dim: int = 1,
        init_scale: float = 1.0,
        loc_initializer=None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for key, value in (("num_components", num_components), ("dim", dim)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{key}` must be an int >= 1. Received: {key}={value!r}")
        if not isinstance(init_scale, numbers.Real) or not 0 < init_scale < np.inf:
            raise ValueError(f"`init_scale` must be a positive number. Received {init_scale!r}.")
        self.num_components = int(num_components)
        self.dim = int(dim)
        self.init_scale = float(init_scale)
        self.seed = seed
        if loc_initializer is None:
            loc_initializer = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
        self.loc_initializer = keras.initializers.get(loc_initializer)
        self.nll = NegativeLogLikelihood()
        # Built at construction: the shapes are known, so a loaded model restores its weights.
        self.build((None, self.dim))

    def build(self, input_shape=None):
        if self.built:
            return
        k, d = self.num_components, self.dim
        self.mixture_logits = self.add_weight(
            shape=(k,), initializer="zeros", name="mixture_logits"
        )
        self.locs = self.add_weight(shape=(k, d), initializer=self.loc_initializer, name="locs")
        # Inverse softplus of init_scale on the diagonal, zeros off it.
        diagonal = float(np.log(np.expm1(self.init_scale)))
        packed = tfp.math.fill_triangular_inverse(np.eye(d, dtype="float32") * diagonal)
        self.scale_params = self.add_weight(
            shape=(k, d * (d + 1) // 2),
            initializer=keras.initializers.Constant(np.tile(packed.numpy(), (k, 1))),
            name="scale_params",
        )
        self.built = True

    # ------------------------------------------------------------------ the distribution
    def scale_tril(self):
        """`L_k` `[K, D, D]`: lower-triangular, positive diagonal (softplus + 1e-5)."""
        raw = tfp.math.fill_triangular(tf.cast(self.scale_params, tf.float32))
        diagonal = tf.nn.softplus(tf.linalg.diag_part(raw)) + 1e-5
        return tf.linalg.set_diag(raw, diagonal)

    def distribution(self):
        """The mixture as a `tfd.MixtureSameFamily` (batch shape `[]`, event shape `[D]`)."""
        return tfd.MixtureSameFamily(
            mixture_distribution=tfd.Categorical(logits=tf.cast(self.mixture_logits, tf.float32)),
            components_distribution=tfd.MultivariateNormalTriL(
                loc=tf.cast(self.locs, tf.float32), scale_tril=self.scale_tril()
            ),
        )

    def call(self, inputs):
        inputs = tf.cast(inputs, tf.float32)
        if inputs.shape.rank != 2 or inputs.shape[-1] != self.dim:
            raise ValueError(f"`inputs` must be [batch, {self.dim}]. Received {inputs.shape}.")
        return self.distribution().log_prob(inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def log_prob(self, x):
        """`log p(x)` `[B]` float32."""
        return self(x)

    def sample(self, n: int, seed=None):
        """`n` draws `[n, D]`."""
        return self.distribution().sample(int(n), seed=self.seed if seed is None else seed)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        return self.nll(ops.zeros_like(y_pred), y_pred, sample_weight)

    def init_from_samples(self, samples, seed: int = 0, iterations: int = 10):
        """Initialises from k-means on `samples` `[N, D]` (k-means++ seeding, Lloyd steps).

        Means go to the centroids, mixture weights to the cluster fractions, and each scale to
        the diagonal of its cluster's standard deviation. Maximum likelihood from a random start
        often merges modes; this start avoids most such local optima. Returns `self`.
        """
        samples = np.asarray(samples, "float64")
        k = self.num_components
        if samples.ndim != 2 or samples.shape[1] != self.dim or len(samples) < k:
            raise ValueError(f"`samples` must be [N >= {k}, {self.dim}]. Received {samples.shape}.")
        if not np.all(np.isfinite(samples)):
            raise ValueError("`samples` contain NaN or Inf.")
        rng = np.random.default_rng(seed)
        centers = [samples[rng.integers(len(samples))]]
        for _ in range(1, k):
            distance = np.min(((samples[:, None] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
            total = distance.sum()
            probabilities = distance / total if total > 0 else None
            centers.append(samples[rng.choice(len(samples), p=probabilities)])
        centers = np.array(centers)
        for _ in range(int(iterations)):
            labels = np.argmin(((samples[:, None] - centers[None]) ** 2).sum(-1), axis=1)
            for j in range(k):
                if np.any(labels == j):
                    centers[j] = samples[labels == j].mean(0)
        labels = np.argmin(((samples[:, None] - centers[None]) ** 2).sum(-1), axis=1)
        fallback = np.maximum(samples.std(0), 1e-3)
        packed, counts = [], []
        for j in range(k):
            members = samples[labels == j]
            std = members.std(0) if len(members) > 1 else fallback
            diagonal = np.diag(np.log(np.expm1(np.maximum(std, 1e-3)))).astype("float32")
            packed.append(tfp.math.fill_triangular_inverse(diagonal).numpy())
            counts.append(max(len(members), 1))
        self.locs.assign(centers.astype("float32"))
        self.scale_params.assign(np.stack(packed))
        self.mixture_logits.assign(np.log(np.array(counts, "float32") / sum(counts)))
        return self

    def fit(self, x=None, y=None, **kwargs):
        """`keras.Model.fit` on samples `x` (no targets), after a NaN/Inf check of arrays."""
        if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
            raise ValueError("`x` contains NaN or Inf.")
        return super().fit(x, y, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_components=self.num_components,
            dim=self.dim,
            init_scale=self.init_scale,
            loc_initializer=keras.initializers.serialize(self.loc_initializer),
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loc_initializer"] = keras.initializers.deserialize(config["loc_initializer"])
        return cls(**config)
