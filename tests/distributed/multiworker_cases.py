"""Training cases that must give the same weights on 2 local workers as on one process.

Run as a script (`python multiworker_cases.py OUT_DIR`) by each worker of
`tests/distributed/test_multiworker.py`, with `TF_CONFIG` set by
`kdtfp.distribute.launch_local_workers`: it creates the `MultiWorkerMirroredStrategy` first
thing, runs every case and writes `OUT_DIR/worker{i}.npz`. Imported by the test, `run_all` runs
the same cases in one process under the default strategy, on the same global batches.

Every case starts from fixed initial weights and trains for a few steps on a tf.data pipeline
of global batches of `GLOBAL_BATCH` rows, sharded with auto-shard policy `DATA`.
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kdtfp.callbacks import DualAscent
from kdtfp.distill import ConstrainedVIDistiller, DistillationObjective, Distiller
from kdtfp.distribute import make_strategy, shard_by_data, wait_for_workers
from kdtfp.losses import DerivativeMatching, SimilarityPreserving, SoftTargetKL
from kdtfp.optimizers import SGLD
from kdtfp.teachers import mlp

INPUT_DIM, CLASSES, GLOBAL_BATCH, ROWS = 8, 4, 16, 48  # 3 steps per epoch
CASES = ("soft_target_kl", "derivative_matching", "sgld", "constrained_vi")


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, INPUT_DIM)).astype("float32")
    features = np.maximum(rng.standard_normal((ROWS, 6)), 0).astype("float32")
    return x, features


def batches(*arrays):
    """Global batches in a fixed order, sharded by data across workers."""
    elements = arrays[0] if len(arrays) == 1 else arrays
    dataset = tf.data.Dataset.from_tensor_slices(elements).batch(GLOBAL_BATCH, drop_remainder=True)
    return shard_by_data(dataset)


def distiller_case(strategy, objectives, optimizer):
    keras.utils.set_random_seed(0)
    x, _ = data()
    with strategy.scope():
        teacher = mlp(INPUT_DIM, (16,), CLASSES, name="teacher", seed=10)
        student = mlp(INPUT_DIM, (8,), CLASSES, name="student", seed=20)
        distiller = Distiller(student, teacher, objectives(), seed=7)
        distiller.compile(optimizer=optimizer())
    initial = [np.array(w) for w in student.get_weights()]
    history = distiller.fit(batches(x), epochs=1, verbose=0).history
    return {
        "initial": initial,
        "weights": [np.array(w) for w in student.get_weights()],
        "loss": np.asarray(history["loss"]),
        "steps": np.asarray(int(distiller.optimizer.iterations.numpy())),
    }


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class ToyVIStudent(keras.Model):
    """A deterministic stand-in for a VI student: softmax features and a reconstruction loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(1))
        self.decoder = keras.layers.Dense(
            INPUT_DIM, kernel_initializer=keras.initializers.GlorotUniform(2)
        )

    def call(self, x, training=None):
        h = ops.softmax(self.encoder(x))
        self.add_loss(ops.mean(ops.sum(ops.square(self.decoder(h) - x), axis=-1)))
        return h


class HalvesSimilarity(SimilarityPreserving):
    """One-process twin of 2 replicas: each replica compares pairs within its half of a batch."""

    def call(self, y_true, y_pred):
        half = ops.shape(y_pred)[0] // 2
        first = super().call(y_true[:half], y_pred[:half])
        return 0.5 * (first + super().call(y_true[half:], y_pred[half:]))


def constrained_vi_case(strategy):
    """2 epochs of Lagrangian constrained VI: the dual variable moves after each epoch."""
    keras.utils.set_random_seed(0)
    x, features = data()
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        constraint = SimilarityPreserving() if replicas > 1 else HalvesSimilarity()
        student = ToyVIStudent()
        student(x[:GLOBAL_BATCH])  # builds the weights, to record their initial values
        distiller = ConstrainedVIDistiller(
            student, constraint=constraint, multiplier=1.0, mode="lagrangian", epsilon=0.0
        )
        distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    initial = [np.array(w) for w in student.get_weights()]
    history = distiller.fit(
        batches(x, features),
        epochs=2,
        verbose=0,
        callbacks=[DualAscent(target=0.0, learning_rate=50.0)],
    ).history
    return {
        "initial": initial,
        "weights": [np.array(w) for w in distiller.student.get_weights()],
        "multiplier": np.asarray(history["multiplier_next"]),
        "constraint": np.asarray(history["constraint"]),
        "steps": np.asarray(int(distiller.optimizer.iterations.numpy())),
    }


def run_case(name, strategy):
    if name == "soft_target_kl":
        return distiller_case(
            strategy, lambda: [(SoftTargetKL(2.0), 1.0)], lambda: keras.optimizers.SGD(0.5)
        )
    if name == "derivative_matching":
        return distiller_case(
            strategy,
            lambda: [
                DistillationObjective(DerivativeMatching("exact"), 1.0, name="dm_exact"),
                DistillationObjective(
                    DerivativeMatching("projection", num_projections=2), 1.0, name="dm_projection"
                ),
            ],
            lambda: keras.optimizers.SGD(0.5),
        )
    if name == "sgld":
        return distiller_case(
            strategy,
            lambda: [(SoftTargetKL(2.0), 1.0)],
            lambda: SGLD(1e-3, data_size=ROWS, temperature=1.0, seed=3),
        )
    if name == "constrained_vi":
        return constrained_vi_case(strategy)
    raise ValueError(f"`name` must be one of {CASES}, got {name!r}.")


def run_all(strategy):
    """`{case: {key: array or list of arrays}}` for every case, trained under `strategy`."""
    return {name: run_case(name, strategy) for name in CASES}


def flatten(results):
    """`run_all`'s results as one flat dict of arrays (for `np.savez`)."""
    flat = {}
    for case, record in results.items():
        for key, value in record.items():
            if isinstance(value, list):
                for i, array in enumerate(value):
                    flat[f"{case}/{key}/{i}"] = array
            else:
                flat[f"{case}/{key}"] = value
    return flat


def main(out_dir):
    strategy = make_strategy("multiworker")  # first: before any other TensorFlow op
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    results = run_all(strategy)
    np.savez(os.path.join(out_dir, f"worker{index}.npz"), **flatten(results))
    wait_for_workers(strategy)
    print(f"worker {index}: {strategy.num_replicas_in_sync} replicas, cases {list(results)}")


if __name__ == "__main__":
    main(sys.argv[1])
