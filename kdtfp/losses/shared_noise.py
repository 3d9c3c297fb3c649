"""Node-by-node divergences for shared-noise distillation of directed generative models.

Each loss compares a teacher node's parameters (`y_true`) with the student's (`y_pred`), both
parameter dicts as returned by `kdtfp.layers.GaussianLatent` / `BernoulliLatent` (and their
roots). Values are per example (and per step for sequences): the divergence is **summed over
the last axis** (the node's units) and Keras averages the rest, so a `[B, units]` node gives the
batch mean of the per-example divergence and a `[B, T, units]` node the mean per step.

Output terms use `GaussianKL` / `BernoulliKL`: with shared noise `E_eps KL(p_T(x|eps) || p_S(x|eps))`
upper-bounds `KL(p_T(x) || p_S(x))` (METHODS 3.3). Latent terms use `GaussianW2` or `GaussianKL`
for Gaussian nodes and `BernoulliKL` for binary ones, each side under its own parents.
"""

from __future__ import annotations

import keras
from keras import ops


def _params(params, keys, name):
    if not isinstance(params, dict) or any(key not in params for key in keys):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"`{name}` must be a dict with keys {list(keys)}, got {got}.")
    return [ops.cast(params[key], "float32") for key in keys]


@keras.saving.register_keras_serializable(package="kdtfp")
class GaussianKL(keras.losses.Loss):
    """`KL(N(loc_T, scale_T^2) || N(loc_S, scale_S^2))` for diagonal Gaussians, summed over units.

    ```
    KL = sum_i log(s_S / s_T) + (s_T^2 + (m_T - m_S)^2) / (2 s_S^2) - 1/2
    ```

    With a fixed, equal scale `sigma` (an emission with fixed sd) this is
    `||m_T - m_S||^2 / (2 sigma^2)`.

    Example:

    >>> loss = kdtfp.losses.GaussianKL()
    >>> loss({"loc": mt, "scale": st}, {"loc": ms, "scale": ss})
    """

    def __init__(self, name="gaussian_kl", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        loc_t, scale_t = _params(y_true, ("loc", "scale"), "y_true")
        loc_s, scale_s = _params(y_pred, ("loc", "scale"), "y_pred")
        log_ratio = ops.log(scale_s) - ops.log(scale_t)
        ratio = ops.square(scale_t / scale_s) + ops.square((loc_t - loc_s) / scale_s)
        return ops.sum(log_ratio + 0.5 * (ratio - 1.0), axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class GaussianW2(keras.losses.Loss):
    """Squared 2-Wasserstein distance of diagonal Gaussians, summed over units:
    `||loc_T - loc_S||^2 + ||scale_T - scale_S||^2`.

    Symmetric and bounded by the parameter gap, it does not blow up when a scale is small,
    which makes it the latent loss of choice for deep Gaussian hierarchies (METHODS 3.4).

    Example:

    >>> kdtfp.losses.GaussianW2()({"loc": mt, "scale": st}, {"loc": ms, "scale": ss})
    """

    def __init__(self, name="gaussian_w2", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        loc_t, scale_t = _params(y_true, ("loc", "scale"), "y_true")
        loc_s, scale_s = _params(y_pred, ("loc", "scale"), "y_pred")
        return ops.sum(ops.square(loc_t - loc_s) + ops.square(scale_t - scale_s), axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class BernoulliKL(keras.losses.Loss):
    """`KL(Bern(sigmoid(l_T)) || Bern(sigmoid(l_S)))` summed over units, in log-sigmoid form:

    ```
    KL = p_T (log_sigmoid(l_T) - log_sigmoid(l_S)) + (1 - p_T) (log_sigmoid(-l_T) - log_sigmoid(-l_S))
    ```

    Its gradient in `l_S` equals that of the authors' BCE-with-logits of the student logits
    against the teacher probabilities (the two differ by the teacher's entropy, a constant).

    Example:

    >>> kdtfp.losses.BernoulliKL()({"logits": lt}, {"logits": ls})
    """

    def __init__(self, name="bernoulli_kl", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        (logits_t,) = _params(y_true, ("logits",), "y_true")
        (logits_s,) = _params(y_pred, ("logits",), "y_pred")
        p_t = ops.sigmoid(logits_t)
        on = ops.log_sigmoid(logits_t) - ops.log_sigmoid(logits_s)
        off = ops.log_sigmoid(-logits_t) - ops.log_sigmoid(-logits_s)
        return ops.sum(p_t * on + (1.0 - p_t) * off, axis=-1)


@keras.saving.register_keras_serializable(package="kdtfp")
class PerExampleMean(keras.losses.Loss):
    """Averages per-example values `y_pred` (e.g. a model's negative ELBO); ignores `y_true`.

    Wrapping a hand-computed per-example term in a `Loss` makes Keras scale it per replica
    under `tf.distribute` (DESIGN rule 5).

    Example:

    >>> kdtfp.losses.PerExampleMean(name="data_loss")(None, model.negative_elbo(x))
    """

    def __init__(self, name="per_example_mean", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        y_true = ops.zeros_like(y_pred) if y_true is None else y_true
        return super().__call__(y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred):
        return ops.cast(y_pred, "float32")
