"""The persistent-Gibbs sample stream of an RBM (the transfer set of RBM -> NADE distillation)."""

import numpy as np

from kdtfp.datasets.rbm_stream import sample_stream
from kdtfp.models.rbm import RBM


def random_rbm(num_visible=6, num_hidden=4, seed=0):
    rng = np.random.default_rng(seed)
    rbm = RBM(num_visible, num_hidden, seed=seed)
    rbm.kernel.assign(rng.normal(size=(num_visible, num_hidden)).astype("float32"))
    rbm.visible_bias.assign(rng.normal(size=num_visible).astype("float32"))
    rbm.hidden_bias.assign(rng.normal(size=num_hidden).astype("float32"))
    return rbm


def test_sample_stream_emits_binary_batches_with_exact_log_densities():
    rbm = random_rbm(6, 4)
    log_z = rbm.log_partition()
    stream = sample_stream(rbm, batch_size=8, num_chains=16, burn_in=5, log_z=log_z)
    for v, log_p in stream.take(3):
        assert v.shape == (8, 6)
        assert set(np.unique(v.numpy())) <= {0.0, 1.0}
        np.testing.assert_allclose(log_p.numpy(), rbm.log_prob(v.numpy(), log_z), atol=1e-4)
