"""Distribution strategies for recipes: one place that turns `--strategy/--devices` into a strategy,
and a launcher that runs the same command as N local workers of a `MultiWorkerMirroredStrategy`.

Logical CPU devices and collective ops must be configured before TensorFlow initialises its
runtime, so call `make_strategy` first thing in a process, and only once (DESIGN.md rule 6).

Multi-worker training (DESIGN.md section 4) is `tf.distribute.MultiWorkerMirroredStrategy`
driven by the `TF_CONFIG` environment variable; kdtfp adds no machinery of its own:

* on a cluster, every host sets its `TF_CONFIG` and runs the same program with
  `make_strategy("multiworker")` (`kdtfp run RECIPE --strategy multiworker`);
* on one machine, `launch_local_workers(argv, workers)` starts `workers` copies of `argv`, each
  with a generated `TF_CONFIG` on free loopback ports (`kdtfp run ... --workers N`).

Worker 0 (or the task of type `"chief"`) is the chief (`is_chief()`): it writes metrics and
exports; the other workers run every step too, and write to temporary folders.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")
TASK_TYPES = ("chief", "worker")


def safe_steps_per_execution(steps_per_execution, strategy=None):
    """`steps_per_execution`, or 1 on a multi-replica strategy.

    Keras 3 (checked on 3.15 / TF 2.21) fails with "You must feed a value for placeholder tensor
    ... while/cond" when `steps_per_execution > 1` under `MirroredStrategy`, even for a plain
    Sequential model (keras-team/keras#19246, open).
    """
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1 and steps_per_execution != 1:
        return 1
    return steps_per_execution


def make_strategy(name="default", devices=None):
    """Returns a `tf.distribute.Strategy`.

    Args:
        name: `"default"` (no distribution), `"mirrored"` (`MirroredStrategy` over `devices`
            replicas: the GPUs if there are enough, else that many logical CPU devices) or
            `"multiworker"` (`MultiWorkerMirroredStrategy` over the workers that the `TF_CONFIG`
            environment variable lists; each worker uses its GPUs, or its CPU).
        devices: number of replicas for `"mirrored"` (default: all GPUs, or 2 CPUs without GPU).
            Not allowed with `"default"` (except 1) or `"multiworker"`.

    Raises:
        ValueError: an unknown `name`, a bad `devices`, a missing or malformed `TF_CONFIG` for
            `"multiworker"`, or a runtime that was initialised before this call.
    """
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {name!r}.")
    if name == "default":
        if devices not in (None, 1):
            raise ValueError(f"`devices`={devices} needs `strategy='mirrored'`.")
        return tf.distribute.get_strategy()
    if name == "multiworker":
        return _multi_worker_strategy(devices)
    gpus = tf.config.list_physical_devices("GPU")
    if devices is None:
        devices = len(gpus) if gpus else 2
    devices = int(devices)
    if devices < 1:
        raise ValueError(f"`devices` must be >= 1, got {devices}.")
    if gpus:
        if devices > len(gpus):
            raise ValueError(f"`devices`={devices} but only {len(gpus)} GPU(s) exist.")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(devices)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        # Must come before anything initialises the runtime (list_logical_devices does).
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )
    except RuntimeError as error:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != devices:
            raise ValueError(
                f"`devices`={devices}: TensorFlow is already initialised with {existing} CPU device(s); "
                "choose the strategy before any TensorFlow work, once per process."
            ) from error
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)])


#: Seconds a multi-worker collective may wait for the other workers before it fails.
COLLECTIVE_TIMEOUT_SECONDS = 600.0


def _multi_worker_strategy(devices):
    if devices is not None:
        raise ValueError(
            f"`devices`={devices} cannot be combined with `strategy='multiworker'`: each worker "
            "uses all its GPUs, or its CPU; the number of workers comes from `TF_CONFIG`."
        )
    if parse_tf_config() is None:
        raise ValueError(
            "`strategy='multiworker'` needs the `TF_CONFIG` environment variable (set it on each "
            "worker of a cluster), or launch local workers (`kdtfp run ... --workers N`)."
        )
    try:
        # A collective that waits longer than this fails instead of hanging: when a worker
        # dies the others stop, and the cluster can be restarted from its last backup.
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as error:  # "Collective ops must be configured at program startup"
        raise ValueError(
            "`strategy='multiworker'`: TensorFlow is already initialised; choose the strategy "
            "before any TensorFlow work, once per process."
        ) from error
    fix_keras_multi_worker()
    return strategy


def _multi_worker(strategy):
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def wait_for_workers(strategy) -> None:
    """Returns once every worker of a multi-worker `strategy` has called it (else at once).

    Call it on every worker at the end of a run, so that no worker (the chief hosts the
    cluster's coordination service) exits while another is still saving.
    """
    if _multi_worker(strategy):
        strategy.reduce("SUM", tf.constant(0.0), axis=None)


def _float_scalar(value):
    return isinstance(value, tf.Tensor) and value.shape.rank == 0 and value.dtype == tf.float32


def fix_keras_multi_worker() -> None:
    """Makes Keras 3's `fit`/`evaluate` run under a `MultiWorkerMirroredStrategy` (idempotent).

    Keras 3 (checked on 3.15 / TF 2.21; tensorflow/tensorflow#72388, closed without a fix) fails
    on more than one worker in two places, for any model:

    * the step's logs are reduced with `strategy.reduce("MEAN", value, axis=0)`, which raises
      "Invalid reduction dimension 0 for input with 0 dimensions" for scalar metrics (and would
      average a vector metric over its own entries). Here they are reduced with `axis=None`: the
      mean over replicas, as Keras does for `MirroredStrategy`;
    * before the first step an unbuilt model is built from the first batch reduced across
      replicas with `strategy.reduce`, which cannot take an `(x, y)` tuple across workers. Here
      the first local replica's batch is used: only its shapes and dtypes matter.

    Other strategies are untouched. `make_strategy("multiworker")` calls this.
    """
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_kdtfp_multi_worker_fixed", False):
        return
    reduce_per_replica = trainer.reduce_per_replica
    symbolic_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def fixed_reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not _multi_worker(strategy):
            return reduce_per_replica(values, strategy, reduction)
        flat = tree.flatten(values)
        if flat and all(_float_scalar(value) for value in flat):
            # One all-reduce for all the logs instead of one per metric: every collective is a
            # round trip between the workers.
            means = strategy.reduce("MEAN", tf.stack(flat), axis=None)
            return tree.pack_sequence_as(values, tf.unstack(means, num=len(flat)))
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    def first_local(value, strategy):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def fixed_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and _multi_worker(strategy):
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tree.map_structure(lambda v: first_local(v, strategy), batch)
                break
            iterator = None
        return symbolic_build(self, iterator=iterator, data_batch=data_batch)

    trainer.reduce_per_replica = fixed_reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = fixed_symbolic_build
    trainer._kdtfp_multi_worker_fixed = True


def parse_tf_config(text: str | None = None) -> dict | None:
    """The checked `TF_CONFIG` as a dict, or None when it is unset or empty.

    Args:
        text: the JSON text; defaults to the `TF_CONFIG` environment variable.

    Raises:
        ValueError naming `TF_CONFIG` when it is not JSON, has no `cluster` with a non-empty
        `worker` (or `chief`) list of `"host:port"` addresses, or its `task` is not a
        `{"type": "worker"|"chief", "index": i}` with `i` in range.
    """
    text = os.environ.get("TF_CONFIG", "") if text is None else text
    if not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"`TF_CONFIG` is not JSON ({error}): {text[:200]!r}.") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(
            f"`TF_CONFIG` must be a JSON object with a 'cluster' object: {text[:200]!r}."
        )
    cluster = config["cluster"]
    for task_type, addresses in cluster.items():
        if task_type not in TASK_TYPES:
            raise ValueError(
                f"`TF_CONFIG` cluster has tasks of type {task_type!r}; multi-worker training uses "
                f"only {TASK_TYPES}."
            )
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            raise ValueError(
                f"`TF_CONFIG` cluster[{task_type!r}] must be a non-empty list of 'host:port' "
                f"strings, got {addresses!r}."
            )
    if "worker" not in cluster and "chief" not in cluster:
        raise ValueError("`TF_CONFIG` cluster lists no 'worker' (nor 'chief') addresses.")
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(
            f"`TF_CONFIG` task must be {{'type': one of {sorted(cluster)}, 'index': i}}, got {task!r}."
        )
    index = task.get("index", 0)
    if (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not 0 <= index < len(cluster[task["type"]])
    ):
        raise ValueError(
            f"`TF_CONFIG` task index must be an int in [0, {len(cluster[task['type']])}) for type "
            f"{task['type']!r}, got {index!r}."
        )
    return config


def is_chief(tf_config: dict | str | None = None) -> bool:
    """Whether this process is the chief: the `"chief"` task, or worker 0 of a cluster without one.

    Without `TF_CONFIG` (a single process) it is the chief. The chief writes results and
    exports; the other workers of a `MultiWorkerMirroredStrategy` must run the same steps (and
    the same saves, into temporary folders) but their files are thrown away.

    Args:
        tf_config: a `TF_CONFIG` dict or JSON string; defaults to the environment variable.
    """
    config = tf_config if isinstance(tf_config, dict) else parse_tf_config(tf_config)
    if not config:
        return True
    task = config["task"]
    if task["type"] == "chief":
        return True
    return (
        task["type"] == "worker" and task.get("index", 0) == 0 and "chief" not in config["cluster"]
    )


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` now (held open together while they are chosen)."""
    if count < 1:
        raise ValueError(f"`count` must be >= 1, got {count}.")
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind((host, 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def local_tf_config(workers: int, index: int, ports, host: str = "127.0.0.1") -> dict:
    """The `TF_CONFIG` dict of worker `index` of `workers` local workers on `host:ports[i]`.

    There is no separate chief task: worker 0 is the chief (see `is_chief`).
    """
    workers = _check_workers(workers)
    ports = list(ports)
    if len(ports) != workers:
        raise ValueError(f"`ports` must list {workers} ports (one per worker), got {ports}.")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < workers:
        raise ValueError(f"`index` must be an int in [0, {workers}), got {index!r}.")
    return {
        "cluster": {"worker": [f"{host}:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }


def _check_workers(workers):
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an int >= 1, got {workers!r}.")
    return workers


def launch_local_workers(
    argv, workers: int, *, env=None, stream="stdout", timeout=None, cwd=None
) -> list[subprocess.CompletedProcess]:
    """Runs the command `argv` as `workers` local workers of one `MultiWorkerMirroredStrategy`.

    Each worker gets the environment `env` (default: this process's) plus its own `TF_CONFIG`
    (`local_tf_config` on free loopback ports); the command must create its strategy with
    `make_strategy("multiworker")` (or `tf.distribute.MultiWorkerMirroredStrategy()`) before any
    other TensorFlow work. Their standard output and error are merged, and each line is echoed
    to `stream` prefixed with `[worker i] ` (None: nothing is echoed). When a worker fails the
    others, which would wait for it forever in the next collective, are stopped.

    Args:
        argv: the command, e.g. `[sys.executable, "-m", "kdtfp.cli", "run", ..., "--strategy",
            "multiworker"]`.
        workers: int >= 1.
        env: the workers' environment (default `os.environ`).
        stream: a text stream to echo the prefixed output to, `"stdout"` (the default:
            `sys.stdout` at call time) or None (nothing is echoed).
        timeout: seconds after which every worker still running is stopped and `TimeoutError`
            is raised; None waits for ever.
        cwd: the workers' working folder.

    Returns:
        One `subprocess.CompletedProcess` per worker, in worker order, with its return code and
        its whole output (stdout and stderr merged) as `stdout`.
    """
    workers = _check_workers(workers)
    argv = [str(part) for part in argv]
    if not argv:
        raise ValueError("`argv` is empty: give the command each worker runs.")
    stream = sys.stdout if stream == "stdout" else stream
    ports = free_ports(workers)
    base = dict(os.environ if env is None else env)
    base.setdefault("PYTHONUNBUFFERED", "1")
    lock = threading.Lock()
    outputs = [[] for _ in range(workers)]

    def pump(index, pipe):
        for line in pipe:
            outputs[index].append(line)
            if stream is not None:
                with lock:
                    stream.write(f"[worker {index}] {line}")
                    stream.flush()
        pipe.close()

    processes, readers = [], []
    try:
        for index in range(workers):
            worker_env = dict(base, TF_CONFIG=json.dumps(local_tf_config(workers, index, ports)))
            process = subprocess.Popen(
                argv,
                env=worker_env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            processes.append(process)
            reader = threading.Thread(target=pump, args=(index, process.stdout), daemon=True)
            reader.start()
            readers.append(reader)
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(process.poll() is None for process in processes):
            if any(process.poll() not in (None, 0) for process in processes):
                break  # a worker failed: the others would hang in their next collective
            if deadline is not None and time.monotonic() > deadline:
                _stop(processes)
                raise TimeoutError(
                    f"{workers} local workers still running after {timeout} s; stopped them."
                )
            time.sleep(0.1)
    finally:
        _stop(processes)
        for reader in readers:
            reader.join(timeout=10)
    return [
        subprocess.CompletedProcess(argv, process.returncode, stdout="".join(lines))
        for process, lines in zip(processes, outputs, strict=True)
    ]


def _stop(processes, grace=5.0):
    """Terminates the processes still running, then kills those still alive after `grace` s."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data auto-shard policy `DATA`, for multi-worker training.

    Under `MultiWorkerMirroredStrategy` Keras distributes a `tf.data.Dataset` whose elements are
    global batches: every worker builds the whole pipeline and keeps its replicas' slices of each
    batch, so a step sees the same global batch as one process does (global batch = per-worker
    batch x workers; batch sizes must divide by the number of replicas). `DATA` is the right
    policy for datasets built from tensors (`from_tensor_slices`), which have no files to split;
    the default `AUTO` would first try `FILE`, fail, and warn. Harmless on one process.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
