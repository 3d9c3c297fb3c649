"""`MixturePredictive`: a mixture of logistic regressors, the compact student of a Bayesian
predictive (Snelson & Ghahramani 2005; Papamakarios 2015, part B; METHODS.md §5.4)."""

from __future__ import annotations

import math
import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdtfp")
class MixturePredictive(keras.Model):
    """A mixture of `M` logistic regressors: `f(x) = sum_m pi_m sigmoid(v_m . x + b_m)`.

    The student that replaces a Monte Carlo predictive `g(x) = (1/S) sum_s sigmoid(w_s . x)`
    over `S` posterior samples (`S x D` stored floats) by `M << S` components (`M x D` floats).
    With the defaults it is the thesis's student: equal weights `pi_m = 1/M` and no biases.

    `call(x)` maps `[B, D]` inputs to the **log-probabilities of the two classes**
    `[B, 2] = [log(1 - f(x)), log f(x)]`, computed in log space,

    ```python
    a = x @ kernel (+ bias)                              # [B, M]
    log_pi = log_softmax(mixture_logits)  # or -log(M)  # [M]
    log f = logsumexp(log_pi - softplus(-a), axis=-1)
    log(1 - f) = logsumexp(log_pi - softplus(a), axis=-1)
    ```

    so that outputs are valid logits (`softmax` of them is `[1 - f, f]`): train with
    `keras.losses.CategoricalCrossentropy(from_logits=True)` against soft targets
    `[1 - g(x), g(x)]` (the cross-entropy to the teacher's predictive), evaluate with any
    logits-based metric, and export with `kdtfp.export.export_student`, whose `serve` endpoint
    then returns `[1 - f, f]` and whose extra `prob_positive` endpoint returns `f(x)`, `[B]`.
    Outputs are float32 whatever the dtype policy.

    Args:
        num_components: int >= 1, the number of logistic regressors `M`.
        use_bias: learn a bias `b_m` per component (the thesis's student has none; append a
            constant input instead to share the teacher's parametrisation).
        learn_weights: learn the mixture weights `pi = softmax(mixture_logits)` (initialised
            equal) instead of fixing them to `1/M`.
        kernel_initializer: initializer of the `[D, M]` kernel.
        seed: optional int seed of the default kernel initializer.

    Example:

    >>> student = MixturePredictive(num_components=10)
    >>> student.compile(
    ...     optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True)
    ... )
    >>> student.fit(transfer_dataset, steps_per_epoch=5000)  # (x [b, D], targets [b, 2])
    >>> student.probability(x)  # p(y = 1 | x), [B]
    """

    def __init__(
        self,
        num_components: int = 10,
        use_bias: bool = False,
        learn_weights: bool = False,
        kernel_initializer=None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        ok = isinstance(num_components, numbers.Integral) and not isinstance(num_components, bool)
        if not ok or num_components < 1:
            raise ValueError(
                f"`num_components` must be an int >= 1. Received: num_components={num_components!r}"
            )
        self.num_components = int(num_components)
        self.use_bias = bool(use_bias)
        self.learn_weights = bool(learn_weights)
        self.seed = seed
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"`inputs` must be [batch, D] with a known D. Received shape {tuple(input_shape)}."
            )
        dim = int(input_shape[-1])
        self.kernel = self.add_weight(
            shape=(dim, self.num_components), initializer=self.kernel_initializer, name="kernel"
        )
        self.bias = (
            self.add_weight(shape=(self.num_components,), initializer="zeros", name="bias")
            if self.use_bias
            else None
        )
        self.mixture_logits = (
            self.add_weight(
                shape=(self.num_components,), initializer="zeros", name="mixture_logits"
            )
            if self.learn_weights
            else None
        )
        self.built = True

    def component_logits(self, inputs):
        """`v_m . x + b_m` for every component, `[B, M]` float32."""
        inputs = ops.cast(inputs, "float32")
        logits = ops.matmul(inputs, ops.cast(self.kernel, "float32"))
        if self.bias is not None:
            logits = logits + ops.cast(self.bias, "float32")
        return logits

    def log_mixture_weights(self):
        """`log pi`, `[M]` float32."""
        if self.mixture_logits is None:
            return ops.full((self.num_components,), -math.log(self.num_components), "float32")
        return ops.log_softmax(ops.cast(self.mixture_logits, "float32"))

    def call(self, inputs):
        logits = self.component_logits(inputs)
        log_weights = self.log_mixture_weights()
        log_positive = ops.logsumexp(log_weights - ops.softplus(-logits), axis=-1)
        log_negative = ops.logsumexp(log_weights - ops.softplus(logits), axis=-1)
        return ops.stack([log_negative, log_positive], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)

    def probability(self, inputs):
        """`p(y = 1 | x) = f(x)`, `[B]` float32."""
        return ops.exp(self(inputs)[:, 1])

    def export_endpoints(self):
        """Extra SavedModel endpoints for `kdtfp.export.export_student`."""
        return {"prob_positive": lambda inputs: ops.exp(self(inputs, training=False)[:, 1])}

    @property
    def stored_floats(self) -> int:
        """Floats the student keeps: the kernel (and biases and mixture logits if learned)."""
        return int(sum(math.prod(w.shape) for w in self.weights))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_components=self.num_components,
            use_bias=self.use_bias,
            learn_weights=self.learn_weights,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["kernel_initializer"] = keras.initializers.deserialize(config["kernel_initializer"])
        return cls(**config)
