"""`kdtfp.datasets.softmax_truth`: synthetic classification data with known probabilities."""

import numpy as np
import pytest

from kdtfp.datasets import softmax_truth


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_shapes_split_ratio_and_probabilities_on_the_simplex(kind, num_classes):
    data = softmax_truth(1000, 7, num_classes, kind, seed=3)
    split = data.split
    assert (len(split.x_train), len(split.x_test), len(split.x_val)) == (700, 200, 100)
    assert split.x_train.shape[1] == 7 and split.x_train.dtype == np.float32
    for probs, y in ((data.probs_train, split.y_train), (data.probs_test, split.y_test)):
        assert probs.shape == (len(y), num_classes)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
        assert y.min() >= 0 and y.max() < num_classes


def test_labels_are_sampled_from_the_true_probabilities():
    # Over many examples the label frequencies match the mean true probabilities, and the
    # Bayes classifier's accuracy matches its expected accuracy E[max_k p_k].
    data = softmax_truth(40000, 5, 5, "nonlinear", fractions=(1, 1, 1), seed=0)
    probs = np.concatenate([data.probs_train, data.probs_val, data.probs_test])
    labels = np.concatenate([data.split.y_train, data.split.y_val, data.split.y_test])
    frequencies = np.bincount(labels, minlength=5) / len(labels)
    np.testing.assert_allclose(frequencies, probs.mean(0), atol=4 * np.sqrt(0.25 / len(labels)))
    bayes_accuracy = np.mean(probs.argmax(-1) == labels)
    assert abs(bayes_accuracy - probs.max(-1).mean()) < 4 * np.sqrt(0.25 / len(labels))


def test_the_same_seed_gives_the_same_data_and_another_seed_does_not():
    a, b, c = (softmax_truth(300, 5, 2, "linear", seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.split.x_train, b.split.x_train)
    np.testing.assert_array_equal(a.probs_test, b.probs_test)
    assert not np.allclose(a.probs_test, c.probs_test)


def test_larger_scale_gives_more_peaked_probabilities():
    soft = softmax_truth(2000, 5, 5, "linear", scale=0.5, seed=0).probs_test.max(-1).mean()
    sharp = softmax_truth(2000, 5, 5, "linear", scale=4.0, seed=0).probs_test.max(-1).mean()
    assert sharp > soft + 0.2


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"kind": "quadratic"}, "kind"),
        ({"num_classes": 1}, "num_classes"),
        ({"input_dim": 0}, "input_dim"),
        ({"num_examples": 5}, "num_examples"),
        ({"scale": 0.0}, "scale"),
        ({"fractions": (0.7, 0.3)}, "fractions"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        softmax_truth(**kwargs)
