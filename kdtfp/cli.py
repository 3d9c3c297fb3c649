"""The `kdtfp` command: list recipes, run them, benchmark.

kdtfp list
kdtfp run RECIPE [--quick] [--seed N] [--out DIR] [--json PATH]
                 [--strategy default|mirrored] [--devices N] [--jit]
kdtfp run all --quick
kdtfp bench NAME [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BENCHMARKS = {
    "distiller": "kdtfp.bench.distiller",
    "sgld": "kdtfp.bench.sgld",
    "logz": "kdtfp.bench.logz",
    "online": "kdtfp.bench.online",
    "arhmm": "kdtfp.bench.arhmm",
}


def _parser():
    parser = argparse.ArgumentParser(
        prog="kdtfp", description="Distil teacher networks into probabilistic students."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the recipes")

    run = commands.add_parser("run", help="run a recipe (or 'all')")
    run.add_argument("recipe")
    run.add_argument(
        "--quick", action="store_true", help="CI scale: under 90 s per recipe on 2 CPU cores"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="output folder (default saved_models/RECIPE)")
    run.add_argument("--json", default=None, help="also write the result record here")
    run.add_argument("--strategy", default="default", choices=["default", "mirrored"])
    run.add_argument("--devices", type=int, default=None, help="replicas for --strategy mirrored")
    run.add_argument("--jit", action="store_true", help="compile train steps with XLA")
    run.add_argument("--quiet", action="store_true")

    bench = commands.add_parser("bench", help="run a benchmark (ratios measured in one process)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("--json", default=None)
    bench.add_argument("--quick", action="store_true")
    return parser


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
    strategy = make_strategy(args.strategy, args.devices)
    if (
        args.jit
        and strategy.num_replicas_in_sync > 1
        and not tf.config.list_physical_devices("GPU")
    ):
        # XLA-compiled steps on several logical CPU devices fail in TF 2.21 ("Trying to access
        # resource ... located in device CPU:1 from device CPU:0").
        raise ValueError("`--jit` cannot be combined with `--strategy mirrored` on CPU devices.")
    return names, strategy


def _run(args):
    import keras

    from kdtfp import recipes

    try:
        names, strategy = _check_run_arguments(args)
    except ValueError as error:
        sys.exit(f"kdtfp: error: {error}")
    results = []
    for name in names:
        module = recipes.get(name)
        out = (
            args.out
            if (args.out and len(names) == 1)
            else os.path.join(args.out or "saved_models", name)
        )
        config = recipes.RunConfig(
            quick=args.quick,
            seed=args.seed,
            out=out,
            strategy=strategy,
            jit=args.jit,
            verbose=0 if args.quiet else 1,
        )
        keras.utils.set_random_seed(args.seed)
        start = time.perf_counter()
        result = module.run(config)
        result.seconds = time.perf_counter() - start
        result.settings.update(
            strategy=args.strategy,
            replicas=strategy.num_replicas_in_sync,
            jit=args.jit,
            quick=args.quick,
        )
        json_path = args.json if len(names) == 1 else None
        metrics_path = recipes.write_result(result, out, json_path)
        config.log(
            f"[{name}] done in {result.seconds:.0f} s: metrics {metrics_path}, export {result.export_path}"
        )
        results.append(result)
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
    args = _parser().parse_args(argv)
    if args.command == "list":
        _list()
    elif args.command == "run":
        _run(args)
    else:
        _bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
