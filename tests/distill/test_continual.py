"""`ContinualVAEDistiller`: the mixed loss against a NumPy composition of its terms, the three
methods, argument checks, Keras round trip, and one step on 2 replicas == one step on 1 device."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.distill.continual import ContinualVAEDistiller, continual_dataset, frozen_copy
from kdtfp.models.conditional_vae import ConditionalVAE

D, L, T, B = 8, 3, 2, 16


def _model(seed=1, latent_size=L, num_tasks=T):
    keras.utils.set_random_seed(seed)
    return ConditionalVAE(latent_size, hidden_units=16, num_tasks=num_tasks, data_size=D,
                          seed=seed)  # fmt: skip


def _x_new(n=48, seed=0):
    return (np.random.default_rng(seed).random((n, D)) < 0.4).astype("float32")


def _pair():
    """A model and a frozen previous copy whose weights were moved (so every term is > 0)."""
    model = _model()
    previous = frozen_copy(model)
    rng = np.random.default_rng(7)
    previous.set_weights([w + 0.3 * rng.standard_normal(w.shape) for w in previous.get_weights()])
    return model, previous


def _batch(model, seed=0):
    dataset = continual_dataset(model, _x_new(), new_task=1, old_task=0, batch_size=B, seed=seed)
    return next(iter(dataset))


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _np(tensor):
    return np.asarray(tensor, np.float64)


@pytest.mark.parametrize("divergence", ["w2", "kl"])
def test_distill_loss_is_the_weighted_sum_of_numpy_terms(divergence):
    model, previous = _pair()
    share, lam = 0.3, 0.7
    distiller = ContinualVAEDistiller(
        model, previous, old_task_share=share, latent_weight=lam, latent_divergence=divergence
    )
    x = _batch(model)
    loss = float(distiller.compute_loss(x=x, training=False))

    data = _np(model.negative_elbo(x["data"], x["data_task"], noise=x["data_noise"])).mean()
    noise = x["noise"]
    np.testing.assert_array_equal(_np(noise["task"]), np.tile([[1.0, 0.0]], (B, 1)))
    logits_t = _np(previous.generate(noise)["x"]["logits"])
    logits_s = _np(model.generate(noise)["x"]["logits"])
    p_t, p_s = _sigmoid(logits_t), _sigmoid(logits_s)
    output_kl = np.sum(p_t * np.log(p_t / p_s) + (1 - p_t) * np.log((1 - p_t) / (1 - p_s)), -1)
    x_teacher = (_np(noise["x"]) < p_t).astype("float32")
    q_t, q_s = previous.encode(x_teacher, 0), model.encode(x_teacher, 0)
    m_t, s_t = _np(q_t["loc"]), _np(q_t["scale"])
    m_s, s_s = _np(q_s["loc"]), _np(q_s["scale"])
    if divergence == "w2":
        latent = np.sum((m_t - m_s) ** 2 + (s_t - s_s) ** 2, -1)
    else:
        latent = np.sum(np.log(s_s / s_t) + (s_t**2 + (m_t - m_s) ** 2) / (2 * s_s**2) - 0.5, -1)
    want = (1 - share) * data + share * (output_kl.mean() + lam * latent.mean())
    assert output_kl.mean() > 1e-3 and latent.mean() > 1e-3
    np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_replay_and_finetune_losses():
    model, previous = _pair()
    x = _batch(model)
    data = _np(model.negative_elbo(x["data"], x["data_task"], noise=x["data_noise"])).mean()
    finetune = ContinualVAEDistiller(model, previous, old_task_share=0.3, method="finetune")
    np.testing.assert_allclose(float(finetune.compute_loss(x=x, training=False)), data, rtol=1e-5)

    replay = ContinualVAEDistiller(model, previous, old_task_share=0.3, method="replay")
    noise = x["noise"]
    x_teacher = _np(previous.generate(noise)["x"]["sample"])
    replayed = _np(model.negative_elbo(x_teacher, 0, noise=x["replay_noise"])).mean()
    np.testing.assert_allclose(
        float(replay.compute_loss(x=x, training=False)), 0.7 * data + 0.3 * replayed, rtol=1e-5
    )


def test_distill_terms_vanish_for_an_exact_copy_and_the_teacher_stays_frozen():
    model = _model()
    previous = frozen_copy(model)
    distiller = ContinualVAEDistiller(model, previous, latent_weight=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = _batch(model)
    distiller.compute_loss(x=x, training=False)
    assert float(distiller.term_trackers["output_kl"].result()) == pytest.approx(0.0, abs=1e-6)
    assert float(distiller.term_trackers["latent_loss"].result()) == pytest.approx(0.0, abs=1e-6)
    frozen = [np.array(w) for w in previous.get_weights()]
    dataset = continual_dataset(model, _x_new(), 1, 0, B)
    history = distiller.fit(dataset, steps_per_epoch=20, epochs=1, verbose=0).history
    assert set(history) >= {"loss", "data_loss", "output_kl", "latent_loss"}
    for a, b in zip(frozen, previous.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history["output_kl"][0] > 0  # the student moved away from its copy and is pulled back


def test_distillation_forgets_less_than_fine_tuning():
    # Task 0 = the previous model's own generations; after learning task 1 the distilled model
    # stays closer to the previous model on task 0 than the fine-tuned one.
    base = _model()
    base.compile(optimizer=keras.optimizers.Adam(1e-2))
    x0 = _x_new(64, seed=1)
    x0[:, :4] = 1.0
    base.fit({"x": x0, "task": np.zeros(64, np.int32)}, batch_size=32, epochs=30, verbose=0)
    x1 = _x_new(64, seed=2)
    x1[:, 4:] = 1.0
    kl = {}
    for method in ("distill", "finetune"):
        keras.utils.set_random_seed(0)
        model, previous = frozen_copy(base), frozen_copy(base)
        model.trainable = True
        distiller = ContinualVAEDistiller(model, previous, method=method)
        distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
        distiller.fit(continual_dataset(model, x1, 1, 0, 32), steps_per_epoch=60, verbose=0)
        probe = ContinualVAEDistiller(model, previous)
        probe.compute_loss(x=_batch(model, seed=9), training=False)
        kl[method] = float(probe.term_trackers["output_kl"].result())
    assert kl["distill"] < 0.5 * kl["finetune"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"latent_weight": -0.1}, "`latent_weight`"),
        ({"latent_weight": float("nan")}, "`latent_weight`"),
        ({"old_task_share": 1.5}, "`old_task_share`"),
        ({"old_task_share": -0.1}, "`old_task_share`"),
        ({"method": "ewc"}, "`method`"),
        ({"latent_divergence": "js"}, "`latent_divergence`"),
    ],
)
def test_bad_arguments_raise_before_any_step(kwargs, argument):
    model, previous = _pair()
    with pytest.raises(ValueError, match=argument):
        ContinualVAEDistiller(model, previous, **kwargs)


def test_mismatched_models_and_inputs_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match="frozen copy"):
        ContinualVAEDistiller(model, model)
    with pytest.raises(ValueError, match="noise layouts"):
        ContinualVAEDistiller(model, _model(latent_size=L + 1))
    with pytest.raises(ValueError, match="tasks"):
        ContinualVAEDistiller(model, _model(num_tasks=T + 1))
    with pytest.raises(ValueError, match="`previous_model`"):
        ContinualVAEDistiller(model, keras.Sequential([keras.layers.Dense(2)]))
    distiller = ContinualVAEDistiller(model, frozen_copy(model))
    with pytest.raises(ValueError, match="`x`"):
        distiller.compute_loss(x={"data": _x_new(4)})
    with pytest.raises(ValueError, match="`x_new`"):
        continual_dataset(model, _x_new() * 0.5, 1, 0, B)
    with pytest.raises(ValueError, match="`task`"):
        continual_dataset(model, _x_new(), 2, 0, B)
    with pytest.raises(ValueError, match="`batch_size`"):
        continual_dataset(model, _x_new(), 1, 0, 0)


def test_keras_round_trip(tmp_path):
    model, previous = _pair()
    distiller = ContinualVAEDistiller(model, previous, old_task_share=0.4, latent_weight=0.1,
                                      method="replay", latent_divergence="kl")  # fmt: skip
    path = str(tmp_path / "continual.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, ContinualVAEDistiller)
    for key in ("old_task_share", "latent_weight", "method", "latent_divergence"):
        assert getattr(loaded, key) == getattr(distiller, key)
    assert not loaded.previous_model.trainable
    x = _batch(model)
    np.testing.assert_allclose(
        float(loaded.compute_loss(x=x, training=False)),
        float(distiller.compute_loss(x=x, training=False)),
        rtol=1e-6,
    )


def _one_step(strategy, method):
    with strategy.scope():
        model, previous = _pair()
        distiller = ContinualVAEDistiller(model, previous, old_task_share=0.4, latent_weight=0.5,
                                          method=method)  # fmt: skip
        distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    dataset = continual_dataset(model, _x_new(), 1, 0, B, seed=3).take(1)
    history = distiller.fit(dataset, epochs=1, verbose=0).history
    return [np.array(w) for w in model.get_weights()], history


@pytest.mark.parametrize("method", ["distill", "replay"])
def test_one_step_on_two_replicas_equals_one_step_on_one_device(method, mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    start = [np.array(w) for w in _pair()[0].get_weights()]
    single, single_history = _one_step(tf.distribute.get_strategy(), method)
    mirrored, mirrored_history = _one_step(mirrored_strategy, method)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(single, start, strict=True)) > 1e-3
    for a, b in zip(mirrored, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert set(mirrored_history) == set(single_history)
    for key, value in single_history.items():
        np.testing.assert_allclose(mirrored_history[key], value, rtol=1e-4, atol=1e-6)


def test_jit_compiled_steps_match_eager_steps():
    histories = []
    for jit in (False, True):
        model, previous = _pair()
        distiller = ContinualVAEDistiller(model, previous)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
        dataset = continual_dataset(model, _x_new(), 1, 0, B, seed=3)
        histories.append(distiller.fit(dataset, steps_per_epoch=3, verbose=0).history)
    for key, value in histories[0].items():
        np.testing.assert_allclose(histories[1][key], value, rtol=1e-5)
