"""`SharedNoiseDistiller`: the surrogate bound in closed form, training, local mode, checks,
round trip and replica invariance."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from shared_noise_models import EMISSION_SD, Chain, LinearGaussian

from kdtfp.distill.shared_noise import SharedNoiseDistiller


def gaussian_kl(mean_p, cov_p, mean_q, cov_q):
    inverse = np.linalg.inv(cov_q)
    delta = mean_q - mean_p
    return 0.5 * (
        np.trace(inverse @ cov_p)
        + delta @ inverse @ delta
        - len(mean_p)
        + np.log(np.linalg.det(cov_q) / np.linalg.det(cov_p))
    )


def models(cls=Chain, **kwargs):
    keras.utils.set_random_seed(0)
    teacher = cls(**kwargs, name="teacher")
    keras.utils.set_random_seed(1)
    student = cls(**kwargs, name="student")
    return teacher, student


def test_surrogate_equals_its_closed_form_and_bounds_the_marginal_kl():
    teacher, student = models(LinearGaussian)
    distiller = SharedNoiseDistiller(student, teacher, latent_weight=0.0)
    noise = teacher.sample_noise(20000, seed=(3, 4))
    distiller.compute_loss(noise, training=False)
    surrogate = float(distiller.output_tracker.result())

    a_t, b_t = teacher.matrices()
    a_s, b_s = student.matrices()
    variance = EMISSION_SD**2
    expected = (np.sum((a_t - a_s) ** 2) + np.sum((b_t - b_s) ** 2)) / (2 * variance)
    identity = np.eye(len(b_t))
    marginal = gaussian_kl(
        b_t, a_t @ a_t.T + variance * identity, b_s, a_s @ a_s.T + variance * identity
    )
    assert surrogate == pytest.approx(expected, rel=0.03)
    assert marginal > 0.1 and surrogate > marginal


def test_data_free_training_shrinks_the_output_kl():
    teacher, student = models()
    distiller = SharedNoiseDistiller(student, teacher, latent_weight=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(
        teacher.noise_dataset(64, seed=0), steps_per_epoch=60, epochs=3, verbose=0
    )
    kl = history.history["output_kl"]
    assert set(history.history) >= {"loss", "output_kl", "latent_loss"}
    assert kl[-1] < 0.5 * kl[0]
    assert all(np.isfinite(history.history["loss"]))
    # The teacher is frozen.
    assert not teacher.trainable and distiller.trainable_weights
    assert {id(w) for w in distiller.trainable_weights} <= {id(w) for w in student.weights}


def test_local_mode_feeds_the_teacher_latents_to_the_student():
    teacher, student = models()
    noise = teacher.sample_noise(8, seed=(0, 1))
    for local in (False, True):
        outputs = SharedNoiseDistiller(student, teacher, local=local)(noise)
        same = np.array_equal(outputs["teacher"]["b"]["sample"], outputs["student"]["b"]["sample"])
        if local:
            assert same
            np.testing.assert_array_equal(
                outputs["teacher"]["z2"]["sample"], outputs["student"]["z2"]["sample"]
            )
        else:  # shared noise, the student's own parents: its samples differ from the teacher's
            assert not np.allclose(
                outputs["teacher"]["z2"]["sample"], outputs["student"]["z2"]["sample"]
            )


def test_data_assisted_mode_adds_the_data_loss():
    teacher, student = models()
    distiller = SharedNoiseDistiller(student, teacher, data_weight=0.5)
    distiller.compile(optimizer="adam")
    noise = teacher.sample_noise(32, seed=(0, 2))
    data = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensors({"noise": noise, "data": data}).repeat(3)
    history = distiller.fit(dataset, verbose=0)
    assert np.isfinite(history.history["data_loss"][0])
    with pytest.raises(ValueError, match="data"):
        SharedNoiseDistiller(student, teacher, data_weight=0.5).compute_loss(noise)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"latent_weight": -1.0}, "latent_weight"),
        ({"data_weight": -0.1}, "data_weight"),
        ({"latent_divergence": "l1"}, "latent_divergence"),
        ({"teacher_forced": ("z2",)}, "teacher_forced"),
    ],
)
def test_bad_arguments_are_refused_before_training(kwargs, pattern):
    teacher, student = models()
    with pytest.raises(ValueError, match=pattern):
        SharedNoiseDistiller(student, teacher, **kwargs)


def test_a_teacher_forced_node_keeps_its_output_term():
    teacher, student = models()
    noise = teacher.sample_noise(64, seed=(2, 2))
    forced = SharedNoiseDistiller(student, teacher, teacher_forced=("x",))
    forced.compute_loss(noise, training=False)
    outputs = forced(noise)
    # The student's x conditional is evaluated at its own parents; only its sample is forced.
    np.testing.assert_array_equal(
        outputs["student"]["x"]["sample"], outputs["teacher"]["x"]["sample"]
    )
    assert float(forced.output_tracker.result()) > 0.01


def test_different_layouts_are_refused():
    with pytest.raises(ValueError, match="observed dimensions"):
        SharedNoiseDistiller(LinearGaussian(data=5), LinearGaussian(data=4))
    with pytest.raises(ValueError, match="noise layouts"):
        SharedNoiseDistiller(LinearGaussian(latent=3), LinearGaussian(latent=2))
    with pytest.raises(ValueError, match="noise layouts"):
        SharedNoiseDistiller(Chain(), LinearGaussian())
    with pytest.raises(ValueError, match="SharedNoiseModel"):
        SharedNoiseDistiller(keras.Sequential([keras.layers.Dense(1)]), Chain())


def test_noise_of_the_wrong_shape_is_refused():
    teacher, student = models()
    distiller = SharedNoiseDistiller(student, teacher)
    noise = teacher.sample_noise(4, seed=(0, 0))
    noise["b"] = tf.zeros((4, 5))
    with pytest.raises(ValueError, match="noise"):
        distiller(noise)
    del noise["b"]
    with pytest.raises(ValueError, match="noise"):
        distiller(noise)


def test_noise_dataset_is_reproducible_and_fresh_each_step():
    model = Chain()
    first, second = list(model.noise_dataset(4, seed=5).take(2))
    again = next(iter(model.noise_dataset(4, seed=5)))
    np.testing.assert_array_equal(first["z1"], again["z1"])
    assert not np.array_equal(first["z1"], second["z1"])
    assert first["b"].shape == (4, 3) and float(tf.reduce_min(first["b"])) >= 0.0
    with pytest.raises(ValueError, match="batch_size"):
        model.noise_dataset(0)


def test_round_trip(tmp_path):
    teacher, student = models()
    distiller = SharedNoiseDistiller(
        student, teacher, latent_weight=0.3, latent_divergence="kl", local=True
    )
    noise = teacher.sample_noise(4, seed=(1, 1))
    expected = distiller(noise)["student"]["x"]["loc"]
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.get_config()["latent_weight"] == 0.3 and restored.local
    np.testing.assert_allclose(restored(noise)["student"]["x"]["loc"], expected, rtol=1e-6)


def _one_step(strategy, noise):
    with strategy.scope():
        teacher, student = models()
        distiller = SharedNoiseDistiller(student, teacher, latent_weight=0.5)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    dataset = tf.data.Dataset.from_tensors(noise)
    history = distiller.fit(dataset, verbose=0)
    return [np.asarray(w) for w in student.weights], history.history


def test_one_step_on_two_replicas_equals_one_device(mirrored_strategy):
    noise = Chain().sample_noise(16, seed=(7, 7))
    single, single_history = _one_step(tf.distribute.get_strategy(), noise)
    mirrored, mirrored_history = _one_step(mirrored_strategy, noise)
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "output_kl", "latent_loss"):
        assert mirrored_history[key][0] == pytest.approx(single_history[key][0], rel=1e-5)
