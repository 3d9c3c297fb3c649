"""Multi-worker training (DESIGN.md section 4): 2 local workers equal one process.

The workers are subprocesses started by `kdtfp.distribute.launch_local_workers` (DESIGN rule 6:
no second strategy in the test process); each runs `multiworker_cases.py` under a
`MultiWorkerMirroredStrategy` from its generated `TF_CONFIG`. The same cases run here, in one
process under the default strategy, on the same global batches, while the workers run.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import kdtfp.cli
from kdtfp.distribute import (
    free_ports,
    is_chief,
    launch_local_workers,
    local_tf_config,
    make_strategy,
    parse_tf_config,
    wait_for_workers,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import multiworker_cases  # noqa: E402

WORKERS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`(one-process results, [worker 0 results, worker 1 results])`, flat dicts of arrays."""
    out = tmp_path_factory.mktemp("multiworker")
    argv = [sys.executable, str(HERE / "multiworker_cases.py"), str(out)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with ThreadPoolExecutor(1) as pool:
        launched = pool.submit(
            launch_local_workers, argv, WORKERS, env=env, stream=None, timeout=400, cwd=ROOT
        )
        single = multiworker_cases.flatten(multiworker_cases.run_all(tf.distribute.get_strategy()))
        completed = launched.result()
    for index, process in enumerate(completed):
        assert process.returncode == 0, f"worker {index}:\n{process.stdout[-4000:]}"
    workers = []
    for index in range(WORKERS):
        with np.load(out / f"worker{index}.npz") as archive:
            workers.append(dict(archive))
    return single, workers


def weights(results, case, key="weights"):
    prefix = f"{case}/{key}/"
    return [results[name] for name in sorted(results) if name.startswith(prefix)]


def max_abs_diff(a, b):
    assert len(a) == len(b) > 0
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", multiworker_cases.CASES)
def test_two_workers_train_the_same_weights_as_one_process_with_the_same_global_batch(
    trained, case
):
    single, workers = trained
    for worker in workers:
        assert int(worker[f"{case}/steps"]) == int(single[f"{case}/steps"]) >= 3
        # Same start, so any difference comes from the steps.
        assert max_abs_diff(weights(worker, case, "initial"), weights(single, case, "initial")) == 0
        assert max_abs_diff(weights(worker, case), weights(single, case)) < 1e-5
    # The steps did something (a test that cannot pass by training nothing).
    assert max_abs_diff(weights(single, case), weights(single, case, "initial")) > 1e-3


def test_sgld_noise_is_the_same_on_every_worker(trained):
    # With replica-asynchronous noise the two workers' weights would drift apart (DESIGN rule 7).
    _, (chief, other) = trained
    assert max_abs_diff(weights(chief, "sgld"), weights(other, "sgld")) == 0


def test_constrained_vi_dual_variable_follows_the_global_constraint(trained):
    single, workers = trained
    for worker in workers:
        np.testing.assert_allclose(
            worker["constrained_vi/constraint"], single["constrained_vi/constraint"], rtol=1e-5
        )
        np.testing.assert_allclose(
            worker["constrained_vi/multiplier"], single["constrained_vi/multiplier"], rtol=1e-5
        )
    # Two dual-ascent steps moved the multiplier up from 1.0 (the constraint is violated).
    multiplier = single["constrained_vi/multiplier"]
    assert multiplier.shape == (2,) and 1.0 < multiplier[0] < multiplier[1]


# ---------------------------------------------------------------------- launcher and TF_CONFIG


def test_local_tf_config_lists_every_worker_and_worker_zero_is_chief():
    ports = free_ports(3)
    assert len(set(ports)) == 3
    configs = [local_tf_config(3, index, ports) for index in range(3)]
    assert configs[1]["cluster"]["worker"] == [f"127.0.0.1:{port}" for port in ports]
    assert [parse_tf_config(json.dumps(config))["task"]["index"] for config in configs] == [0, 1, 2]
    assert [is_chief(config) for config in configs] == [True, False, False]
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker"}}
    assert not is_chief(with_chief)
    assert is_chief(dict(with_chief, task={"type": "chief", "index": 0}))


def test_without_tf_config_the_process_is_the_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert parse_tf_config() is None
    assert is_chief()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "cluster"),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "worker"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker"}}', "host:port"),
        ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker"}}', "ps"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator"}}', "task"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index"),
    ],
)
def test_bad_tf_config_raises_naming_it(text, named):
    with pytest.raises(ValueError, match="TF_CONFIG") as error:
        parse_tf_config(text)
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: local_tf_config(0, 0, []), "workers"),
        (lambda: local_tf_config(2, 2, [1, 2]), "index"),
        (lambda: local_tf_config(2, 0, [1]), "ports"),
        (lambda: launch_local_workers([sys.executable, "-c", "pass"], 0), "workers"),
        (lambda: launch_local_workers([], 2), "argv"),
        (lambda: free_ports(0), "count"),
        (lambda: make_strategy("multiworker", devices=2), "devices"),
    ],
)
def test_bad_launcher_arguments_raise_naming_them(call, named):
    with pytest.raises(ValueError, match=named):
        call()


def test_wait_for_workers_returns_at_once_without_workers():
    wait_for_workers(tf.distribute.get_strategy())


def test_multiworker_strategy_without_tf_config_raises_before_creating_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_strategy("multiworker")


def test_a_failing_worker_stops_the_others_and_its_code_is_returned():
    # Worker 1 fails at once; worker 0 would wait for ever in its next collective, so the
    # launcher stops it instead of waiting.
    code = (
        "import json, os, sys, time\n"
        "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "print('worker', index, 'up', flush=True)\n"
        "sys.exit(3) if index == 1 else time.sleep(600)\n"
    )
    completed = launch_local_workers([sys.executable, "-c", code], 2, stream=None, timeout=300)
    assert completed[1].returncode == 3
    assert completed[0].returncode not in (0, None)
    assert completed[1].stdout.strip() == "worker 1 up"


def test_worker_output_is_prefixed_with_its_index(capsys):
    code = "import json, os; print(json.loads(os.environ['TF_CONFIG'])['task']['index'])"
    completed = launch_local_workers([sys.executable, "-c", code], 2, stream=sys.stdout)
    assert [process.returncode for process in completed] == [0, 0]
    assert sorted(capsys.readouterr().out.splitlines()) == ["[worker 0] 0", "[worker 1] 1"]


# ---------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--strategy", "multiworker", "--workers", "0"], None, "--workers"),
        (["--workers", "2"], None, "--workers"),
        (["--strategy", "mirrored", "--workers", "2"], None, "--workers"),
        (["--strategy", "multiworker", "--workers", "2", "--devices", "2"], None, "--devices"),
        (["--strategy", "multiworker", "--devices", "2"], None, "devices"),
        (["--strategy", "multiworker"], "{not json", "TF_CONFIG"),
        (["--strategy", "multiworker"], "", "TF_CONFIG"),
    ],
)
def test_bad_multiworker_command_lines_exit_with_one_line_naming_the_argument(
    args, env, named, monkeypatch
):
    # Each of these fails before any strategy exists, so it can run in this process.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if env is not None:
        monkeypatch.setenv("TF_CONFIG", env)
    with pytest.raises(SystemExit) as exit_info:
        kdtfp.cli.main(["run", "ensemble-compression", "--quick", *args])
    message = str(exit_info.value.code)
    assert message.startswith("kdtfp: error:") and "\n" not in message
    assert named in message


def test_worker_command_is_the_run_command_without_workers():
    argv = ["run", "bkd", "--workers", "2", "--quick", "--workers=3", "--strategy", "multiworker"]
    command = kdtfp.cli._worker_argv(argv)
    assert command[:3] == [sys.executable, "-m", "kdtfp.cli"]
    assert command[3:] == ["run", "bkd", "--quick", "--strategy", "multiworker"]
