"""`kdtfp.models.parallel_chains`: C SGLD chains of one student in one model."""

import keras
import numpy as np
import pytest

from kdtfp.callbacks import PosteriorSampler
from kdtfp.losses import TeacherDirichletPosterior
from kdtfp.models import parallel_chains, repeat_targets, split_chain_samples
from kdtfp.optimizers import SGLD


def _student(seed=0):
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, "relu", kernel_initializer=init(seed))(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init(seed + 1))(h))


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype("float32")
    targets = TeacherDirichletPosterior.targets(rng.integers(0, 3, n), rng.standard_normal((n, 3)))
    return x, targets


def test_outputs_stack_copies_that_start_at_the_students_weights():
    student = _student()
    model = parallel_chains(student, 3)
    x, _ = _data()
    out = np.asarray(model(x))
    assert out.shape == (32, 3, 3)
    for chain in range(3):
        np.testing.assert_allclose(out[:, chain], np.asarray(student(x)), atol=1e-6)
    # The copies own their weights: training them leaves the student alone.
    assert len(model.trainable_weights) == 3 * len(student.trainable_weights)


def test_one_noise_free_step_with_data_size_n_times_c_is_the_single_chain_step():
    x, targets = _data()
    loss = TeacherDirichletPosterior(lam=2.0, temperature=2.0)
    single = _student()
    single.compile(optimizer=SGLD(1e-3, data_size=100, temperature=0.0), loss=loss)
    model = parallel_chains(_student(), 4)
    model.compile(optimizer=SGLD(1e-3, data_size=100 * 4, temperature=0.0), loss=loss)
    single.fit(x, targets, batch_size=32, epochs=2, verbose=0, shuffle=False)
    model.fit(x, repeat_targets(targets, 4), batch_size=32, epochs=2, verbose=0, shuffle=False)
    for chain in split_chain_samples(_record(model), 4):
        for got, want in zip(chain.samples[0], single.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _record(model):
    sampler = PosteriorSampler(burn_in=0, thin=1, max_samples=1, verbose=0)
    sampler.set_model(model)
    sampler.on_train_batch_end(0)
    return sampler


def test_with_noise_the_chains_move_apart_and_split_into_student_shaped_samples():
    x, targets = _data()
    model = parallel_chains(_student(), 3)
    model.compile(optimizer=SGLD(1e-3, data_size=3 * 32, seed=1), loss=TeacherDirichletPosterior())
    sampler = PosteriorSampler(burn_in=2, thin=2, max_samples=10, verbose=0)
    model.fit(x, repeat_targets(targets, 3), batch_size=8, epochs=3, verbose=0, callbacks=[sampler])
    chains = split_chain_samples(sampler, 3)
    assert [len(c) for c in chains] == [len(sampler)] * 3
    shapes = [w.shape for w in _student().get_weights()]
    for chain in chains:
        assert [w.shape for w in chain.samples[0]] == shapes
    assert not np.allclose(chains[0].samples[-1][0], chains[1].samples[-1][0])
    combined = PosteriorSampler.combine(chains)
    assert combined.summary()["n_chains"] == 3


def test_repeat_targets_for_arrays_and_tensors():
    targets = np.arange(6, dtype="float32").reshape(3, 2)
    repeated = repeat_targets(targets, 4)
    assert repeated.shape == (3, 4, 2)
    np.testing.assert_array_equal(repeated[:, 2], targets)
    np.testing.assert_array_equal(np.asarray(repeat_targets(keras.ops.array(targets), 4)), repeated)


def test_keras_file_round_trip(tmp_path):
    model = parallel_chains(_student(), 2)
    x, _ = _data()
    model.save(tmp_path / "chains.keras")
    loaded = keras.saving.load_model(tmp_path / "chains.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


@pytest.mark.parametrize("num_chains", [0, 1.5, True, -2])
def test_bad_num_chains_raises_naming_it(num_chains):
    with pytest.raises(ValueError, match="num_chains"):
        parallel_chains(_student(), num_chains)


def test_split_needs_a_multiple_of_the_chain_count():
    sampler = _record(parallel_chains(_student(), 2))
    with pytest.raises(ValueError, match="num_chains=3"):
        split_chain_samples(sampler, 3)


def _two_sgld_epochs(model, x, targets, jit=False):
    model.compile(
        optimizer=SGLD(1e-3, data_size=3 * 32, seed=4),
        loss=TeacherDirichletPosterior(lam=1.0),
        jit_compile=jit,
    )
    model.fit(x, repeat_targets(targets, 3), batch_size=16, epochs=2, verbose=0, shuffle=False)
    return [np.asarray(w) for w in model.get_weights()]


def test_two_replicas_take_the_same_noisy_steps_as_one_device(mirrored_strategy):
    # DESIGN rules 5 and 7: the loss is scaled per replica by Keras and the noise comes from a
    # SeedGenerator, so the chains are the same on 2 replicas as on one device.
    x, targets = _data()
    keras.utils.set_random_seed(0)
    single = _two_sgld_epochs(parallel_chains(_student(), 3), x, targets)
    keras.utils.set_random_seed(0)
    with mirrored_strategy.scope():
        model = parallel_chains(_student(), 3)
    mirrored = _two_sgld_epochs(model, x, targets)
    for got, want in zip(mirrored, single, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_jit_compiled_sampling_runs_and_moves_the_chains_apart():
    x, targets = _data()
    weights = _two_sgld_epochs(parallel_chains(_student(), 3), x, targets, jit=True)
    assert all(np.all(np.isfinite(w)) for w in weights)
    per_chain = len(weights) // 3
    assert not np.allclose(weights[0], weights[per_chain])  # chain 0 vs chain 1 kernels
