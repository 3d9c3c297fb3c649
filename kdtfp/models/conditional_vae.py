"""`ConditionalVAE`: a VAE on binary data conditioned on a one-hot task, with explicit noise.

The generative model (METHODS 3.8, `continual-vae`) for a task `c` in `0..num_tasks-1`:

```
z ~ N(0, I_L)                                   # GaussianRoot: z = eps, eps ~ N(0, I)
x | z, c ~ Bernoulli(sigmoid(dec([z, onehot(c)])))   # x = 1[u < p], u ~ U(0, 1)
q(z | x, c) = N(enc_loc([x, onehot(c)]), enc_scale([x, onehot(c)])^2)
```

`dec` and `enc` are MLPs (`hidden_layers` ReLU layers of `hidden_units`). Nodes (the
shared-noise protocol of `kdtfp.models.generative`): `z` (Gaussian latent, `[L]`) and `x`
(Bernoulli observed, `[D]`). **The task is an observed root input, not a random node**: it
travels in the noise dict under the key `"task"` (one-hot float `[B, num_tasks]`, or int labels
`[B]`), so `sample_noise(n, task=c)` and `generate(noise)` condition on it, and a teacher and a
student driven by the same noise dict see the same task.

Training: `fit({"x": x, "task": labels})` minimises the negative ELBO (analytic KL to the prior,
one reparameterised sample); `log_prob(x, task, k)` is the IWAE bound with `k` samples.
"""

from __future__ import annotations

import math
import numbers
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.distill.safe_compile import SafeCompile
from kdtfp.layers.latent import BernoulliLatent, GaussianLatent, GaussianRoot
from kdtfp.losses.shared_noise import PerExampleMean
from kdtfp.models.generative import Node, SharedNoiseModel
from kdtfp.models.rbm import check_binary
from kdtfp.seed_state import SavesSeedState

#: Key of the task input in noise dicts and in `fit` inputs.
TASK = "task"
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _is_concrete(value):
    return isinstance(value, np.ndarray) or (
        isinstance(value, tf.Tensor) and tf.executing_eagerly() and hasattr(value, "numpy")
    )


def bernoulli_log_prob(x, logits):
    """`sum_d x_d * logit_d - softplus(logit_d)` over the last axis."""
    return ops.sum(ops.cast(x, "float32") * logits - ops.softplus(logits), axis=-1)


def normal_log_prob(z, loc, scale):
    """Diagonal Gaussian log-density summed over the last axis."""
    u = (z - loc) / scale
    return ops.sum(-0.5 * ops.square(u) - ops.log(scale) - _HALF_LOG_2PI, axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class ConditionalVAE(SharedNoiseModel, SavesSeedState, SafeCompile, keras.Model):
    """A task-conditioned VAE over `data_size` binary pixels with a Bernoulli decoder.

    Args:
        latent_size: L >= 1, size of z (prior N(0, I)).
        hidden_units: width of the encoder's and the decoder's hidden layers.
        num_tasks: number of tasks (size of the one-hot task input), >= 1.
        data_size: D >= 1 binary inputs (64 for 8x8 digits).
        hidden_layers: number of hidden layers of each MLP (>= 1).
        seed: seed of the noise drawn when none is given.

    Call: `model({"x": x [B, D], "task": [B] int or [B, T] one-hot, "noise": optional [B, L]})`
    returns the per-example negative ELBO `[B]` (nats); `fit` minimises its mean.

    Example:

    >>> vae = ConditionalVAE(latent_size=10, hidden_units=128, num_tasks=2, data_size=64)
    >>> vae.compile(optimizer="adam")
    >>> vae.fit({"x": x_bin, "task": labels}, batch_size=64, epochs=10)
    >>> vae.log_prob(x_bin, task=labels, k=1000)    # IWAE bound [B]
    >>> vae.sample(16, task=1)                        # binary [16, 64]
    """

    def __init__(
        self,
        latent_size=10,
        hidden_units=128,
        num_tasks=2,
        data_size=64,
        hidden_layers=1,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.latent_size = _check_int("latent_size", latent_size, 1)
        self.hidden_units = _check_int("hidden_units", hidden_units, 1)
        self.num_tasks = _check_int("num_tasks", num_tasks, 1)
        self.data_size = _check_int("data_size", data_size, 1)
        self.hidden_layers = _check_int("hidden_layers", hidden_layers, 1)
        self.seed = seed
        hidden = (self.hidden_units,) * self.hidden_layers
        self.prior = GaussianRoot(self.latent_size, name="prior")
        self.decoder = BernoulliLatent(self.data_size, hidden, seed=seed, name="decoder")
        self.encoder = GaussianLatent(self.latent_size, hidden, seed=seed, name="encoder")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.elbo_loss = PerExampleMean(name="negative_elbo")
        self.decoder.build((None, self.latent_size + self.num_tasks))
        self.encoder.build((None, self.data_size + self.num_tasks))
        self.built = True

    # ------------------------------------------------------------------ protocol

    @property
    def nodes(self):
        return [
            Node("z", "gaussian", "latent", (self.latent_size,)),
            Node("x", "bernoulli", "observed", (self.data_size,)),
        ]

    def task_one_hot(self, task, batch_size=None):
        """`task` (int, int labels `[B]` or one-hot `[B, T]`) -> float32 one-hot `[B, T]`."""
        if isinstance(task, numbers.Integral) and not isinstance(task, bool):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"`task` must be in [0, {self.num_tasks}), got {task}.")
            if batch_size is None:
                raise ValueError("An int `task` needs a batch size.")
            return tf.one_hot(tf.fill(tf.reshape(batch_size, [1]), task), self.num_tasks)
        if _is_concrete(task):
            array = np.asarray(task)
            if (
                array.ndim == 1
                and array.size
                and (array.min() < 0 or array.max() >= self.num_tasks)
            ):
                raise ValueError(
                    f"`task` labels must be in [0, {self.num_tasks}); got {array.min()}..."
                    f"{array.max()}."
                )
        task = tf.convert_to_tensor(task)
        if task.shape.rank == 0:
            task = tf.fill(tf.reshape(batch_size, [1]), tf.cast(task, tf.int32))
        if task.shape.rank == 1:
            return tf.one_hot(tf.cast(task, tf.int32), self.num_tasks)
        if task.shape.rank != 2 or task.shape[-1] != self.num_tasks:
            raise ValueError(
                f"`task` must be int labels [B] or one-hot [B, {self.num_tasks}], got shape "
                f"{tuple(task.shape)}."
            )
        return tf.cast(task, tf.float32)

    def check_noise(self, noise):
        """`noise` must hold `"z"` `[B, L]`, `"x"` `[B, D]` and the `"task"` input."""
        if not isinstance(noise, dict) or TASK not in noise:
            got = sorted(noise) if isinstance(noise, dict) else type(noise).__name__
            raise ValueError(
                f"`noise` must be a dict with keys ['z', 'x', 'task'] (the task is an input "
                f"carried with the noise), got {got}."
            )
        super().check_noise({k: v for k, v in noise.items() if k != TASK})

    def sample_noise(self, batch_size, seed=None, task=None):
        """Noise of `z` (N(0, 1)) and `x` (U(0, 1)) plus the one-hot `"task"` input.

        `task`: an int (every row that task), int labels `[batch_size]`, or None (uniform over
        the tasks, drawn from `seed` when given).
        """
        noise = super().sample_noise(batch_size, seed=seed)
        if task is None:
            shape = tf.reshape(batch_size, [1])
            if seed is None:
                labels = tf.random.uniform(shape, 0, self.num_tasks, dtype=tf.int32)
            else:
                task_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 99)
                labels = tf.random.stateless_uniform(
                    shape, task_seed, 0, self.num_tasks, dtype=tf.int32
                )
            task = labels
        noise[TASK] = self.task_one_hot(task, batch_size)
        return noise

    def generate(self, noise, forced=None, training=False):
        """Ancestral pass on `noise` = `{"z": [B, L], "x": [B, D], "task": ...}`.

        `forced` may fix `"z"` and/or `"x"`. Returns `{"z": {"loc", "scale", "sample"},
        "x": {"logits", "sample"}}`; `z`'s sample is the noise itself (prior N(0, I)).
        """
        self.check_noise(noise)
        forced = dict(forced or {})
        unknown = set(forced) - {"z", "x"}
        if unknown:
            raise ValueError(f"`forced` may only hold nodes 'z' and 'x', got {sorted(unknown)}.")
        task = self.task_one_hot(noise[TASK], ops.shape(noise["z"])[0])
        z = self.prior(noise["z"], value=forced.get("z"))
        x = self.decoder([z["sample"], task], noise=noise["x"], value=forced.get("x"))
        return {"z": z, "x": x}

    # ------------------------------------------------------------------ inference

    def _check_x(self, x):
        if _is_concrete(x):
            array = check_binary(np.asarray(x), "x")
            if array.ndim != 2 or array.shape[-1] != self.data_size:
                raise ValueError(f"`x` must have shape [B, {self.data_size}], got {array.shape}.")
        return ops.cast(x, "float32")

    def posterior(self, x, task, noise=None, training=False):
        """`q(z | x, task)` params `{"loc", "scale", "sample"}` `[B, L]` (sample from `noise`)."""
        x = self._check_x(x)
        task = self.task_one_hot(task, ops.shape(x)[0])
        return self.encoder([x, task], noise=noise, training=training)

    def encode(self, x, task):
        """Mean and scale of `q(z | x, task)`: `{"loc": [B, L], "scale": [B, L]}`."""
        q = self.posterior(x, task)
        return {"loc": q["loc"], "scale": q["scale"]}

    def negative_elbo(self, x, task, noise=None, training=False):
        """`-ELBO(x) = KL(q(z|x,c) || N(0, I)) - log p(x | z, c)`, one sample `z = loc + scale *
        noise` (`noise` `[B, L]` N(0, 1), drawn when None). Returns `[B]` nats."""
        x = self._check_x(x)
        task = self.task_one_hot(task, ops.shape(x)[0])
        q = self.encoder([x, task], noise=noise, training=training)
        logits = self.decoder([q["sample"], task], value=x, training=training)["logits"]
        loc, scale = q["loc"], q["scale"]
        kl = ops.sum(0.5 * (ops.square(loc) + ops.square(scale) - 1.0) - ops.log(scale), axis=-1)
        return kl - bernoulli_log_prob(x, logits)

    def log_prob(self, x, task, k=100, seed=None, batch_size=256):
        """IWAE lower bound on `log p(x | task)` with `k` importance samples, `[B]` float32.

        `log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i | x)`, `z_i ~ q(z | x, task)`; tight as
        `k` grows. `seed`: int (reproducible) or None. Rows are processed `batch_size` at a time.
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"`k` (IWAE samples) must be an int >= 1, got {k!r}.")
        x = self._check_x(x)
        task = self.task_one_hot(task, ops.shape(x)[0])
        base = tf.constant([0 if seed is None else int(seed), 7], tf.int64)
        out = []
        n = int(x.shape[0])
        for start in range(0, n, batch_size):
            rows = slice(start, min(n, start + batch_size))
            shape = (int(k), rows.stop - rows.start, self.latent_size)
            if seed is None:
                eps = keras.random.normal(shape, seed=self.seed_generator)
            else:
                eps = tf.random.stateless_normal(
                    shape, tf.random.experimental.stateless_fold_in(base, start)
                )
            out.append(_iwae(self, x[rows], task[rows], eps))
        return ops.concatenate(out, axis=0)

    def sample(self, n, task=0, seed=None, probabilities=False):
        """`n` ancestral draws for `task` (fresh noise each call, or stateless from `seed`):
        binary `[n, D]`, or the decoder's probabilities with `probabilities=True`."""
        noise = self.sample_noise(n, seed=seed, task=task)
        x = self.generate(noise)["x"]
        return ops.sigmoid(x["logits"]) if probabilities else x["sample"]

    # ------------------------------------------------------------------ training

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict) or "x" not in inputs or TASK not in inputs:
            raise ValueError("`inputs` must be a dict {'x': [B, D], 'task': ...[, 'noise']}.")
        return self.negative_elbo(
            inputs["x"], inputs[TASK], noise=inputs.get("noise"), training=training
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        total = self.elbo_loss(None, y_pred, sample_weight)
        for loss in self.losses:
            total = total + self._aggregate_additional_loss(loss)
        return total

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`; array inputs are checked first (binary `x`, tasks in range)."""
        if isinstance(x, dict) and "x" in x and _is_concrete(x["x"]):
            self._check_x(x["x"])
            if TASK in x and not isinstance(x[TASK], numbers.Integral):
                self.task_one_hot(x[TASK])
        return super().fit(x, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            latent_size=self.latent_size,
            hidden_units=self.hidden_units,
            num_tasks=self.num_tasks,
            data_size=self.data_size,
            hidden_layers=self.hidden_layers,
            seed=self.seed,
        )
        return config


def _iwae(model, x, task, eps):
    """IWAE bound `[B]` from `x` `[B, D]`, one-hot `task` `[B, T]` and noise `eps` `[k, B, L]`."""
    q = model.encoder([x, task], value=ops.zeros_like(eps[0]))
    loc, scale = q["loc"], q["scale"]
    z = loc[None] + scale[None] * eps
    log_q = normal_log_prob(z, loc[None], scale[None])
    log_prior = ops.sum(-0.5 * ops.square(z) - _HALF_LOG_2PI, axis=-1)
    tasks = ops.broadcast_to(task[None], (ops.shape(eps)[0],) + tuple(ops.shape(task)))
    logits = model.decoder([z, tasks], value=z[..., :1])["logits"]
    log_w = log_prior + bernoulli_log_prob(x[None], logits) - log_q
    k = ops.cast(ops.shape(eps)[0], "float32")
    return ops.logsumexp(log_w, axis=0) - ops.log(k)


def export_conditional_vae(model, path, k=100):
    """Writes the model alone as a SavedModel (servable without kdtfp). Endpoints:

    * `sample(n, task)`: int32 scalars -> binary samples `[n, D]` (fresh noise each call);
    * `log_prob(x, task)`: `x` float32 `[None, D]` binary, `task` int32 `[None]` -> IWAE bound
      with `k` samples `[None]` (fresh noise each call);
    * `encode(x, task)`: -> `{"loc": [None, L], "scale": [None, L]}`.

    Non-binary `x` or a task outside `[0, num_tasks)` fails with `InvalidArgumentError`.

    Returns `path`.
    """
    if not isinstance(model, ConditionalVAE):
        raise ValueError(f"`model` must be a ConditionalVAE, got {type(model).__name__}.")
    k = _check_int("k", k, 1)
    path = os.fspath(path)
    x_spec = tf.TensorSpec([None, model.data_size], tf.float32, name="x")
    task_spec = tf.TensorSpec([None], tf.int32, name="task")
    archive = keras.export.ExportArchive()
    archive.track(model)

    def check_task(task):
        message = f"`task` must be in [0, {model.num_tasks})"
        tf.debugging.assert_non_negative(task, message=message)
        tf.debugging.assert_less(task, model.num_tasks, message=message)
        return task

    def check_x(x):
        x = tf.ensure_shape(x, x_spec.shape)  # a restored signature does not check it itself
        binary = tf.reduce_all(tf.logical_or(tf.equal(x, 0.0), tf.equal(x, 1.0)))
        tf.debugging.assert_equal(binary, True, message="`x` must be binary (0 or 1)")
        return x

    def sample(n, task):
        task = check_task(task)
        noise = {
            "z": tf.random.normal(tf.stack([n, model.latent_size])),
            "x": tf.random.uniform(tf.stack([n, model.data_size])),
            TASK: tf.one_hot(tf.fill(tf.reshape(n, [1]), task), model.num_tasks),
        }
        return model.generate(noise)["x"]["sample"]

    def log_prob(x, task):
        x, task = check_x(x), check_task(task)
        eps = tf.random.normal(tf.stack([k, tf.shape(x)[0], model.latent_size]))
        return _iwae(model, x, tf.one_hot(task, model.num_tasks), eps)

    def encode(x, task):
        x, task = check_x(x), check_task(task)
        q = model.encoder([x, tf.one_hot(task, model.num_tasks)], value=tf.zeros([1, 1]))
        return {"loc": q["loc"], "scale": q["scale"]}

    scalar = tf.TensorSpec([], tf.int32)
    archive.add_endpoint("sample", sample, input_signature=[scalar, scalar])
    archive.add_endpoint("log_prob", log_prob, input_signature=[x_spec, task_spec])
    archive.add_endpoint("encode", encode, input_signature=[x_spec, task_spec])
    archive.write_out(path, verbose=False)
    return path
