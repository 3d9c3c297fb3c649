"""The `kdtfp` command: list recipes, run them, benchmark.

kdtfp list
kdtfp run RECIPE [--quick] [--seed N] [--out DIR] [--json PATH]
                 [--strategy default|mirrored|multiworker] [--devices N] [--workers N] [--jit]
kdtfp run all --quick
kdtfp bench NAME [--json PATH] [--quick]
kdtfp serve-check PATH [--rows N] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

BENCHMARKS = {
    "distiller": "kdtfp.bench.distiller",
    "sgld": "kdtfp.bench.sgld",
    "logz": "kdtfp.bench.logz",
    "online": "kdtfp.bench.online",
    "arhmm": "kdtfp.bench.arhmm",
    "recovery": "kdtfp.bench.recovery",
}


def _parser():
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="kdtfp",
        description="Distil teacher networks into probabilistic students.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the recipes")

    run = commands.add_parser("run", help="run a recipe (or 'all')")
    run.add_argument("recipe")
    run.add_argument(
        "--quick", action="store_true", help="CI scale: under 90 s per recipe on 2 CPU cores"
    )
    run.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    run.add_argument("--out", default=None, help="output folder (default saved_models/RECIPE)")
    run.add_argument("--json", default=None, help="also write the result record here")
    run.add_argument(
        "--strategy", default="default", choices=["default", "mirrored", "multiworker"]
    )
    run.add_argument("--devices", type=int, default=None, help="replicas for --strategy mirrored")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --strategy multiworker: launch N local workers (worker 0 writes the results); "
        "without it, each worker of a cluster runs the command with its own TF_CONFIG",
    )
    run.add_argument("--jit", action="store_true", help="compile train steps with XLA")
    run.add_argument("--quiet", action="store_true")

    bench = commands.add_parser("bench", help="run a benchmark (ratios measured in one process)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("--json", default=None)
    bench.add_argument("--quick", action="store_true")
    check = commands.add_parser(
        "serve-check",
        help="call every endpoint of an export on valid and malformed requests, without kdtfp",
    )
    check.add_argument("path", help="an export's base folder (highest version) or a version folder")
    check.add_argument("--rows", type=int, default=100_000, help="rows of the large request")
    check.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    return parser


def _serve_check(args):
    from kdtfp import serve_check

    try:
        return serve_check.check(args.path, rows=args.rows, timeout=args.timeout)
    except ValueError as error:
        sys.exit(f"kdtfp serve-check: error: {error}")


def _list():
    from kdtfp.recipes import RECIPES

    width = max(map(len, RECIPES))
    for name, (_, description) in RECIPES.items():
        print(f"{name:<{width}}  {description}")


def _format(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _summary(results):
    rows = [("recipe", "headline metric", "kdtfp", "baseline", "baseline is", "seconds")]
    for result in results:
        headline = result.headline
        rows.append(
            (
                result.recipe,
                headline.get("metric", ""),
                _format(headline.get("ours", "")),
                _format(headline.get("baseline", "")),
                headline.get("baseline_name", ""),
                f"{result.seconds:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _check_run_arguments(args):
    """Checks `kdtfp run`'s arguments before any work; returns `(recipe names, strategy)`.

    Raises ValueError naming the argument. Only these errors are shown as one line: errors
    during a run keep their traceback.
    """
    import tensorflow as tf

    from kdtfp import recipes
    from kdtfp.distribute import make_strategy

    names = list(recipes.RECIPES) if args.recipe == "all" else [args.recipe]
    for name in names:
        recipes.get(name)
    if args.json and os.path.isdir(args.json):
        raise ValueError(f"`--json` {args.json!r} is a folder; give a file path.")
    if args.out and os.path.isfile(args.out):
        raise ValueError(f"`--out` {args.out!r} is a file; give a folder.")
    if args.workers is not None:
        _check_worker_arguments(args)
        return names, None  # this process only launches the workers
    strategy = make_strategy(args.strategy, args.devices)
    if (
        args.jit
        and strategy.num_replicas_in_sync > 1
        and not tf.config.list_physical_devices("GPU")
    ):
        # XLA-compiled steps on several logical CPU devices fail in TF 2.21 ("Trying to access
        # resource ... located in device CPU:1 from device CPU:0").
        raise ValueError(
            f"`--jit` cannot be combined with `--strategy {args.strategy}` on CPU devices."
        )
    return names, strategy


def _check_worker_arguments(args):
    """Checks `--workers N` (local multi-worker launch); raises ValueError naming the flag."""
    if args.workers < 1:
        raise ValueError(f"`--workers` must be >= 1, got {args.workers}.")
    if args.strategy != "multiworker":
        raise ValueError(
            f"`--workers` needs `--strategy multiworker`, got `--strategy {args.strategy}`."
        )
    if args.devices is not None:
        raise ValueError(
            "`--devices` cannot be combined with `--workers`: each local worker uses one CPU "
            "(or its GPUs)."
        )
    if os.environ.get("TF_CONFIG", "").strip():
        raise ValueError(
            "`--workers` launches local workers with their own TF_CONFIG, but TF_CONFIG is set: "
            "unset it, or drop `--workers` to run as that cluster's worker."
        )


def _worker_argv(argv):
    """The command each local worker runs: this one, without `--workers`."""
    command, skip = [], False
    for part in argv:
        if skip:
            skip = False
        elif part == "--workers":
            skip = True
        elif not part.startswith("--workers="):
            command.append(part)
    return [sys.executable, "-m", "kdtfp.cli", *command]


def _launch_workers(args):
    """`kdtfp run ... --workers N`: runs the command as N local workers; returns the exit code.

    Each worker gets a `TF_CONFIG` on free loopback ports and creates its
    `MultiWorkerMirroredStrategy`; worker 0 (the chief) writes `--out` and `--json`, the others
    write into temporary folders. Their output is streamed with a `[worker i]` prefix.
    """
    from kdtfp.distribute import launch_local_workers

    completed = launch_local_workers(_worker_argv(args.argv), args.workers)
    failed = [f"{i} (exit {p.returncode})" for i, p in enumerate(completed) if p.returncode]
    if failed:
        print(f"kdtfp: error: worker {', '.join(failed)} failed.", file=sys.stderr)
        return 1
    return 0


def _run_recipes(args, names, strategy, chief, scratch):
    """Runs each recipe in this process; returns their results (written by the chief)."""
    import tensorflow as tf

    from kdtfp import recipes
    from kdtfp.callbacks import nan_guard
    from kdtfp.callbacks.nan_guard import NumericalFailureError
    from kdtfp.determinism import set_determinism
    from kdtfp.distribute import wait_for_workers

    # Op determinism makes CPU runs repeatable; on a GPU some ops have no deterministic kernel,
    # so it is on there only when a seed is asked for explicitly.
    deterministic = args.seed_given or not tf.config.list_physical_devices("GPU")
    results = []
    for name in names:
        module = recipes.get(name)
        out = (
            args.out
            if (args.out and len(names) == 1)
            else os.path.join(args.out or "saved_models", name)
        )
        if not chief:
            out = os.path.join(scratch, name)
        config = recipes.RunConfig(
            quick=args.quick,
            seed=args.seed,
            out=out,
            strategy=strategy,
            jit=args.jit,
            verbose=0 if (args.quiet or not chief) else 1,
            chief=chief,
        )
        set_determinism(args.seed, op_determinism=deterministic)
        nan_guard.DEFAULT_CHECKPOINT_DIR = out  # last_good.weights.h5, written only on a failure
        start = time.perf_counter()
        try:
            result = module.run(config)
        except NumericalFailureError as error:
            # The guard's one line (step, term, restored weights) says it all; no traceback.
            sys.exit(f"[{name}] {error}")
        result.seconds = time.perf_counter() - start
        result.settings.update(
            strategy=args.strategy,
            replicas=strategy.num_replicas_in_sync,
            jit=args.jit,
            quick=args.quick,
        )
        json_path = args.json if (len(names) == 1 and chief) else None
        metrics_path = recipes.write_result(result, out, json_path)
        config.log(
            f"[{name}] done in {result.seconds:.0f} s: metrics {metrics_path}, export {result.export_path}"
        )
        results.append(result)
    wait_for_workers(strategy)  # multi-worker: nobody exits while another worker still saves
    return results


def _run(args):
    from kdtfp.distribute import is_chief

    try:
        names, strategy = _check_run_arguments(args)
    except ValueError as error:
        sys.exit(f"kdtfp: error: {error}")
    if strategy is None:
        sys.exit(_launch_workers(args))
    # A multi-worker run: every worker trains; only the chief keeps its files (the others
    # still save, into a scratch folder: saving a distributed model involves every worker).
    chief = args.strategy != "multiworker" or is_chief()
    scratch = None if chief else tempfile.mkdtemp(prefix="kdtfp-worker-")
    try:
        results = _run_recipes(args, names, strategy, chief, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not chief:
        return
    print(_summary(results))
    if args.json and len(names) > 1:
        # `run all --json`: one record per recipe, under the recipe's name.
        with open(args.json, "w") as handle:
            json.dump({r.recipe: r.to_json() for r in results}, handle, indent=2)


def _bench(args):
    import importlib

    module = importlib.import_module(BENCHMARKS[args.name])
    module.run(quick=args.quick, json_path=args.json, verbose=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # `run --workers N` relaunches this command in each worker
    if args.command == "list":
        _list()
    elif args.command == "run":
        args.seed_given = args.seed is not None
        args.seed = 0 if args.seed is None else args.seed
        _run(args)
    elif args.command == "serve-check":
        return _serve_check(args)
    else:
        _bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
