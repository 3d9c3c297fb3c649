"""`SavesSeedState`: make a Keras layer's `SeedGenerator` states part of its saved weights.

Keras 3 saves no seed-generator state (checked on 3.15): after `load_model`, `load_weights` or a
`BackupAndRestore` resume, a layer's random stream restarts from its seed, so a resumed run draws
other noise than an uninterrupted one. Mixing this class in saves each generator owned directly
by the layer (its `_seed_generators`) under `seed_state_<i>` next to the layer's variables.
"""

from __future__ import annotations

import numpy as np

SEED_STATE_PREFIX = "seed_state_"


class SavesSeedState:
    """Mixin (list it before `keras.layers.Layer` / `keras.Model`) that saves and restores the
    states of the layer's own `keras.random.SeedGenerator`s with its weights. Files written
    without seed states still load (the generators then keep their current state).

    Example:

    >>> class NoisyLayer(SavesSeedState, keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.seed_generator = keras.random.SeedGenerator(0)
    """

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for index, generator in enumerate(self._seed_generators):
            store[f"{SEED_STATE_PREFIX}{index}"] = generator.state

    def load_own_variables(self, store):
        keys = list(store.keys())
        for index, generator in enumerate(self._seed_generators):
            key = f"{SEED_STATE_PREFIX}{index}"
            if key in keys:
                state = generator.state
                state.assign(np.asarray(store[key], dtype=state.dtype))
        super().load_own_variables(
            {key: store[key] for key in keys if not key.startswith(SEED_STATE_PREFIX)}
        )
