"""`VRNN`: a variational recurrent neural network (Chung et al., 2015) for pen strokes, built from
the explicit-noise latent layers so that it can be distilled with shared noise (METHODS 3.4, 3.8).

Data are sequences `x [B, T, 3]` of `(pen, dx, dy)` steps (`kdtfp.datasets.strokes`). With a GRU
state `h_t` (`h_0 = 0`), each step `t = 1..T` is

```
prior      p(z_t | h_{t-1})        = N(mu_p(h), sigma_p(h)^2)          GaussianLatent(latent_size)
posterior  q(z_t | x_t, h_{t-1})   = N(mu_q(x_t, h), sigma_q(x_t, h)^2) GaussianLatent(latent_size)
emission   p(dx_t, dy_t | z_t, h_{t-1}) = N(mu_x(z_t, h), emission_scale^2)   GaussianLatent(2)
           p(pen_t | z_t, h_{t-1})      = Bernoulli(sigmoid(l(z_t, h)))       BernoulliLatent(1)
recurrence h_t = GRU([pen_t, dx_t, dy_t, z_t], h_{t-1})
```

Every conditional is an MLP with one hidden layer of `mlp_units` ReLUs. The emission sd is fixed
at `emission_scale` (1.0, as in Chen et al.'s VRNN), or learned with `emission_scale=None`.

Shared-noise protocol (`kdtfp.models.generative`): nodes `z` (Gaussian latent, `(T, latent_size)`),
`pen` (Bernoulli observed, `(T, 1)`) and `x` (Gaussian observed `(dx, dy)`, `(T, 2)`).
`generate(noise, forced)` runs the prior ancestrally; with `forced={"x": ..., "pen": ...}` the
recurrence reads the given strokes (teacher forcing of `x_{<t}`) while every node's parameters
are still the model's own, so a student's `h` runs on the teacher's strokes.

Likelihood bounds (nats per sequence; divide by T for the per-step values the recipe reports):
`negative_elbo(x)` is `-ELBO` with the analytic per-step KL(q || p); `log_prob(x, k)` is the ELBO
for `k = 1` and the sequence-level IWAE bound with `k` posterior trajectories for `k > 1`
(importance weights over whole sequences, a valid lower bound that tightens with `k`).

The time loop is a `tf.while_loop` over the steps (XLA-compatible; `unroll=True` unrolls a static
number of steps instead). Only the sampled node and the GRU run inside the loop; every node's
parameters are then recomputed for all steps at once from the stacked states.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.layers.latent import BernoulliLatent, GaussianLatent
from kdtfp.losses.shared_noise import PerExampleMean
from kdtfp.models.generative import Node, SharedNoiseModel

DATA_DIM = 3  # (pen, dx, dy)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def gaussian_log_prob(x, loc, scale):
    """`log N(x; loc, scale^2)` summed over the last axis: `[..., D] -> [...]`."""
    z = (x - loc) / scale
    return ops.sum(-0.5 * ops.square(z) - ops.log(scale) - _HALF_LOG_2PI, axis=-1)


def gaussian_kl(loc_q, scale_q, loc_p, scale_p):
    """`KL(N(loc_q, scale_q^2) || N(loc_p, scale_p^2))` summed over the last axis."""
    ratio = ops.square(scale_q / scale_p) + ops.square((loc_q - loc_p) / scale_p)
    return ops.sum(ops.log(scale_p) - ops.log(scale_q) + 0.5 * (ratio - 1.0), axis=-1)


def bernoulli_log_prob(x, logits):
    """`log Bernoulli(x; sigmoid(logits))` summed over the last axis."""
    return ops.sum(x * logits - ops.softplus(logits), axis=-1)


def check_strokes(x, argument="x"):
    """Checks stroke data `[B, T, 3]` that can be read now (NumPy or eager tensors): finite, and
    the pen column (the Bernoulli emission's support) in {0, 1}. Raises ValueError naming
    `argument`; symbolic tensors are only checked for their last dimension."""
    shape = tuple(x.shape)
    if len(shape) != 3 or (shape[-1] is not None and shape[-1] != DATA_DIM):
        raise ValueError(
            f"`{argument}` must have shape [batch, T, 3] (pen, dx, dy), got shape {shape}."
        )
    if isinstance(x, np.ndarray) or (tf.is_tensor(x) and tf.executing_eagerly()):
        values = np.asarray(x)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"`{argument}` contains NaN or Inf values.")
        pen = values[..., 0]
        if not np.all((pen == 0) | (pen == 1)):
            raise ValueError(
                f"`{argument}[..., 0]` (the pen bit) must be 0 or 1: it is outside the "
                "Bernoulli emission's support."
            )


@keras.saving.register_keras_serializable(package="kdtfp")
class VRNN(SharedNoiseModel, keras.Model):
    """A VRNN over pen strokes `[B, T, 3]` (see the module docstring).

    `call(x)` returns the per-sequence negative ELBO `[B]`; `fit(x_train)` minimises its mean per
    step (`compute_loss`, a `keras.losses.Loss`, so replica-correct).

    Args:
        hidden_units: GRU width (64 for the recipe's teacher, 16 for its students).
        latent_size: size of each z_t (4).
        length: T, the per-example length of the nodes (noise layout) for `generate`; the
            likelihood methods accept any length.
        mlp_units: hidden width of the prior, posterior and emission MLPs (default hidden_units).
        emission_scale: fixed sd of the (dx, dy) emission, or None to learn it.
        unroll: unroll the time loop in Python instead of a `tf.while_loop`.
        seed: seed of the layers' own noise.

    Example:

    >>> model = VRNN(hidden_units=64, latent_size=4, length=50)
    >>> model.compile(optimizer="adam")
    >>> model.fit(x_train, batch_size=64, epochs=10)          # x_train [N, 50, 3]
    >>> nll_per_step = -model.log_prob(x_test).numpy().mean() / 50
    >>> strokes = model.sample(16)                             # [16, 50, 3]
    """

    def __init__(
        self,
        hidden_units=64,
        latent_size=4,
        length=50,
        mlp_units=None,
        emission_scale=1.0,
        unroll=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_units = _check_int("hidden_units", hidden_units, 1)
        self.latent_size = _check_int("latent_size", latent_size, 1)
        self.length = _check_int("length", length, 1)
        self.mlp_units = _check_int(
            "mlp_units", self.hidden_units if mlp_units is None else mlp_units, 1
        )
        if emission_scale is not None and not (
            np.isfinite(emission_scale) and float(emission_scale) > 0
        ):
            raise ValueError(
                f"`emission_scale` must be a positive float or None, got {emission_scale!r}."
            )
        self.emission_scale = None if emission_scale is None else float(emission_scale)
        self.unroll = bool(unroll)
        self.seed = seed
        mlp = (self.mlp_units,)
        self.prior = GaussianLatent(latent_size, mlp, seed=seed, name="prior")
        self.posterior = GaussianLatent(latent_size, mlp, seed=seed, name="posterior")
        self.emission = GaussianLatent(2, mlp, scale=emission_scale, seed=seed, name="emission")
        self.pen = BernoulliLatent(1, mlp, seed=seed, name="pen")
        self.cell = keras.layers.GRUCell(self.hidden_units, name="gru")
        self.nll = PerExampleMean(name="negative_elbo_per_step")
        # Build every layer now: layers must not create weights inside the time loop.
        h = ops.zeros((1, self.hidden_units))
        z = ops.zeros((1, self.latent_size))
        step = ops.zeros((1, DATA_DIM))
        self.prior(h, noise=z)
        self.posterior([step, h], noise=z)
        self.emission([z, h], noise=ops.zeros((1, 2)))
        self.pen([z, h], noise=ops.zeros((1, 1)))
        self.cell(ops.concatenate([step, z], -1), h)
        self.built = True

    # ------------------------------------------------------------------ protocol

    @property
    def nodes(self):
        return [
            Node("z", "gaussian", "latent", (self.length, self.latent_size)),
            Node("pen", "bernoulli", "observed", (self.length, 1)),
            Node("x", "gaussian", "observed", (self.length, 2)),
        ]

    @property
    def generative_layers(self):
        """The layers of p(x, z): prior, emissions and GRU (frozen when the posterior is refit)."""
        return [self.prior, self.emission, self.pen, self.cell]

    def generate(self, noise, forced=None, training=False):
        """Runs the VRNN ancestrally from its prior on `noise` (see `kdtfp.models.generative`).

        Args:
            noise: `{"z": [B, T, latent_size], "pen": [B, T, 1], "x": [B, T, 2]}`.
            forced: optional dict with any of `"z"`, `"pen"`, `"x"` -> value of that node's
                shape; a forced node's sample is the given value, and the recurrence reads it.
            training: unused (no dropout), for the protocol.

        Returns:
            `{"z": {"loc", "scale", "sample"}, "pen": {"logits", "sample"},
            "x": {"loc", "scale", "sample"}}`, each `[B, T, units]`.
        """
        self.check_noise(noise)
        forced = dict(forced or {})
        for name, value in forced.items():
            shape, got = self.node(name).shape, tuple(value.shape[1:])
            if len(got) != len(shape) or any(
                g not in (None, e) for g, e in zip(got, shape, strict=True)
            ):
                raise ValueError(
                    f"`forced[{name!r}]` has per-example shape {got}, expected {shape}."
                )
        h_prev, z, pen, xy = self._unroll(
            z_noise=noise["z"],
            z_value=forced.get("z"),
            pen_value=forced.get("pen"),
            pen_noise=noise["pen"],
            x_value=forced.get("x"),
            x_noise=noise["x"],
        )
        return {
            "z": self.prior(h_prev, value=z),
            "pen": self.pen([z, h_prev], value=pen),
            "x": self.emission([z, h_prev], value=xy),
        }

    # ------------------------------------------------------------------ the time loop

    def _step(self, h, z_noise, z_value, pen_value, pen_noise, x_value, x_noise, posterior):
        """One step from `h_{t-1}` [B, H]; returns `(h_t, z_t, pen_t, xy_t)`."""
        if posterior:
            step = ops.concatenate([pen_value, x_value], -1)
            z = self.posterior([step, h], noise=z_noise)["sample"]
        elif z_value is not None:
            z = z_value
        else:
            z = self.prior(h, noise=z_noise)["sample"]
        if pen_value is None:
            pen_value = self.pen([z, h], noise=pen_noise)["sample"]
        if x_value is None:
            x_value = self.emission([z, h], noise=x_noise)["sample"]
        h_next, _ = self.cell(ops.concatenate([pen_value, x_value, z], -1), h)
        return h_next, z, pen_value, x_value

    def _unroll(self, z_noise, z_value=None, pen_value=None, pen_noise=None, x_value=None,
                x_noise=None, posterior=False):  # fmt: skip
        """Runs the recurrence over batch-major sequences `[B, T, .]`; returns the batch-major
        stacks `(h_{t-1} [B, T, H], z [B, T, L], pen [B, T, 1], xy [B, T, 2])`."""
        inputs = {
            "z_noise": z_noise,
            "z_value": z_value,
            "pen_value": pen_value,
            "pen_noise": pen_noise,
            "x_value": x_value,
            "x_noise": x_noise,
        }
        inputs = {
            k: tf.transpose(ops.cast(v, "float32"), [1, 0, 2])
            for k, v in inputs.items()
            if v is not None
        }
        reference = inputs["z_value"] if "z_value" in inputs else inputs["z_noise"]
        batch = tf.shape(reference)[1]
        h0 = tf.zeros(tf.stack([batch, self.hidden_units]))

        def step(t, h):
            at_t = {k: v[t] for k, v in inputs.items()}
            return self._step(
                h,
                at_t.get("z_noise"),
                at_t.get("z_value"),
                at_t.get("pen_value"),
                at_t.get("pen_noise"),
                at_t.get("x_value"),
                at_t.get("x_noise"),
                posterior,
            )

        static_steps = reference.shape[0]
        if self.unroll and static_steps is not None:
            h, outputs = h0, []
            for t in range(static_steps):
                h_next, *values = step(t, h)
                outputs.append((h, *values))
                h = h_next
            stacks = [tf.stack(column) for column in zip(*outputs, strict=True)]
        else:
            steps = tf.shape(reference)[0]
            arrays = [tf.TensorArray(tf.float32, size=steps) for _ in range(4)]

            def body(t, h, *arrays):
                h_next, *values = step(t, h)
                arrays = [a.write(t, v) for a, v in zip(arrays, (h, *values), strict=True)]
                return (t + 1, h_next, *arrays)

            # A static bound lets XLA compile the loop's gradient (DESIGN rule 9).
            _, _, *arrays = tf.while_loop(
                lambda t, *_: t < steps,
                body,
                (tf.constant(0), h0, *arrays),
                maximum_iterations=static_steps,
            )
            stacks = [a.stack() for a in arrays]
            for stack in stacks:
                stack.set_shape(tf.TensorShape([static_steps]).concatenate(stack.shape[1:]))
        return tuple(tf.transpose(s, [1, 0, 2]) for s in stacks)

    # ------------------------------------------------------------------ likelihood

    def _split(self, x):
        x = ops.cast(x, "float32")
        return x[..., :1], x[..., 1:]

    def _log_weights(self, x, z_noise=None, analytic_kl=True):
        """`[B]` per-sequence `log p(x, z) - log q(z | x)` (or with the analytic KL) for one
        posterior trajectory per sequence driven by `z_noise` (drawn when None)."""
        pen, xy = self._split(x)
        if z_noise is None:
            shape = tf.concat([tf.shape(x)[:2], [self.latent_size]], 0)
            z_noise = keras.random.normal(shape, seed=self.posterior.seed_generator)
        h_prev, z, _, _ = self._unroll(z_noise=z_noise, pen_value=pen, x_value=xy, posterior=True)
        q = self.posterior([x, h_prev], value=z)
        p = self.prior(h_prev, value=z)
        emission = self.emission([z, h_prev], value=xy)
        logits = self.pen([z, h_prev], value=pen)["logits"]
        log_lik = gaussian_log_prob(xy, emission["loc"], emission["scale"])
        log_lik = log_lik + bernoulli_log_prob(pen, logits)
        if analytic_kl:
            latent = -gaussian_kl(q["loc"], q["scale"], p["loc"], p["scale"])
        else:
            latent = gaussian_log_prob(z, p["loc"], p["scale"]) - gaussian_log_prob(
                z, q["loc"], q["scale"]
            )
        return ops.sum(log_lik + latent, axis=1)

    def negative_elbo(self, x, noise=None):
        """`-ELBO(x)` `[B]` in nats per sequence, with the analytic per-step KL(q || p).

        Args:
            x: strokes `[B, T, 3]`, pen in {0, 1}.
            noise: optional standard-normal posterior noise `[B, T, latent_size]`.
        """
        check_strokes(x)
        if noise is not None and tuple(noise.shape[-1:]) != (self.latent_size,):
            raise ValueError(
                f"`noise` must have shape [batch, T, {self.latent_size}], got {tuple(noise.shape)}."
            )
        return -self._log_weights(x, noise)

    def log_prob(self, x, k=1):
        """A lower bound on `log p(x)` `[B]` (nats per sequence): the ELBO for `k = 1`, the
        sequence-level IWAE bound with `k` posterior trajectories for `k > 1`."""
        k = _check_int("k", k, 1)
        check_strokes(x)
        if k == 1:
            return self._log_weights(x)
        x = ops.cast(x, "float32")
        batch = tf.shape(x)[0]
        tiled = tf.reshape(tf.repeat(x[None], k, axis=0), tf.concat([[-1], tf.shape(x)[1:]], 0))
        log_w = tf.reshape(self._log_weights(tiled, analytic_kl=False), tf.stack([k, batch]))
        return tf.reduce_logsumexp(log_w, axis=0) - math.log(k)

    def encode(self, x):
        """Posterior means `[B, T, latent_size]` along the trajectory where every z_t is set to
        its posterior mean (zero noise)."""
        check_strokes(x)
        pen, xy = self._split(x)
        h_prev, z, _, _ = self._unroll(
            z_noise=ops.zeros(tf.concat([tf.shape(x)[:2], [self.latent_size]], 0)),
            pen_value=pen,
            x_value=xy,
            posterior=True,
        )
        return z

    def sample(self, n):
        """`n` new stroke sequences `[n, length, 3]` (pen, dx, dy), fresh noise on every call."""
        if isinstance(n, (numbers.Integral, np.integer)) and not isinstance(n, bool):
            _check_int("n", int(n), 1)
        nodes = self.generate(self.sample_noise(n))
        return ops.concatenate([nodes["pen"]["sample"], nodes["x"]["sample"]], -1)

    # ------------------------------------------------------------------ training

    def call(self, inputs, training=None):
        """Per-sequence negative ELBO `[B]` of strokes `inputs [B, T, 3]`."""
        return -self._log_weights(inputs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Mean negative ELBO per step: `mean_B(-ELBO) / T`."""
        if y_pred is None:
            y_pred = self(x, training=training)
        steps = ops.cast(ops.shape(x)[1], "float32")
        return self.nll(None, y_pred / steps, sample_weight)

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`, first checking array data `x` (DESIGN rule 12)."""
        if isinstance(x, (np.ndarray, tf.Tensor)):
            check_strokes(x)
        return super().fit(x, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units,
            latent_size=self.latent_size,
            length=self.length,
            mlp_units=self.mlp_units,
            emission_scale=self.emission_scale,
            unroll=self.unroll,
            seed=self.seed,
        )
        return config


def export_vrnn(model, path):
    """Writes the VRNN alone as a SavedModel (`export_generative`): `sample(n)` -> `[n, T, 3]`,
    `log_prob(x)` -> ELBO `[B]` and `encode(x)` -> `[B, T, latent_size]` for `x [B, T, 3]`
    float32 (any T). Loads with `tf.saved_model.load(path)` without kdtfp. Returns `path`."""
    from kdtfp.models.generative import export_generative

    if not isinstance(model, VRNN):
        raise ValueError(f"`model` must be a kdtfp VRNN, got {type(model).__name__}.")
    spec = tf.TensorSpec([None, None, DATA_DIM], tf.float32, name="x")
    return export_generative(model, path, spec)
