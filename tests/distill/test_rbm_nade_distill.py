"""RBM -> NADE distillation on sample streams, with exact KL by enumeration on a tiny RBM."""

import itertools

import keras
import numpy as np
import pytest

from kdtfp.distill.rbm_nade import distill_rbm_into_nade, rbm_stream
from kdtfp.models.nade import NADE
from kdtfp.models.rbm import RBM

D, H = 8, 4


@pytest.fixture(scope="module")
def rbm():
    rng = np.random.default_rng(0)
    model = RBM(D, H, seed=0)
    model.kernel.assign(rng.normal(scale=1.5, size=(D, H)).astype("float32"))
    model.visible_bias.assign(rng.normal(scale=0.5, size=D).astype("float32"))
    model.hidden_bias.assign(rng.normal(scale=0.5, size=H).astype("float32"))
    return model


def exact_kl(rbm, nade):
    """KL(RBM || NADE) by enumerating all 2^D visible states."""
    states = np.array(list(itertools.product([0.0, 1.0], repeat=D)), np.float32)
    log_p = rbm.log_prob(states)
    log_q = np.asarray(nade.log_prob(states), np.float64)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


@pytest.mark.parametrize(
    "loss, stream", [("likelihood", "gibbs"), ("likelihood", "exact"), ("square", "gibbs")]
)
def test_distillation_drives_the_exact_kl_down(rbm, loss, stream):
    keras.utils.set_random_seed(0)
    nade = NADE(D, 16)
    before = exact_kl(rbm, nade)
    gibbs = {"num_chains": 256, "burn_in": 20} if stream == "gibbs" else {}
    history = distill_rbm_into_nade(
        rbm,
        nade,
        steps=400,
        batch_size=64,
        loss=loss,
        stream=stream,
        optimizer=keras.optimizers.Adam(1e-2),
        **gibbs,
    )
    after = exact_kl(rbm, nade)
    assert np.isfinite(history.history["loss"][0])
    assert after < 0.05 < before, (before, after)


def test_square_stream_carries_normalised_log_densities(rbm):
    log_z = rbm.log_partition()
    x, y = next(iter(rbm_stream(rbm, 16, loss="square", num_chains=32, burn_in=2)))
    np.testing.assert_array_equal(x.numpy(), y.numpy()[:, :-1])
    np.testing.assert_allclose(y.numpy()[:, -1], rbm.log_prob(x.numpy(), log_z), atol=1e-4)


def test_bad_arguments_name_themselves(rbm):
    with pytest.raises(ValueError, match="`loss`"):
        rbm_stream(rbm, 8, loss="kl")
    with pytest.raises(ValueError, match="`stream`"):
        rbm_stream(rbm, 8, stream="mcmc")
    with pytest.raises(ValueError, match="`nade`"):
        distill_rbm_into_nade(rbm, NADE(D + 1, 4), steps=1)
    with pytest.raises(ValueError, match="`steps`"):
        distill_rbm_into_nade(rbm, NADE(D, 4), steps=0)
    with pytest.raises(ValueError, match="`num_chains`"):
        rbm_stream(rbm, 64, num_chains=10)
