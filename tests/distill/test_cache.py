"""`kdtfp.distill.cache`: teacher outputs computed once over a fixed transfer set."""

from __future__ import annotations

import numpy as np
import pytest

from kdtfp.distill import INPUTS, TEACHER_OUTPUTS, teacher_cached_dataset, teacher_outputs
from kdtfp.teachers import mlp


@pytest.fixture
def teacher():
    return mlp(8, (16,), 4, name="teacher", seed=1)


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((70, 8)).astype("float32")


def test_teacher_outputs_in_batches_equal_one_call(teacher, x):
    outputs = teacher_outputs(teacher, x, batch_size=16)
    assert outputs.shape == (70, 4)
    np.testing.assert_allclose(
        outputs, np.asarray(teacher(x, training=False)), rtol=1e-6, atol=1e-6
    )


def test_teacher_outputs_reject_empty_x(teacher, x):
    with pytest.raises(ValueError, match="`x` is empty"):
        teacher_outputs(teacher, x[:0])


def test_cached_dataset_yields_inputs_teacher_outputs_and_labels_in_order(teacher, x):
    y = np.arange(70)
    batches = list(teacher_cached_dataset(teacher, x, y, batch_size=32, shuffle=False))
    assert [len(labels) for _, labels in batches] == [32, 32, 6]
    features = {
        key: np.concatenate([f[key] for f, _ in batches]) for key in (INPUTS, TEACHER_OUTPUTS)
    }
    np.testing.assert_array_equal(features[INPUTS], x)
    np.testing.assert_allclose(
        features[TEACHER_OUTPUTS], np.asarray(teacher(x)), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in batches]), y)


def test_cached_dataset_without_labels_yields_feature_dicts(teacher, x):
    element = next(iter(teacher_cached_dataset(teacher, x, batch_size=8, shuffle=False)))
    assert set(element) == {INPUTS, TEACHER_OUTPUTS}


def test_cached_dataset_shuffle_keeps_pairs_together_and_is_seeded(teacher, x):
    y = np.arange(70)
    first = [
        (f[INPUTS].numpy(), f[TEACHER_OUTPUTS].numpy(), labels.numpy())
        for f, labels in teacher_cached_dataset(teacher, x, y, batch_size=70, seed=3)
    ]
    second = [
        labels.numpy() for _, labels in teacher_cached_dataset(teacher, x, y, batch_size=70, seed=3)
    ]
    inputs, outputs, labels = first[0]
    assert not np.array_equal(labels, y)
    np.testing.assert_array_equal(labels, second[0])
    np.testing.assert_array_equal(inputs, x[labels])
    np.testing.assert_allclose(outputs, np.asarray(teacher(x[labels])), rtol=1e-6, atol=1e-6)
