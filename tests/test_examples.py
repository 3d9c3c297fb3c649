"""The scripts in examples/ run end to end (at a couple of epochs) and leave a servable export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run_example(script, out_dir, epochs=2):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--epochs", str(epochs), "--out", str(out_dir)],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "export_name"),
    [("quickstart.py", "student"), ("custom_student.py", "residual_student")],
)
def test_example_runs_and_exports(script, export_name, tmp_path):
    result = _run_example(script, tmp_path)
    assert result.returncode == 0, (
        f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    assert "test accuracy: student" in result.stdout
    assert (tmp_path / export_name / "saved_model.pb").is_file()


@pytest.mark.slow
def test_bayesian_kd_example_samples_and_serves_the_posterior(tmp_path):
    result = _run_example("bayesian_kd.py", tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "test accuracy: BKD" in result.stdout and "from 4 chains" in result.stdout
    assert "credible set:" in result.stdout
    assert (tmp_path / "bkd_student" / "saved_model.pb").is_file()
