"""What every recipe shares: its run settings, its result record, and writing them out."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RunConfig:
    """Settings of one recipe run (the `kdtfp run` flags).

    `quick` runs at CI scale (< 90 s on 2 CPU cores); `out` receives the export, `metrics.json`
    and plots; `strategy` is a `tf.distribute.Strategy` (build models in its scope); `jit`
    compiles train steps with XLA.

    `chief` is False on the non-chief workers of a `MultiWorkerMirroredStrategy` run: they must
    make every `fit` (and save) call the chief makes, in the same order and with the same global
    batches, but their `out` is a scratch folder that is deleted afterwards. A recipe may skip
    work whose only product is a file (plots) when `chief` is False; never a `fit`.
    """

    quick: bool = False
    seed: int = 0
    out: str = "saved_models"
    strategy: object = None
    jit: bool = False
    verbose: int = 1
    chief: bool = True

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)


@dataclass
class Result:
    """The record `--json` writes: metrics, baselines, headline comparison, timing, export."""

    recipe: str
    seed: int
    metrics: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    headline: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    export_path: str | None = None
    plots: list = field(default_factory=list)

    def to_json(self) -> dict:
        record = asdict(self)
        record["metrics"] = {k: _plain(v) for k, v in self.metrics.items()}
        record["baselines"] = {k: _plain(v) for k, v in self.baselines.items()}
        record["headline"] = {k: _plain(v) for k, v in self.headline.items()}
        return record


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_result(result: Result, out: str, json_path: str | None = None) -> str:
    """Writes `metrics.json` into `out` (and to `json_path` if given); returns the metrics path."""
    os.makedirs(out, exist_ok=True)
    record = result.to_json()
    metrics_path = os.path.join(out, "metrics.json")
    for path in filter(None, (metrics_path, json_path)):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
    return metrics_path
