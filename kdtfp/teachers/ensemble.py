"""Bagged ensembles: the "cumbersome" teachers of ensemble compression (Papamakarios 2015, part A)."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="kdtfp")
class BaggedEnsemble(keras.Model):
    """An ensemble whose predictive distribution is the average of its members' probabilities.

    `call` returns `log(mean_m softmax(logits_m))`, shape `[batch, classes]`, computed as
    `logsumexp_m(log_softmax(logits_m)) - log M`. These are valid logits: `softmax` of them is
    the averaged distribution, so the ensemble plugs into any logits-based objective.

    Args:
        members: list of Keras models with identical input and output shapes (logits).

    Example:

    >>> members = [kdtfp.teachers.mlp(64, (100, 100), 10, name=f"member_{i}") for i in range(10)]
    >>> teacher = kdtfp.teachers.BaggedEnsemble(members)
    >>> kdtfp.teachers.fit_bagged(teacher, x_train, y_train, epochs=30)
    """

    def __init__(self, members, name="bagged_ensemble", **kwargs):
        super().__init__(name=name, **kwargs)
        if not members:
            raise ValueError("`members` is empty: a bagged ensemble needs at least one member.")
        self.members = list(members)

    def call(self, inputs, training=None):
        member_log_probs = ops.stack(
            [
                ops.log_softmax(ops.cast(member(inputs, training=training), "float32"), axis=-1)
                for member in self.members
            ],
            axis=1,
        )
        return ops.logsumexp(member_log_probs, axis=1) - math.log(len(self.members))

    def member_logits(self, inputs, training=None):
        """Stacked member logits, `[batch, members, classes]`."""
        return ops.stack([member(inputs, training=training) for member in self.members], axis=1)

    def get_config(self):
        return {
            "name": self.name,
            "members": [keras.saving.serialize_keras_object(m) for m in self.members],
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["members"] = [keras.saving.deserialize_keras_object(m) for m in config["members"]]
        return cls(**config)


class _StackedMembers(keras.Model):
    def __init__(self, ensemble, **kwargs):
        super().__init__(**kwargs)
        self.ensemble = ensemble
        self.built = True  # the members are built models already

    def call(self, inputs, training=None):
        return self.ensemble.member_logits(inputs, training=training)


def fit_bagged(ensemble, x, y, epochs=30, batch_size=32, learning_rate=1e-3, seed=0, verbose=0):
    """Trains every member on its own bootstrap resample of `(x, y)`, all in one `fit`.

    Bagging is done with bootstrap multiplicities as sample weights: member m sees example i
    with weight `c_mi ~ Multinomial(n, 1/n)`, exactly as if trained on a resample with
    replacement. Training the members side by side in one model costs one Keras step per
    batch instead of M. Returns the Keras `History`.
    """
    x = np.asarray(x, dtype="float32")
    y = np.asarray(y)
    if len(x) == 0:
        raise ValueError("`x` is empty: the ensemble needs training data.")
    rng = np.random.default_rng(seed)
    members = len(ensemble.members)
    counts = np.stack(
        [np.bincount(rng.integers(0, len(x), len(x)), minlength=len(x)) for _ in range(members)],
        axis=1,
    )
    # The trainer and its optimizer must live in the strategy the members were built in.
    with ensemble.distribute_strategy.scope():
        trainer = _StackedMembers(ensemble, name="stacked_members")
        trainer.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    labels = np.repeat(y[:, None], members, axis=1)
    return trainer.fit(
        x,
        labels,
        sample_weight=counts.astype("float32"),
        epochs=epochs,
        batch_size=batch_size,
        verbose=verbose,
        shuffle=True,
    )
