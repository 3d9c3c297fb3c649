"""Latent and emission layers with explicit noise, for shared-noise distillation (Chen et al.).

Every random node of a directed generative model is written as a deterministic function of its
parents and an exogenous noise variable (METHODS 3.3):

```
Gaussian:   z = loc(pa) + scale(pa) * eps,      eps ~ N(0, I)
Bernoulli:  z = 1[u < sigmoid(logits(pa))],      u  ~ U(0, 1)
```

A teacher and a student that are given the same noise can then be compared node by node. The
layers return parameter dicts (DESIGN rule 4: layers output tensors, not distributions) that
always hold the `"sample"` and the distribution's parameters; `make_distribution(params)` builds
the TFP distribution for log-probabilities and KLs.

A node is *forced* with `value=`: its sample is the given value (observed data, a teacher-forced
middle node, or the teacher's sample in local distillation) and no noise is used.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from kdtfp.seed_state import SavesSeedState

tfd = tfp.distributions


def _check_units(units):
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
        raise ValueError(f"`units` must be an int >= 1, got {units!r}.")
    return int(units)


def _check_hidden(hidden_units):
    if isinstance(hidden_units, (int, np.integer)):
        hidden_units = (hidden_units,)
    hidden_units = tuple(hidden_units or ())
    for width in hidden_units:
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise ValueError(f"`hidden_units` must be ints >= 1, got {hidden_units!r}.")
    return tuple(int(width) for width in hidden_units)


def _concat_parents(parents):
    if isinstance(parents, (list, tuple)):
        parents = [ops.cast(p, "float32") for p in parents]
        return parents[0] if len(parents) == 1 else ops.concatenate(parents, axis=-1)
    return ops.cast(parents, "float32")


def _check_noise(noise, shape, kind):
    """`noise` must have the node's shape (static dims only: the batch may be unknown)."""
    noise = ops.cast(noise, "float32")
    expected, got = tuple(shape), tuple(noise.shape)
    if len(expected) != len(got) or any(
        e is not None and g is not None and e != g for e, g in zip(expected, got, strict=True)
    ):
        raise ValueError(
            f"`noise` has shape {got} but this {kind} node needs {expected} "
            "(teacher and student must share the noise layout)."
        )
    return noise


class _Node(SavesSeedState, keras.layers.Layer):
    """What every node layer shares: `log_prob` from its `make_distribution`, and a seed state
    saved with its weights."""

    def log_prob(self, params, x):
        """`log p(x | parents)` summed over the node's units: shape `params`' batch shape."""
        return self.make_distribution(params).log_prob(ops.cast(x, "float32"))


class _ConditionalNode(_Node):
    """An MLP from the (concatenated) parents to the node's distribution parameters."""

    def __init__(self, units, hidden_units=(), activation="relu", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _check_units(units)
        self.hidden_units = _check_hidden(hidden_units)
        self.activation = activation
        self.seed = seed
        self.hidden = [
            keras.layers.Dense(width, activation=activation, name=f"hidden_{i}")
            for i, width in enumerate(self.hidden_units)
        ]
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, parents_shape):
        """Builds the MLP for parents of shape `[..., P]` (or a list of such shapes)."""
        if (
            isinstance(parents_shape, (list, tuple))
            and parents_shape
            and isinstance(parents_shape[0], (list, tuple))
        ):
            width = sum(int(shape[-1]) for shape in parents_shape)
            parents_shape = tuple(parents_shape[0][:-1]) + (width,)
        shape = tuple(parents_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        for head in self._heads():
            head.build(shape)

    def _features(self, parents):
        h = _concat_parents(parents)
        for layer in self.hidden:
            h = layer(h)
        return h

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            hidden_units=list(self.hidden_units),
            activation=self.activation,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class GaussianLatent(_ConditionalNode):
    """Gaussian conditional `p(z | pa) = N(loc(pa), diag(scale(pa)^2))` with explicit noise.

    `sample = loc + scale * noise`, so gradients flow through the sample to the parents.

    Args:
        units: size of the node.
        hidden_units: widths of the hidden Dense layers from the parents (empty: linear).
        activation: activation of the hidden layers.
        scale: a fixed positive standard deviation (e.g. an emission with sd 0.5); when None
            the scale is learned: `softplus(Dense(h)) + min_scale`.
        min_scale: floor of a learned scale, for stable log-densities.
        seed: seed of the noise drawn when `call` gets none.

    Call arguments:
        parents: tensor `[..., P]` or a list of them (concatenated on the last axis).
        noise: `[..., units]` standard normal noise; drawn when None.
        value: `[..., units]`; if given it is the sample (observed or forced node).

    Returns:
        dict with `"loc"`, `"scale"` and `"sample"`, each `[..., units]` float32.

    Example:

    >>> layer = kdtfp.layers.GaussianLatent(8, hidden_units=[32])
    >>> params = layer(parents, noise=tf.random.normal([batch, 8]))
    >>> layer.make_distribution(params).log_prob(params["sample"])  # [batch]
    """

    noise_kind = "gaussian"

    def __init__(
        self,
        units,
        hidden_units=(),
        activation="relu",
        scale=None,
        min_scale=1e-4,
        seed=None,
        **kwargs,
    ):
        super().__init__(units, hidden_units, activation, seed, **kwargs)
        if scale is not None and not (np.isfinite(scale) and float(scale) > 0):
            raise ValueError(f"`scale` must be a positive float or None, got {scale!r}.")
        if not (np.isfinite(min_scale) and float(min_scale) >= 0):
            raise ValueError(f"`min_scale` must be a float >= 0, got {min_scale!r}.")
        self.scale = None if scale is None else float(scale)
        self.min_scale = float(min_scale)
        self.loc_layer = keras.layers.Dense(self.units, name="loc")
        self.scale_layer = (
            None if scale is not None else keras.layers.Dense(self.units, name="scale")
        )

    def _heads(self):
        return [self.loc_layer] + ([self.scale_layer] if self.scale_layer is not None else [])

    def call(self, parents, noise=None, value=None):
        h = self._features(parents)
        loc = self.loc_layer(h)
        if self.scale_layer is None:
            scale = ops.ones_like(loc) * self.scale
        else:
            scale = ops.softplus(self.scale_layer(h)) + self.min_scale
        if value is not None:
            sample = ops.cast(value, "float32")
        else:
            if noise is None:
                noise = keras.random.normal(ops.shape(loc), seed=self.seed_generator)
            else:
                noise = _check_noise(noise, loc.shape, "Gaussian")
            sample = loc + scale * noise
        return {"loc": loc, "scale": scale, "sample": sample}

    @staticmethod
    def make_distribution(params):
        """`tfd.Independent(tfd.Normal(loc, scale), 1)` from the parameter dict."""
        return tfd.Independent(tfd.Normal(params["loc"], params["scale"]), 1)

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale, min_scale=self.min_scale)
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class BernoulliLatent(_ConditionalNode):
    """Bernoulli conditional `p(z | pa) = Bernoulli(sigmoid(logits(pa)))` with explicit noise.

    `sample = 1[noise < sigmoid(logits)]` with `noise ~ U(0, 1)`. The threshold passes no
    gradient (no straight-through estimator: that would be a different method, METHODS 3.9);
    such a node learns from its own term of the latent loss.

    Args:
        units, hidden_units, activation, seed: as for `GaussianLatent`.

    Call arguments:
        parents: tensor `[..., P]` or a list of them.
        noise: `[..., units]` uniform noise in [0, 1); drawn when None.
        value: `[..., units]` in {0, 1}; if given it is the sample.

    Returns:
        dict with `"logits"` and `"sample"`, each `[..., units]` float32.

    Example:

    >>> layer = kdtfp.layers.BernoulliLatent(2, hidden_units=[8])
    >>> params = layer(parents, noise=tf.random.uniform([batch, 2]))
    """

    noise_kind = "uniform"

    def __init__(self, units, hidden_units=(), activation="relu", seed=None, **kwargs):
        super().__init__(units, hidden_units, activation, seed, **kwargs)
        self.logits_layer = keras.layers.Dense(self.units, name="logits")

    def _heads(self):
        return [self.logits_layer]

    def call(self, parents, noise=None, value=None):
        logits = self.logits_layer(self._features(parents))
        return {"logits": logits, "sample": _bernoulli_sample(logits, noise, value, self)}

    @staticmethod
    def make_distribution(params):
        """`tfd.Independent(tfd.Bernoulli(logits), 1)` (float samples) from the parameter dict."""
        return tfd.Independent(tfd.Bernoulli(logits=params["logits"], dtype=tf.float32), 1)


def _bernoulli_sample(logits, noise, value, layer):
    if value is not None:
        return ops.cast(value, "float32")
    if noise is None:
        noise = keras.random.uniform(ops.shape(logits), seed=layer.seed_generator)
    else:
        noise = _check_noise(noise, logits.shape, "Bernoulli")
    return ops.cast(ops.less(noise, ops.sigmoid(logits)), "float32")


@keras.saving.register_keras_serializable(package="kdtfp")
class GaussianRoot(_Node):
    """A parentless Gaussian node: `N(0, I)`, or `N(loc, diag(scale^2))` learned (`learn=True`).

    Call arguments: `noise` `[..., units]` (gives the batch shape) and optional `value`.
    Returns the same dict as `GaussianLatent`.

    Example:

    >>> top = kdtfp.layers.GaussianRoot(4)
    >>> params = top(tf.random.normal([batch, 4]))   # params["sample"] is the noise itself
    """

    noise_kind = "gaussian"

    def __init__(self, units, learn=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _check_units(units)
        self.learn = bool(learn)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        if self.learn:
            self.loc = self.add_weight(name="loc", shape=(self.units,), initializer="zeros")
            # softplus(0.5413) = 1: a standard normal at initialisation.
            self.raw_scale = self.add_weight(
                name="raw_scale",
                shape=(self.units,),
                initializer=keras.initializers.Constant(0.5413),
            )

    def call(self, noise, value=None):
        reference = ops.cast(value if value is not None else noise, "float32")
        _check_noise(reference, (None,) * (len(reference.shape) - 1) + (self.units,), "Gaussian")
        if self.learn:
            loc = ops.zeros_like(reference) + self.loc
            scale = ops.zeros_like(reference) + ops.softplus(self.raw_scale)
        else:
            loc, scale = ops.zeros_like(reference), ops.ones_like(reference)
        sample = reference if value is not None else loc + scale * reference
        return {"loc": loc, "scale": scale, "sample": sample}

    make_distribution = staticmethod(GaussianLatent.make_distribution)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, learn=self.learn, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class BernoulliRoot(_Node):
    """A parentless Bernoulli node with learned logits (a bias-free linear map of a constant 1).

    Call arguments: `noise` `[..., units]` uniform (gives the batch shape) and optional `value`.
    Returns the same dict as `BernoulliLatent`.

    Example:

    >>> top = kdtfp.layers.BernoulliRoot(2)
    >>> params = top(tf.random.uniform([batch, 2]))
    """

    noise_kind = "uniform"

    def __init__(self, units, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _check_units(units)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.logits = self.add_weight(name="logits", shape=(self.units,), initializer="zeros")

    def call(self, noise, value=None):
        reference = ops.cast(value if value is not None else noise, "float32")
        _check_noise(reference, (None,) * (len(reference.shape) - 1) + (self.units,), "Bernoulli")
        logits = ops.zeros_like(reference) + self.logits
        return {"logits": logits, "sample": _bernoulli_sample(logits, noise, value, self)}

    make_distribution = staticmethod(BernoulliLatent.make_distribution)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, seed=self.seed)
        return config
