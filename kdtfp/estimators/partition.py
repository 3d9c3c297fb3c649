"""Estimators of an RBM's log partition function at a compute budget counted in energy units.

Unit of compute `E` = one D x H product of the RBM (D*H multiply-adds), i.e. one free-energy
evaluation `F(v)` (METHODS.md 5.8). Costs per draw, with `c_q` the proposal's cost in E
(a NADE 64-50 against an RBM 64-16: `c_q = 2 * 50 / 16 = 6.25`):

| estimator | per unit of work | E |
|---|---|---|
| `importance_sampling` | one proposal draw with its log q, one F(v) | `c_q + 1` |
| `bridge_sampling` | a proposal draw, F at it; a Gibbs chain of `sweeps` sweeps started there, F and log q at its end | `2 c_q + 2 + 2 sweeps` |
| `annealed_importance_sampling` (`kdtfp.estimators.ais`) | one chain at one temperature: the weight increment and one block-Gibbs sweep | `2` |
| `exact_enumeration` | one hidden state | `1` (2^H in all) |

Each estimator takes `budget` (E per estimate) and `repeats`, runs the `repeats` independent
estimates in one vectorised pass, and returns a `LogZEstimate` of arrays `[repeats]`. All
log-weight arithmetic is float64. Costs are algorithmic multiply-add counts (METHODS.md 5.8), not
wall-clock: `NADE.log_prob` runs as a masked [B*D, D] x [D, H] product on CPU (faster there, more
flops), while the count charges a NADE density its sequential 2 * D * H.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from kdtfp.models.rbm import RBM, exact_log_partition, gibbs_chain

#: Largest number of proposal draws made in one call (memory: this many x D floats).
_CHUNK = 1 << 16
#: Densities are evaluated in chunks of this many (the NADE keeps a [chunk, D, D] tensor).
_DENSITY_CHUNK = 4096


@dataclass
class LogZEstimate:
    """`repeats` independent estimates of log Z, each at `cost` E.

    `log_z`, `std_err` (of log Z, delta method), `lower`, `upper` (`log_z -/+ num_sigmas *
    std_err`) are float64 arrays `[repeats]`. `settings` records what was run (sample counts,
    chains, temperatures, ...).
    """

    method: str
    log_z: np.ndarray
    std_err: np.ndarray
    num_sigmas: float
    cost: float
    settings: dict = field(default_factory=dict)

    @property
    def lower(self) -> np.ndarray:
        return self.log_z - self.num_sigmas * self.std_err

    @property
    def upper(self) -> np.ndarray:
        return self.log_z + self.num_sigmas * self.std_err

    def errors(self, log_z_true) -> np.ndarray:
        """`log_z - log_z_true` per repeat."""
        return self.log_z - float(log_z_true)

    def rmse(self, log_z_true) -> float:
        return float(np.sqrt(np.mean(self.errors(log_z_true) ** 2)))

    def coverage(self, log_z_true) -> float:
        """Fraction of repeats whose interval contains `log_z_true`."""
        return float(np.mean((self.lower <= log_z_true) & (log_z_true <= self.upper)))


# ---- argument checks ------------------------------------------------------------------------
def _check_rbm(rbm):
    if not isinstance(rbm, RBM):
        raise ValueError(f"`rbm` must be a kdtfp.models.rbm.RBM, got {type(rbm).__name__}.")
    return rbm


def _check_positive_int(name, value, minimum=1):
    if not (
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    ):
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_budget(budget, per_unit, what):
    budget = float(budget)
    if not budget > 0 or not math.isfinite(budget):
        raise ValueError(
            f"`budget` must be a finite number of energy evaluations > 0, got {budget}."
        )
    if budget < per_unit:
        raise ValueError(f"`budget`={budget:g} E is below the cost of one {what} ({per_unit:g} E).")
    return budget


def _proposal_cost(rbm, proposal, proposal_cost):
    if proposal_cost is None:
        if not hasattr(proposal, "cost_per_sample"):
            raise ValueError(
                "`proposal_cost` (E per draw with its log-density) is needed: the proposal has no "
                "`cost_per_sample(rbm_hidden)` method."
            )
        proposal_cost = proposal.cost_per_sample(rbm.num_hidden)
    proposal_cost = float(proposal_cost)
    if not proposal_cost >= 0:
        raise ValueError(f"`proposal_cost` must be >= 0, got {proposal_cost}.")
    if getattr(proposal, "num_inputs", rbm.num_visible) != rbm.num_visible:
        raise ValueError(
            f"`proposal` models {proposal.num_inputs} inputs but the RBM has {rbm.num_visible} "
            "visible units."
        )
    return proposal_cost


def _finite(name, values):
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: NaN or Inf log-weights; check the RBM and the proposal.")
    return values


# ---- shared pieces --------------------------------------------------------------------------
def _log_mean_exp(log_w, axis=-1):
    peak = np.max(log_w, axis=axis, keepdims=True)
    return np.squeeze(peak, axis) + np.log(np.mean(np.exp(log_w - peak), axis=axis))


def _relative_std_err(log_w):
    """Delta-method std. error of `log mean exp(log_w)` along the last axis: sd(w) / (sqrt(n) mean w)."""
    w = np.exp(log_w - np.max(log_w, axis=-1, keepdims=True))
    n = log_w.shape[-1]
    sd = np.std(w, axis=-1, ddof=1) if n > 1 else np.full(w.shape[:-1], np.inf)
    return sd / (np.sqrt(n) * np.mean(w, axis=-1))


def _free_energy64(v, params):
    kernel, visible_bias, hidden_bias = params
    return -v @ visible_bias - np.logaddexp(0.0, v @ kernel + hidden_bias).sum(-1)


def _draw(proposal, count, seed):
    """`count` proposal draws `(x float64 [count, D], log q float64 [count])`, in chunks."""
    xs, logs = [], []
    for index, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        x, log_q = proposal.sample(n, seed=tf.constant([int(seed), index], tf.int32))
        xs.append(np.asarray(x, np.float64))
        logs.append(np.asarray(log_q, np.float64))
    return np.concatenate(xs), np.concatenate(logs)


def _log_q(proposal, x):
    return np.concatenate(
        [
            np.asarray(
                proposal.log_prob(tf.constant(x[s : s + _DENSITY_CHUNK], tf.float32)), np.float64
            )
            for s in range(0, len(x), _DENSITY_CHUNK)
        ]
    )


# ---- estimators -----------------------------------------------------------------------------
def exact_enumeration(rbm) -> LogZEstimate:
    """Exact log Z by enumeration (`kdtfp.models.rbm.exact_log_partition`); cost 2^min(D,H) E."""
    rbm = _check_rbm(rbm)
    log_z = exact_log_partition(rbm)
    return LogZEstimate(
        "exact",
        np.array([log_z]),
        np.zeros(1),
        0.0,
        float(2 ** min(rbm.num_hidden, rbm.num_visible)),
    )


def importance_sampling(
    rbm, proposal, budget, repeats=1, num_sigmas=3.0, proposal_cost=None, seed=0
) -> LogZEstimate:
    """Importance sampling with a tractable proposal q (a NADE):

    ```python
    x_s ~ q,  l_s = -F(x_s) - log q(x_s)             # s = 1..S, S = floor(budget / (c_q + 1))
    log Z_hat = log mean_s exp(l_s)
    se = std(exp(l)) / (sqrt(S) * mean(exp(l)))     # delta method, in log space
    ```

    `Z_hat` is unbiased; `log Z_hat` is biased low by about se^2 / 2, and a proposal that misses
    modes of the RBM gives a low estimate with an over-confident interval.

    Args:
        rbm: `kdtfp.models.rbm.RBM`.
        proposal: has `sample(n, seed) -> (x [n, D], log q [n])` (e.g. `kdtfp.models.nade.NADE`).
        budget: E per estimate (> 0).
        repeats: independent estimates.
        num_sigmas: half-width of the interval in standard errors (3, as in the thesis).
        proposal_cost: E per draw; default `proposal.cost_per_sample(rbm.num_hidden)`.
        seed: int.
    """
    rbm = _check_rbm(rbm)
    cost_q = _proposal_cost(rbm, proposal, proposal_cost)
    budget = _check_budget(budget, cost_q + 1.0, "proposal draw with its energy")
    repeats = _check_positive_int("repeats", repeats)
    num_samples = int(budget // (cost_q + 1.0))
    x, log_q = _draw(proposal, repeats * num_samples, seed)
    log_w = _finite("importance_sampling", -_free_energy64(x, rbm.numpy_parameters()) - log_q)
    log_w = log_w.reshape(repeats, num_samples)
    return LogZEstimate(
        "importance_sampling",
        _log_mean_exp(log_w),
        _relative_std_err(log_w),
        float(num_sigmas),
        num_samples * (cost_q + 1.0),
        {"num_samples": num_samples},
    )


def bridge_sampling(
    rbm,
    proposal,
    budget,
    repeats=1,
    sweeps=1,
    num_sigmas=3.0,
    max_iterations=100,
    tolerance=1e-10,
    proposal_cost=None,
    seed=0,
) -> LogZEstimate:
    """Bridge sampling (Meng & Wong 1996) between a proposal q and the RBM, iterated.

    `n` draws `x_i ~ q`, and `n` RBM samples `y_j` from block-Gibbs chains of `sweeps` sweeps
    started at those draws (one sample per chain). With `r = p~ / q` (`p~ = exp(-F)`) and the
    bridge `p* = p~ q / (p~ + Z_hat q)` (equal sample sizes):

    ```python
    Z_hat <- mean_i [p*/q](x_i) / mean_j [p*/p~](y_j)
           = mean_i r(x_i) / (r(x_i) + Z_hat)  /  mean_j 1 / (r(y_j) + Z_hat)
    ```

    iterated in log space from the importance-sampling estimate until it moves by less than
    `tolerance` (the log-weights are computed once; iterations cost no energy evaluations).
    Std. error: the delta method on both means, treated as independent,
    `se^2 = var(f1) / (n mean(f1)^2) + var(f2) / (n mean(f2)^2)`. As in the thesis the chains
    start at the proposal draws themselves, so with few sweeps the two sets are correlated and
    the RBM samples are not yet stationary: both make the interval approximate, and too few
    sweeps bias the estimate towards the proposal (tune `sweeps` at a fixed budget).

    Args: as `importance_sampling`, plus `sweeps` (>= 1) Gibbs sweeps per RBM sample,
    `max_iterations` and `tolerance` of the fixed-point iteration.
    """
    rbm = _check_rbm(rbm)
    cost_q = _proposal_cost(rbm, proposal, proposal_cost)
    sweeps = _check_positive_int("sweeps", sweeps)
    per_pair = 2 * cost_q + 2.0 + 2.0 * sweeps
    budget = _check_budget(budget, per_pair, "bridge pair (proposal draw + Gibbs chain)")
    repeats = _check_positive_int("repeats", repeats)
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    n = int(budget // per_pair)
    params = rbm.numpy_parameters()
    x, log_q_x = _draw(proposal, repeats * n, seed)
    log_r1 = _finite("bridge_sampling", -_free_energy64(x, params) - log_q_x).reshape(repeats, n)
    y = np.asarray(rbm_gibbs(rbm, x.astype(np.float32), sweeps, seed=[int(seed), 99]), np.float64)
    log_r2 = -_free_energy64(y, params) - _log_q(proposal, y)
    log_r2 = _finite("bridge_sampling", log_r2).reshape(repeats, n)

    log_z = _log_mean_exp(log_r1)
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007
        numerator = _log_mean_exp(log_r1 - np.logaddexp(log_r1, log_z[:, None]))
        denominator = _log_mean_exp(-np.logaddexp(log_r2, log_z[:, None]))
        new = numerator - denominator
        change = np.max(np.abs(new - log_z))
        log_z = new
        if change < tolerance:
            break
    f1 = log_r1 - np.logaddexp(log_r1, log_z[:, None])
    f2 = -np.logaddexp(log_r2, log_z[:, None])
    std_err = np.sqrt(_relative_std_err(f1) ** 2 + _relative_std_err(f2) ** 2)
    return LogZEstimate(
        "bridge_sampling",
        log_z,
        std_err,
        float(num_sigmas),
        n * per_pair,
        {"num_samples": n, "sweeps": sweeps, "iterations": iterations},
    )


def rbm_gibbs(rbm, v, sweeps, seed):
    """`sweeps` block-Gibbs sweeps of the chains `v` [N, D] (float32 in, float32 out)."""
    kernel, visible_bias, hidden_bias = rbm.numpy_parameters()
    return gibbs_chain(v, kernel, visible_bias, hidden_bias, sweeps, seed).numpy()
