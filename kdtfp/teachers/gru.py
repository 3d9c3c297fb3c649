"""GRU sequence classifier: the teacher of `kd-arhmm` (its final hidden state is the feature)."""

from __future__ import annotations

import keras


def gru_classifier(input_dim, units=32, num_outputs=1, name="gru_teacher", seed=None):
    """A functional GRU classifier `[B, T, D] -> logits [B, num_outputs]`, and its feature model.

    ```
    h_T = GRU(units)(x_{1:T})          # final hidden state, tanh-bounded, [B, units]
    logits = Dense(num_outputs)(h_T)   # one logit (sigmoid outcome) by default
    ```

    Args:
        input_dim: D >= 1, the observation dimension (any sequence length T is accepted).
        units: GRU width >= 1.
        num_outputs: logits; 1 for a binary outcome (train with `BinaryCrossentropy(from_logits=True)`).
        name: model name; the GRU layer is `"{name}_gru"`, the head `"{name}_logits"`.
        seed: int or None, seeds the initialisers.

    Returns:
        `(classifier, features)`: two `keras.Model`s sharing weights; `features(x)` returns `h_T`.

    Example:

    >>> teacher, teacher_features = gru_classifier(2, units=32)
    >>> teacher.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True))
    >>> teacher.fit(x_train, y_train, epochs=30)
    >>> t = teacher_features.predict(x_train)   # [N, 32]
    """
    for argument, value in (
        ("input_dim", input_dim),
        ("units", units),
        ("num_outputs", num_outputs),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"`{argument}` must be an integer >= 1, got {value!r}.")
    inputs = keras.Input(shape=(None, int(input_dim)), name=f"{name}_inputs")
    hidden = keras.layers.GRU(
        int(units),
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        recurrent_initializer=keras.initializers.Orthogonal(
            seed=None if seed is None else seed + 1
        ),
        name=f"{name}_gru",
    )(inputs)
    logits = keras.layers.Dense(
        int(num_outputs),
        kernel_initializer=keras.initializers.GlorotUniform(
            seed=None if seed is None else seed + 2
        ),
        dtype="float32",
        name=f"{name}_logits",
    )(hidden)
    classifier = keras.Model(inputs, logits, name=name)
    features = keras.Model(inputs, hidden, name=f"{name}_features")
    return classifier, features
