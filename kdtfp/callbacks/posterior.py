"""`PosteriorSampler`: collects weight snapshots of an SGLD chain during `fit`, with R-hat / ESS."""

from __future__ import annotations

import numbers
import os

import keras
import numpy as np

_BACKUP_FILE = "posterior_sampler.npz"


def _check_int(name, value, minimum):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


class PosteriorSampler(keras.callbacks.Callback):
    """Keeps thinned snapshots of `model.trainable_weights` while `fit` runs an SGLD chain.

    Steps are counted over training batches across every `fit` call this sampler sees (one
    count per `on_train_batch_end`; with `steps_per_execution > 1` the count advances by the
    executed steps). With `s` the 1-based step count, a snapshot is taken after step `s` when

    ```python
    s > burn_in and (s - burn_in) % thin == 0
    ```

    until `max_samples` snapshots are held; after that collection **stops** (the earliest,
    not the latest, samples are kept, so no sample is ever discarded). For `S` steps in all the
    number of samples is `min(max_samples, max(0, (S - burn_in) // thin))`. With
    `steps_per_execution > 1` at most one snapshot is taken per execution (when the executed
    block contains a sampling step).

    Snapshots are NumPy copies in host memory: `samples[i][v]` is the value of
    `model.trainable_weights[v]` at the i-th kept step. For a `kdtfp.Distiller` whose teacher is
    frozen these are the student's weights, in `distiller.student.trainable_weights` order.

    **Several chains.** One sampler records one chain. Run independent chains (independent
    students, or restarts from the same mode with different SGLD seeds) each with its own
    sampler, then `PosteriorSampler.combine([s_a, s_b, ...])` returns a sampler that holds
    them as separate chains: `summary()` then computes between-chain R-hat and cross-chain ESS,
    and `samples` concatenates the chains (for prediction). Chains are truncated to the
    shortest one for the diagnostics.

    **ArviZ.** `to_arviz()` returns the chains as an ArviZ posterior (`[chain, draw, *shape]`
    per weight, named by the weights' Keras paths), for `arviz.summary`, `arviz.plot_trace`, ...
    ArviZ is optional: `pip install arviz`.

    **Fault tolerance.** With `backup_dir`, the buffer, the step count and the step count at
    the end of every epoch of the current `fit` are written to `backup_dir/posterior_sampler.npz`
    (atomically) when an epoch ends: after its last batch, before any callback's `on_epoch_end`
    (at `on_epoch_end` when Keras does not know the number of steps). When `fit` starts and the
    file exists, it is read back, replacing the in-memory state, and at the first epoch Keras
    runs the buffer is rewound to that epoch's start (samples taken later are dropped). Use it
    beside `keras.callbacks.BackupAndRestore`: Keras resumes at the start of the epoch recorded
    in its backup (Keras 3 restarts an interrupted epoch from its first batch, also with an
    integer `save_freq`), so the resumed run counts the same steps and ends with the same number
    of samples as an uninterrupted one, whatever the order of the callbacks; resumed from an
    epoch-end backup (`save_freq="epoch"`) with a deterministic input order (e.g.
    `shuffle=False`), the samples are the same too. Like `BackupAndRestore`, the file is deleted
    when `fit` ends normally (`delete_backup=True`). One sampler per `backup_dir`.

    Args:
        burn_in: int >= 0, number of training steps (batches) discarded before sampling.
        thin: int >= 1, keep one snapshot every `thin` steps after burn-in.
        max_samples: int >= 1, the most snapshots kept; collection stops when reached.
        backup_dir: optional directory for the buffer's backup (see above).
        delete_backup: remove the backup file at the end of a completed `fit`.
        verbose: 1 prints `"posterior samples: k/max_samples"` at each epoch end.

    Raises:
        ValueError: for bad arguments (named), and at `on_train_begin` of a sampler that has not
            yet counted any step when `burn_in >= epochs * steps` (the run's planned steps, when
            Keras knows them): the chain would never leave burn-in.

    Example:

    >>> sampler = kdtfp.callbacks.PosteriorSampler(burn_in=200, thin=5, max_samples=500)
    >>> model.compile(optimizer=kdtfp.optimizers.SGLD(1e-5, data_size=len(x)), loss=...)
    >>> model.fit(x, y, epochs=30, callbacks=[sampler])
    >>> sampler.summary()["max_rhat"], sampler.predict_distribution(model, x_test)["mean_probs"]
    """

    def __init__(
        self,
        burn_in: int,
        thin: int,
        max_samples: int,
        backup_dir: str | None = None,
        delete_backup: bool = True,
        verbose: int = 1,
    ):
        super().__init__()
        self.burn_in = _check_int("burn_in", burn_in, 0)
        self.thin = _check_int("thin", thin, 1)
        self.max_samples = _check_int("max_samples", max_samples, 1)
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)
        self.delete_backup = bool(delete_backup)
        self.verbose = verbose
        self.step = 0
        self._buffer: list[list[np.ndarray]] = []
        self._other_chains: list[list[list[np.ndarray]]] = []
        self._epoch_start_step = 0
        # Fault tolerance: the step of each kept sample (own chain), the step count when the
        # current `fit` started and at the end of each of its epochs, and a pending rewind.
        self._sample_steps: list[int] = []
        self._fit_start_step = 0
        self._epoch_end_steps: dict[int, int] = {}
        self._epoch = 0
        self._epoch_closed = False
        self._rewind_pending = False
        # Keras paths of the sampled weights (`model.trainable_weights[v].path`), set by `fit`.
        self.weight_names: list[str] | None = None

    # ----------------------------------------------------------------------------- chains
    @classmethod
    def combine(cls, samplers) -> PosteriorSampler:
        """A sampler holding the chains of `samplers` (each one chain, or already combined).

        The result is for diagnostics and prediction only (it is not meant to be passed to
        `fit`). Its `burn_in`/`thin` are the first sampler's; `max_samples` is the total.
        """
        samplers = list(samplers)
        if not samplers:
            raise ValueError("`samplers` must be a non-empty list of PosteriorSampler.")
        chains = [chain for s in samplers for chain in s.chains]
        first = samplers[0]
        out = cls(first.burn_in, first.thin, max(1, sum(len(c) for c in chains)), verbose=0)
        out._buffer = [list(w) for w in chains[0]]
        out._other_chains = [[list(w) for w in c] for c in chains[1:]]
        out.weight_names = next((s.weight_names for s in samplers if s.weight_names), None)
        return out

    @property
    def chains(self) -> list[list[list[np.ndarray]]]:
        """The chains: `chains[c][i][v]` is weight `v` of sample `i` of chain `c`."""
        return [self._buffer, *self._other_chains]

    @property
    def samples(self) -> list[list[np.ndarray]]:
        """All samples (chains concatenated): a list of weight lists (NumPy arrays)."""
        return [w for chain in self.chains for w in chain]

    def __len__(self) -> int:
        return sum(len(c) for c in self.chains)

    # ----------------------------------------------------------------------------- backup
    def _backup_path(self):
        return os.path.join(self.backup_dir, _BACKUP_FILE)

    def _save_backup(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        epochs = sorted(self._epoch_end_steps)
        if len(self._sample_steps) != len(self._buffer):  # a buffer set by hand
            self._sample_steps = [self.step] * len(self._buffer)
        arrays = {
            "step": np.asarray(self.step, np.int64),
            "n": np.asarray(len(self._buffer)),
            "sample_steps": np.asarray(self._sample_steps, np.int64),
            "fit_start_step": np.asarray(self._fit_start_step, np.int64),
            "epochs": np.asarray(epochs, np.int64),
            "epoch_end_steps": np.asarray([self._epoch_end_steps[e] for e in epochs], np.int64),
        }
        if self._buffer:
            for v in range(len(self._buffer[0])):
                arrays[f"w{v}"] = np.stack([s[v] for s in self._buffer])
            arrays["n_vars"] = np.asarray(len(self._buffer[0]))
        if self.weight_names:
            arrays["names"] = np.asarray(self.weight_names, dtype=str)
        tmp = self._backup_path() + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self._backup_path())

    def _load_backup(self):
        with np.load(self._backup_path()) as data:
            self.step = int(data["step"])
            if "names" in data.files:
                self.weight_names = [str(name) for name in data["names"]]
            n = int(data["n"])
            if "sample_steps" in data.files:
                self._sample_steps = [int(s) for s in data["sample_steps"]]
                self._fit_start_step = int(data["fit_start_step"])
                ends = zip(data["epochs"], data["epoch_end_steps"], strict=True)
                self._epoch_end_steps = {int(e): int(s) for e, s in ends}
            else:  # a file without the step records: no rewind is possible
                self._sample_steps = [self.step] * n
                self._fit_start_step, self._epoch_end_steps = self.step, {}
            stacked = [data[f"w{v}"] for v in range(int(data["n_vars"]))] if n else []
        self._buffer = [[np.array(w[i]) for w in stacked] for i in range(n)]

    def _rewind_to_epoch(self, epoch):
        """Rewinds the restored state to the start of `epoch` (the epoch Keras resumes at)."""
        start = self._fit_start_step if epoch == 0 else self._epoch_end_steps.get(epoch - 1)
        if start is None or start > self.step:
            return  # no record of that epoch's start: keep the state as read
        keep = sum(1 for s in self._sample_steps if s <= start)
        self._buffer, self._sample_steps = self._buffer[:keep], self._sample_steps[:keep]
        self._epoch_end_steps = {e: s for e, s in self._epoch_end_steps.items() if e < epoch}
        self.step = start

    def _close_epoch(self):
        self._epoch_end_steps[self._epoch] = self.step
        self._epoch_closed = True
        if self.backup_dir is not None:
            self._save_backup()

    # ----------------------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        self._rewind_pending = False
        if self.backup_dir is not None and os.path.exists(self._backup_path()):
            self._load_backup()
            self._rewind_pending = True  # done at the first epoch, once Keras has chosen it
        else:
            self._fit_start_step, self._epoch_end_steps = self.step, {}
        if self.model is not None:
            self.weight_names = _unique([v.path for v in self.model.trainable_weights])
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if self.step == 0 and epochs and steps and self.burn_in >= epochs * steps:
            raise ValueError(
                f"`burn_in` must be smaller than the planned number of training steps "
                f"(epochs * steps = {epochs} * {steps} = {epochs * steps}). "
                f"Received: burn_in={self.burn_in}"
            )

    def on_epoch_begin(self, epoch, logs=None):
        if self._rewind_pending:
            self._rewind_pending = False
            self._rewind_to_epoch(int(epoch))
        self._epoch, self._epoch_closed = int(epoch), False
        self._epoch_start_step = self.step

    def on_train_batch_end(self, batch, logs=None):
        previous, self.step = self.step, self._epoch_start_step + int(batch) + 1
        if self.step <= previous:  # defensive: batch indices did not advance
            self.step = previous + 1
        if len(self._buffer) < self.max_samples and self.step > self.burn_in:
            # Largest sampling step <= self.step; take a snapshot if it lies in (previous, step].
            last_sampling_step = self.step - (self.step - self.burn_in) % self.thin
            if last_sampling_step > max(previous, self.burn_in):
                self._buffer.append(
                    [
                        np.array(keras.ops.convert_to_numpy(v), copy=True)
                        for v in self.model.trainable_weights
                    ]
                )
                self._sample_steps.append(self.step)
        steps = (self.params or {}).get("steps")
        if steps and int(batch) + 1 >= int(steps):
            # The epoch's record is saved before any `on_epoch_end` (e.g. BackupAndRestore's).
            self._close_epoch()

    def on_epoch_end(self, epoch, logs=None):
        if not self._epoch_closed:  # the number of steps was unknown
            self._close_epoch()
        if self.verbose:
            print(f"posterior samples: {len(self._buffer)}/{self.max_samples}")

    def on_train_end(self, logs=None):
        if self.backup_dir is not None and self.delete_backup:
            if os.path.exists(self._backup_path()):
                os.remove(self._backup_path())

    # ----------------------------------------------------------------------------- outputs
    def summary(self) -> dict:
        """R-hat and ESS per weight tensor, summarised over the tensor's elements.

        R-hat is `tfp.mcmc.potential_scale_reduction(..., split_chains=True)`: every chain is
        split in two halves (split-R-hat), so a single chain gets a within-chain check too. TFP
        returns the Brooks-Gelman variance ratio (not its square root); values near 1 mean the
        (half-)chains agree, values well above 1 (say > 1.1) mean they do not. ESS is
        `tfp.mcmc.effective_sample_size`, summed over chains (`cross_chain_dims=1`) when there
        are several. Elements that never change (zero variance) give NaN and are ignored by the
        summaries. Chains are truncated to the shortest one.

        Returns:
            dict with `"n_chains"`, `"n_samples"` (per chain), `"max_rhat"`, `"min_ess"` (over
            all tensors), and `"per_weight"`: a list of `{"index", "shape", "max_rhat",
            "min_ess"}`, one per trainable weight. Raises ValueError with < 4 samples per chain.
        """
        import tensorflow as tf
        import tensorflow_probability as tfp

        chains = [c for c in self.chains if c]
        n = min((len(c) for c in chains), default=0)
        if n < 4:
            raise ValueError(
                f"summary() needs at least 4 samples per chain (split-R-hat); the shortest of "
                f"{len(chains)} chain(s) has {n}."
            )
        per_weight = []
        for v in range(len(chains[0][0])):
            # [n_samples, n_chains, *shape]
            states = np.stack([np.stack([c[i][v] for i in range(n)]) for c in chains], axis=1)
            states = tf.constant(states.reshape(n, len(chains), -1).astype(np.float64))
            rhat = tfp.mcmc.potential_scale_reduction(states, split_chains=True).numpy()
            if len(chains) > 1:
                ess = tfp.mcmc.effective_sample_size(states, cross_chain_dims=1).numpy()
            else:
                ess = tfp.mcmc.effective_sample_size(states[:, 0]).numpy()
            per_weight.append(
                {
                    "index": v,
                    "shape": tuple(chains[0][0][v].shape),
                    "max_rhat": _nanreduce(np.nanmax, rhat),
                    "min_ess": _nanreduce(np.nanmin, ess),
                }
            )
        return {
            "n_chains": len(chains),
            "n_samples": n,
            "max_rhat": _nanreduce(np.nanmax, [w["max_rhat"] for w in per_weight]),
            "min_ess": _nanreduce(np.nanmin, [w["min_ess"] for w in per_weight]),
            "per_weight": per_weight,
        }

    def to_arviz(self, **kwargs):
        """The chains as an ArviZ posterior: one variable per weight, `[chain, draw, *shape]`.

        Variables are named by the weights' Keras paths (`model.trainable_weights[v].path`,
        e.g. `"dense/kernel"`), recorded when `fit` starts; a combined sampler uses the names of
        the first sampler that has them, and samplers that never ran `fit` use `"w0"`, `"w1"`,
        .... Chains are truncated to the shortest one (as in `summary`); empty chains are left
        out. Calls `arviz.from_dict(posterior=...)` with ArviZ 0.x (returns `InferenceData`) and
        `arviz.from_dict({"posterior": ...})` with ArviZ >= 1 (returns an xarray `DataTree`);
        `kwargs` (e.g. `coords`, `dims`) are passed on. (Names holding `/` must be renamed
        before writing netCDF.)

        ArviZ is optional and not installed with kdtfp.

        Raises:
            ImportError: when ArviZ is not installed (`pip install arviz`).
            ValueError: when the sampler holds no samples.

        Example:

        >>> idata = kdtfp.callbacks.PosteriorSampler.combine([s_a, s_b]).to_arviz()
        >>> arviz.summary(idata)
        """
        try:
            import arviz
        except ImportError as error:
            raise ImportError(
                "PosteriorSampler.to_arviz() needs ArviZ, which kdtfp does not install: "
                "pip install arviz"
            ) from error
        chains = [c for c in self.chains if c]
        if not chains:
            raise ValueError("to_arviz() needs at least one sample; this sampler holds none.")
        n = min(len(c) for c in chains)
        num_weights = len(chains[0][0])
        names = self.weight_names
        if not names or len(names) != num_weights:
            names = [f"w{v}" for v in range(num_weights)]
        posterior = {
            name: np.stack([np.stack([c[i][v] for i in range(n)]) for c in chains])
            for v, name in enumerate(names)
        }
        major = str(getattr(arviz, "__version__", "0")).split(".")[0]
        if major.isdigit() and int(major) >= 1:
            return arviz.from_dict({"posterior": posterior}, **kwargs)
        return arviz.from_dict(posterior=posterior, **kwargs)

    def predict_distribution(self, model, x, level: float = 0.95, **kwargs) -> dict:
        """`kdtfp.predictive.predict_distribution(model, self.samples, x, level, **kwargs)`."""
        from kdtfp.predictive import predict_distribution

        return predict_distribution(model, self.samples, x, level=level, **kwargs)


def _unique(names):
    """`names` with repeats made unique by a `_1`, `_2`, ... suffix (ArviZ needs unique names)."""
    used, out = set(), []
    for name in names:
        candidate, count = name, 0
        while candidate in used:
            count += 1
            candidate = f"{name}_{count}"
        used.add(candidate)
        out.append(candidate)
    return out


def _nanreduce(fn, values):
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    return float(fn(values))
