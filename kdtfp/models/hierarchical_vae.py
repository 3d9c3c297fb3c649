"""`HierarchicalVAE`: a top-down Gaussian hierarchy with MLP conditionals (METHODS 3.7).

Generative model (the default sizes; `L = len(latent_sizes)` layers, top first):

```
z3 ~ N(0, I_4)                                   GaussianRoot        node "z3"
z2 ~ N(loc(z3), diag scale(z3)^2)   [8]          GaussianLatent      node "z2"
z1 ~ N(loc(z2), diag scale(z2)^2)   [16]         GaussianLatent      node "z1"
x  ~ Bernoulli(sigmoid(logits(z1))) [64]         BernoulliLatent     node "x" (observed)
     or N(loc(z1), sigma^2 I) with a fixed sigma (decoder="gaussian")
```

Every conditional is an MLP (`hidden_units`) written with explicit noise, so the model is a
`SharedNoiseModel`: `generate(noise, forced)` runs it ancestrally on a noise dict, which is what
`kdtfp.distill.SharedNoiseDistiller` shares between teacher and student.

Inference network (our choice): a bottom-up Markov chain of diagonal Gaussians
`q(z1 | x) q(z2 | z1) q(z3 | z2)` (Burda et al.'s IWAE architecture), each an MLP of width
`encoder_hidden_units`. It only serves the ELBO and the IWAE bound; distillation never trains it,
so a distilled student refits it with the decoder frozen (`fit_encoder`) before evaluation.

Training: `fit(x)` maximises the single-sample ELBO with a KL warm-up,
`loss = E_B[-log p(x | z1) + beta_t (log q(z | x) - log p(z))]`, with
`beta_t = min(1, (t + 1) / kl_warmup_steps)` at optimizer step `t` (METHODS 3.4: the teacher is
trained with warm-up). Evaluation: `log_prob(x, k)` is the IWAE bound
`log (1/k) sum_i p(x, z_i) / q(z_i | x)`, `z_i ~ q(z | x)`, computed with `logsumexp`.

All densities are written with plain TensorFlow ops, so the export (`export_hvae`) serves
without kdtfp or TFP.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.distribute import safe_steps_per_execution
from kdtfp.layers.latent import BernoulliLatent, GaussianLatent, GaussianRoot
from kdtfp.losses.shared_noise import PerExampleMean
from kdtfp.models.generative import Node, SharedNoiseModel, export_generative

DECODERS = ("bernoulli", "gaussian")
# IWAE is computed over chunks of examples so that k * chunk rows fit in memory.
_IWAE_ROWS = 1 << 16
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def normal_log_prob(x, loc, scale):
    """`log N(x; loc, diag scale^2)` summed over the last axis: `[..., D]` -> `[...]`."""
    z = (ops.cast(x, "float32") - loc) / scale
    return ops.sum(-0.5 * ops.square(z) - ops.log(scale) - _HALF_LOG_2PI, axis=-1)


def bernoulli_log_prob(x, logits):
    """`log Bernoulli(x; sigmoid(logits))` summed over the last axis: `[..., D]` -> `[...]`."""
    return ops.sum(ops.cast(x, "float32") * logits - ops.softplus(logits), axis=-1)


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_widths(name, value):
    widths = (value,) if isinstance(value, numbers.Integral) else tuple(value)
    for width in widths:
        _check_int(name, width, 1)
    return tuple(int(w) for w in widths)


@keras.saving.register_keras_serializable(package="kdtfp")
class HierarchicalVAE(SharedNoiseModel, keras.Model):
    """A hierarchical VAE `z_L -> ... -> z_1 -> x` with MLP conditionals and an IWAE bound.

    Nodes (topological order): `z{L}`, ..., `z1` (Gaussian latents with sizes `latent_sizes`,
    top first) and `x` (observed, `data_size`, Bernoulli or Gaussian). See the module docstring.

    Args:
        latent_sizes: sizes of the latent layers, top first (default `(4, 8, 16)`).
        data_size: D, the size of `x` (default 64: 8x8 digits).
        hidden_units: width(s) of the hidden layers of every generative conditional (an int or a
            tuple of ints; 128 for the teacher, 16-32 for a student).
        encoder_hidden_units: width(s) of the inference network's MLPs (default: as
            `hidden_units`).
        decoder: `"bernoulli"` (binary `x`, METHODS 3.7) or `"gaussian"` (fixed `decoder_scale`).
        decoder_scale: the fixed standard deviation of the Gaussian decoder (default
            `sqrt(0.1 / 2)`, the authors' sigma for beta = 0.1).
        activation: activation of every hidden layer.
        kl_warmup_steps: the KL weight rises linearly to 1 over this many optimizer steps
            (0: no warm-up).
        num_importance_samples: default k of `log_prob` (and of the exported `log_prob`).
        seed: int seed of the layers' own noise (None: random).

    Call: `model(x)` -> dict `{"reconstruction": log p(x | z1) [B], "kl": log q(z | x) -
    log p(z) [B]}` for one posterior sample (the ELBO is their difference).

    Example:

    >>> teacher = HierarchicalVAE(hidden_units=128, kl_warmup_steps=2000, seed=0)
    >>> teacher.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> teacher.fit(x_train, batch_size=100, epochs=100)        # binary x [N, 64]
    >>> teacher.log_prob(x_test, k=1000)                        # IWAE bound [N]
    >>> teacher.sample(16)                                      # [16, 64] in {0, 1}
    """

    def __init__(
        self,
        latent_sizes=(4, 8, 16),
        data_size=64,
        hidden_units=128,
        encoder_hidden_units=None,
        decoder="bernoulli",
        decoder_scale=None,
        activation="relu",
        kl_warmup_steps=0,
        num_importance_samples=100,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.latent_sizes = _check_widths("latent_sizes", latent_sizes)
        if not self.latent_sizes:
            raise ValueError("`latent_sizes` must hold at least one latent size.")
        self.data_size = _check_int("data_size", data_size, 1)
        self.hidden_units = _check_widths("hidden_units", hidden_units)
        self.encoder_hidden_units = (
            self.hidden_units
            if encoder_hidden_units is None
            else _check_widths("encoder_hidden_units", encoder_hidden_units)
        )
        if decoder not in DECODERS:
            raise ValueError(f"`decoder` must be one of {DECODERS}. Received: decoder={decoder!r}")
        self.decoder = decoder
        if decoder_scale is None:
            decoder_scale = math.sqrt(0.1 / 2.0)
        if not (np.isfinite(decoder_scale) and float(decoder_scale) > 0):
            raise ValueError(f"`decoder_scale` must be a float > 0. Received: {decoder_scale!r}")
        self.decoder_scale = float(decoder_scale)
        self.activation = activation
        self.kl_warmup_steps = _check_int("kl_warmup_steps", kl_warmup_steps, 0)
        self.num_importance_samples = _check_int(
            "num_importance_samples", num_importance_samples, 1
        )
        self.seed = seed

        def layer_seed(index):
            return None if seed is None else int(seed) * 1000 + index

        num_latents = len(self.latent_sizes)
        self.latent_names = tuple(f"z{num_latents - i}" for i in range(num_latents))
        root = GaussianRoot(
            self.latent_sizes[0], seed=layer_seed(0), name=f"p_{self.latent_names[0]}"
        )
        generative = [root]
        for index in range(1, num_latents):
            generative.append(
                GaussianLatent(
                    self.latent_sizes[index],
                    self.hidden_units,
                    activation,
                    seed=layer_seed(index),
                    name=f"p_{self.latent_names[index]}",
                )
            )
        if decoder == "bernoulli":
            emission = BernoulliLatent(
                self.data_size, self.hidden_units, activation, seed=layer_seed(num_latents),
                name="p_x",
            )  # fmt: skip
        else:
            emission = GaussianLatent(
                self.data_size, self.hidden_units, activation, scale=self.decoder_scale,
                seed=layer_seed(num_latents), name="p_x",
            )  # fmt: skip
        generative.append(emission)
        self.generative_layers = generative
        # Bottom-up inference chain: q(z1 | x), q(z2 | z1), ..., q(zL | z_{L-1}).
        self.encoder_layers = [
            GaussianLatent(
                size,
                self.encoder_hidden_units,
                activation,
                seed=layer_seed(100 + index),
                name=f"q_{name}",
            )
            for index, (size, name) in enumerate(
                zip(reversed(self.latent_sizes), reversed(self.latent_names), strict=True)
            )
        ]
        self._loss_fn = PerExampleMean(name="negative_elbo")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        # Build every weight now (a subclassed model has no symbolic input).
        self.negative_elbo(ops.zeros((1, self.data_size)))
        self.built = True

    # ------------------------------------------------------------------ protocol

    @property
    def nodes(self):
        latents = [
            Node(name, "gaussian", "latent", (size,))
            for name, size in zip(self.latent_names, self.latent_sizes, strict=True)
        ]
        return latents + [Node("x", self.decoder, "observed", (self.data_size,))]

    def generate(self, noise, forced=None, training=False):
        """Runs `z_L -> ... -> x` ancestrally on `noise`.

        Args:
            noise: dict node name -> `[..., size]` noise (N(0, 1) for the latents, U(0, 1) for
                a Bernoulli `x`); a node may lack noise only if it is `forced`.
            forced: dict node name -> value `[..., size]`: that node's sample is the value
                (teacher forcing, local distillation, or posterior samples in the ELBO).
            training: unused (no dropout); part of the protocol.

        Returns:
            dict node name -> the layer's parameter dict (`"loc"`/`"scale"` or `"logits"`, and
            `"sample"`), every tensor `[..., size]`.
        """
        del training
        noise, forced = dict(noise or {}), dict(forced or {})
        names = [node.name for node in self.nodes]
        for argument, given in (("noise", noise), ("forced", forced)):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise ValueError(f"`{argument}` has unknown nodes {unknown}; nodes: {names}.")
        outputs, parent = {}, None
        for name, layer in zip(names, self.generative_layers, strict=True):
            eps, value = noise.get(name), forced.get(name)
            if eps is None and value is None:
                raise ValueError(f"`noise` must hold node {name!r} (it is not forced).")
            if parent is None:
                params = layer(eps if eps is not None else value, value=value)
            else:
                params = layer(parent, noise=eps, value=value)
            outputs[name] = params
            parent = params["sample"]
        return outputs

    # ------------------------------------------------------------------ inference and bounds

    def infer(self, x, noise=None, mean=False):
        """Samples the bottom-up posterior `q(z1 | x) q(z2 | z1) ...` for `x` `[..., D]`.

        `noise`: optional dict latent name -> N(0, 1) noise; `mean=True` follows the posterior
        means instead (no noise). Returns dict latent name -> parameter dict (with `"sample"`).
        """
        noise = dict(noise or {})
        outputs, parent = {}, ops.cast(x, "float32")
        names = tuple(reversed(self.latent_names))
        for name, layer in zip(names, self.encoder_layers, strict=True):
            if mean:  # zero noise: the sample is the conditional mean
                shape = (*ops.shape(parent)[:-1], layer.units)
                params = layer(parent, noise=ops.zeros(shape))
            else:
                params = layer(parent, noise=noise.get(name))
            outputs[name] = params
            parent = params["sample"]
        return outputs

    def _log_weights(self, x, noise=None):
        """`(log p(x | z1), log p(z) - log q(z | x))` for one posterior sample per row of x."""
        posterior = self.infer(x, noise)
        forced = {name: posterior[name]["sample"] for name in self.latent_names}
        forced["x"] = ops.cast(x, "float32")
        prior = self.generate(None, forced=forced)
        emission = prior["x"]
        if self.decoder == "bernoulli":
            reconstruction = bernoulli_log_prob(x, emission["logits"])
        else:
            reconstruction = normal_log_prob(x, emission["loc"], emission["scale"])
        log_ratio = 0.0
        for name in self.latent_names:
            z = forced[name]
            p, q = prior[name], posterior[name]
            log_ratio += normal_log_prob(z, p["loc"], p["scale"])
            log_ratio -= normal_log_prob(z, q["loc"], q["scale"])
        return reconstruction, log_ratio

    def call(self, inputs, training=None):
        reconstruction, log_ratio = self._log_weights(inputs)
        return {"reconstruction": reconstruction, "kl": -log_ratio}

    def compute_output_spec(self, inputs, training=None):
        batch = inputs.shape[0]
        spec = keras.KerasTensor((batch,), dtype="float32")
        return {"reconstruction": spec, "kl": spec}

    def kl_weight(self):
        """The warm-up weight `beta_t` of the KL term at the optimizer's current step."""
        if self.kl_warmup_steps == 0 or getattr(self, "optimizer", None) is None:
            return ops.ones((), "float32")
        step = ops.cast(self.optimizer.iterations, "float32")
        return ops.minimum(1.0, (step + 1.0) / float(self.kl_warmup_steps))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        beta = self.kl_weight() if training else ops.ones((), "float32")
        per_example = beta * y_pred["kl"] - y_pred["reconstruction"]
        loss = self._loss_fn(None, per_example, sample_weight)
        self.reconstruction_tracker.update_state(y_pred["reconstruction"])
        self.kl_tracker.update_state(y_pred["kl"])
        for extra in self.losses:
            loss = loss + ops.cast(self._aggregate_additional_loss(extra), "float32")
        return loss

    def negative_elbo(self, x, noise=None):
        """`-ELBO(x)` `[B]` from one posterior sample: `-log p(x | z1) + log q(z|x) - log p(z)`.

        `noise`: optional dict latent name -> `[B, size]` N(0, 1) noise of the posterior sample
        `z = loc_q + scale_q * noise` (drawn when absent).
        """
        x = self._checked(x)
        reconstruction, log_ratio = self._log_weights(x, noise)
        return -(reconstruction + log_ratio)

    def log_prob(self, x, k=None):
        """The IWAE bound on `log p(x)` `[B]` with `k` importance samples from `q(z | x)`.

        `k = 1` is the ELBO; the bound tightens as `k` grows. Examples are processed in chunks of
        `2^16 / k` rows (k = 1000 fits in memory). Default k: `num_importance_samples`.
        """
        k = self.num_importance_samples if k is None else _check_int("k", k, 1)
        x = self._checked(x)
        if not tf.executing_eagerly() or not isinstance(x, np.ndarray):
            return self._iwae(ops.cast(x, "float32"), k)
        chunk = max(1, _IWAE_ROWS // k)
        parts = [
            self._iwae_graph(tf.constant(x[i : i + chunk], tf.float32), k)
            for i in range(0, len(x), chunk)
        ]
        return ops.concatenate(parts, axis=0) if parts else ops.zeros((0,), "float32")

    def _iwae(self, x, k):
        tiled = ops.broadcast_to(x[None], (k, *ops.shape(x)))
        reconstruction, log_ratio = self._log_weights(tiled)
        return ops.logsumexp(reconstruction + log_ratio, axis=0) - math.log(k)

    @tf.function(reduce_retracing=True)
    def _iwae_graph(self, x, k):
        return self._iwae(x, k)

    def encode(self, x):
        """Posterior means `[B, sum(latent_sizes)]`: `z1, z2, ...` concatenated (bottom first),
        following the mean path of the bottom-up chain."""
        posterior = self.infer(self._checked(x), mean=True)
        return ops.concatenate(
            [posterior[name]["loc"] for name in reversed(self.latent_names)], axis=-1
        )

    def sample(self, n):
        """`n` draws of `x` `[n, D]` (fresh noise each call): binary for the Bernoulli decoder."""
        if isinstance(n, numbers.Integral):
            _check_int("n", n, 1)
        return self.generate(self.sample_noise(n))["x"]["sample"]

    def sample_mean(self, n):
        """`n` decoder means `E[x | z1]` `[n, D]` at fresh ancestral latent samples."""
        params = self.generate(self.sample_noise(n))["x"]
        return ops.sigmoid(params["logits"]) if self.decoder == "bernoulli" else params["loc"]

    def _checked(self, x):
        """Checks eager data: `[..., D]`, finite, and in {0, 1} for the Bernoulli decoder."""
        if isinstance(x, (np.ndarray, list)) or (tf.is_tensor(x) and tf.executing_eagerly()):
            if not isinstance(x, keras.KerasTensor):
                x = np.asarray(x, np.float32)
                if x.ndim < 1 or x.shape[-1] != self.data_size:
                    raise ValueError(
                        f"`x` must have shape [..., {self.data_size}]. Received: {x.shape}"
                    )
                if not np.all(np.isfinite(x)):
                    raise ValueError("`x` must be finite; it contains NaN or Inf.")
                if self.decoder == "bernoulli" and not np.all((x == 0) | (x == 1)):
                    bad = x[(x != 0) & (x != 1)].ravel()[:3]
                    raise ValueError(
                        "`x` must be binary (every entry 0 or 1) for the Bernoulli decoder; "
                        f"found values such as {bad.tolist()}."
                    )
        return x

    # ------------------------------------------------------------------ training helpers

    def fit(self, x=None, y=None, **kwargs):
        """`keras.Model.fit`, first checking array data `x` (shape, finite, support)."""
        if isinstance(x, (np.ndarray, tf.Tensor)):
            self._checked(x)
        return super().fit(x, y, **kwargs)

    def fit_encoder(self, x, steps, batch_size=100, learning_rate=1e-3, seed=0, jit_compile=False,
                    steps_per_execution=50, verbose=0):  # fmt: skip
        """Refits the inference network by ELBO (no warm-up) with the generative layers frozen.

        A distilled student's encoder was never trained (METHODS 3.7): call this before
        `log_prob`. The model is compiled anew (Adam with `learning_rate`); recompile before
        training the whole model again. Returns the `History`.
        """
        steps = _check_int("steps", steps, 1)
        self._checked(x)
        warmup, self.kl_warmup_steps = self.kl_warmup_steps, 0
        trainable = [layer.trainable for layer in self.generative_layers]
        for layer in self.generative_layers:
            layer.trainable = False
        try:
            with self.distribute_strategy.scope():
                self.compile(
                    optimizer=keras.optimizers.Adam(learning_rate),
                    steps_per_execution=safe_steps_per_execution(
                        min(steps_per_execution, steps), self.distribute_strategy
                    ),
                    jit_compile=jit_compile,
                )
            data = (
                tf.data.Dataset.from_tensor_slices(np.asarray(x, np.float32))
                .shuffle(len(x), seed=seed)
                .repeat()
                .batch(batch_size, drop_remainder=True)
            )
            history = self.fit(data, steps_per_epoch=steps, epochs=1, verbose=verbose)
        finally:
            self.kl_warmup_steps = warmup
            for layer, flag in zip(self.generative_layers, trainable, strict=True):
                layer.trainable = flag
        return history

    def get_config(self):
        config = super().get_config()
        config.update(
            latent_sizes=list(self.latent_sizes),
            data_size=self.data_size,
            hidden_units=list(self.hidden_units),
            encoder_hidden_units=list(self.encoder_hidden_units),
            decoder=self.decoder,
            decoder_scale=self.decoder_scale,
            activation=self.activation,
            kl_warmup_steps=self.kl_warmup_steps,
            num_importance_samples=self.num_importance_samples,
            seed=self.seed,
        )
        return config


def export_hvae(model, path):
    """Writes the VAE alone as a SavedModel (`kdtfp.models.generative.export_generative`).

    Endpoints (load with `tf.saved_model.load(path)`, no kdtfp or TFP needed): `sample(n)`
    int32 scalar -> `[n, D]`; `log_prob(x)` `[None, D]` -> IWAE bound `[None]` with
    `model.num_importance_samples` samples; `encode(x)` -> posterior means
    `[None, sum(latent_sizes)]`; `sample_mean(n)` -> decoder means `[n, D]`. Returns `path`.
    """
    if not isinstance(model, HierarchicalVAE):
        raise ValueError(f"`model` must be a HierarchicalVAE, got {type(model).__name__}.")
    spec = tf.TensorSpec([None, model.data_size], tf.float32, name="x")
    extra = {
        "sample_mean": (
            lambda n: model.sample_mean(n),
            [tf.TensorSpec([], tf.int32, name="n")],
        )
    }
    return export_generative(model, path, spec, extra_endpoints=extra)
