"""log Z estimators on a tiny RBM with known log Z: accuracy, unbiasedness in Z, intervals, budgets."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from kdtfp.estimators import (
    annealed_importance_sampling,
    base_rate_bias,
    bridge_sampling,
    exact_enumeration,
    importance_sampling,
    temperature_schedule,
)
from kdtfp.models.rbm import RBM

D, H = 10, 6


@pytest.fixture(scope="module")
def rbm():
    rng = np.random.default_rng(0)
    model = RBM(D, H, seed=0)
    model.kernel.assign(rng.normal(scale=0.8, size=(D, H)).astype("float32"))
    model.visible_bias.assign(rng.normal(scale=0.5, size=D).astype("float32"))
    model.hidden_bias.assign(rng.normal(scale=0.5, size=H).astype("float32"))
    return model


@pytest.fixture(scope="module")
def states():
    return np.array(list(itertools.product([0.0, 1.0], repeat=D)), np.float32)


@pytest.fixture(scope="module")
def log_z(rbm):
    return rbm.log_partition()


class TableProposal:
    """A proposal over {0,1}^D given by a probability table over all 2^D states."""

    num_inputs = D

    def __init__(self, states, probs, cost=2.0):
        self.states, self.probs, self.cost = states, probs / probs.sum(), cost

    def cost_per_sample(self, rbm_hidden):
        return self.cost

    def _log(self, index):
        return np.log(self.probs[index]).astype(np.float32)

    def sample(self, n, seed):
        seed = np.asarray(seed).tolist()
        index = np.random.default_rng(seed).choice(len(self.probs), size=n, p=self.probs)
        return tf.constant(self.states[index]), tf.constant(self._log(index))

    def log_prob(self, x):
        index = (np.asarray(x).astype(int) * (2 ** np.arange(D)[::-1])).sum(-1)
        return tf.constant(self._log(index))


@pytest.fixture(scope="module")
def exact_proposal(rbm, states):
    return TableProposal(states, np.exp(rbm.log_prob(states)))


@pytest.fixture(scope="module")
def factorised_proposal(rbm, states):
    # The product of the RBM's exact marginals: a decent proposal that misses the correlations.
    p = np.exp(rbm.log_prob(states))
    marginals = (p[:, None] * states).sum(0)
    table = np.prod(np.where(states == 1, marginals, 1 - marginals), axis=1)
    return TableProposal(states, table)


def test_importance_sampling_with_the_exact_proposal_has_no_error(rbm, log_z, exact_proposal):
    estimate = importance_sampling(rbm, exact_proposal, budget=300, repeats=3)
    np.testing.assert_allclose(estimate.log_z, log_z, atol=1e-4)
    assert np.all(estimate.std_err < 1e-4)


def test_importance_sampling_is_unbiased_in_z(rbm, log_z, factorised_proposal):
    # E[Z_hat] = Z for any proposal covering the support, even with 10 samples per estimate.
    estimate = importance_sampling(rbm, factorised_proposal, budget=30, repeats=2000, seed=1)
    assert estimate.settings["num_samples"] == 10
    ratio = np.exp(estimate.log_z - log_z)
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / np.sqrt(len(ratio))
    # log Z_hat is biased low (Jensen), Z_hat is not.
    assert estimate.errors(log_z).mean() < 0


def test_importance_sampling_intervals_cover_the_exact_value(rbm, log_z, factorised_proposal):
    estimate = importance_sampling(rbm, factorised_proposal, budget=1500, repeats=100, seed=2)
    assert estimate.coverage(log_z) >= 0.9
    assert estimate.rmse(log_z) < 0.1
    assert np.all(estimate.lower < estimate.log_z) and np.all(estimate.log_z < estimate.upper)


def test_bridge_sampling_is_accurate_and_covers(rbm, log_z, factorised_proposal, exact_proposal):
    exact = bridge_sampling(rbm, exact_proposal, budget=2000, repeats=3, sweeps=1)
    np.testing.assert_allclose(exact.log_z, log_z, atol=1e-4)
    estimate = bridge_sampling(rbm, factorised_proposal, budget=3000, repeats=50, sweeps=5, seed=3)
    assert estimate.coverage(log_z) >= 0.9
    assert abs(estimate.errors(log_z).mean()) < 0.05
    assert estimate.settings["iterations"] < 100  # the fixed point converged


@pytest.mark.parametrize("base", ["uniform", "base_rate"])
def test_ais_is_unbiased_in_z_and_accurate(rbm, log_z, states, base):
    bias = None
    if base == "base_rate":
        data = states[
            np.random.default_rng(0).choice(len(states), 500, p=np.exp(rbm.log_prob(states)))
        ]
        bias = base_rate_bias(data)
    estimate = annealed_importance_sampling(rbm, budget=4000, num_chains=20, repeats=200,
                                            base_visible_bias=bias, seed=4)  # fmt: skip
    assert estimate.settings["num_temperatures"] == 100
    ratio = np.exp(estimate.log_z - log_z)
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / np.sqrt(len(ratio)) + 1e-3
    assert estimate.rmse(log_z) < 0.1
    assert estimate.coverage(log_z) >= 0.85


def test_ais_with_one_temperature_is_importance_sampling_from_the_base(rbm, log_z):
    # K = 1: log w = log p~(v) - log p~_0(v) at v ~ p_0, i.e. plain IS from the base model.
    estimate = annealed_importance_sampling(rbm, budget=2 * 5000, num_chains=5000, repeats=2)
    assert estimate.settings["num_temperatures"] == 1
    np.testing.assert_allclose(estimate.log_z, log_z, atol=0.2)


def test_budget_accounting(rbm, factorised_proposal):
    cost_q = factorised_proposal.cost_per_sample(H)  # 2 E per draw in this test
    est = importance_sampling(rbm, factorised_proposal, budget=1000, repeats=2)
    assert est.settings["num_samples"] == int(1000 // (cost_q + 1))
    assert 1000 - (cost_q + 1) < est.cost <= 1000
    est = bridge_sampling(rbm, factorised_proposal, budget=1000, sweeps=3)
    per_pair = 2 * cost_q + 2 + 2 * 3
    assert est.settings["num_samples"] == int(1000 // per_pair)
    assert 1000 - per_pair < est.cost <= 1000
    est = annealed_importance_sampling(rbm, budget=1000, num_chains=7)
    assert est.settings["num_temperatures"] == 1000 // 14
    assert est.cost == 2 * 7 * (1000 // 14) <= 1000
    assert exact_enumeration(rbm).cost == 2**H


def test_nade_proposal_cost_is_two_hidden_ratio():
    from kdtfp.models.nade import NADE

    assert NADE(64, 50).cost_per_sample(16) == pytest.approx(6.25)


def test_temperature_schedule_runs_from_zero_to_one():
    for kind in ("sigmoid", "linear"):
        betas = temperature_schedule(50, kind)
        assert betas[0] == 0 and betas[-1] == 1 and np.all(np.diff(betas) > 0)


def test_bad_input_names_the_argument(rbm, factorised_proposal):
    for budget in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="`budget`"):
            importance_sampling(rbm, factorised_proposal, budget=budget)
    with pytest.raises(ValueError, match="`budget`.*below the cost"):
        bridge_sampling(rbm, factorised_proposal, budget=5)
    with pytest.raises(ValueError, match="`budget`.*below the cost"):
        annealed_importance_sampling(rbm, budget=10, num_chains=100)
    with pytest.raises(ValueError, match="`num_chains`"):
        annealed_importance_sampling(rbm, budget=100, num_chains=0)
    with pytest.raises(ValueError, match="`repeats`"):
        importance_sampling(rbm, factorised_proposal, budget=100, repeats=0)
    with pytest.raises(ValueError, match="`proposal_cost`"):
        importance_sampling(rbm, object(), budget=100)
    with pytest.raises(ValueError, match="`rbm`"):
        importance_sampling("rbm", factorised_proposal, budget=100)
    with pytest.raises(ValueError, match="`base_visible_bias`"):
        annealed_importance_sampling(rbm, budget=100, num_chains=2, base_visible_bias=np.zeros(3))

    class NaNProposal(TableProposal):
        def sample(self, n, seed):
            x, log_q = super().sample(n, seed)
            return x, log_q * np.nan

    bad = NaNProposal(factorised_proposal.states, factorised_proposal.probs)
    with pytest.raises(ValueError, match="NaN"):
        importance_sampling(rbm, bad, budget=100)
