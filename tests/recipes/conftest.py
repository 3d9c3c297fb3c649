"""Shared by the recipe tests: run `kdtfp run RECIPE --quick` in a subprocess."""

import json
import os
import subprocess
import sys

import pytest


def _run_recipe(name, out, *flags):
    """`kdtfp run NAME --quick --out OUT --json OUT/m.json FLAGS...` in a fresh process (one
    strategy per process, DESIGN rule 6); returns `(out, json record, stdout)`."""
    json_path = out / "m.json"
    completed = subprocess.run(
        [sys.executable, "-m", "kdtfp.cli", "run", name, "--quick"]
        + ["--out", str(out), "--json", str(json_path), *flags],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, json.loads(json_path.read_text()), completed.stdout


@pytest.fixture(scope="session")
def run_recipe():
    """The function `run_recipe(name, out, *flags) -> (out, record, stdout)`."""
    return _run_recipe
