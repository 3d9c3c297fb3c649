"""`kdtfp.teachers.mlp`: the functional MLP used as teacher and student."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kdtfp.teachers import mlp


def test_mlp_layers_are_named_for_feature_distillation():
    model = mlp(64, (32, 16), 10, name="teacher")
    assert [layer.name for layer in model.layers] == [
        "teacher_inputs",
        "teacher_hidden_0",
        "teacher_hidden_1",
        "teacher_logits",
    ]
    assert model.get_layer("teacher_hidden_1").output.shape == (None, 16)
    assert model.output.shape == (None, 10)


def test_mlp_with_a_seed_is_reproducible():
    first, second = mlp(8, (4,), 3, seed=5), mlp(8, (4,), 3, seed=5)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = mlp(8, (4,), 3, seed=6)
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])


def test_mlp_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp(8, (4,), 3, name="mixed")
        assert model.get_layer("mixed_hidden_0").compute_dtype == "float16"
        assert model.get_layer("mixed_logits").compute_dtype == "float32"
        assert model(np.zeros((2, 8), "float32")).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("input_dim, num_outputs", [(0, 3), (8, 0)])
def test_mlp_rejects_empty_input_or_output(input_dim, num_outputs):
    with pytest.raises(ValueError, match="`input_dim` and `num_outputs` must be >= 1"):
        mlp(input_dim, (4,), num_outputs)
