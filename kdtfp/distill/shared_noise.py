"""`SharedNoiseDistiller`: distils a directed generative model with shared noise (Chen et al.)."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from kdtfp.distill.distiller import unscale_loss_for_distribution
from kdtfp.distill.objective import check_weight
from kdtfp.distill.safe_compile import SafeCompile
from kdtfp.losses.shared_noise import BernoulliKL, GaussianKL, GaussianW2, PerExampleMean
from kdtfp.models.generative import check_same_layout

NOISE = "noise"
DATA = "data"
LATENT_DIVERGENCES = ("w2", "kl")


def split_noise_inputs(inputs):
    """`(noise, data_or_None)` from a plain noise dict or `{"noise": ..., "data": ...}`."""
    if isinstance(inputs, dict) and NOISE in inputs:
        return inputs[NOISE], inputs.get(DATA)
    return inputs, None


@keras.saving.register_keras_serializable(package="kdtfp")
class SharedNoiseDistiller(SafeCompile, keras.Model):
    """Trains `student` to reproduce a frozen `teacher` generative model driven by the same noise.

    Each step the teacher runs ancestrally on a noise batch `eps`; the student runs on **the same
    noise through its own layers** (its latents are its own functions of `eps`), and

    ```
    loss = sum_{observed x}  KL(p_T(x | eps) || p_S(x | eps))                  # "output_kl"
         + latent_weight * sum_{latent z} d(p_T(z | pa_T(eps)), p_S(z | pa_S(eps)))   # "latent_loss"
         + data_weight * E_data[-ELBO_S(x)]                                     # "data_loss"
    ```

    with `d` the squared 2-Wasserstein distance (`latent_divergence="w2"`) or the KL for Gaussian
    latents and the Bernoulli KL for binary ones (METHODS 3.3). The output term upper-bounds
    `KL(p_T(x) || p_S(x))`. Nodes in `teacher_forced` (observed middle nodes such as the
    Helmholtz machine's `y2` or a VRNN's `x_{<t}`) pass the teacher's sample on to their children
    in the student; their own conditionals keep their output terms.

    **Local distillation** (`local=True`), the baseline: every latent of the student takes the
    teacher's sample, so each conditional is fitted at the teacher's parents; errors then
    accumulate through the layers at generation time.

    **Inputs.** Data-free: `fit(teacher.noise_dataset(batch_size), steps_per_epoch=...)`, the
    teacher's samples are the data. Data-assisted: batches `{"noise": eps, "data": x}` with
    `data_weight > 0` add the student's negative ELBO on real data (`student.negative_elbo`).
    Every term is a `keras.losses.Loss`, so Keras scales it per replica (DESIGN rule 5).

    Args:
        student, teacher: `kdtfp.models.generative.SharedNoiseModel`s with the same node layout.
        latent_weight: lambda >= 0 of the latent term.
        latent_divergence: "w2" or "kl" for Gaussian latents.
        teacher_forced: names of observed nodes the student reads from the teacher.
        local: local distillation instead of shared-noise ancestral distillation.
        data_weight: weight >= 0 of the student's negative ELBO on `inputs["data"]`.
        seed: kept for configuration; the noise comes with the inputs.

    Example:

    >>> distiller = kdtfp.distill.SharedNoiseDistiller(student, teacher, latent_weight=0.1)
    >>> distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> distiller.fit(teacher.noise_dataset(256), steps_per_epoch=500)
    """

    def __init__(
        self,
        student,
        teacher,
        latent_weight=1.0,
        latent_divergence="w2",
        teacher_forced=(),
        local=False,
        data_weight=0.0,
        seed=None,
        name="shared_noise_distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if student is teacher:
            raise ValueError("`student` and `teacher` are the same model.")
        check_same_layout(teacher, student)
        self.latent_weight = check_weight(latent_weight, "latent_weight")
        self.data_weight = check_weight(data_weight, "data_weight")
        if latent_divergence not in LATENT_DIVERGENCES:
            raise ValueError(
                f"`latent_divergence` must be one of {LATENT_DIVERGENCES}, got {latent_divergence!r}."
            )
        if isinstance(teacher_forced, str):
            teacher_forced = (teacher_forced,)
        teacher_forced = tuple(teacher_forced)
        observed = [n.name for n in teacher.nodes if n.role == "observed"]
        for node_name in teacher_forced:
            if node_name not in observed:
                raise ValueError(
                    f"`teacher_forced` names {node_name!r}, which is not an observed node of the "
                    f"teacher; observed nodes: {observed}."
                )
        if self.data_weight > 0 and not hasattr(student, "negative_elbo"):
            raise ValueError("`data_weight` > 0 needs a student with `negative_elbo(x)`.")

        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.latent_divergence = latent_divergence
        self.teacher_forced = teacher_forced
        self.local = bool(local)
        self.seed = seed
        self.output_losses = {
            "gaussian": GaussianKL(name="output_gaussian_kl"),
            "bernoulli": BernoulliKL(name="output_bernoulli_kl"),
        }
        self.latent_losses = {
            "gaussian": GaussianW2(name="latent_w2")
            if latent_divergence == "w2"
            else GaussianKL(name="latent_kl"),
            "bernoulli": BernoulliKL(name="latent_bernoulli_kl"),
        }
        self.data_loss = PerExampleMean(name="data_loss")
        self.output_tracker = keras.metrics.Mean(name="output_kl")
        self.latent_tracker = keras.metrics.Mean(name="latent_loss")
        self.data_tracker = keras.metrics.Mean(name="data_loss") if self.data_weight > 0 else None

    def build(self, input_shape=None):
        # Teacher and student build themselves on their first `generate`.
        self.built = True

    # ------------------------------------------------------------------ forward and loss

    def call(self, inputs, training=None):
        """Runs teacher and student on the noise; returns `{"teacher": ..., "student": ...}`,
        each a dict node name -> parameter dict."""
        noise, _ = split_noise_inputs(inputs)
        self.teacher.check_noise(noise)
        teacher = self.teacher.generate(noise, training=False)
        teacher = tf.nest.map_structure(ops.stop_gradient, teacher)
        forced = {name: teacher[name]["sample"] for name in self.teacher_forced}
        if self.local:
            for node in self.teacher.nodes:
                if node.role == "latent":
                    forced[node.name] = teacher[node.name]["sample"]
        student = self.student.generate(noise, forced=forced, training=training)
        return {"teacher": teacher, "student": student}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        noise, data = split_noise_inputs(x)
        teacher, student = y_pred["teacher"], y_pred["student"]
        batch_size = ops.shape(tf.nest.flatten(noise)[0])[0]

        output = ops.zeros((), "float32")
        latent = ops.zeros((), "float32")
        for node in self.teacher.nodes:
            # A teacher-forced node passes the teacher's sample downstream, but its own
            # conditional (at the student's parents) is still a term: the joint KL over the
            # observed nodes given the noise is KL(y2 | eps) + E_{y2 ~ T} KL(y1 | y2, eps).
            losses = self.output_losses if node.role == "observed" else self.latent_losses
            value = losses[node.family](teacher[node.name], student[node.name], sample_weight)
            if node.role == "observed":
                output = output + value
            else:
                latent = latent + value
        total = output + self.latent_weight * latent
        self.output_tracker.update_state(
            unscale_loss_for_distribution(output), sample_weight=batch_size
        )
        self.latent_tracker.update_state(
            unscale_loss_for_distribution(latent), sample_weight=batch_size
        )
        if self.data_weight > 0:
            if data is None:
                raise ValueError(
                    '`data_weight` > 0 needs inputs {"noise": ..., "data": x} with real data.'
                )
            value = self.data_loss(None, self.student.negative_elbo(data), sample_weight)
            total = total + self.data_weight * value
            self.data_tracker.update_state(
                unscale_loss_for_distribution(value), sample_weight=batch_size
            )
        for loss in self.student.losses:
            total = total + ops.cast(self._aggregate_additional_loss(loss), "float32")
        return total

    # ------------------------------------------------------------------ serialisation

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "latent_weight": self.latent_weight,
            "latent_divergence": self.latent_divergence,
            "teacher_forced": list(self.teacher_forced),
            "local": self.local,
            "data_weight": self.data_weight,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("student", "teacher"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
