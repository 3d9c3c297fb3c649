"""The `kdtfp` command line: listing, one-line errors for bad arguments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def kdtfp_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "kdtfp.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def test_list_names_every_recipe():
    from kdtfp.recipes import RECIPES

    completed = kdtfp_cli("list")
    assert completed.returncode == 0
    for name in RECIPES:
        assert name in completed.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("run", "no-such-recipe", "--quick"), "no-such-recipe"),
        (
            ("run", "ensemble-compression", "--quick", "--strategy", "mirrored", "--devices", "0"),
            "devices",
        ),
        (("run", "ensemble-compression", "--quick", "--devices", "3"), "devices"),
        (("run", "ensemble-compression", "--quick", "--json", "."), "--json"),
        (("run", "ensemble-compression", "--quick", "--out", "pyproject.toml"), "--out"),
        (
            (
                "run",
                "ensemble-compression",
                "--quick",
                "--strategy",
                "mirrored",
                "--devices",
                "2",
                "--jit",
            ),
            "--jit",
        ),
    ],
)
def test_bad_arguments_exit_with_one_line_naming_the_argument(args, named):
    completed = kdtfp_cli(*args)
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    error_lines = [
        line for line in completed.stderr.splitlines() if line.startswith("kdtfp: error:")
    ]
    assert len(error_lines) == 1 and named in error_lines[0], completed.stderr[-2000:]
