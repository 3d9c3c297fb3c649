"""Stochastic-gradient Langevin dynamics (SGLD) and RMSprop-preconditioned SGLD as Keras 3 optimizers."""

from __future__ import annotations

import numbers

import keras
from keras import ops


def _check(name, value, ok, expected):
    if not ok:
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="kdtfp")
class SGLD(keras.optimizers.Optimizer):
    """Stochastic-gradient Langevin dynamics (Welling & Teh, 2011): each step is one sample.

    Keras hands the optimizer `g`, the gradient of the **mean** batch loss. With `N = data_size`,
    `eps` the learning rate and `T = temperature`, one step is

    ```python
    xi = keras.random.normal(w.shape, seed=seed_generator)   # N(0, I)
    w = w - eps * N * g + sqrt(2 * eps * T) * xi              # no noise while iterations < burn_in_steps
    ```

    `N * g` is an unbiased estimate of the gradient of the full-data loss `U(w) = N * mean loss`,
    so for small `eps` the iterates sample the density `exp(-U(w) / T)`. When the loss is the
    per-example negative log posterior (negative log likelihood plus the prior's share `1/N` of
    `-log p(w)`, e.g. `kdtfp.losses.TeacherDirichletPosterior` plus a regulariser scaled by `1/N`),
    `T = 1` samples the posterior; `T < 1` sharpens it ("cold posterior") and `T = 0` is plain
    SGD with learning rate `eps * N`. With a fixed `eps` the chain has an `O(eps)` bias (there is
    no Metropolis correction); a decaying `LearningRateSchedule` removes it asymptotically.

    The noise comes from `keras.random.normal` with a `keras.random.SeedGenerator` built with the
    optimizer, so it is reproducible from `seed`, saved with the optimizer's variables, and equal
    on every replica under `tf.distribute` (mirrored weights stay identical). The generator's
    state and the step counter `iterations` (which `burn_in_steps` reads) are optimizer
    variables, so `keras.callbacks.BackupAndRestore` restores both: a chain resumed from an
    epoch-end backup draws the same noise as an uninterrupted one, bit for bit on CPU with op
    determinism on (tests/distributed/test_recovery.py).

    Args:
        learning_rate: step size `eps` > 0: a float, a
            `keras.optimizers.schedules.LearningRateSchedule` or a callable. Defaults to 1e-4.
        data_size: int >= 1, the number `N` of training examples (required).
        temperature: float >= 0, the temperature `T` of the sampled density. Defaults to 1.
        burn_in_steps: int >= 0. For the first `burn_in_steps` iterations no noise is added
            (noise-free gradient moves toward the mode). To start from the mode found by Adam,
            as Fang et al. (2024) do, fit with `keras.optimizers.Adam` first, then recompile with
            this optimizer.
        seed: int or None, the seed of the noise.
        **kwargs: the base optimizer's keyword arguments (`name`, `clipnorm`, `weight_decay`, ...).

    Example:

    >>> opt = kdtfp.optimizers.SGLD(learning_rate=1e-4, data_size=len(x_train), seed=0)
    >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    >>> model.fit(x_train, y_train, callbacks=[kdtfp.callbacks.PosteriorSampler(...)])
    """

    def __init__(
        self,
        learning_rate=1e-4,
        *,
        data_size,
        temperature=1.0,
        burn_in_steps=0,
        seed=None,
        name="sgld",
        **kwargs,
    ):
        is_int = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)  # noqa: E731
        if isinstance(learning_rate, numbers.Real):
            _check("learning_rate", learning_rate, learning_rate > 0, "> 0")
        _check("data_size", data_size, is_int(data_size) and data_size >= 1, "an int >= 1")
        _check("temperature", temperature, float(temperature) >= 0, "a float >= 0")
        _check("burn_in_steps", burn_in_steps, is_int(burn_in_steps) and burn_in_steps >= 0,
               "an int >= 0")  # fmt: skip
        _check("seed", seed, seed is None or is_int(seed), "an int or None")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.data_size = int(data_size)
        self.temperature = float(temperature)
        self.burn_in_steps = int(burn_in_steps)
        self.seed = seed

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Built here, inside the distribution scope: each replica holds a copy of the state and
        # advances it in the same order, so every replica draws the same noise (DESIGN rule 7).
        self._seed_generator = keras.random.SeedGenerator(self.seed, name="sgld_seed")
        self._track_variable(self._seed_generator.state)

    def _preconditioner(self, scaled_gradient, variable):
        """The diagonal preconditioner `G` (None means the identity)."""
        return None

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.multiply(ops.cast(gradient, dtype), float(self.data_size))
        precond = self._preconditioner(grad, variable)
        scale = lr if precond is None else ops.multiply(lr, precond)
        if self.temperature == 0:
            self.assign_sub(variable, ops.multiply(scale, grad))
            return
        noise = keras.random.normal(tuple(variable.shape), dtype=dtype, seed=self._seed_generator)
        std = ops.sqrt(ops.multiply(scale, 2.0 * self.temperature))
        if self.burn_in_steps > 0:  # a Python branch: no per-step ops when there is no burn-in
            std = ops.multiply(
                std, ops.cast(ops.greater_equal(self.iterations, self.burn_in_steps), dtype)
            )
        self.assign_add(variable, ops.subtract(ops.multiply(std, noise), ops.multiply(scale, grad)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "data_size": self.data_size,
                "temperature": self.temperature,
                "burn_in_steps": self.burn_in_steps,
                "seed": self.seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="kdtfp")
class PSGLD(SGLD):
    """Preconditioned SGLD (Li et al., AAAI 2016) with an RMSprop diagonal preconditioner.

    With `g` the gradient of the mean batch loss, `N = data_size`, `eps` the learning rate,
    `T = temperature`, `rho` and `epsilon` as below, and `v` a per-weight slot starting at 0:

    ```python
    v = rho * v + (1 - rho) * (N * g) ** 2
    G = 1 / (epsilon + sqrt(v))
    w = w - eps * G * N * g + sqrt(2 * eps * T * G) * xi      # no noise while iterations < burn_in_steps
    ```

    As is standard, the correction term `Gamma(w)` (the derivative of `G`) is dropped. It is
    small only while `G` changes slowly compared with the chain's mixing: when `v` is driven by
    the chain's own position rather than by minibatch noise, a `rho` close to 1 is needed
    (sampling a 2-D Gaussian with exact gradients, `rho=0.99` inflated the variances by 40 %,
    `rho=0.999` by 8 %, `rho=0.9999` by 2 %). The sampled density and all other arguments are
    those of `SGLD`.

    Args:
        rho: float in (0, 1), the decay of the squared-gradient average. Defaults to 0.99.
        epsilon: float > 0, the preconditioner's damping `lambda` in Li et al. Defaults to 1e-5.
        **kwargs: the arguments of `SGLD` (`learning_rate`, `data_size`, ...).

    Example:

    >>> opt = kdtfp.optimizers.PSGLD(learning_rate=1e-4, data_size=len(x_train), seed=0)
    """

    def __init__(self, learning_rate=1e-4, *, rho=0.99, epsilon=1e-5, name="psgld", **kwargs):
        _check("rho", rho, 0 < float(rho) < 1, "in (0, 1)")
        _check("epsilon", epsilon, float(epsilon) > 0, "> 0")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho = float(rho)
        self.epsilon = float(epsilon)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._velocities = self.add_optimizer_variables(variables, "velocity")

    def _preconditioner(self, scaled_gradient, variable):
        v = self._velocities[self._get_variable_index(variable)]
        self.assign(
            v,
            ops.add(
                ops.multiply(self.rho, v), ops.multiply(1 - self.rho, ops.square(scaled_gradient))
            ),
        )
        return ops.divide(1.0, ops.add(ops.sqrt(v), self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update({"rho": self.rho, "epsilon": self.epsilon})
        return config
