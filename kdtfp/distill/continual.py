"""`ContinualVAEDistiller`: continual learning of a conditional VAE by distilling its own
previous copy with shared noise (Chen et al. 2023; METHODS 3.4 and 3.8).

After learning the old task, the model learns a new task from real data while a frozen copy of
itself (the teacher) generates the old task. Every step sees a batch of `B` new-task examples
and `B` noise draws for the old task, and minimises

```
loss = (1 - s) * mean_B[-ELBO(x_new | new_task)]                       # rho = 1 - s
     + s * mean_B[ KL(p_T(x | eps, old) || p_S(x | eps, old))             # output term, z = eps
                 + latent_weight * d(q_T(z | x_T, old), q_S(z | x_T, old)) ]   # latent term
```

with `s = old_task_share` (METHODS 3.4 writes `rho ELBO(new) + (1 - rho) distillation`, `rho`
the new task's data fraction, so `rho = 1 - s`). The prior is fixed N(0, I) and shared through
the noise (`z = eps`, as in the authors' code), so its W2 is identically zero: the latent term
acts on the one learned latent conditional, the encoder, compared on the teacher's sample
`x_T = 1[u < p_T(x | eps)]` (`d` = squared W2 or Gaussian KL). Without it the encoder of the old
task drifts and its IWAE falls even when the decoder is preserved.

Baselines with the same batches, steps and share (`method`):

* `"replay"` (generative replay): the old-task term is the -ELBO of the teacher's samples `x_T`,
  labelled with the old task;
* `"finetune"`: the new-task -ELBO alone (the noise half of each batch is ignored).

All terms are `keras.losses.Loss` objects, so the step is replica-correct under
`tf.distribute` (DESIGN rule 5), and all randomness comes through the input dataset
(`continual_dataset`), so one step on N replicas equals one step on one device.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.distill.distiller import unscale_loss_for_distribution
from kdtfp.distill.safe_compile import SafeCompile
from kdtfp.losses.shared_noise import BernoulliKL, GaussianKL, GaussianW2, PerExampleMean
from kdtfp.models.conditional_vae import TASK, ConditionalVAE
from kdtfp.models.generative import check_same_layout
from kdtfp.models.rbm import check_binary

METHODS = ("distill", "replay", "finetune")
DIVERGENCES = ("w2", "kl")


def frozen_copy(model):
    """A frozen copy of a `ConditionalVAE` (same config and weights, `trainable=False`): the
    teacher of the next task. Build it inside the strategy scope that trains the model."""
    if not isinstance(model, ConditionalVAE):
        raise ValueError(f"`model` must be a ConditionalVAE, got {type(model).__name__}.")
    config = dict(model.get_config(), name=f"{model.name}_previous")
    copy = ConditionalVAE.from_config(config)
    copy.set_weights(model.get_weights())
    copy.trainable = False
    return copy


def continual_dataset(model, x_new, new_task, old_task, batch_size, seed=0):
    """The endless input of `ContinualVAEDistiller.fit`: each element is a dict of `B` rows,

    * `"data"` `[B, D]`: new-task examples (a repeated stream shuffled with a buffer of N, the
      same on every new iterator, so runs and replicas see the same batches), `"data_task"`
      `[B, T]` one-hot,
      `"data_noise"` `[B, L]`: the encoder noise of their ELBO;
    * `"noise"`: `{"z": [B, L], "x": [B, D], "task": [B, T]}` for the old task (shared by
      teacher and student), and `"replay_noise"` `[B, L]`: the encoder noise of replay's ELBO.

    Noise is stateless in the step (reproducible from `seed`); a global batch is split over the
    replicas like any batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    x_new = check_binary(np.asarray(x_new, np.float32), "x_new")
    if x_new.ndim != 2 or x_new.shape[1] != model.data_size or len(x_new) < batch_size:
        raise ValueError(
            f"`x_new` must be [N >= batch_size, {model.data_size}], got {x_new.shape}."
        )
    for task in (new_task, old_task):
        model.task_one_hot(task, 1)  # range check
    base = tf.constant([int(seed), 3], tf.int64)
    data = (
        tf.data.Dataset.from_tensor_slices(x_new)
        .repeat()  # then shuffle: a stream that is the same on every new iterator
        .shuffle(len(x_new), seed=seed, reshuffle_each_iteration=False)
        .batch(batch_size, drop_remainder=True)
    )

    def with_noise(step, x):
        step_seed = tf.random.experimental.stateless_fold_in(base, step)
        seeds = tf.random.experimental.stateless_split(step_seed, 3)
        noise = model.sample_noise(batch_size, seed=seeds[0], task=old_task)
        shape = (batch_size, model.latent_size)
        return {
            "data": x,
            "data_task": model.task_one_hot(new_task, batch_size),
            "data_noise": tf.random.stateless_normal(shape, seeds[1]),
            "noise": noise,
            "replay_noise": tf.random.stateless_normal(shape, seeds[2]),
        }

    return tf.data.Dataset.zip(tf.data.Dataset.counter(), data).map(with_noise).prefetch(2)


@keras.saving.register_keras_serializable(package="kdtfp")
class ContinualVAEDistiller(SafeCompile, keras.Model):
    """Trains `model` on a new task while it distils `previous_model` (frozen) on the old one.

    Args:
        model: the `ConditionalVAE` being trained (`.model` after `fit`).
        previous_model: its frozen copy after the old task (`frozen_copy(model)`), same layout.
        old_task_share: `s` in [0, 1], weight of the old-task term (the new-task ELBO gets
            `1 - s`; METHODS' rho = 1 - s). Default 0.5 (digits 0-4 vs 5-9 are half and half).
        latent_weight: lambda >= 0 on the encoder term (method "distill").
        method: "distill" (ours), "replay" (generative replay) or "finetune".
        latent_divergence: "w2" (squared 2-Wasserstein) or "kl" (KL(q_T || q_S)).

    Input: the dicts of `continual_dataset` (`fit(dataset, steps_per_epoch=...)`). Reported
    metrics (unweighted batch means, the same on N replicas as on one): `data_loss` (-ELBO of
    the new data), and `output_kl` + `latent_loss` (distill) or `replay_loss` (replay).

    Example:

    >>> teacher = frozen_copy(vae)
    >>> distiller = ContinualVAEDistiller(vae, teacher, old_task_share=0.5, latent_weight=1.0)
    >>> distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> distiller.fit(continual_dataset(vae, x_task1, 1, 0, 64), steps_per_epoch=1000)
    """

    def __init__(
        self,
        model,
        previous_model,
        old_task_share=0.5,
        latent_weight=1.0,
        method="distill",
        latent_divergence="w2",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("model", model), ("previous_model", previous_model)):
            if not isinstance(value, ConditionalVAE):
                raise ValueError(f"`{name}` must be a ConditionalVAE, got {type(value).__name__}.")
        if model is previous_model:
            raise ValueError("`previous_model` must be a frozen copy, not `model` itself.")
        check_same_layout(previous_model, model)
        if previous_model.num_tasks != model.num_tasks:
            raise ValueError(
                f"`previous_model` has {previous_model.num_tasks} tasks but `model` has "
                f"{model.num_tasks}: they must share the task input."
            )
        share = _check_float("old_task_share", old_task_share)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"`old_task_share` must be in [0, 1], got {old_task_share!r}.")
        weight = _check_float("latent_weight", latent_weight)
        if weight < 0:
            raise ValueError(f"`latent_weight` must be >= 0, got {latent_weight!r}.")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        if latent_divergence not in DIVERGENCES:
            raise ValueError(
                f"`latent_divergence` must be one of {DIVERGENCES}, got {latent_divergence!r}."
            )
        self.model = model
        self.previous_model = previous_model
        self.previous_model.trainable = False
        self.old_task_share = share
        self.latent_weight = weight
        self.method = method
        self.latent_divergence = latent_divergence
        self.data_loss = PerExampleMean(name="data_loss")
        self.replay_loss = PerExampleMean(name="replay_loss")
        self.output_loss = BernoulliKL(name="output_kl")
        self.latent_loss = GaussianW2() if latent_divergence == "w2" else GaussianKL()
        names = {"distill": ("output_kl", "latent_loss"), "replay": ("replay_loss",)}
        self.term_names = ("data_loss",) + names.get(method, ())
        self.term_trackers = {n: keras.metrics.Mean(name=n) for n in self.term_names}
        self.built = True  # both models build their weights in their constructors

    def build(self, input_shape=None):
        self.built = True

    @property
    def student(self):
        """The trained model (the name `SharedNoiseDistiller` uses)."""
        return self.model

    def call(self, inputs, training=False):
        _check_inputs(inputs)
        return self.model.negative_elbo(
            inputs["data"], inputs["data_task"], noise=inputs["data_noise"], training=training
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        _check_inputs(x)
        if y_pred is None:
            y_pred = self(x, training=training)
        batch_size = ops.shape(x["data"])[0]
        values = {"data_loss": self.data_loss(None, y_pred)}
        share = self.old_task_share
        if self.method == "finetune":
            total = values["data_loss"]
        else:
            noise = x["noise"]
            teacher = self.previous_model.generate(noise, training=False)
            x_old = ops.stop_gradient(teacher["x"]["sample"])
            if self.method == "replay":
                replay = self.model.negative_elbo(
                    x_old, noise[TASK], noise=x["replay_noise"], training=training
                )
                values["replay_loss"] = self.replay_loss(None, replay)
                old = values["replay_loss"]
            else:
                student = self.model.generate(noise, training=training)
                values["output_kl"] = self.output_loss(
                    _stop(teacher["x"], ("logits",)), student["x"]
                )
                q_teacher = self.previous_model.posterior(x_old, noise[TASK], training=False)
                q_student = self.model.posterior(x_old, noise[TASK], training=training)
                values["latent_loss"] = self.latent_loss(
                    _stop(q_teacher, ("loc", "scale")), _stop(q_student, ("loc", "scale"), False)
                )
                old = values["output_kl"] + self.latent_weight * values["latent_loss"]
            total = (1.0 - share) * values["data_loss"] + share * old
        for name, value in values.items():
            self.term_trackers[name].update_state(
                unscale_loss_for_distribution(value), sample_weight=batch_size
            )
        for loss in self.model.losses:
            total = total + self._aggregate_additional_loss(loss)
        return total

    def get_config(self):
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "previous_model": keras.saving.serialize_keras_object(self.previous_model),
            "old_task_share": self.old_task_share,
            "latent_weight": self.latent_weight,
            "method": self.method,
            "latent_divergence": self.latent_divergence,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("model", "previous_model"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def _check_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


_INPUT_KEYS = ("data", "data_task", "data_noise", "noise", "replay_noise")


def _check_inputs(inputs):
    if not isinstance(inputs, dict) or any(key not in inputs for key in _INPUT_KEYS):
        got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise ValueError(
            f"`x` must be a dict with keys {list(_INPUT_KEYS)} (see `continual_dataset`), "
            f"got {got}."
        )


def _stop(params, keys, stop=True):
    """The parameter dict restricted to `keys` (gradients stopped for the teacher's side)."""
    return {k: ops.stop_gradient(params[k]) if stop else params[k] for k in keys}
