"""`kdtfp bench recovery`: what a killed worker costs, and 1 vs 2 local workers' throughput.

Every run here is a cluster of local worker processes on loopback ports, each with a generated
`TF_CONFIG`, training the same tiny constrained-VI distiller with `SGLD`, a `PosteriorSampler`
and `DualAscent` under `tf.distribute.MultiWorkerMirroredStrategy`, beside
`keras.callbacks.BackupAndRestore(save_freq=...)` (one backup directory per worker).

* **Seconds lost to a kill.** Worker 1 stops at a known mid-epoch batch and is killed with
  SIGKILL. The survivor errors out on its next collective (a collective timeout is set, and is
  killed if it has not exited within a grace period); the whole cluster is then restarted, as
  Keras multi-worker recovery requires, and resumes from the last backup. Reported: seconds from
  the kill to the first training step after the restore (process start, TensorFlow import,
  cluster set-up, restore and one step), and how it splits.
* **Steps per second** for 1 and 2 workers (same per-worker batch, so the global batch doubles
  with 2), from the step end times inside the chief, after the first epoch. On a machine with
  few cores the two workers share them: no speed-up is expected, and none is claimed.

The same launcher and worker are used by `tests/distributed/test_recovery.py`. A worker is
`python -m kdtfp.bench.recovery --worker CONFIG.json`; ports and `TF_CONFIG` come from
`kdtfp.distribute` (its `launch_local_workers` is not used: the kill needs each process).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

BENCHMARK = "recovery"
FEATURES, TEACHER_FEATURES = 4, 5

# The training run every worker makes (overridden per call by `run_cluster(**settings)`).
DEFAULTS = {
    "epochs": 3,
    "steps_per_epoch": 6,
    "per_worker_batch": 16,
    "save_freq": 4,  # BackupAndRestore saves every 4 steps: mid-epoch backups exist
    "burn_in": 2,
    "thin": 2,
    "max_samples": 100,
    "learning_rate": 2e-4,
    "temperature": 1e-3,
    "dual_learning_rate": 5.0,
    "target": 0.01,
    "collective_timeout": 30.0,
    "kill_at": None,  # [epoch, batch] at which worker `hold_worker` stops and waits to be killed
    "hold_worker": 1,
}


# ------------------------------------------------------------------------------- launcher
def _python_path():
    import kdtfp

    root = os.path.dirname(os.path.dirname(os.path.abspath(kdtfp.__file__)))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def launch(workers, settings, workdir, tag):
    """Starts `workers` worker processes; returns `(processes, result_paths, log_paths)`."""
    from kdtfp.distribute import free_ports, local_tf_config

    ports = free_ports(workers)
    processes, results, logs = [], [], []
    for index in range(workers):
        config = dict(DEFAULTS, **settings, workers=workers, index=index, workdir=workdir)
        config["result"] = os.path.join(workdir, f"{tag}_result_{index}.json")
        config["marker"] = os.path.join(workdir, f"{tag}_held_{index}.json")
        config_path = os.path.join(workdir, f"{tag}_config_{index}.json")
        with open(config_path, "w") as handle:
            json.dump(config, handle)
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(local_tf_config(workers, index, ports)),
            TF_CPP_MIN_LOG_LEVEL="2",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=_python_path(),
        )
        log_path = os.path.join(workdir, f"{tag}_log_{index}.txt")
        with open(log_path, "w") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "kdtfp.bench.recovery", "--worker", config_path],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        results.append(config["result"])
        logs.append(log_path)
    return processes, results, logs


def _tail(path, lines=15):
    try:
        with open(path) as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def _kill(process):
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def wait_all(processes, logs, timeout):
    """Waits for every process (at most `timeout` s in all); kills them all and raises
    RuntimeError with the logs' tails if one fails or time runs out."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in processes:
            _kill(process)
        raise RuntimeError(
            f"workers still running after {timeout:.0f} s:\n" + "\n".join(map(_tail, logs))
        ) from None
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        raise RuntimeError(
            f"worker(s) {failed} failed:\n" + "\n".join(_tail(logs[i]) for i in failed)
        )


def _read(path):
    with open(path) as handle:
        return json.load(handle)


def run_cluster(workers, workdir, tag, timeout=300, **settings):
    """One complete training run on `workers` local workers; returns the workers' results."""
    processes, results, logs = launch(workers, settings, workdir, tag)
    wait_all(processes, logs, timeout)
    return [_read(path) for path in results]


def run_killed_and_restarted(workdir, tag, kill_at, timeout=300, survivor_grace=40.0, **settings):
    """Two workers; worker 1 is SIGKILLed when it reaches `kill_at = [epoch, batch]` (it holds
    there), the survivor is given `survivor_grace` s to fail on its own, then the cluster is
    restarted on fresh ports with the same backup directories and runs to the end.

    Returns a dict: `results` (the restarted workers' results), `kill_time` (time.time()),
    `survivor_exit_seconds` (None if it had to be killed), `survivor_returncode`, and
    `seconds_lost` (kill -> the restarted chief's first training step).
    """
    settings = dict(settings, kill_at=list(kill_at), hold_worker=1)
    processes, _, logs = launch(2, settings, workdir, f"{tag}_killed")
    marker = os.path.join(workdir, f"{tag}_killed_held_1.json")
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            for process in processes:
                _kill(process)
            raise RuntimeError(f"worker 1 never reached {kill_at}:\n" + "\n".join(map(_tail, logs)))
        time.sleep(0.02)
    kill_time = time.time()
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait(timeout=30)
    survivor_exit = None
    try:
        processes[0].wait(timeout=survivor_grace)
        survivor_exit = time.time() - kill_time
    except subprocess.TimeoutExpired:
        _kill(processes[0])
    survivor_returncode = processes[0].returncode
    restart_time = time.time()
    resumed = run_cluster(
        2, workdir, f"{tag}_resumed", timeout=timeout, **dict(settings, kill_at=None)
    )
    first_step = resumed[0]["step_end_times"][0]
    return {
        "results": resumed,
        "held": _read(marker),
        "kill_time": kill_time,
        "survivor_exit_seconds": survivor_exit,
        "survivor_returncode": survivor_returncode,
        "restart_seconds": restart_time - kill_time,
        "seconds_lost": first_step - kill_time,
        "startup_seconds": resumed[0]["fit_start_time"] - restart_time,
        "first_step_seconds": first_step - resumed[0]["fit_start_time"],
    }


def steps_per_second(result, skip_steps):
    """Steps per second from a worker's step end times, after the first `skip_steps` steps."""
    times = result["step_end_times"][skip_steps:]
    if len(times) < 2:
        raise ValueError(f"need at least 2 timed steps after {skip_steps}, got {len(times)}.")
    return (len(times) - 1) / (times[-1] - times[0])


# ------------------------------------------------------------------------------- worker
def _data(config):
    import numpy as np

    global_batch = config["per_worker_batch"] * config["workers"]
    n = global_batch * config["steps_per_epoch"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    teacher = np.maximum(rng.standard_normal((n, TEACHER_FEATURES)), 0).astype("float32")
    return x, teacher, global_batch


def build_model(config, n):
    """The tiny lagrangian `ConstrainedVIDistiller` every worker trains, compiled with SGLD."""
    import keras
    from keras import ops

    from kdtfp.distill import ConstrainedVIDistiller
    from kdtfp.optimizers import SGLD

    class TinyStudent(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            init = keras.initializers.GlorotUniform
            self.encoder = keras.layers.Dense(3, kernel_initializer=init(seed=1))
            self.decoder = keras.layers.Dense(FEATURES, kernel_initializer=init(seed=2))

        def call(self, x, training=None):
            h = ops.softmax(self.encoder(x))
            self.add_loss(ops.mean(ops.sum(ops.square(self.decoder(h) - x), axis=-1)))
            return h

    model = ConstrainedVIDistiller(
        TinyStudent(), multiplier=1.0, mode="lagrangian", epsilon=config["target"]
    )
    model.compile(
        optimizer=SGLD(
            config["learning_rate"], data_size=n, temperature=config["temperature"], seed=0
        )
    )
    return model


def _probe(config):
    import keras

    class Probe(keras.callbacks.Callback):
        """Records step end times; on the held worker, stops at `kill_at` and waits."""

        def __init__(self):
            super().__init__()
            self.times, self.epoch = [], 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.time())
            kill_at = config["kill_at"]
            if (
                kill_at is not None
                and config["index"] == config["hold_worker"]
                and [self.epoch, int(batch)] == list(kill_at)
            ):
                step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
                tmp = config["marker"] + ".tmp"
                with open(tmp, "w") as handle:
                    json.dump({"epoch": self.epoch, "batch": int(batch), "step": step}, handle)
                os.replace(tmp, config["marker"])
                # Held here until SIGKILL; gives up if the parent died (no orphan left behind)
                # or after 10 minutes.
                parent, deadline = os.getppid(), time.monotonic() + 600.0
                while os.getppid() == parent and time.monotonic() < deadline:
                    time.sleep(1.0)
                os._exit(3)

    return Probe()


def worker_main(config_path):
    """Runs one worker of the cluster described by `TF_CONFIG` and the JSON config file."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kdtfp.callbacks import DualAscent, PosteriorSampler
    from kdtfp.distribute import fix_keras_multi_worker, wait_for_workers

    with open(config_path) as handle:
        config = json.load(handle)
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=config["collective_timeout"]
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    fix_keras_multi_worker()  # Keras 3.15's multi-worker `fit` fails without it
    keras.utils.set_random_seed(0)
    x, teacher, global_batch = _data(config)
    dataset = tf.data.Dataset.from_tensor_slices((x, teacher)).batch(global_batch)
    data_options = tf.data.Options()
    data_options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(data_options)
    with strategy.scope():
        model = build_model(config, len(x))
        model(x[:1], training=False)
        model.optimizer.build(model.trainable_variables)
    index, backup = config["index"], os.path.join(config["workdir"], "backup")
    sampler = PosteriorSampler(
        config["burn_in"],
        config["thin"],
        config["max_samples"],
        backup_dir=os.path.join(backup, f"sampler_{index}"),
        verbose=0,
    )
    probe = _probe(config)
    callbacks = [
        keras.callbacks.BackupAndRestore(
            os.path.join(backup, f"worker_{index}"), save_freq=config["save_freq"]
        ),
        sampler,
        DualAscent(target=config["target"], learning_rate=config["dual_learning_rate"]),
        probe,
    ]
    fit_start = time.time()
    history = model.fit(dataset, epochs=config["epochs"], verbose=0, callbacks=callbacks)
    wait_for_workers(strategy)  # the chief hosts the coordination service: leave together
    result = {
        "index": index,
        "fit_start_time": fit_start,
        "step_end_times": probe.times,
        "epochs_run": len(history.epoch),
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "num_samples": len(sampler.samples),
        "sampler_step": sampler.step,
        "multiplier": model.multiplier_value(),
        "metrics": {k: float(v[-1]) for k, v in history.history.items()},
        "weights": [np.asarray(w).tolist() for w in model.student.get_weights()],
    }
    tmp = config["result"] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, config["result"])


# ------------------------------------------------------------------------------- benchmark
def format_table(output):
    kill, speed = output["kill"], output["throughput"]
    survivor = kill["survivor_exit_seconds"]
    lines = [
        "kdtfp bench recovery (local workers, MultiWorkerMirroredStrategy)",
        f"  seconds lost to a SIGKILL (kill -> 1st step after restore): {kill['seconds_lost']:.2f}",
        "    survivor exited after: "
        + ("killed (no exit within grace)" if survivor is None else f"{survivor:.2f} s"),
        f"    restart -> fit start (imports, cluster): {kill['startup_seconds']:.2f} s",
        f"    fit start -> first step (restore, trace): {kill['first_step_seconds']:.2f} s",
        f"    steps redone after the restore: {kill['steps_redone']}",
        f"  steps/s, 1 worker:  {speed['steps_per_second_1_worker']:.2f}",
        f"  steps/s, 2 workers: {speed['steps_per_second_2_workers']:.2f} "
        f"(x{speed['speedup_2_workers']:.2f}; global batch doubles)",
        f"  cpu cores: {output['settings'].get('cpu_count')}",
    ]
    return "\n".join(lines)


def run(quick=False, json_path=None, verbose=True):
    """Runs the benchmark; returns (and optionally writes) its record."""
    from kdtfp.bench.timing import report

    started = time.perf_counter()
    settings = dict(
        epochs=2 if quick else 4,
        steps_per_epoch=6 if quick else 20,
        save_freq=4 if quick else 8,
    )
    kill_at = [1, 3] if quick else [2, 13]
    skip = settings["steps_per_epoch"]  # the first epoch includes tracing
    phases = {}
    with tempfile.TemporaryDirectory(prefix="kdtfp_recovery_") as workdir:
        runs = {}
        for name, workers in (("one_worker", 1), ("two_workers", 2), ("kill_and_restart", 2)):
            folder = os.path.join(workdir, name)
            os.makedirs(folder)
            t = time.perf_counter()
            if name == "kill_and_restart":
                runs[name] = run_killed_and_restarted(folder, "run", kill_at, **settings)
            else:
                runs[name] = run_cluster(workers, folder, "run", **settings)
            phases[name] = time.perf_counter() - t
    one, two, killed = runs["one_worker"], runs["two_workers"], runs["kill_and_restart"]
    planned = settings["epochs"] * settings["steps_per_epoch"]
    resumed = killed["results"][0]
    speed_1 = steps_per_second(one[0], skip)
    speed_2 = steps_per_second(two[0], skip)
    output = {
        "benchmark": BENCHMARK,
        "quick": bool(quick),
        "settings": dict(settings, kill_at=kill_at, per_worker_batch=DEFAULTS["per_worker_batch"]),
        "kill": {
            "seconds_lost": killed["seconds_lost"],
            "survivor_exit_seconds": killed["survivor_exit_seconds"],
            "survivor_returncode": killed["survivor_returncode"],
            "startup_seconds": killed["startup_seconds"],
            "first_step_seconds": killed["first_step_seconds"],
            "killed_at_step": killed["held"]["step"],
            "steps_redone": resumed["iterations"] - planned,
            "num_samples": resumed["num_samples"],
            "num_samples_uninterrupted": two[0]["num_samples"],
            "multiplier": resumed["multiplier"],
            "multiplier_uninterrupted": two[0]["multiplier"],
        },
        "throughput": {
            "steps_per_second_1_worker": speed_1,
            "steps_per_second_2_workers": speed_2,
            "examples_per_second_1_worker": speed_1 * DEFAULTS["per_worker_batch"],
            "examples_per_second_2_workers": speed_2 * 2 * DEFAULTS["per_worker_batch"],
            "speedup_2_workers": speed_2 / speed_1,
        },
    }
    if not all(math.isfinite(v) for v in output["throughput"].values()):
        raise RuntimeError(f"non-finite throughput: {output['throughput']}")
    return report(output, json_path, verbose, format_table, started, phases)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        raise SystemExit("usage: python -m kdtfp.bench.recovery --worker CONFIG.json")
