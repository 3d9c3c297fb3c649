"""The shared-noise protocol of directed generative models, and their SavedModel export.

A model that can be distilled with `kdtfp.distill.SharedNoiseDistiller` lists its random nodes
in topological order (`nodes`) and runs ancestrally on a given noise dict (`generate`). Teacher
and student with the same node layout can then be driven by the same noise (METHODS 3.3).

```python
class MyModel(SharedNoiseModel, keras.Model):
    @property
    def nodes(self):
        return [Node("z", "gaussian", "latent", (4,)), Node("x", "bernoulli", "observed", (64,))]

    def generate(self, noise, forced=None, training=False):
        forced = forced or {}
        z = self.prior(noise["z"], value=forced.get("z"))
        x = self.decoder(z["sample"], noise=noise["x"], value=forced.get("x"))
        return {"z": z, "x": x}
```
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

FAMILIES = ("gaussian", "bernoulli")
ROLES = ("latent", "observed")


@dataclasses.dataclass(frozen=True)
class Node:
    """One random node: its `name`, distribution `family` ("gaussian" or "bernoulli"), `role`
    ("latent" or "observed") and per-example `shape` (without the batch axis), which is also the
    shape of its noise."""

    name: str
    family: str
    role: str
    shape: tuple

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Node {self.name!r}: `family` must be one of {FAMILIES}.")
        if self.role not in ROLES:
            raise ValueError(f"Node {self.name!r}: `role` must be one of {ROLES}.")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


class SharedNoiseModel:
    """Mixin for `keras.Model`s driven by explicit noise. Subclasses define `nodes` and
    `generate(noise, forced=None, training=False)`; the mixin draws and checks noise.

    List it before `keras.Model`: `class HelmholtzMachine(SharedNoiseModel, keras.Model)`.
    """

    @property
    def nodes(self):
        raise NotImplementedError

    def generate(self, noise, forced=None, training=False):
        """Runs the model ancestrally on `noise` (dict name -> `[B, *shape]`); a node in
        `forced` takes the given value as its sample. Returns dict name -> parameter dict."""
        raise NotImplementedError

    def node(self, name):
        for node in self.nodes:
            if node.name == name:
                return node
        raise ValueError(f"No node named {name!r}; nodes: {[n.name for n in self.nodes]}.")

    def sample_noise(self, batch_size, seed=None):
        """Noise for every node: N(0, 1) for Gaussian nodes, U(0, 1) for Bernoulli nodes.

        Args:
            batch_size: int or scalar int tensor.
            seed: None (fresh stateful noise each call) or a shape-[2] int seed (stateless:
                the same seed gives the same noise).

        Returns:
            dict name -> float32 `[batch_size, *node.shape]`.
        """
        noise = {}
        for index, node in enumerate(self.nodes):
            shape = tf.concat([tf.reshape(batch_size, [1]), tf.constant(node.shape, tf.int32)], 0)
            shape = tf.cast(shape, tf.int32)
            if seed is None:
                draw = tf.random.normal if node.family == "gaussian" else tf.random.uniform
                noise[node.name] = draw(shape)
            else:
                node_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), index)
                draw = (
                    tf.random.stateless_normal
                    if node.family == "gaussian"
                    else tf.random.stateless_uniform
                )
                noise[node.name] = draw(shape, seed=node_seed)
        return noise

    def noise_dataset(self, batch_size, seed=0):
        """An endless `tf.data.Dataset` of noise dicts, new noise each step, reproducible from
        `seed`: the input of data-free `fit` (the teacher's samples are the data). Under a
        distribution strategy each global batch is split over the replicas."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        base = tf.constant([int(seed), 0], tf.int64)

        def draw(step):
            return self.sample_noise(
                batch_size, seed=tf.random.experimental.stateless_fold_in(base, step)
            )

        return tf.data.Dataset.counter().map(draw).prefetch(2)

    def check_noise(self, noise):
        """Raises ValueError unless `noise` has one tensor of the right shape per node."""
        names = [node.name for node in self.nodes]
        if not isinstance(noise, dict) or sorted(noise) != sorted(names):
            got = sorted(noise) if isinstance(noise, dict) else type(noise).__name__
            raise ValueError(f"`noise` must be a dict with keys {names}, got {got}.")
        for node in self.nodes:
            shape = tuple(noise[node.name].shape[1:])
            if shape != node.shape:
                raise ValueError(
                    f"`noise[{node.name!r}]` has per-example shape {shape}, expected {node.shape}."
                )


def check_same_layout(teacher, student):
    """Teacher and student must have the same nodes (names, families, roles, shapes) in the same
    order: shared noise needs identical latent shapes and noise layout (METHODS 3.9)."""
    for model, role in ((teacher, "teacher"), (student, "student")):
        if not isinstance(model, SharedNoiseModel):
            raise ValueError(
                f"`{role}` must be a SharedNoiseModel (with `nodes` and `generate`), "
                f"got {type(model).__name__}."
            )
    teacher_nodes, student_nodes = list(teacher.nodes), list(student.nodes)
    if [n.name for n in teacher_nodes] != [n.name for n in student_nodes]:
        raise ValueError(
            "`teacher` and `student` have different noise layouts: nodes "
            f"{[n.name for n in teacher_nodes]} vs {[n.name for n in student_nodes]}."
        )
    for t, s in zip(teacher_nodes, student_nodes, strict=True):
        if t != s:
            what = "observed dimensions" if t.role == s.role == "observed" else "noise layouts"
            raise ValueError(
                f"`teacher` and `student` have different {what} at node {t.name!r}: "
                f"teacher {t}, student {s}."
            )


def export_generative(model, path, data_spec, extra_endpoints=None):
    """Exports a generative student as a SavedModel with `sample`, `log_prob` and `encode`.

    Endpoints (servable with TensorFlow alone; kdtfp is not needed to load them):

    - `sample(n)`: `n` int32 scalar -> the model's `sample(n)`; fresh noise on every call.
    - `log_prob(x)`: `x` of `data_spec` -> `[B]` (exact or a bound, as the model documents).
    - `encode(x)`: `x` of `data_spec` -> the model's `encode(x)`.

    Requests of another shape than `data_spec`, or with NaN/Inf, are refused
    (`InvalidArgumentError`).

    Args:
        model: a Keras model with `sample(n)`, `log_prob(x)` and `encode(x)`.
        path: output directory (e.g. `saved_models/RECIPE/export/1`).
        data_spec: `tf.TensorSpec` of one batch of data, batch dimension None.
        extra_endpoints: optional dict name -> `(fn, input_signature)` added as they are.

    Returns:
        `path`.
    """
    from kdtfp.export import checked  # here: kdtfp.export imports kdtfp.distill, which imports us

    if not isinstance(data_spec, tf.TensorSpec):
        raise ValueError(f"`data_spec` must be a tf.TensorSpec, got {type(data_spec).__name__}.")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "sample",
        lambda n: model.sample(n),
        input_signature=[tf.TensorSpec([], tf.int32, name="n")],
    )
    # A restored signature does not check the feature dimension by itself: `checked` refuses a
    # request of the wrong shape, and NaN/Inf, in the graph.
    archive.add_endpoint(
        "log_prob", checked(lambda x: model.log_prob(x), data_spec), input_signature=[data_spec]
    )
    archive.add_endpoint(
        "encode", checked(lambda x: model.encode(x), data_spec), input_signature=[data_spec]
    )
    for name, (fn, signature) in (extra_endpoints or {}).items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(path, verbose=False)
    return path
