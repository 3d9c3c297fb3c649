"""`RBM`: a binary restricted Boltzmann machine (a teacher), trained with CD-k or PCD by `fit`.

The math, for visible `v` in {0,1}^D, hidden `h` in {0,1}^H, kernel `W` [D, H], visible bias
`a` [D] and hidden bias `b` [H] (METHODS.md 5.5, 5.8):

```python
E(v, h) = -a @ v - b @ h - v @ W @ h                       # energy
F(v) = -a @ v - sum_j softplus(b_j + v @ W[:, j])          # free energy: p(v) = exp(-F(v)) / Z
log Z = logsumexp_h [b @ h + sum_i softplus(a_i + W[i] @ h)]   # exact, enumerating 2^H states
p(h_j = 1 | v) = sigmoid(b_j + v @ W[:, j]);  p(v_i = 1 | h) = sigmoid(a_i + W[i] @ h)
```

The module-level functions (`free_energy`, `gibbs_sweep`, `exact_log_partition`,
`exact_samples`, `check_binary`) work on plain arrays so the estimators (`kdtfp.estimators`)
and the `tf.data` sample stream share them with the model.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.seed_state import SavesSeedState

#: Exact log Z enumerates 2^min(D, H) states; beyond 2^20 (~10^6 terms of D*H multiply-adds
#: each) enumeration stops being a cheap reference, and at 2^30 it no longer fits in memory.
MAX_ENUMERATED_UNITS = 20


def check_binary(x, name="x"):
    """Raises ValueError naming `name` unless `x` is finite and every entry is 0 or 1."""
    array = np.asarray(x)
    if array.size and not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite binary data in {{0, 1}}; it contains NaN/Inf.")
    if array.size and not np.all((array == 0) | (array == 1)):
        bad = array[(array != 0) & (array != 1)].ravel()[:3]
        raise ValueError(
            f"`{name}` must be binary (every entry 0 or 1); found values such as {bad.tolist()}."
        )
    return array


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def free_energy(v, kernel, visible_bias, hidden_bias):
    """`F(v) = -a @ v - sum_j softplus(b_j + v @ W[:, j])` for a batch `v` [B, D] -> [B].

    One evaluation costs D*H multiply-adds: the unit `E` of the estimators' compute budgets.
    """
    pre = tf.matmul(v, kernel) + hidden_bias
    return -tf.linalg.matvec(v, visible_bias) - tf.reduce_sum(tf.nn.softplus(pre), axis=-1)


def _bernoulli(logits, seed):
    """Stateless Bernoulli(sigmoid(logits)) draws, as `logits.dtype` 0/1 values."""
    uniform = tf.random.stateless_uniform(tf.shape(logits), seed, dtype=logits.dtype)
    return tf.cast(uniform < tf.sigmoid(logits), logits.dtype)


def gibbs_sweep(v, kernel, visible_bias, hidden_bias, seed):
    """One block-Gibbs sweep `v -> h ~ p(h|v) -> v' ~ p(v|h)` with a stateless `seed` [2].

    Costs 2 E per chain (two D x H products).
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)
    h = _bernoulli(tf.matmul(v, kernel) + hidden_bias, seeds[0])
    return _bernoulli(tf.matmul(h, kernel, transpose_b=True) + visible_bias, seeds[1])


def _bits(indices, width):
    """Rows of 0/1 float64: the binary expansion of `indices` over `width` bits."""
    return ((indices[:, None] >> np.arange(width)) & 1).astype(np.float64)


def _parameters(rbm_or_params):
    if isinstance(rbm_or_params, RBM):
        return rbm_or_params.numpy_parameters()
    kernel, visible_bias, hidden_bias = (np.asarray(p, np.float64) for p in rbm_or_params)
    return kernel, visible_bias, hidden_bias


def _enumerated_side(kernel):
    num_visible, num_hidden = kernel.shape
    if num_hidden <= MAX_ENUMERATED_UNITS:
        return "hidden"
    if num_visible <= MAX_ENUMERATED_UNITS:
        return "visible"
    raise ValueError(
        f"Exact log Z enumerates 2^min(D, H) states and needs `num_hidden` <= {MAX_ENUMERATED_UNITS} "
        f"(or `num_visible` <= {MAX_ENUMERATED_UNITS}); got num_hidden={num_hidden}, "
        f"num_visible={num_visible}: 2^{min(num_visible, num_hidden)} terms is too many. "
        "Use an estimator from kdtfp.estimators instead."
    )


def _log_terms(kernel, visible_bias, hidden_bias, start, stop, side):
    """Log-weights of the enumerated states `start..stop-1` of `side` (float64)."""
    if side == "hidden":
        h = _bits(np.arange(start, stop, dtype=np.int64), kernel.shape[1])
        return h @ hidden_bias + np.logaddexp(0.0, h @ kernel.T + visible_bias).sum(-1), h
    v = _bits(np.arange(start, stop, dtype=np.int64), kernel.shape[0])
    return v @ visible_bias + np.logaddexp(0.0, v @ kernel + hidden_bias).sum(-1), v


def exact_log_partition(rbm_or_params, chunk_size=65536) -> float:
    """Exact `log Z` in float64 by enumerating the smaller layer, `chunk_size` states at a time.

    With H <= 20 hidden units: `log Z = logsumexp_h [b @ h + sum_i softplus(a_i + W[i] @ h)]`
    (the visible units summed analytically); otherwise, if D <= 20, the same over visible
    states. Costs 2^min(D,H) E. Raises ValueError when both layers exceed
    `MAX_ENUMERATED_UNITS` (20).

    Args:
        rbm_or_params: an `RBM` or a tuple `(kernel [D, H], visible_bias [D], hidden_bias [H])`.
        chunk_size: states per chunk (memory: chunk_size * max(D, H) float64).
    """
    kernel, visible_bias, hidden_bias = _parameters(rbm_or_params)
    side = _enumerated_side(kernel)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    total = 2 ** (kernel.shape[1] if side == "hidden" else kernel.shape[0])
    log_z = -np.inf
    for start in range(0, total, chunk_size):
        terms, _ = _log_terms(
            kernel, visible_bias, hidden_bias, start, min(total, start + chunk_size), side
        )
        peak = terms.max()
        log_z = np.logaddexp(log_z, peak + np.log(np.exp(terms - peak).sum()))
    return float(log_z)


def exact_samples(rbm_or_params, num_samples, seed=None) -> np.ndarray:
    """Independent exact samples `v ~ p(v)` [num_samples, D] (float32), needing H <= 20.

    The enumeration gives `p(h)` exactly (`log p(h) = b @ h + sum_i softplus(a_i + W[i] @ h) -
    log Z`), so `h ~ p(h)` and then `v ~ p(v | h)`: no Markov chain, no burn-in.
    """
    kernel, visible_bias, hidden_bias = _parameters(rbm_or_params)
    if kernel.shape[1] > MAX_ENUMERATED_UNITS:
        raise ValueError(
            f"exact_samples enumerates the hidden states and needs `num_hidden` <= "
            f"{MAX_ENUMERATED_UNITS}; got {kernel.shape[1]}."
        )
    num_samples = _check_int("num_samples", num_samples, 1)
    rng = np.random.default_rng(seed)
    terms, _ = _log_terms(kernel, visible_bias, hidden_bias, 0, 2 ** kernel.shape[1], "hidden")
    probs = np.exp(terms - terms.max())
    index = rng.choice(len(probs), size=num_samples, p=probs / probs.sum())
    h = _bits(index.astype(np.int64), kernel.shape[1])
    p_v = 1.0 / (1.0 + np.exp(-(h @ kernel.T + visible_bias)))
    return (rng.random(p_v.shape) < p_v).astype(np.float32)


@keras.saving.register_keras_serializable(package="kdtfp")
class ContrastiveDivergence(keras.losses.Loss):
    """The CD / PCD surrogate loss whose gradient is the contrastive-divergence update.

    `y_pred` [B, 2] holds `(F(v_data), F(v_model))` per example, the negative sample `v_model`
    already behind `stop_gradient` (the `RBM` builds it in `compute_loss`):

    ```python
    loss = F(v_data) - F(stop_gradient(v_model))         # per example; mean over the batch
    grad = E_data[dF/dθ] - E_model[dF/dθ]                # = -(CD estimate of d log p / dθ)
    ```

    Its value is not a log-likelihood (it is a free-energy gap); its gradient is what matters.
    `y_true` is ignored. Being a `keras.losses.Loss`, it is divided by the replica count under
    `tf.distribute` (DESIGN.md rule 5).
    """

    def __init__(self, reduction="sum_over_batch_size", name="contrastive_divergence", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return y_pred[..., 0] - y_pred[..., 1]


@keras.saving.register_keras_serializable(package="kdtfp")
class RBM(SavesSeedState, keras.Model):
    """A binary-binary restricted Boltzmann machine, trained by `fit` with CD-k or PCD-k.

    `call(v)` returns the free energy `F(v)` [B] (float32); `log_unnormalized_prob(v) = -F(v)`.
    `fit(x)` on binary data minimises `ContrastiveDivergence` (the default compiled loss): the
    negative samples are `cd_steps` block-Gibbs sweeps started at the batch (CD-k) or, with
    `persistent=True`, at `num_chains` persistent chains that are advanced `cd_steps` sweeps
    per training step and kept as a non-trainable weight (PCD; Tieleman 2008). The Gibbs noise
    comes from `keras.random` and a `SeedGenerator`, so it is reproducible, XLA-compilable and
    identical on all replicas.

    Exact quantities for small models: `log_partition()` (enumerates 2^min(D,H) states,
    float64), `log_prob(v) = -F(v) - log Z`, `exact_sample(n)`. Sampling by MCMC:
    `gibbs(v, num_sweeps, seed)`.

    Args:
        num_visible: D >= 1.
        num_hidden: H >= 1.
        cd_steps: k >= 1 Gibbs sweeps for the negative phase.
        persistent: PCD (True) or CD (False).
        num_chains: persistent chains (PCD only); their mean free energy is the negative phase.
        seed: int or None, the seed of the training-time Gibbs noise.

    Example:

    >>> rbm = RBM(64, 16, cd_steps=1, persistent=True, num_chains=100, seed=0)
    >>> rbm.compile(optimizer=keras.optimizers.Adam(3e-3))
    >>> rbm.fit(x_binary, batch_size=100, epochs=50)
    >>> rbm.log_prob(x_test)  # exact: H = 16
    """

    def __init__(
        self,
        num_visible,
        num_hidden,
        cd_steps=1,
        persistent=False,
        num_chains=100,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_visible = _check_int("num_visible", num_visible, 1)
        self.num_hidden = _check_int("num_hidden", num_hidden, 1)
        self.cd_steps = _check_int("cd_steps", cd_steps, 1)
        self.persistent = bool(persistent)
        self.num_chains = _check_int("num_chains", num_chains, 1)
        if seed is not None:
            _check_int("seed", seed, 0)
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed, name="gibbs_seed")
        self.kernel = self.add_weight(
            shape=(self.num_visible, self.num_hidden),
            initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
            name="kernel",
        )
        self.visible_bias = self.add_weight(
            shape=(self.num_visible,), initializer="zeros", name="visible_bias"
        )
        self.hidden_bias = self.add_weight(
            shape=(self.num_hidden,), initializer="zeros", name="hidden_bias"
        )
        # Persistent chains (PCD). Under tf.distribute every replica advances the same chains
        # with the same noise, and the first replica's update is kept ("only_first_replica").
        self.chains = self.add_weight(
            shape=(self.num_chains if self.persistent else 1, self.num_visible),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="chains",
        )
        self.built = True

    # ---- energies -------------------------------------------------------------------------
    def free_energy(self, v):
        """`F(v)` [B] for binary `v` [B, D]."""
        v = ops.cast(v, self.kernel.dtype)
        pre = ops.matmul(v, self.kernel) + self.hidden_bias
        return -ops.sum(v * self.visible_bias, axis=-1) - ops.sum(ops.softplus(pre), axis=-1)

    def call(self, inputs):
        return self.free_energy(inputs)

    def log_unnormalized_prob(self, v):
        """`log p~(v) = -F(v)` [B]."""
        return -self.free_energy(v)

    def numpy_parameters(self):
        """`(kernel [D, H], visible_bias [D], hidden_bias [H])` as float64 arrays."""
        return tuple(
            np.asarray(ops.convert_to_numpy(w), np.float64)
            for w in (self.kernel, self.visible_bias, self.hidden_bias)
        )

    def log_partition(self, chunk_size=65536) -> float:
        """Exact `log Z` (float64), see `exact_log_partition` (needs min(D, H) <= 20)."""
        return exact_log_partition(self, chunk_size=chunk_size)

    def log_prob(self, v, log_z=None) -> np.ndarray:
        """Exact `log p(v) = -F(v) - log Z` [B] in float64 (log Z enumerated unless given)."""
        v = check_binary(v, "v").astype(np.float64)
        kernel, visible_bias, hidden_bias = self.numpy_parameters()
        log_z = self.log_partition() if log_z is None else float(log_z)
        free = -v @ visible_bias - np.logaddexp(0.0, v @ kernel + hidden_bias).sum(-1)
        return -free - log_z

    def exact_sample(self, num_samples, seed=None) -> np.ndarray:
        """Exact samples [n, D], see `exact_samples` (needs H <= 20)."""
        return exact_samples(self, num_samples, seed=seed)

    # ---- sampling -------------------------------------------------------------------------
    def _sweep(self, v):
        pre_h = ops.matmul(v, self.kernel) + self.hidden_bias
        h = ops.cast(
            keras.random.uniform(ops.shape(pre_h), seed=self._seed_generator) < ops.sigmoid(pre_h),
            v.dtype,
        )
        pre_v = ops.matmul(h, ops.transpose(self.kernel)) + self.visible_bias
        return ops.cast(
            keras.random.uniform(ops.shape(pre_v), seed=self._seed_generator) < ops.sigmoid(pre_v),
            v.dtype,
        )

    def gibbs(self, v, num_sweeps=1, seed=0):
        """`num_sweeps` block-Gibbs sweeps from `v` [B, D] with a stateless int `seed`; [B, D]."""
        num_sweeps = _check_int("num_sweeps", num_sweeps, 0)
        v = tf.convert_to_tensor(check_binary(v, "v"), tf.float32)
        params = [
            tf.convert_to_tensor(w) for w in (self.kernel, self.visible_bias, self.hidden_bias)
        ]
        return _gibbs_chain(v, *params, tf.constant(num_sweeps), tf.constant([int(seed), 7]))

    def _negative_samples(self, x, training):
        v = self.chains if self.persistent else ops.cast(x, self.kernel.dtype)
        for _ in range(self.cd_steps):
            v = self._sweep(v)
        v = ops.stop_gradient(v)
        if self.persistent and training:
            self.chains.assign(v)
        return v

    # ---- training -------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss=None, **kwargs):
        """As `keras.Model.compile`; the loss defaults to `ContrastiveDivergence()`."""
        super().compile(optimizer=optimizer, loss=loss or ContrastiveDivergence(), **kwargs)

    def compile_from_config(self, config):
        # As keras.Model's, which refuses to run when `compile` is overridden.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        negatives = self._negative_samples(x, training)
        free_model = self.free_energy(negatives)
        if self.persistent:  # chains and batch differ in size: pair each example with the mean
            free_model = ops.broadcast_to(ops.mean(free_model), ops.shape(y_pred))
        stacked = ops.stack([y_pred, free_model], axis=-1)
        return super().compute_loss(
            x=x,
            y=ops.zeros_like(y_pred),
            y_pred=stacked,
            sample_weight=sample_weight,
            training=training,
        )

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`, first checking that array data `x` are binary (DESIGN rule 12)."""
        if isinstance(x, (np.ndarray, tf.Tensor)):
            check_binary(x, "x")
            if x.shape[-1] != self.num_visible:
                raise ValueError(f"`x` must have {self.num_visible} columns; got shape {x.shape}.")
        return super().fit(x, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_visible=self.num_visible,
            num_hidden=self.num_hidden,
            cd_steps=self.cd_steps,
            persistent=self.persistent,
            num_chains=self.num_chains,
            seed=self.seed,
        )
        return config


@tf.function(reduce_retracing=True)
def _gibbs_chain(v, kernel, visible_bias, hidden_bias, num_sweeps, seed):
    def body(i, v):
        return i + 1, gibbs_sweep(
            v, kernel, visible_bias, hidden_bias, tf.random.experimental.stateless_fold_in(seed, i)
        )

    return tf.while_loop(lambda i, _: i < num_sweeps, body, (tf.constant(0), v))[1]


def gibbs_chain(v, kernel, visible_bias, hidden_bias, num_sweeps, seed):
    """`num_sweeps` stateless block-Gibbs sweeps of the chains `v` [B, D] (a compiled loop)."""
    return _gibbs_chain(
        tf.convert_to_tensor(v, tf.float32),
        *(tf.convert_to_tensor(p, tf.float32) for p in (kernel, visible_bias, hidden_bias)),
        tf.constant(int(num_sweeps)),
        tf.convert_to_tensor(seed, tf.int32),
    )
