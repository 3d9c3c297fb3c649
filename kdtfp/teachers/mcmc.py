"""MCMC teachers for Bayesian logistic regression (Papamakarios 2015, part B; METHODS.md §5.4).

Two teachers share one posterior and one `tfp.mcmc` kernel (HMC or NUTS, step size adapted by
dual averaging during burn-in, `C` chains advanced together as a batch):

* the **batch teacher** — `sample_posterior` stores a bag of `S` samples `w_s` (`S x D` floats)
  with R-hat / ESS, and its predictive is the Monte Carlo average
  `g(x) = (1/S) sum_s sigmoid(w_s . x)` (`mc_predictive_log_probs`);
* the **online teacher** — `OnlineChain` keeps only the current state of the `C` chains and
  advances them one transition per element of a `tf.data.Dataset` (`Dataset.scan`), so its
  memory is `C x (D + 1)` floats whatever the number of MCMC steps.

`batch_transfer_dataset` and `online_transfer_dataset` turn either teacher into the
`(x, soft_targets)` stream that `model.fit` consumes with a plain
`keras.losses.CategoricalCrossentropy(from_logits=True)`: the target at a fresh transfer input
`x` is `[1 - g(x), g(x)]` (batch) or `[1 - q_t(x), q_t(x)]` with
`q_t(x) = (1/C) sum_c sigmoid(w_{t,c} . x)` the average over the chains' current states (online).
Cross-entropy is linear in the target, so the online gradient is unbiased for the batch one once
the chains are stationary; averaging the `C` chains divides the target's variance by about `C`.

Labels are 0/1 (class 1 is the positive class); the model has no bias (append a column of ones
to `x` for one). Everything runs in float32.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

KERNELS = ("hmc", "nuts")
# Inputs x samples per chunk of the MC predictive: [chunk, S] logits stay under ~16 MB.
_PREDICTIVE_CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------------- checks
def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_positive(name, value):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return float(value)


def _check_data(x, y):
    x = np.asarray(x, dtype="float32")
    y = np.asarray(y)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"`x` must be a non-empty [N, D] array. Received shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("`x` contains NaN or Inf.")
    if y.shape != (x.shape[0],):
        raise ValueError(f"`y` must have shape [N] = ({x.shape[0]},). Received shape {y.shape}.")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"`y` must hold 0/1 labels. Received values {np.unique(y)[:5]}.")
    return x, y.astype("float32")


def _check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}. Received: kernel={kernel!r}")
    return kernel


def _seed_pair(seed):
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return tf.constant([int(seed), 0], tf.int32)
    raise ValueError(f"`seed` must be an int. Received: seed={seed!r}")


# ------------------------------------------------------------------------------- posterior
def logistic_log_posterior(x, y, prior_scale: float = 10.0):
    """The unnormalised log posterior of bias-free Bayesian logistic regression.

    `log p(w | x, y) = sum_n log sigmoid(s_n w . x_n) - |w|^2 / (2 prior_scale^2) + const`
    with `s_n = 2 y_n - 1`, computed as `-softplus(-s_n w . x_n)` (stable for large margins).

    Args:
        x: `[N, D]` inputs. y: `[N]` 0/1 labels. prior_scale: the prior's standard deviation
            (the thesis's prior N(0, 100 I) is `prior_scale=10`).

    Returns:
        A function `w [..., D] -> [...]`, the log density of each weight vector (float32).
    """
    x, y = _check_data(x, y)
    prior_scale = _check_positive("prior_scale", prior_scale)
    signed_x = tf.constant(x * (2.0 * y - 1.0)[:, None])  # s_n x_n, [N, D]
    precision = 1.0 / prior_scale**2

    def log_prob(w):
        margins = tf.linalg.matvec(signed_x, w)  # [..., N]
        log_likelihood = -tf.reduce_sum(tf.nn.softplus(-margins), axis=-1)
        return log_likelihood - 0.5 * precision * tf.reduce_sum(tf.square(w), axis=-1)

    return log_prob


def _kernel(log_prob, kernel, step_size, num_leapfrog_steps, max_tree_depth):
    if kernel == "hmc":
        return tfp.mcmc.HamiltonianMonteCarlo(
            log_prob, step_size=step_size, num_leapfrog_steps=num_leapfrog_steps
        )
    return tfp.mcmc.NoUTurnSampler(log_prob, step_size=step_size, max_tree_depth=max_tree_depth)


def _warm_up(
    log_prob,
    initial_state,
    kernel,
    step_size,
    num_leapfrog_steps,
    max_tree_depth,
    burn_in,
    seed,
    jit_compile,
):
    """`burn_in` transitions with dual-averaging step-size adaptation, storing nothing.

    Every chain adapts its own step size (shape `[C, 1]`): a chain that starts in the far tail,
    where gradients are large, keeps a small step until it reaches the bulk instead of being
    frozen by the step size that suits the others. Returns `(final_state [C, D], step sizes
    [C, 1])`.
    """
    step_sizes = tf.fill([initial_state.shape[0], 1], tf.constant(step_size, tf.float32))
    if burn_in == 0:
        return initial_state, step_sizes
    adaptive = tfp.mcmc.DualAveragingStepSizeAdaptation(
        _kernel(log_prob, kernel, step_sizes, num_leapfrog_steps, max_tree_depth),
        num_adaptation_steps=burn_in,
        target_accept_prob=0.75,
    )

    @tf.function(autograph=False, jit_compile=jit_compile)
    def run():
        states, step_sizes = tfp.mcmc.sample_chain(
            num_results=1,
            num_burnin_steps=burn_in,
            current_state=initial_state,
            kernel=adaptive,
            trace_fn=lambda _, results: results.new_step_size,
            seed=seed,
        )
        return states[-1], step_sizes[-1]

    return run()


def laplace_approximation(x, y, prior_scale: float = 10.0, max_iterations: int = 100):
    """The posterior's mode and the inverse Hessian there: `(mode [D], covariance [D, D])`.

    Damped Newton's method in float64 on the (strictly concave) log posterior of
    `logistic_log_posterior`; the prior keeps the mode finite even for separable data.
    """
    x, y = _check_data(x, y)
    prior_scale = _check_positive("prior_scale", prior_scale)
    x = x.astype("float64")
    precision = np.eye(x.shape[1]) / prior_scale**2

    def log_post(w):
        margins = (2.0 * y - 1.0) * (x @ w)
        return -np.sum(np.logaddexp(0.0, -margins)) - 0.5 * w @ precision @ w

    w = np.zeros(x.shape[1])
    for _ in range(max_iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (y - p) - precision @ w
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + precision
        direction = np.linalg.solve(hessian, gradient)
        step, current = 1.0, log_post(w)
        while log_post(w + step * direction) < current and step > 1e-6:
            step /= 2.0
        w = w + step * direction
        if np.max(np.abs(step * direction)) < 1e-8:
            break
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    hessian = (x * (p * (1.0 - p))[:, None]).T @ x + precision
    return w, np.linalg.inv(hessian)


def _initial_state(x, y, prior_scale, num_chains, init_scale, seed):
    """`num_chains` draws from the Laplace approximation with its scale multiplied by `init_scale`.

    Starting near the posterior matters for logistic regression with separable data: a chain
    started where every point is misclassified sees gradients of order `sum |x_n|` and, at the
    step size the bulk of the posterior wants, rejects every proposal for ever.
    """
    mode, covariance = laplace_approximation(x, y, prior_scale)
    scale = np.linalg.cholesky(covariance).astype("float32")
    noise = tf.random.stateless_normal([num_chains, len(mode)], seed=seed)
    return mode.astype("float32") + init_scale * tf.matmul(noise, scale, transpose_b=True)


@dataclass
class PosteriorSamples:
    """A bag of posterior samples (the batch teacher) and its diagnostics.

    Attributes:
        samples: `[num_results, num_chains, D]` float32 draws, in chain order.
        rhat: `[D]` split-chain potential scale reduction (`tfp.mcmc.potential_scale_reduction`).
        ess: `[D]` effective sample size summed over chains (`cross_chain_dims=1`).
        acceptance_rate: mean acceptance probability of the kept transitions.
        step_size: the adapted step sizes, one per chain, `[num_chains, 1]`.
        final_state: `[num_chains, D]`, where the chains stopped (to continue them online).
    """

    samples: np.ndarray
    rhat: np.ndarray
    ess: np.ndarray
    acceptance_rate: float
    step_size: np.ndarray
    final_state: np.ndarray

    @property
    def bag(self) -> np.ndarray:
        """All samples as one `[num_results * num_chains, D]` array."""
        return self.samples.reshape(-1, self.samples.shape[-1])

    @property
    def stored_floats(self) -> int:
        """Floats the batch teacher keeps: `S x D`."""
        return int(self.samples.size)

    def summary(self) -> dict:
        return {
            "num_samples": int(self.bag.shape[0]),
            "num_chains": int(self.samples.shape[1]),
            "max_rhat": float(np.max(self.rhat)),
            "min_ess": float(np.min(self.ess)),
            "acceptance_rate": float(self.acceptance_rate),
            "step_size": float(np.median(self.step_size)),
        }


def sample_posterior(
    x,
    y,
    num_results: int,
    num_chains: int = 4,
    num_burnin_steps: int = 500,
    prior_scale: float = 10.0,
    kernel: str = "hmc",
    step_size: float = 0.1,
    num_leapfrog_steps: int = 8,
    max_tree_depth: int = 6,
    init_scale: float = 1.5,
    seed: int = 0,
    jit_compile: bool = True,
) -> PosteriorSamples:
    """Samples the Bayesian logistic-regression posterior with `tfp.mcmc`: the batch teacher.

    `num_chains` chains start at over-dispersed draws around the mode and run as one batch;
    the first `num_burnin_steps` transitions adapt one step size per chain (dual averaging,
    target acceptance 0.75; see `_warm_up` for why per chain) and are discarded; then
    `num_results` transitions per chain are kept at the adapted step sizes, so the bag holds
    `num_results * num_chains` samples. Burn-in and sampling are one `tfp.mcmc.sample_chain`
    loop.

    Args:
        x, y, prior_scale: the data and prior, as `logistic_log_posterior`.
        num_results: int >= 2, samples kept per chain.
        num_chains: int >= 1 (R-hat needs >= 2; with one chain it is split in halves).
        num_burnin_steps: int >= 0.
        kernel: `"hmc"` (`num_leapfrog_steps` leapfrog steps) or `"nuts"` (`max_tree_depth`).
        step_size: > 0, the initial step size.
        init_scale: > 0, the chains start at independent draws from the Laplace approximation
            with its standard deviations multiplied by `init_scale` (over-dispersed for R-hat).
        seed: int; the run is deterministic given it.
        jit_compile: compile the loop with XLA (about 2 s of compilation; the loop then runs
            several times faster on CPU than a TensorFlow graph: 3,000 transitions of 4 chains
            on the 2-D toy take ~3 s instead of ~9 s).

    Returns:
        A `PosteriorSamples`.

    Example:

    >>> posterior = sample_posterior(x, y, num_results=2500, num_chains=4)
    >>> posterior.summary()["max_rhat"], posterior.bag.shape  # ~1.0, (10000, D)
    """
    x, y = _check_data(x, y)
    num_results = _check_int("num_results", num_results, 2)
    num_chains = _check_int("num_chains", num_chains, 1)
    num_burnin_steps = _check_int("num_burnin_steps", num_burnin_steps, 0)
    kernel = _check_kernel(kernel)
    step_size = _check_positive("step_size", step_size)
    num_leapfrog_steps = _check_int("num_leapfrog_steps", num_leapfrog_steps, 1)
    max_tree_depth = _check_int("max_tree_depth", max_tree_depth, 1)
    init_scale = _check_positive("init_scale", init_scale)
    log_prob = logistic_log_posterior(x, y, prior_scale)
    init_seed, sample_seed = tf.unstack(tf.random.experimental.stateless_split(_seed_pair(seed), 2))
    state = _initial_state(x, y, prior_scale, num_chains, init_scale, init_seed)
    _check_finite_log_prob(log_prob, state)
    step_sizes = tf.fill([num_chains, 1], tf.constant(step_size, tf.float32))
    sampler = _kernel(log_prob, kernel, step_sizes, num_leapfrog_steps, max_tree_depth)
    if num_burnin_steps > 0:
        # One compiled loop: burn-in with per-chain adaptation (see `_warm_up`), then sampling at
        # the adapted step sizes (the adaptation stops after `num_burnin_steps`).
        sampler = tfp.mcmc.DualAveragingStepSizeAdaptation(
            sampler, num_adaptation_steps=num_burnin_steps, target_accept_prob=0.75
        )

    def trace(_, results):
        inner = results.inner_results if num_burnin_steps > 0 else results
        size = results.new_step_size if num_burnin_steps > 0 else step_sizes
        return tf.exp(tf.minimum(inner.log_accept_ratio, 0.0)), size

    @tf.function(autograph=False, jit_compile=jit_compile)
    def run(state):
        samples, (accept, sizes) = tfp.mcmc.sample_chain(
            num_results=num_results,
            num_burnin_steps=num_burnin_steps,
            current_state=state,
            kernel=sampler,
            trace_fn=trace,
            seed=sample_seed,
        )
        return samples, accept, sizes[-1]

    samples, accept, adapted = run(state)
    rhat = tfp.mcmc.potential_scale_reduction(samples, split_chains=True)
    ess = tfp.mcmc.effective_sample_size(samples, cross_chain_dims=1 if num_chains > 1 else None)
    if not np.all(np.isfinite(samples.numpy())):
        raise ValueError("The chains produced NaN/Inf states: lower `step_size`.")
    return PosteriorSamples(
        samples=samples.numpy(),
        rhat=rhat.numpy(),
        ess=ess.numpy(),
        acceptance_rate=float(tf.reduce_mean(accept)),
        step_size=adapted.numpy(),
        final_state=samples[-1].numpy(),
    )


def _check_finite_log_prob(log_prob, state):
    values = log_prob(state).numpy()
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"`initial_state`: the log posterior is not finite at the chains' start ({values})."
        )


# ----------------------------------------------------------------------------- predictive
def mc_predictive_log_probs(samples, x):
    """Log of the Monte Carlo predictive `[log(1 - g(x)), log g(x)]`, `[N, 2]` float32.

    `g(x) = (1/S) sum_s sigmoid(w_s . x)`, computed in log space as
    `log g = logsumexp_s(-softplus(-w_s . x)) - log S` and
    `log(1 - g) = logsumexp_s(-softplus(w_s . x)) - log S`, in chunks of inputs so that the
    `[chunk, S]` logits stay small. `softmax` of the result is the predictive itself, so it is a
    drop-in for the `[N, 2]` outputs of `kdtfp.models.mixture_predictive.MixturePredictive`.

    Args:
        samples: `[S, D]` weight samples (a `PosteriorSamples.bag`) or `[C, D]` chain states.
        x: `[N, D]` inputs.
    """
    samples = tf.convert_to_tensor(samples, tf.float32)
    x = tf.convert_to_tensor(x, tf.float32)
    if samples.shape.rank != 2 or x.shape.rank != 2 or samples.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"`samples` [S, D] and `x` [N, D] must share D. Received {samples.shape} and {x.shape}."
        )
    chunk = max(1, _PREDICTIVE_CHUNK_ELEMENTS // max(1, int(samples.shape[0])))
    parts = [
        _predictive_log_probs(samples, x[start : start + chunk])
        for start in range(0, max(1, int(x.shape[0])), chunk)
    ]
    return tf.concat(parts, axis=0)


def _predictive_log_probs(samples, x):
    logits = tf.matmul(x, samples, transpose_b=True)  # [N, S]
    log_count = tf.math.log(tf.cast(tf.shape(samples)[0], tf.float32))
    log_one = tf.reduce_logsumexp(-tf.nn.softplus(-logits), axis=-1) - log_count
    log_zero = tf.reduce_logsumexp(-tf.nn.softplus(logits), axis=-1) - log_count
    return tf.stack([log_zero, log_one], axis=-1)


def _soft_targets(samples, x):
    """`[1 - g, g]` for the MC predictive of `samples` (mean of sigmoids), `[N, 2]`."""
    probs = tf.reduce_mean(tf.sigmoid(tf.matmul(x, samples, transpose_b=True)), axis=-1)
    return tf.stack([1.0 - probs, probs], axis=-1)


# --------------------------------------------------------------------------- online chain
class OnlineChain:
    """The online teacher: `C` chains that advance one transition per dataset element.

    The chains first burn in for `num_burnin_steps` transitions with step-size adaptation
    (nothing is stored), then `states()` returns a `tf.data.Dataset` built with `Dataset.scan`
    whose only state is the chains' current position `[C, D]` and a stateless seed; each element
    advances every chain `thin` transitions of the kernel (HMC or NUTS, at the adapted step size,
    one XLA-compiled call with `jit_compile`) and yields the new `[C, D]` state. Memory is
    `stored_floats = C x (D + 1)` (states and per-chain step sizes), independent of how many elements are
    drawn.

    Args:
        x, y, prior_scale, kernel, step_size, num_leapfrog_steps, max_tree_depth, init_scale,
            seed: as `sample_posterior`.
        jit_compile: compile the per-element transitions with XLA (the burn-in runs as a
            TensorFlow graph).
        num_chains: int >= 1, chains run in parallel; their states are averaged in the targets.
        num_burnin_steps: int >= 0.
        thin: int >= 1, transitions per element.
        initial_state: optional `[C, D]` start (then `num_chains` is its length), e.g. the
            `final_state` of a `PosteriorSamples`; burn-in still runs if `num_burnin_steps > 0`.

    Example:

    >>> chain = OnlineChain(x, y, num_chains=16, num_burnin_steps=500)
    >>> for state in chain.states().take(3):  # [16, D] each
    ...     ...
    """

    def __init__(
        self,
        x,
        y,
        num_chains: int = 1,
        num_burnin_steps: int = 500,
        prior_scale: float = 10.0,
        kernel: str = "hmc",
        step_size: float = 0.1,
        num_leapfrog_steps: int = 8,
        max_tree_depth: int = 6,
        init_scale: float = 1.5,
        thin: int = 1,
        initial_state=None,
        seed: int = 0,
        jit_compile: bool = True,
    ):
        x, y = _check_data(x, y)
        self.num_burnin_steps = _check_int("num_burnin_steps", num_burnin_steps, 0)
        self.kernel = _check_kernel(kernel)
        step_size = _check_positive("step_size", step_size)
        self.num_leapfrog_steps = _check_int("num_leapfrog_steps", num_leapfrog_steps, 1)
        self.max_tree_depth = _check_int("max_tree_depth", max_tree_depth, 1)
        self.thin = _check_int("thin", thin, 1)
        init_seed, warm_seed, self._seed = tf.unstack(
            tf.random.experimental.stateless_split(_seed_pair(seed), 3)
        )
        self.log_prob = logistic_log_posterior(x, y, prior_scale)
        if initial_state is None:
            num_chains = _check_int("num_chains", num_chains, 1)
            init_scale = _check_positive("init_scale", init_scale)
            state = _initial_state(x, y, prior_scale, num_chains, init_scale, init_seed)
        else:
            state = tf.constant(np.asarray(initial_state, "float32"))
            if state.shape.rank != 2 or state.shape[1] != x.shape[1]:
                raise ValueError(
                    f"`initial_state` must be [C, D={x.shape[1]}]. Received shape {state.shape}."
                )
        _check_finite_log_prob(self.log_prob, state)
        self.initial_state, self.step_size = _warm_up(
            self.log_prob,
            state,
            self.kernel,
            step_size,
            self.num_leapfrog_steps,
            self.max_tree_depth,
            self.num_burnin_steps,
            warm_seed,
            # A graph, not XLA: compiling the adaptation loop costs more than a few hundred
            # burn-in transitions (3.0 vs 1.6 CPU seconds for 500 transitions of 64 chains).
            False,
        )
        self.num_chains, self.dim = (int(d) for d in self.initial_state.shape)
        sampler = _kernel(
            self.log_prob, self.kernel, self.step_size, self.num_leapfrog_steps, self.max_tree_depth
        )

        def transition(state, seed):
            seed, step_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            state, _ = sampler.one_step(state, sampler.bootstrap_results(state), seed=step_seed)
            return state, seed

        @tf.function(autograph=False, jit_compile=jit_compile)
        def advance(state, seed, transitions):
            # A loop, not an unrolled block: one compilation serves every `thin`.
            _, state, seed = tf.while_loop(
                lambda i, *_: i < transitions,
                lambda i, state, seed: (i + 1, *transition(state, seed)),
                (tf.constant(0, tf.int64), state, seed),
            )
            return state, seed

        self._advance = advance

    @property
    def stored_floats(self) -> int:
        """Floats the online teacher keeps between transitions: `C x D` states, `C` step sizes."""
        return self.num_chains * (self.dim + 1)

    def states(self, num_steps: int | None = None, thin: int | None = None) -> tf.data.Dataset:
        """A dataset of `[C, D]` chain states, one per element (`num_steps` of them, or endless).

        Element `t` is the state after `t * thin` transitions past burn-in (`thin` defaults to
        the chain's). Each iteration over the dataset restarts from the burnt-in state with the
        same seed.
        """
        thin = tf.constant(self.thin if thin is None else _check_int("thin", thin, 1), tf.int64)
        steps = (
            tf.data.Dataset.counter()
            if num_steps is None
            else tf.data.Dataset.range(_check_int("num_steps", num_steps, 1))
        )

        def scan(carry, _):
            state, seed = self._advance(*carry, thin)
            return (state, seed), state

        return steps.scan((self.initial_state, self._seed), scan)
