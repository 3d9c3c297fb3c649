"""Synthetic switching AR(1) sequences with true regimes and a binary outcome (METHODS.md 2.6).

The data are designed so that there is something to distil (the project lead's correction to
METHODS.md 2.6): the structure that dominates the likelihood is outcome-irrelevant, and the
outcome hangs on a subtle one.

* `nuisance` regimes (`num_regimes - 2` of them) differ from each other in noise scale
  (1 to `nuisance_scale_ratio`): telling them apart is worth a lot of likelihood, and nothing
  for the outcome;
* two "quiet" regimes, `good` and `bad`, share their dynamics and differ only by a small mean
  shift (`subtle_shift` noise standard deviations): worth little likelihood;
* the outcome depends on the time spent in `bad`, which, per sequence, is a random share
  (`risk ~ U(0, 1)`) of the time spent in the quiet regimes, plus a nonlinear term (a long
  `bad` episode). An AR-HMM with fewer states than regimes spends its states on the nuisance
  regimes and merges `good` with `bad`; a GRU trained on the outcome does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SwitchingARData:
    """Sequences `x [N, T, D]` float32, true regimes `regimes [N, T]` int32, outcomes
    `y [N]` int32 and their true probabilities `probs [N]`, split into train/val/test.

    `regimes` uses `bad_regime` and `good_regime` for the two quiet regimes; the others are
    nuisance regimes. `params` holds the generating AR parameters (`coefficients [R, D, D]`,
    `bias [R, D]`, `scale [R, D]`).
    """

    x_train: np.ndarray
    regimes_train: np.ndarray
    y_train: np.ndarray
    probs_train: np.ndarray
    x_val: np.ndarray
    regimes_val: np.ndarray
    y_val: np.ndarray
    probs_val: np.ndarray
    x_test: np.ndarray
    regimes_test: np.ndarray
    y_test: np.ndarray
    probs_test: np.ndarray
    bad_regime: int
    good_regime: int
    params: dict


def _rotation(dim, angle):
    rotation = np.eye(dim)
    c, s = np.cos(angle), np.sin(angle)
    rotation[:2, :2] = [[c, -s], [s, c]]
    return rotation


def longest_run(regimes, value):
    """Length of the longest run of `value` in each row of `regimes [N, T]`, `[N]` int."""
    hits = (np.asarray(regimes) == value).astype(int)
    best = np.zeros(hits.shape[0], int)
    current = np.zeros(hits.shape[0], int)
    for t in range(hits.shape[1]):
        current = (current + 1) * hits[:, t]
        best = np.maximum(best, current)
    return best


def switching_ar(
    num_sequences=800,
    length=48,
    dim=2,
    num_regimes=4,
    seed=0,
    stay_probability=0.9,
    quiet_probability=0.5,
    nuisance_scale_ratio=2.0,
    quiet_offset=3.0,
    subtle_shift=0.7,
    outcome_weight=8.0,
    sustained_weight=1.5,
    sustained_length=10,
    fractions=(0.6, 0.15, 0.25),
) -> SwitchingARData:
    """Samples switching AR(1) sequences, their regimes and a binary outcome.

    ```
    regimes r = 0..R-3 nuisance, R-2 good, R-1 bad;  x_t = A_r x_{t-1} + b_r + s_r * eps_t
    nuisance j:  A = 0.6 I, b = 0, s = geomspace(1, nuisance_scale_ratio, R - 2)[j]
    quiet:       A = 0.8 Rot(0.3) (stable, spectral radius 0.8), s = 0.8,
                 b_good = quiet_offset * e_2,  b_bad = b_good + subtle_shift * 0.8 * e_1
    risk ~ U(0, 1) per sequence
    entry  = quiet_probability * [(1 - risk) * good + risk * bad]
             + (1 - quiet_probability) * uniform(nuisance)
    z_1 ~ entry;  z_t = z_{t-1} w.p. stay_probability, else a fresh draw from entry
    logit = outcome_weight * (frac_bad - frac_good)
            + sustained_weight * (1[longest bad run >= sustained_length] - 1/2)
    y ~ Bernoulli(sigmoid(logit))
    ```

    Separating nuisance regimes (noise scales 1 vs 2: a pooled Gaussian cannot absorb the
    heteroscedasticity) is worth far more log-likelihood per step than separating `good` from
    `bad` (a mean shift that a merged AR state largely absorbs with a larger `A`), yet the
    teacher can see the quiet split by pooling evidence over the sequence. Because the share of
    quiet time that is `bad` is random per sequence, time spent in the merged quiet state says
    little about the outcome. `x_1` is drawn from the stationary law of `z_1`'s AR process
    (mean only; its noise scale).

    Args:
        num_sequences: N >= 10. length: T >= 2. dim: D in {2, 3}. num_regimes: R >= 3.
        seed: NumPy seed. Other arguments: as in the model above (`sustained_length` in steps).
        fractions: train / val / test shares.

    Returns:
        `SwitchingARData`.
    """
    for name, value, minimum in (
        ("num_sequences", num_sequences, 10),
        ("length", length, 2),
        ("num_regimes", num_regimes, 3),
        ("sustained_length", sustained_length, 1),
    ):
        if int(value) != value or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if dim not in (2, 3):
        raise ValueError(f"`dim` must be 2 or 3, got {dim!r}.")
    for name, value in (
        ("stay_probability", stay_probability),
        ("quiet_probability", quiet_probability),
    ):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must lie in (0, 1), got {value!r}.")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions <= 0):
        raise ValueError(f"`fractions` must be three positive numbers, got {fractions!r}.")

    rng = np.random.default_rng(seed)
    n, t_len, d, r = int(num_sequences), int(length), int(dim), int(num_regimes)
    good, bad = r - 2, r - 1
    nuisance = r - 2
    coefficients = np.zeros((r, d, d))
    bias = np.zeros((r, d))
    scale = np.ones((r, d))
    nuisance_scales = np.geomspace(1.0, nuisance_scale_ratio, nuisance)
    for j in range(nuisance):
        coefficients[j] = 0.6 * np.eye(d)
        scale[j] = nuisance_scales[j]
    for j in (good, bad):
        coefficients[j] = 0.8 * _rotation(d, 0.3)
        scale[j] = 0.8
        bias[j, 1] = quiet_offset
    bias[bad, 0] += subtle_shift * scale[bad, 0]
    stationary = np.stack([np.linalg.solve(np.eye(d) - coefficients[j], bias[j]) for j in range(r)])

    risk = rng.uniform(size=n)
    entry = np.zeros((n, r))
    entry[:, :nuisance] = (1.0 - quiet_probability) / nuisance
    entry[:, good] = quiet_probability * (1.0 - risk)
    entry[:, bad] = quiet_probability * risk

    def draw(rows):
        cumulative = np.cumsum(entry[rows], -1)
        u = rng.uniform(size=(len(rows), 1))
        return np.minimum((u > cumulative).sum(-1), r - 1)

    everyone = np.arange(n)
    regimes = np.zeros((n, t_len), int)
    regimes[:, 0] = draw(everyone)
    for t in range(1, t_len):
        regimes[:, t] = regimes[:, t - 1]
        switch = everyone[rng.uniform(size=n) > stay_probability]
        regimes[switch, t] = draw(switch)

    x = np.zeros((n, t_len, d))
    x[:, 0] = stationary[regimes[:, 0]] + scale[regimes[:, 0]] * rng.standard_normal((n, d))
    for t in range(1, t_len):
        z = regimes[:, t]
        mean = np.einsum("ned,nd->ne", coefficients[z], x[:, t - 1]) + bias[z]
        x[:, t] = mean + scale[z] * rng.standard_normal((n, d))

    frac_bad = (regimes == bad).mean(1)
    frac_good = (regimes == good).mean(1)
    sustained = (longest_run(regimes, bad) >= sustained_length).astype(float)
    logit = outcome_weight * (frac_bad - frac_good) + sustained_weight * (sustained - 0.5)
    probs = 1.0 / (1.0 + np.exp(-logit))
    y = (rng.uniform(size=n) < probs).astype("int32")

    bounds = (np.cumsum(fractions / fractions.sum())[:2] * n).astype(int)
    train, val, test = np.split(np.arange(n), bounds)
    x = x.astype("float32")
    regimes = regimes.astype("int32")
    return SwitchingARData(
        x[train], regimes[train], y[train], probs[train],
        x[val], regimes[val], y[val], probs[val],
        x[test], regimes[test], y[test], probs[test],
        bad_regime=bad,
        good_regime=good,
        params={"coefficients": coefficients, "bias": bias, "scale": scale},
    )  # fmt: skip
