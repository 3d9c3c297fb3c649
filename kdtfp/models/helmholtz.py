"""`HelmholtzMachine`: binary latent layers with Gaussian emissions, trained by wake-sleep, with
an exact likelihood by enumeration (Chen et al., CVPR 2023; METHODS 3.4 and 3.6).

The DAG of the Old Faithful replica (`layers=4`, `latent_units=2`):

```
z4 -> z3 -> y2 -> z2 -> z1 -> y1
```

`z_l` are layers of `latent_units` binary units, `y2` (waiting time) is an observed middle node
and `y1` (eruption duration) the final output, both with fixed-sd Gaussian emissions. Data
`x` are `[B, 2]` with columns `(y1, y2)`, the column order of `kdtfp.datasets.load_faithful`.
With `layers = 2m`, `m` binary layers sit above `y2` and `m` below it.

Exact likelihood. `y2` is observed, so the model factorises at it (METHODS 3.6):

```
p(y1, y2) = [sum_{z_L..z_{m+1}} p(z_L) ... p(z_{m+1} | z_{m+2}) N(y2; mu2(z_{m+1}), s^2)]
          * [sum_{z_m..z_1} p(z_m | y2) ... p(z_1 | z_2) N(y1; mu1(z_1), s^2)]
```

Each bracket is a chain over `K = 2^latent_units` states per layer, summed exactly by forward
message passing in log space (`K^2` terms per layer instead of `K^m` per bracket; the same
sum). The posterior marginals of `encode` come from the matching backward pass.
"""

from __future__ import annotations

import itertools
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.layers.latent import BernoulliLatent, BernoulliRoot, GaussianLatent
from kdtfp.losses.shared_noise import PerExampleMean
from kdtfp.models.generative import Node, SharedNoiseModel
from kdtfp.seed_state import SavesSeedState

# Exact enumeration multiplies [K, K] matrices with K = 2^latent_units states per layer.
_MAX_LATENT_UNITS = 12
_LOG_2PI = float(np.log(2.0 * np.pi))
# Initial bias of every hidden ReLU unit. With Keras's zero biases a unit whose weights are all
# negative is dead at every binary parent state from the start (a width-2 layer then has a 1/16
# chance of being constant forever); a small positive bias starts every unit alive.
_HIDDEN_BIAS = 0.1


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def binary_states(units):
    """All `2^units` binary vectors as a float32 `[2^units, units]` array; row `k` holds the bits
    of `k`, most significant first."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=units)), dtype="float32")


def _bernoulli_log_prob_states(logits, states):
    """`log Bern(states[k] | logits[..., :])` for every state: `[..., U]`, `[K, U]` -> `[..., K]`."""
    return ops.matmul(logits, ops.transpose(states)) - ops.sum(
        ops.softplus(logits), axis=-1, keepdims=True
    )


def _normal_log_prob_states(y, locs, scale):
    """`log N(y; locs[k], scale^2)` for every state: `y` `[B, 1]`, `locs` `[K, 1]` -> `[B, K]`."""
    z = (y - ops.transpose(locs)) / scale
    return -0.5 * ops.square(z) - np.log(scale) - 0.5 * _LOG_2PI


def _chain(first, transitions, evidence, marginals=False):
    """Sums a chain of discrete layers exactly in log space.

    Args:
        first: `[B or 1, K]` log-probabilities of the first layer's states.
        transitions: list of `[K, K]` log p(child state j | parent state i) (rows: parents).
        evidence: `[B, K]` log-density of the observation given the last layer's state.
        marginals: also return each layer's posterior state probabilities `[B, K]`.

    Returns:
        `log_z` `[B]` (and the list of posteriors, first layer first).
    """
    alphas = [first + ops.zeros_like(evidence)]
    for transition in transitions:
        alphas.append(ops.logsumexp(alphas[-1][:, :, None] + transition[None], axis=1))
    log_z = ops.logsumexp(alphas[-1] + evidence, axis=-1)
    if not marginals:
        return log_z
    betas = [evidence]
    for transition in reversed(transitions):
        betas.insert(0, ops.logsumexp(transition[None] + betas[0][:, None, :], axis=2))
    return log_z, [ops.exp(a + b - log_z[:, None]) for a, b in zip(alphas, betas, strict=True)]


@keras.saving.register_keras_serializable(package="kdtfp")
class HelmholtzMachine(SharedNoiseModel, SavesSeedState, keras.Model):
    """A Helmholtz machine on 2-D data with an observed middle node, exact likelihood included.

    Generative model (nodes in topological order, `L = layers`, `m = L / 2`):

    ```
    z_L ~ Bern(sigmoid(b))                              # BernoulliRoot
    z_l | z_{l+1} ~ Bern(sigmoid(MLP(z_{l+1})))          # l = L-1 .. m+1
    y2 | z_{m+1} ~ N(MLP(z_{m+1}), emission_scale^2)      # observed middle node
    z_m | y2 ~ Bern(sigmoid(MLP(y2)));  z_l | z_{l+1}    # l = m-1 .. 1
    y1 | z_1 ~ N(MLP(z_1), emission_scale^2)
    ```

    Every MLP has one ReLU hidden layer of `hidden_units` (hidden biases start at 0.1 so that no
    unit starts dead at every binary parent state). Recognition model (wake-sleep):
    `q(z_1 | y1, y2)`, `q(z_l | y2, z_{l-1})` for `l = 2..m`, `q(z_{m+1} | y2)`,
    `q(z_l | z_{l-1})` for `l > m + 1`, the same MLP shape.

    * `fit(x)` (x `[B, 2]` = `(y1, y2)`, no targets) trains by **wake-sleep**: the wake term
      `-log p(x, z)`, `z ~ q(z | x)`, reaches only the generative nets; the sleep term
      `-log q(z | x)`, `(z, x) ~ p` (stopped samples), only the recognition nets.
    * `log_prob(x)` `[B]`: **exact** `log p(y1, y2)` by enumeration (module docstring).
    * `encode(x)` `[B, L * latent_units]`: exact posterior marginals `p(z_l,u = 1 | x)`, layers
      in node order (`z_L` first).
    * `sample(n)` `[n, 2]`: ancestral samples with fresh noise.
    * `negative_elbo(x)` `[B]`: one-sample `-(log p(x, z) - log q(z | x))`, `z ~ q`.
    * `nodes` / `generate(noise, forced)`: the shared-noise protocol of
      `kdtfp.distill.SharedNoiseDistiller` (nodes `z{L}, .., z{m+1}, y2, z{m}, .., z1, y1`).

    Args:
        hidden_units: width of every MLP's hidden layer (int >= 1; 8 teacher, 2 student).
        latent_units: binary units per layer (int >= 1, at most 12 for exact enumeration).
        layers: number of binary layers, even (int >= 2): half above `y2`, half below.
        emission_scale: fixed sd of both Gaussian emissions (> 0).
        activation: activation of the hidden layers ("relu" as in the authors' code).
        seed: optional int seed of the noise and of the layers' initial draws.

    Example:

    >>> hm = kdtfp.models.HelmholtzMachine(hidden_units=8)
    >>> hm.compile(optimizer=keras.optimizers.Adam(1e-2))
    >>> hm.fit(x, batch_size=272, epochs=1000, verbose=0)   # wake-sleep
    >>> hm.log_prob(x)                                       # exact, [272]
    """

    def __init__(
        self,
        hidden_units=8,
        latent_units=2,
        layers=4,
        emission_scale=0.5,
        activation="relu",
        seed=None,
        name="helmholtz_machine",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.hidden_units = _check_int("hidden_units", hidden_units, 1)
        self.latent_units = _check_int("latent_units", latent_units, 1)
        if self.latent_units > _MAX_LATENT_UNITS:
            raise ValueError(
                f"`latent_units` must be <= {_MAX_LATENT_UNITS} for exact enumeration. "
                f"Received: latent_units={latent_units!r}"
            )
        self.num_layers = _check_int("layers", layers, 2)
        if self.num_layers % 2:
            raise ValueError(f"`layers` must be even (half above y2). Received: layers={layers!r}")
        scale_ok = isinstance(emission_scale, numbers.Real) and not isinstance(emission_scale, bool)
        if not (scale_ok and np.isfinite(emission_scale) and emission_scale > 0):
            raise ValueError(
                f"`emission_scale` must be a float > 0. Received: emission_scale={emission_scale!r}"
            )
        self.emission_scale = float(emission_scale)
        self.activation = activation
        try:
            keras.activations.get(activation)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"`activation` must name a Keras activation. Received: activation={activation!r}"
            ) from error
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._nodes = self._make_nodes()
        self._states = binary_states(self.latent_units)
        hidden = (self.hidden_units,)
        units = self.latent_units

        def seed_of(index):
            return None if seed is None else int(seed) * 1000 + index

        generative = []
        for index, node in enumerate(self._nodes):
            if index == 0:
                generative.append(BernoulliRoot(units, seed=seed_of(index), name=f"p_{node.name}"))
            elif node.role == "observed":
                generative.append(
                    GaussianLatent(
                        1,
                        hidden,
                        activation=activation,
                        scale=self.emission_scale,
                        seed=seed_of(index),
                        name=f"p_{node.name}",
                    )
                )
            else:
                generative.append(
                    BernoulliLatent(
                        units, hidden, activation, seed=seed_of(index), name=f"p_{node.name}"
                    )
                )
        self.generative_layers = generative
        self.recognition_layers = [
            BernoulliLatent(units, hidden, activation, seed=seed_of(100 + index), name=f"q_{name}")
            for index, name in enumerate(self._latent_names_bottom_up())
        ]
        self.wake_loss = PerExampleMean(name="wake")
        self.sleep_loss = PerExampleMean(name="sleep")
        self.wake_tracker = keras.metrics.Mean(name="wake")
        self.sleep_tracker = keras.metrics.Mean(name="sleep")
        self.build()
        for layer in [*self.generative_layers, *self.recognition_layers]:
            for dense in getattr(layer, "hidden", ()):
                dense.bias.assign(ops.full(dense.bias.shape, _HIDDEN_BIAS))

    # ------------------------------------------------------------------ structure

    def _make_nodes(self):
        units, half = (self.latent_units,), self.num_layers // 2
        nodes = [
            Node(f"z{level}", "bernoulli", "latent", units)
            for level in range(self.num_layers, half, -1)
        ]
        nodes.append(Node("y2", "gaussian", "observed", (1,)))
        nodes += [Node(f"z{level}", "bernoulli", "latent", units) for level in range(half, 0, -1)]
        nodes.append(Node("y1", "gaussian", "observed", (1,)))
        return nodes

    def _latent_names_bottom_up(self):
        return [f"z{level}" for level in range(1, self.num_layers + 1)]

    @property
    def nodes(self):
        return list(self._nodes)

    def build(self, input_shape=None):
        if self.built:
            return
        # Every sublayer is built by one pass on a dummy batch: all shapes are known already.
        noise = {n.name: ops.zeros((1, *n.shape)) for n in self._nodes}
        self.generate(noise)
        self.infer(ops.zeros((1, 2)))
        self.built = True

    def _layer(self, name):
        return self.generative_layers[[n.name for n in self._nodes].index(name)]

    # ------------------------------------------------------------------ generative model

    def _parents(self, index, values):
        """Parent value of node `index` (the previous node in the chain)."""
        return values[self._nodes[index - 1].name]

    def generate(self, noise, forced=None, training=False):
        """Runs the generative model ancestrally on `noise` (dict node name -> `[B, *shape]`:
        U(0, 1) for the `z`s, N(0, 1) for `y2`, `y1`). A node named in `forced` takes the given
        value as its sample. Returns dict name -> the layer's parameter dict (`"logits"` or
        `"loc"`/`"scale"`, and `"sample"`)."""
        del training
        forced = forced or {}
        params, values = {}, {}
        for index, (node, layer) in enumerate(
            zip(self._nodes, self.generative_layers, strict=True)
        ):
            value = forced.get(node.name)
            node_noise = noise.get(node.name) if value is None else None
            if value is None and node_noise is None:
                raise ValueError(f"`noise` has no entry for node {node.name!r} (nor is it forced).")
            if index == 0:
                reference = node_noise if node_noise is not None else value
                out = layer(reference, value=value)
            else:
                out = layer(self._parents(index, values), noise=node_noise, value=value)
            params[node.name], values[node.name] = out, out["sample"]
        return params

    def _draw_noise(self, batch_size):
        noise = {}
        for node in self._nodes:
            shape = (batch_size, *node.shape)
            if node.family == "gaussian":
                noise[node.name] = keras.random.normal(shape, seed=self.seed_generator)
            else:
                noise[node.name] = keras.random.uniform(shape, seed=self.seed_generator)
        return noise

    def sample(self, n):
        """`n` ancestral samples `[n, 2]` (columns `y1, y2`), fresh noise on every call."""
        if isinstance(n, numbers.Integral) and (isinstance(n, bool) or n < 1):
            raise ValueError(f"`n` must be an int >= 1. Received: n={n!r}")
        params = self.generate(self._draw_noise(n))
        return ops.concatenate([params["y1"]["sample"], params["y2"]["sample"]], axis=-1)

    def joint_log_prob(self, params, values):
        """`sum_nodes log p(node = values[node] | its parents)` `[B]` from `generate` outputs."""
        total = 0.0
        for node, layer in zip(self._nodes, self.generative_layers, strict=True):
            total = total + layer.log_prob(params[node.name], values[node.name])
        return total

    # ------------------------------------------------------------------ recognition model

    def infer(self, x, forced=None):
        """The recognition pass: `q(z_1 | y1, y2)` first, up to `q(z_L | z_{L-1})`. A latent in
        `forced` takes that value (used by the sleep phase). Returns dict `z{l}` -> params."""
        forced = forced or {}
        x = ops.cast(x, "float32")
        y1, y2 = x[:, :1], x[:, 1:2]
        half = self.num_layers // 2
        params, previous = {}, None
        for level, layer in enumerate(self.recognition_layers, start=1):
            if level == 1:
                parents = [y1, y2]
            elif level <= half:
                parents = [y2, previous]
            elif level == half + 1:
                parents = [y2]
            else:
                parents = [previous]
            out = layer(parents, value=forced.get(f"z{level}"))
            params[f"z{level}"], previous = out, out["sample"]
        return params

    def call(self, inputs, training=None):
        """Recognition pass on data `[B, 2]`: dict `z{l}` -> `{"logits", "sample"}`."""
        return self.infer(inputs)

    def _wake_sleep_terms(self, x, recognised):
        x = ops.cast(x, "float32")
        batch_size = ops.shape(x)[0]
        # Wake: complete the data with z ~ q(z | x); only the generative nets get gradients.
        observed = {"y1": x[:, :1], "y2": x[:, 1:2]}
        latents = {name: ops.stop_gradient(p["sample"]) for name, p in recognised.items()}
        values = {**latents, **observed}
        params = self.generate({}, forced=values)
        wake = -self.joint_log_prob(params, values)
        # Sleep: dream (z, x) ~ p with stopped samples; only the recognition nets get gradients.
        dream = self.generate(self._draw_noise(batch_size))
        dream = {name: ops.stop_gradient(p["sample"]) for name, p in dream.items()}
        dream_x = ops.concatenate([dream["y1"], dream["y2"]], axis=-1)
        z = {name: dream[name] for name in recognised}
        q = self.infer(dream_x, forced=z)
        sleep = 0.0
        for level, layer in enumerate(self.recognition_layers, start=1):
            sleep = sleep - layer.log_prob(q[f"z{level}"], z[f"z{level}"])
        return wake, sleep

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        # Imported here: kdtfp.distill imports kdtfp.models (no import cycle at load time).
        from kdtfp.distill.distiller import unscale_loss_for_distribution

        wake, sleep = self._wake_sleep_terms(x, y_pred)
        wake = self.wake_loss(None, wake, sample_weight)
        sleep = self.sleep_loss(None, sleep, sample_weight)
        batch_size = ops.shape(x)[0]
        self.wake_tracker.update_state(unscale_loss_for_distribution(wake), batch_size)
        self.sleep_tracker.update_state(unscale_loss_for_distribution(sleep), batch_size)
        return wake + sleep

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit` (wake-sleep); array data are checked first (shape, finite)."""
        if isinstance(x, (np.ndarray, tf.Tensor)):
            self._check_data(x)
        return super().fit(x, *args, **kwargs)

    def negative_elbo(self, x):
        """One-sample `-(log p(x, z) - log q(z | x))` with `z ~ q(z | x)`: `[B]`. Its gradient
        reaches the generative nets only (binary samples pass none to the recognition nets)."""
        x = self._check_data(x)
        q = self.infer(x)
        values = {name: p["sample"] for name, p in q.items()}
        values.update(y1=x[:, :1], y2=x[:, 1:2])
        log_p = self.joint_log_prob(self.generate({}, forced=values), values)
        log_q = 0.0
        for level, layer in enumerate(self.recognition_layers, start=1):
            log_q = log_q + layer.log_prob(q[f"z{level}"], values[f"z{level}"])
        return log_q - log_p

    # ------------------------------------------------------------------ exact inference

    def _check_data(self, x):
        x = ops.convert_to_tensor(x, "float32")
        if len(x.shape) != 2 or x.shape[-1] != 2:
            raise ValueError(
                f"`x` must have shape [batch, 2] (columns y1, y2), got {tuple(x.shape)}."
            )
        if tf.executing_eagerly() and not bool(np.all(np.isfinite(ops.convert_to_numpy(x)))):
            raise ValueError(
                "`x` must be finite: the Gaussian emissions' support is the real line "
                "(found NaN or Inf)."
            )
        return x

    def _exact_chains(self, x, marginals=False):
        x = self._check_data(x)
        y1, y2 = x[:, :1], x[:, 1:2]
        states = ops.convert_to_tensor(self._states)
        names = [n.name for n in self._nodes]
        middle = names.index("y2")

        def transitions(layer_names):
            return [
                _bernoulli_log_prob_states(
                    self._layer(name)(states, value=states)["logits"], states
                )
                for name in layer_names
            ]

        def emission(name, y):
            locs = self._layer(name)(states, value=ops.zeros_like(states[:, :1]))["loc"]
            return _normal_log_prob_states(y, locs, self.emission_scale)

        root = self.generative_layers[0](states[:1], value=states[:1])["logits"]
        top_first = _bernoulli_log_prob_states(root, states)
        top = _chain(top_first, transitions(names[1:middle]), emission("y2", y2), marginals)
        below = names[middle + 1 : -1]
        bottom_first = _bernoulli_log_prob_states(
            self._layer(below[0])(y2, value=ops.zeros((ops.shape(y2)[0], self.latent_units)))[
                "logits"
            ],
            states,
        )
        bottom = _chain(bottom_first, transitions(below[1:]), emission("y1", y1), marginals)
        return top, bottom

    def log_prob(self, x):
        """Exact `log p(y1, y2)` `[B]` of standardised data `x` `[B, 2]` (columns `y1, y2`), by
        enumeration of every latent state (module docstring). Raises ValueError for data of the
        wrong shape or outside the emissions' support (NaN, Inf)."""
        top, bottom = self._exact_chains(x)
        return top + bottom

    def encode(self, x):
        """Exact posterior marginals `p(z_l,u = 1 | x)` `[B, layers * latent_units]`, layers in
        node order (`z_L` first, `z_1` last): the two halves are independent given `y2`."""
        (_, top), (_, bottom) = self._exact_chains(x, marginals=True)
        states = ops.convert_to_tensor(self._states)
        return ops.concatenate([ops.matmul(p, states) for p in top + bottom], axis=-1)

    # ------------------------------------------------------------------ serialisation

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units,
            latent_units=self.latent_units,
            layers=self.num_layers,
            emission_scale=self.emission_scale,
            activation=self.activation,
            seed=self.seed,
        )
        return config
