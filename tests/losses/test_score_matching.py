"""AverageScoreMatching / InputScores: NumPy reference of the thesis's L_ASM on a tiny logistic
case, unbiasedness of the online gradient, Distiller and fit paths, XLA, replicas, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp.distill.distiller import Distiller
from kdtfp.losses.score_matching import AverageScoreMatching, InputScores, score_rows
from kdtfp.losses.soft_target import SoftTargetKL
from kdtfp.models.mixture_predictive import MixturePredictive
from kdtfp.teachers.mcmc import mc_predictive_log_probs

RNG = np.random.default_rng(3)
BAG = RNG.normal(0.0, 1.5, (5, 2)).astype("float32")  # S = 5 posterior samples, D = 2
X = RNG.normal(0.0, 2.0, (6, 2)).astype("float32")


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _numpy_mixture(weights, x):
    """`f(x) = mean_k sigmoid(w_k . x)`, `grad log f`, `grad log(1 - f)` in float64."""
    w, x = np.asarray(weights, "float64"), np.asarray(x, "float64")
    s = _sigmoid(x @ w.T)  # [B, K]
    f = s.mean(1)
    grad_f = (s * (1 - s)) @ w / len(w)  # [B, D]
    return f, grad_f / f[:, None], -grad_f / (1 - f)[:, None]


def _numpy_loss(bag, kernel, x, score_weight, kl_weight):
    """The thesis's L_ASM (METHODS.md §5.3) plus kl_weight * KL, averaged over the batch."""
    g, grad_log_g, grad_log_1mg = _numpy_mixture(bag, x)
    f, grad_log_f, grad_log_1mf = _numpy_mixture(kernel.T, x)
    asm = 0.5 * g * np.sum((grad_log_f - grad_log_g) ** 2, 1) + 0.5 * (1 - g) * np.sum(
        (grad_log_1mf - grad_log_1mg) ** 2, 1
    )
    kl = g * np.log(g / f) + (1 - g) * np.log((1 - g) / (1 - f))
    return float(np.mean(score_weight * asm + kl_weight * kl))


def _teacher_rows(samples, x):
    return score_rows(lambda z: mc_predictive_log_probs(samples, z), x)


def _student(m=3, seed=0):
    model = MixturePredictive(m, seed=seed)
    model.build((None, 2))
    return model


@keras.saving.register_keras_serializable(package="kdtfp_tests")
class BagTeacher(keras.Model):
    """A frozen teacher model: the MC predictive of a stored bag, as log-probabilities."""

    def __init__(self, bag, **kwargs):
        super().__init__(**kwargs)
        self.bag = self.add_weight(
            shape=np.shape(bag),
            initializer=keras.initializers.Constant(np.asarray(bag)),
            trainable=False,
            name="bag",
        )

    def call(self, x):
        return mc_predictive_log_probs(self.bag, x)


def test_score_rows_match_the_closed_form_gradient_of_the_mc_predictive():
    rows = _teacher_rows(BAG, X).numpy()
    g, grad_log_g, grad_log_1mg = _numpy_mixture(BAG, X)
    assert rows.shape == (6, 2, 3)
    np.testing.assert_allclose(np.exp(rows[:, 1, 0]), g, rtol=1e-5)
    np.testing.assert_allclose(rows[:, 1, 1:], grad_log_g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows[:, 0, 1:], grad_log_1mg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score_weight, kl_weight", [(1.0, 0.0), (0.3, 1.0)])
def test_average_score_matching_matches_numpy_on_a_tiny_logistic_case(score_weight, kl_weight):
    student = _student()
    scored = InputScores(student)
    loss = AverageScoreMatching(score_weight=score_weight, kl_weight=kl_weight)
    value = float(loss(_teacher_rows(BAG, X), scored(X)))
    reference = _numpy_loss(BAG, student.kernel.numpy(), X, score_weight, kl_weight)
    np.testing.assert_allclose(value, reference, rtol=1e-4)


def test_score_matching_of_the_teacher_with_itself_is_zero():
    rows = _teacher_rows(BAG, X)
    assert float(AverageScoreMatching()(rows, rows)) == pytest.approx(0.0, abs=1e-10)


def test_online_gradient_averages_to_the_batch_gradient():
    # The parameter gradient is linear in the teacher's (p, grad p): one-sample targets, averaged
    # over the bag, give exactly the gradient against the bag's MC predictive (METHODS.md §5.4).
    student = _student()
    scored = InputScores(student)
    loss = AverageScoreMatching(score_weight=0.5, kl_weight=1.0)

    @tf.function
    def gradient(samples):
        with tf.GradientTape() as tape:
            value = loss(_teacher_rows(samples, X), scored(X))
        return tape.gradient(value, student.kernel)

    batch = gradient(BAG).numpy()
    online = np.mean([gradient(BAG[s : s + 1]).numpy() for s in range(len(BAG))], axis=0)
    np.testing.assert_allclose(online, batch, rtol=1e-4, atol=1e-6)
    assert np.abs(batch).max() > 1e-3


def test_distiller_takes_average_score_matching_as_an_input_gradient_objective():
    student = _student()
    reference = _numpy_loss(BAG, student.kernel.numpy(), X, 1.0, 0.0)
    distiller = Distiller(
        student,
        BagTeacher(BAG),
        objectives=[(SoftTargetKL(1.0), 1.0), (AverageScoreMatching(), 0.5)],
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = distiller.evaluate(X, batch_size=6, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["average_score_matching"], reference, rtol=1e-4)
    kl = _numpy_loss(BAG, student.kernel.numpy(), X, 0.0, 1.0)
    np.testing.assert_allclose(logs["soft_target_kl"], kl, rtol=1e-4, atol=1e-7)


def _fit_one_step(strategy, jit_compile=False):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        student = MixturePredictive(3, seed=0)
        scored = InputScores(student)
        scored.build((None, 2))
        scored.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=AverageScoreMatching(score_weight=0.3, kl_weight=1.0),
            jit_compile=jit_compile,
        )
    x = np.tile(X, (2, 1))[:10]
    history = scored.fit(
        x, _teacher_rows(BAG, x).numpy(), batch_size=10, epochs=1, shuffle=False, verbose=0
    ).history
    return student.kernel.numpy(), history["loss"][0]


def test_one_fit_step_on_two_replicas_equals_one_step_on_one_device(mirrored_strategy):
    single_kernel, single_loss = _fit_one_step(tf.distribute.get_strategy())
    mirrored_kernel, mirrored_loss = _fit_one_step(mirrored_strategy)
    np.testing.assert_allclose(mirrored_kernel, single_kernel, atol=1e-6)
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)


def test_fit_with_jit_compile_on_cpu_matches_eager_step():
    eager_kernel, eager_loss = _fit_one_step(tf.distribute.get_strategy())
    jit_kernel, jit_loss = _fit_one_step(tf.distribute.get_strategy(), jit_compile=True)
    np.testing.assert_allclose(jit_kernel, eager_kernel, atol=1e-5)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-5)


def test_keras_round_trip_of_the_wrapped_student_and_the_loss(tmp_path):
    student = _student()
    scored = InputScores(student)
    scored.compile(optimizer="sgd", loss=AverageScoreMatching(score_weight=0.2, kl_weight=1.0))
    path = tmp_path / "scored.keras"
    scored.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(X).numpy(), scored(X).numpy(), rtol=1e-6)
    assert isinstance(loaded.model, MixturePredictive)
    loss = AverageScoreMatching.from_config(AverageScoreMatching(0.2, 1.0).get_config())
    assert (loss.score_weight, loss.kl_weight) == (0.2, 1.0)


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="score_weight"):
        AverageScoreMatching(score_weight=-1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        AverageScoreMatching(kl_weight=float("nan"))
    with pytest.raises(ValueError, match="both 0"):
        AverageScoreMatching(score_weight=0.0, kl_weight=0.0)
    with pytest.raises(ValueError, match="score rows"):
        AverageScoreMatching()(np.zeros((2, 2), "float32"), np.zeros((2, 2), "float32"))
    with pytest.raises(ValueError, match="keras.Model"):
        InputScores(lambda x: x)
