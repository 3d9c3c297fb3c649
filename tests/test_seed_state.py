"""`SavesSeedState`: seed-generator states travel with a layer's weights (Keras saves none)."""

import keras
import numpy as np

from kdtfp.layers.latent import BernoulliRoot, GaussianLatent
from kdtfp.models import RBM


def _draw(layer):
    return np.asarray(keras.random.normal((3,), seed=layer.seed_generator))


def test_latent_layer_continues_its_noise_after_a_weights_round_trip(tmp_path):
    layer = GaussianLatent(2, hidden_units=[3], seed=4)
    layer(np.zeros((1, 2), "float32"))
    _draw(layer)  # advance the state past the seed
    model = keras.Sequential([keras.Input((2,)), keras.layers.Identity()])
    model.noisy = layer
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    expected = _draw(layer)

    fresh = GaussianLatent(2, hidden_units=[3], seed=4)
    fresh(np.zeros((1, 2), "float32"))
    clone = keras.Sequential([keras.Input((2,)), keras.layers.Identity()])
    clone.noisy = fresh
    clone.load_weights(path)
    np.testing.assert_array_equal(_draw(fresh), expected)


def test_model_with_seed_state_round_trips_and_old_files_still_load(tmp_path):
    rbm = RBM(4, 3, seed=1)
    rbm.build((None, 4))
    rbm._seed_generator.next()
    state = np.asarray(rbm._seed_generator.state)
    path = tmp_path / "rbm.keras"
    rbm.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(restored._seed_generator.state, state)
    # A store without seed states (a file written before this mixin) loads the weights.
    root = BernoulliRoot(2, seed=0)
    store = {"0": np.array([0.5, -0.5], "float32")}
    root.load_own_variables(store)
    np.testing.assert_allclose(root.logits, [0.5, -0.5])
