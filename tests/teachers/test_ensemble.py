"""`kdtfp.teachers.BaggedEnsemble` and `fit_bagged`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kdtfp.distill import Distiller
from kdtfp.losses import SoftTargetKL
from kdtfp.teachers import BaggedEnsemble, fit_bagged, mlp


def members(count, input_dim=8, classes=4, same_init=False):
    return [
        mlp(input_dim, (8,), classes, name=f"member_{i}", seed=100 if same_init else 100 + 10 * i)
        for i in range(count)
    ]


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def inputs(n=16, dim=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype("float32")


def test_ensemble_output_is_log_of_mean_member_probabilities():
    ensemble = BaggedEnsemble(members(3))
    x = inputs()
    member_logits = np.stack([np.asarray(m(x), np.float64) for m in ensemble.members], axis=1)
    expected = np.log(np.mean(np.exp(np_log_softmax(member_logits)), axis=1))
    output = np.asarray(ensemble(x))
    assert output.shape == (16, 4)
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)
    # They are valid logits of the averaged distribution: softmax(output) = mean of softmaxes.
    np.testing.assert_allclose(np.exp(output).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ensemble.member_logits(x)), member_logits, rtol=1e-6, atol=1e-6
    )


def test_ensemble_output_is_finite_for_extreme_member_logits():
    dense = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(1e4))
    extreme = keras.Sequential([keras.Input((8,)), dense], name="extreme")
    ensemble = BaggedEnsemble([extreme, members(1)[0]])
    output = np.asarray(ensemble(inputs()))
    assert np.all(np.isfinite(output))


def test_one_member_ensemble_equals_log_softmax_of_the_member():
    member = members(1)[0]
    x = inputs()
    np.testing.assert_allclose(
        np.asarray(BaggedEnsemble([member])(x)),
        np_log_softmax(np.asarray(member(x))),
        rtol=1e-5,
        atol=1e-6,
    )


def test_empty_members_raise_value_error():
    with pytest.raises(ValueError, match="`members`"):
        BaggedEnsemble([])


def test_ensemble_keras_round_trip_gives_identical_outputs_and_config(tmp_path):
    ensemble = BaggedEnsemble(members(2))
    x = inputs()
    expected = np.asarray(ensemble(x))
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    assert isinstance(loaded, BaggedEnsemble)
    assert len(loaded.members) == 2
    np.testing.assert_array_equal(np.asarray(loaded(x)), expected)
    assert json.loads(json.dumps(loaded.get_config())) == json.loads(
        json.dumps(ensemble.get_config())
    )


def test_fit_bagged_learns_digits_quickly_and_bootstrap_makes_members_differ(digits):
    x, y = digits.x_train[:600], digits.y_train[:600]
    # Identical initial weights: any difference after training comes from the bootstrap.
    ensemble = BaggedEnsemble(
        [mlp(64, (32,), 10, name=f"member_{i}", seed=7) for i in range(3)], name="digits_ensemble"
    )
    np.testing.assert_array_equal(
        ensemble.members[0].get_weights()[0], ensemble.members[1].get_weights()[0]
    )
    history = fit_bagged(ensemble, x, y, epochs=4, batch_size=32, learning_rate=1e-2, seed=0)
    assert history.history["loss"][-1] < history.history["loss"][0]

    accuracy = np.mean(np.argmax(np.asarray(ensemble(digits.x_test)), -1) == digits.y_test)
    assert accuracy > 0.8, accuracy  # chance is 0.1
    kernels = [member.get_weights()[0] for member in ensemble.members]
    assert np.max(np.abs(kernels[0] - kernels[1])) > 1e-2
    assert np.max(np.abs(kernels[1] - kernels[2])) > 1e-2
    predictions = [np.argmax(np.asarray(member(digits.x_test)), -1) for member in ensemble.members]
    assert np.any(predictions[0] != predictions[1])


def test_fit_bagged_rejects_empty_x():
    with pytest.raises(ValueError, match="`x` is empty"):
        fit_bagged(
            BaggedEnsemble(members(1)),
            np.zeros((0, 8), "float32"),
            np.zeros((0,), "int32"),
            epochs=1,
        )


def test_bagged_ensemble_teaches_a_student_through_the_distiller():
    teacher = BaggedEnsemble(members(2))
    student = mlp(8, (8,), 4, name="student", seed=3)
    distiller = Distiller(student, teacher, [(SoftTargetKL(2.0), 1.0)])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    teacher_before = [w.copy() for w in teacher.get_weights()]
    history = distiller.fit(inputs(64), batch_size=16, epochs=3, verbose=0).history
    assert history["soft_target_kl"][-1] < history["soft_target_kl"][0]
    for before, after in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_fit_bagged_trains_an_ensemble_built_under_mirrored_strategy(mirrored_strategy, digits):
    with mirrored_strategy.scope():
        members = [mlp(64, (16,), 10, name=f"mirrored_member_{i}") for i in range(2)]
        ensemble = BaggedEnsemble(members)
    history = fit_bagged(ensemble, digits.x_train[:256], digits.y_train[:256], epochs=3)
    assert history.history["loss"][-1] < history.history["loss"][0]
