"""Small shared-noise models for the core tests: a linear-Gaussian chain (closed-form marginal)
and a three-layer chain with a Bernoulli layer."""

from __future__ import annotations

import keras
import numpy as np

from kdtfp.layers.latent import BernoulliLatent, GaussianLatent, GaussianRoot
from kdtfp.models.generative import Node, SharedNoiseModel

EMISSION_SD = 0.5


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class LinearGaussian(SharedNoiseModel, keras.Model):
    """`z ~ N(0, I_2)`, `x | z ~ N(A z + b, 0.25 I_4)`: marginal `N(b, A A^T + 0.25 I)`."""

    def __init__(self, latent=2, data=4, **kwargs):
        super().__init__(**kwargs)
        self.latent, self.data = latent, data
        self.prior = GaussianRoot(latent, name="z")
        self.emission = GaussianLatent(data, scale=EMISSION_SD, name="x")
        self.emission.build((None, latent))

    @property
    def nodes(self):
        return [
            Node("z", "gaussian", "latent", (self.latent,)),
            Node("x", "gaussian", "observed", (self.data,)),
        ]

    def generate(self, noise, forced=None, training=False):
        forced = forced or {}
        z = self.prior(noise["z"], value=forced.get("z"))
        x = self.emission(z["sample"], noise=noise["x"], value=forced.get("x"))
        return {"z": z, "x": x}

    def call(self, inputs):
        return self.generate(inputs)["x"]["loc"]

    def matrices(self):
        kernel, bias = (np.asarray(w, np.float64) for w in self.emission.loc_layer.get_weights())
        return kernel.T, bias  # x = A z + b with A = kernel^T

    def get_config(self):
        return {**super().get_config(), "latent": self.latent, "data": self.data}


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class Chain(SharedNoiseModel, keras.Model):
    """`z1 ~ N(0, I)` -> `b | z1` Bernoulli -> `z2 | b` Gaussian -> `x | z2` Gaussian (sd 0.5)."""

    def __init__(self, hidden=8, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.top = GaussianRoot(2, name="z1")
        self.middle = BernoulliLatent(3, hidden_units=[hidden], name="b")
        self.lower = GaussianLatent(2, hidden_units=[hidden], name="z2")
        self.emission = GaussianLatent(3, hidden_units=[hidden], scale=EMISSION_SD, name="x")
        self.middle.build((None, 2))
        self.lower.build((None, 3))
        self.emission.build((None, 2))

    @property
    def nodes(self):
        return [
            Node("z1", "gaussian", "latent", (2,)),
            Node("b", "bernoulli", "latent", (3,)),
            Node("z2", "gaussian", "latent", (2,)),
            Node("x", "gaussian", "observed", (3,)),
        ]

    def generate(self, noise, forced=None, training=False):
        forced = forced or {}
        z1 = self.top(noise["z1"], value=forced.get("z1"))
        b = self.middle(z1["sample"], noise=noise["b"], value=forced.get("b"))
        z2 = self.lower(b["sample"], noise=noise["z2"], value=forced.get("z2"))
        x = self.emission(z2["sample"], noise=noise["x"], value=forced.get("x"))
        return {"z1": z1, "b": b, "z2": z2, "x": x}

    def negative_elbo(self, x):
        # Not a real ELBO: a data term for the data-assisted path of the tests.
        params = self.generate(self.sample_noise(keras.ops.shape(x)[0]))
        return -self.emission.log_prob(params["x"], x)

    def call(self, inputs):
        return self.generate(inputs)["x"]["loc"]

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden}
