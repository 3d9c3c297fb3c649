"""`TopicModel` (LDA by ADVI): ELBO pieces against NumPy/SciPy, perplexity of a known model,
saving, training, export and bad input."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import stats

from kdtfp.distill import ConstrainedVIDistiller
from kdtfp.models.topic_model import (
    TopicModel,
    export_topic_model,
    logistic_normal_log_prob,
)

K, V = 3, 5


def counts(n=6, seed=0, vocab=V):
    return np.random.default_rng(seed).integers(0, 6, size=(n, vocab)).astype("float32")


def model(n=6, **kwargs):
    kwargs = {"corpus_size": 100, "encoder_units": (8,), "seed": 3, **kwargs}
    lda = TopicModel(K, V, **kwargs)
    lda(counts(n))  # build
    return lda


def softmax_centered(u):
    z = np.concatenate([u, np.zeros(u.shape[:-1] + (1,))], axis=-1)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def numpy_log_q(u, loc, scale):
    """log q on the first D simplex coordinates, with the Jacobian from `np.linalg.det`."""
    p = softmax_centered(u)
    head = p[:-1]
    jacobian = np.diag(head) - np.outer(head, head)  # d p_{1:D} / d u
    normal = stats.norm.logpdf(u, loc, scale).sum()
    return normal - np.log(abs(np.linalg.det(jacobian)))


def test_logistic_normal_density_matches_the_change_of_variables_by_determinant():
    rng = np.random.default_rng(0)
    for d in (1, 2, 4):
        u, loc = rng.standard_normal(d), rng.standard_normal(d)
        scale = rng.uniform(0.3, 2.0, d)
        log_q, log_p = logistic_normal_log_prob(
            tf.constant(u, tf.float32), tf.constant(loc, tf.float32), tf.constant(scale, tf.float32)
        )
        np.testing.assert_allclose(float(log_q), numpy_log_q(u, loc, scale), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.exp(log_p), softmax_centered(u), rtol=1e-5)


def test_tfp_softmax_centered_density_differs_by_half_log_k():
    # METHODS.md 2.7: TFP's log-det is the volume on the embedded simplex.
    u, loc, scale = np.array([0.3, -1.2]), np.array([0.1, 0.2]), np.array([0.7, 1.3])
    tfd, tfb = tfp.distributions, tfp.bijectors
    q = tfd.TransformedDistribution(
        tfd.Independent(tfd.Normal(loc, scale), 1), tfb.SoftmaxCentered()
    )
    theta = softmax_centered(u)
    ours, _ = logistic_normal_log_prob(u, loc, scale)
    np.testing.assert_allclose(
        float(ours) - float(q.log_prob(theta)), 0.5 * math.log(3), rtol=1e-6, atol=1e-6
    )


def numpy_terms(lda, x, theta_noise, beta_noise):
    loc, scale = (np.asarray(t, np.float64) for t in lda.encode(x))
    beta_loc = np.asarray(lda.beta_loc, np.float64)
    beta_scale = np.asarray(lda.beta_scale, np.float64)
    out = {k: [] for k in ("ll", "lpt", "lqt", "lpb", "lqb")}
    for s in range(len(theta_noise)):
        u_beta = beta_loc + beta_scale * beta_noise[s]
        beta = softmax_centered(u_beta)
        out["lpb"].append(sum(stats.dirichlet.logpdf(b, [lda.eta] * V) for b in beta))
        out["lqb"].append(sum(numpy_log_q(u_beta[k], beta_loc[k], beta_scale[k]) for k in range(K)))
        row = {k: [] for k in ("ll", "lpt", "lqt")}
        for d in range(len(x)):
            u = loc[d] + scale[d] * theta_noise[s, d]
            theta = softmax_centered(u)
            row["ll"].append(np.sum(x[d] * np.log(theta @ beta)))
            row["lpt"].append(stats.dirichlet.logpdf(theta, [lda.alpha] * K))
            row["lqt"].append(numpy_log_q(u, loc[d], scale[d]))
        for key, values in row.items():
            out[key].append(values)
    return {key: np.asarray(values) for key, values in out.items()}


def test_elbo_terms_match_numpy_and_scipy_densities():
    lda = model(alpha=0.7, eta=0.4)
    x = counts(4, seed=1)
    rng = np.random.default_rng(2)
    theta_noise = rng.standard_normal((2, 4, K - 1)).astype("float32")
    beta_noise = rng.standard_normal((2, K, V - 1)).astype("float32")
    terms = {k: np.asarray(v) for k, v in lda.elbo_terms(x, theta_noise, beta_noise).items()}
    reference = numpy_terms(lda, x, theta_noise, beta_noise)
    np.testing.assert_allclose(terms["log_likelihood"], reference["ll"], rtol=1e-4)
    np.testing.assert_allclose(terms["log_prior_theta"], reference["lpt"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(terms["log_q_theta"], reference["lqt"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(terms["log_prior_beta"], reference["lpb"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(terms["log_q_beta"], reference["lqb"], rtol=1e-4, atol=1e-3)

    # The loss is the corpus negative ELBO / N (per document): local mean + global / N.
    local = (reference["ll"] + reference["lpt"] - reference["lqt"]).mean(0)
    global_term = (reference["lpb"] - reference["lqb"]).mean()
    expected = -(local.mean() + global_term / 100)
    np.testing.assert_allclose(float(lda.negative_elbo(terms)), expected, rtol=1e-4)
    per_token = model(alpha=0.7, eta=0.4, tokens_per_document=20.0)
    per_token.set_weights(lda.get_weights())
    per_token_terms = per_token.elbo_terms(x, theta_noise, beta_noise)
    np.testing.assert_allclose(
        float(per_token.negative_elbo(per_token_terms)), expected / 20, rtol=1e-4
    )


def test_elbo_is_below_a_monte_carlo_log_marginal_likelihood():
    # With beta fixed, log p(n | beta) = log E_Dir(theta)[p(n | theta, beta)]; the ELBO of any
    # q(theta | n) lies below it (the gap is KL(q || posterior) >= 0).
    lda = model()
    x = counts(3, seed=4)
    beta = lda.topics().astype(np.float64)
    theta = np.random.default_rng(5).dirichlet([lda.alpha] * K, size=200_000)
    log_lik = x.astype(np.float64) @ np.log(theta @ beta).T  # [docs, samples]
    log_marginal = np.log(np.mean(np.exp(log_lik - log_lik.max(1, keepdims=True)), 1))
    log_marginal += log_lik.max(1)
    bound = lda.log_likelihood_bound(x, num_samples=4000)
    assert np.all(bound <= log_marginal + 0.05)
    assert np.all(bound > log_marginal - 30.0)  # and not absurdly loose


def test_perplexity_of_a_model_with_equal_topics_is_the_unigram_perplexity():
    lda = model()
    p = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    row = np.log(p[:-1]) - np.log(p[-1])  # SoftmaxCentered^{-1}(p)
    lda.beta_loc.assign(np.tile(row, (K, 1)).astype("float32"))
    np.testing.assert_allclose(lda.topics(), np.tile(p, (K, 1)), rtol=1e-5)
    x = counts(8, seed=6)
    unigram = float(np.exp(-(x @ np.log(p)).sum() / x.sum()))
    np.testing.assert_allclose(lda.perplexity(x, bound=False), unigram, rtol=1e-5)
    # The bound adds KL(q(theta | n) || Dir(alpha)) >= 0 per document.
    assert lda.perplexity(x) >= unigram * (1 - 1e-6)


def test_top_words_follow_the_topic_probabilities():
    lda = model()
    p = np.array(
        [[0.1, 0.2, 0.3, 0.15, 0.25], [0.5, 0.1, 0.1, 0.1, 0.2], [0.05, 0.05, 0.1, 0.6, 0.2]]
    )
    lda.beta_loc.assign((np.log(p[:, :-1]) - np.log(p[:, -1:])).astype("float32"))
    assert lda.top_words(2) == [[2, 4], [0, 4], [3, 4]]
    assert lda.top_words(1, vocabulary=list("abcde")) == [["c"], ["a"], ["d"]]


def test_call_adds_one_loss_and_returns_proportions():
    lda = model()
    x = counts(6)
    theta = np.asarray(lda(x))
    assert theta.shape == (6, K) and len(lda.losses) == 1
    np.testing.assert_allclose(theta.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(theta, np.asarray(lda.features(x)), rtol=1e-6)
    sampled = model(feature_mode="sample_mean")
    features = np.asarray(sampled.features(x))
    np.testing.assert_allclose(features.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(features, np.asarray(sampled.features(x)))  # fixed seed


@pytest.mark.parametrize("jit", [False, True], ids=["eager_graph", "xla"])
def test_fit_decreases_the_negative_elbo(jit):
    x = np.tile(counts(64, seed=7), (4, 1))  # 8 steps per epoch
    keras.utils.set_random_seed(0)
    lda = TopicModel(K, V, corpus_size=64, encoder_units=(8,), seed=0, num_samples=2)
    lda.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=jit)
    loss = lda.fit(x, batch_size=32, epochs=3, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0] - 0.5


def test_keras_round_trip_keeps_topics_encoder_and_settings(tmp_path):
    lda = model(alpha=0.5, eta=0.2, tokens_per_document=12.0, feature_mode="sample_mean")
    x = counts(4)
    path = tmp_path / "lda.keras"
    lda.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, TopicModel)
    assert loaded.get_config() == lda.get_config()
    np.testing.assert_allclose(loaded.topics(), lda.topics())
    np.testing.assert_allclose(np.asarray(loaded.features(x)), np.asarray(lda.features(x)))


def test_distiller_round_trip_with_a_topic_model_student(tmp_path):
    x = counts(16, seed=8)
    teacher = np.random.default_rng(9).random((16, 7)).astype("float32")
    distiller = ConstrainedVIDistiller(model(), multiplier=10.0)
    distiller.compile(optimizer=keras.optimizers.Adam(0.01))
    history = distiller.fit(x, teacher, batch_size=8, epochs=1, verbose=0).history
    assert {"elbo_loss", "constraint", "multiplier"} <= set(history)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    np.testing.assert_allclose(
        np.asarray(loaded.student.features(x)), np.asarray(distiller.student.features(x)), rtol=1e-6
    )


def test_exported_model_serves_topic_proportions(tmp_path):
    lda = model()
    x = counts(4)
    path = export_topic_model(lda, str(tmp_path / "export"))
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(x).numpy(), np.asarray(lda.features(x)), rtol=1e-5)
    probs = served.word_probabilities(x).numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        served.log_likelihood(x).numpy(), (x * np.log(probs)).sum(-1), rtol=1e-5
    )


@pytest.mark.parametrize(
    "bad,message",
    [
        (-np.ones((2, V), "float32"), "negative"),
        (np.full((2, V), 0.5, "float32"), "non-integer"),
        (np.ones((2, V + 1), "float32"), "vocabulary"),
        (np.full((2, V), np.nan, "float32"), "NaN"),
    ],
)
def test_bad_counts_are_refused_before_any_step(bad, message):
    lda = TopicModel(K, V, corpus_size=10)
    lda.compile(optimizer="adam")
    with pytest.raises(ValueError, match=message):
        lda.fit(bad, epochs=1, verbose=0)
    distiller = ConstrainedVIDistiller(TopicModel(K, V, corpus_size=10))
    distiller.compile(optimizer="adam")
    if message != "NaN":  # NaN is caught by the distiller's own finiteness check
        with pytest.raises(ValueError, match=message):
            distiller.fit(bad, np.ones((2, 4), "float32"), epochs=1, verbose=0)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"num_topics": 0}, "num_topics"),
        ({"num_topics": 1}, "num_topics"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"alpha": 0.0}, "alpha"),
        ({"eta": -1.0}, "eta"),
        ({"corpus_size": 0}, "corpus_size"),
        ({"feature_mode": "mode"}, "feature_mode"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    arguments = {"num_topics": K, "vocab_size": V, "corpus_size": 10, **kwargs}
    with pytest.raises(ValueError, match=argument):
        TopicModel(**arguments)
