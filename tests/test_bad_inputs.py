"""Bad input across the public API, as one table (DESIGN.md rule 12, issue 9).

Each row feeds one bad input and expects a `ValueError` whose message names the argument, raised
before any training step (rows that call `fit` also check that no weight changed). The rows
collect the bad-input lists of the issues (foundation, constrained VI, Bayesian KD, intractable
models, scaling out). The command-line rows run in one subprocess, through `kdtfp.cli.main`,
and expect a `SystemExit` with a one-line message naming the option and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp import distribute, recipes, serve_check
from kdtfp.callbacks import DualAscent, PosteriorSampler
from kdtfp.distill import ConstrainedVIDistiller, Distiller, teacher_cached_dataset
from kdtfp.export import export_posterior, export_student, versioned_export_path
from kdtfp.losses import (
    DerivativeMatching,
    SimilarityPreserving,
    SoftTargetKL,
    TeacherDirichletPosterior,
)
from kdtfp.models import PosteriorEnsemble
from kdtfp.models.arhmm import AutoregressiveHMM
from kdtfp.models.mixture_predictive import MixturePredictive
from kdtfp.models.nade import NADE, export_nade
from kdtfp.models.rbm import RBM
from kdtfp.models.topic_model import TopicModel, export_topic_model
from kdtfp.optimizers import SGLD
from kdtfp.teachers import mlp

D, K = 8, 3


def _teacher(input_dim=D, classes=K):
    return mlp(input_dim, (6,), classes, name="teacher", seed=1)


def _student(input_dim=D, classes=K):
    return mlp(input_dim, (4,), classes, name="student", seed=2)


def _x(n=16, d=D):
    return np.random.default_rng(0).random((n, d)).astype("float32")


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _refused_before_a_step(model, fit):
    """Runs `fit()`, which must raise; re-raises after checking that `model` did not change."""
    before = _weights(model)
    try:
        fit()
    finally:
        for old, new in zip(before, _weights(model), strict=True):
            np.testing.assert_array_equal(old, new)


def _distiller_fit(x, y=None):
    student = _student()
    distiller = Distiller(
        student,
        _teacher(),
        [SoftTargetKL()],
        student_loss=None if y is None else keras.losses.SparseCategoricalCrossentropy(True),
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    _refused_before_a_step(student, lambda: distiller.fit(x, y, epochs=1, verbose=0))


def _with_nan(x, value=np.nan):
    x = x.copy()
    x[3, 2] = value
    return x


def _topic_fit(counts):
    model = TopicModel(3, 6, corpus_size=10)
    model.compile(optimizer="adam")
    _refused_before_a_step(model, lambda: model.fit(counts, epochs=1, verbose=0))


def _arhmm(x):
    model = AutoregressiveHMM(3, order=2, observation_dim=2, num_sequences=10, seed=0)
    model(x)


def _binary_fit(model, x):
    model.compile(optimizer="adam")
    _refused_before_a_step(model, lambda: model.fit(x, x, epochs=1, verbose=0))


def _sgld_burn_in():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K)])
    model.compile(
        optimizer=SGLD(1e-3, data_size=16, seed=0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    sampler = PosteriorSampler(burn_in=16, thin=1, max_samples=5, verbose=0)
    y = np.zeros(16, "int64")
    _refused_before_a_step(
        model,
        lambda: model.fit(_x(), y, batch_size=4, epochs=2, verbose=0, callbacks=[sampler]),
    )


def _ensemble():
    student = _student()
    return PosteriorEnsemble(student, [_weights(student)] * 2, name="posterior")


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


# (id, call(tmp_path), pattern the message must contain: the argument's name)
CASES = [
    # ---- distillation core (issue 3)
    (
        "teacher/student outputs differ",
        lambda _: Distiller(_student(classes=5), _teacher(), [SoftTargetKL()]),
        "`teacher` and `student` outputs differ",
    ),
    (
        "teacher/student inputs differ",
        lambda _: Distiller(_student(input_dim=D + 1), _teacher(), [SoftTargetKL()]),
        "`teacher` and `student` take inputs of different shapes",
    ),
    ("temperature 0", lambda _: SoftTargetKL(0.0), "temperature"),
    ("temperature < 0", lambda _: SoftTargetKL(-2.0), "temperature"),
    ("temperature inf", lambda _: SoftTargetKL(float("inf")), "temperature"),
    (
        "negative term weight",
        lambda _: Distiller(_student(), _teacher(), [(SoftTargetKL(), -1.0)]),
        "`weight`",
    ),
    (
        "negative student_loss_weight",
        lambda _: Distiller(
            _student(),
            _teacher(),
            [SoftTargetKL()],
            student_loss=keras.losses.SparseCategoricalCrossentropy(True),
            student_loss_weight=-1.0,
        ),
        "`student_loss_weight`",
    ),
    ("NaN in x", lambda _: _distiller_fit(_with_nan(_x())), "`x` contains 1 NaN/Inf"),
    ("Inf in x", lambda _: _distiller_fit(_with_nan(_x(), np.inf)), "`x` contains 1 NaN/Inf"),
    ("empty transfer set", lambda _: _distiller_fit(_x()[:0]), "`x` is empty"),
    (
        "empty transfer dataset",
        lambda _: _distiller_fit(tf.data.Dataset.from_tensor_slices(_x()[:0]).batch(4)),
        "`x` is an empty dataset",
    ),
    (
        "student is the teacher",
        lambda _: (lambda t: Distiller(t, t, [SoftTargetKL()]))(_teacher()),
        "`student` and `teacher` are the same model",
    ),
    (
        "cached teacher on NaN x",
        lambda _: teacher_cached_dataset(_teacher(), _with_nan(_x())),
        "`x`",
    ),
    ("unknown DM mode", lambda _: DerivativeMatching(mode="approximate"), "`mode`"),
    (
        "0 projections",
        lambda _: DerivativeMatching(mode="projection", num_projections=0),
        "`num_projections`",
    ),
    # ---- constrained VI: topic model and AR-HMM (issue 4)
    ("negative counts", lambda _: _topic_fit(-np.ones((2, 6), "float32")), "counts|`x`"),
    ("non-integer counts", lambda _: _topic_fit(np.full((2, 6), 0.5, "float32")), "counts|`x`"),
    ("counts of wrong vocab size", lambda _: _topic_fit(np.ones((2, 7), "float32")), "vocab"),
    ("K < 1 topics", lambda _: TopicModel(0, 6, corpus_size=10), "`num_topics`"),
    ("K < 1 states", lambda _: AutoregressiveHMM(0), "`num_states`"),
    (
        "epsilon < 0",
        lambda _: ConstrainedVIDistiller(TopicModel(3, 6, 10), epsilon=-0.1),
        "epsilon",
    ),
    (
        "sequences shorter than AR order",
        lambda _: _arhmm(np.zeros((2, 2, 2), "float32")),
        "order",
    ),
    ("NaN in sequences", lambda _: _arhmm(np.full((2, 5, 2), np.nan, "float32")), "NaN"),
    (
        "sequences of wrong dimension",
        lambda _: _arhmm(np.zeros((2, 5, 3), "float32")),
        "observation dimension|observation_dim",
    ),
    ("SP kernel unknown", lambda _: SimilarityPreserving(kernel="nope"), "kernel"),
    ("DualAscent target < 0", lambda _: DualAscent(target=-1e-3, learning_rate=1.0), "`target`"),
    # ---- Bayesian KD (issue 5)
    ("lambda < 0", lambda _: TeacherDirichletPosterior(lam=-1.0), "`lam`"),
    (
        "Dirichlet T <= 0",
        lambda _: TeacherDirichletPosterior(1.0, temperature=0.0),
        "`temperature`",
    ),
    ("SGLD step size 0", lambda _: SGLD(0.0, data_size=10), "`learning_rate`"),
    ("SGLD step size < 0", lambda _: SGLD(-1e-3, data_size=10), "`learning_rate`"),
    (
        "teacher probs not summing to 1",
        lambda _: TeacherDirichletPosterior(1.0, teacher_from_logits=False)(
            {"labels": np.array([0, 1]), "teacher_probs": np.full((2, K), 0.5, "float32")},
            np.zeros((2, K), "float32"),
        ),
        "`teacher_probs`",
    ),
    (
        "teacher class count wrong",
        lambda _: TeacherDirichletPosterior.targets(np.zeros(2, int), np.zeros(2, np.float32)),
        "`teacher_logits`",
    ),
    ("thin < 1", lambda _: PosteriorSampler(burn_in=0, thin=0, max_samples=1), "`thin`"),
    ("burn-in >= steps", lambda _: _sgld_burn_in(), "`burn_in`"),
    (
        "posterior level 1",
        lambda _: (lambda s: PosteriorEnsemble(s, [_weights(s)] * 2, level=1.0))(_student()),
        "`level`",
    ),
    # ---- intractable models (issue 7)
    ("non-binary NADE data", lambda _: _binary_fit(NADE(D, 4), _x()), "`x` must be binary"),
    ("non-binary RBM data", lambda _: _binary_fit(RBM(D, 4), _x()), "`x` must be binary"),
    ("H too large to enumerate", lambda _: RBM(30, 21).log_partition(), "`num_hidden` <= 20"),
    ("M < 1 components", lambda _: MixturePredictive(num_components=0), "num_components"),
    # ---- scaling out and serving (issue 9)
    (
        "more devices than exist",  # conftest gave this process 2 logical CPUs (or it has GPUs)
        lambda _: tf.config.list_logical_devices() and distribute.make_strategy("mirrored", 4),
        "`devices`",
    ),
    ("devices without mirrored", lambda _: distribute.make_strategy("default", 2), "`devices`"),
    ("unknown strategy", lambda _: distribute.make_strategy("nope"), "`strategy`"),
    ("recipe that does not exist", lambda _: recipes.get("no-such-recipe"), "no-such-recipe"),
    (
        "export path is a file (student)",
        lambda tmp: export_student(_student(), _a_file(tmp)),
        "`path`",
    ),
    (
        "export path is a file (posterior)",
        lambda tmp: export_posterior(_ensemble(), _a_file(tmp)),
        "`path`",
    ),
    (
        "export path is a file (NADE)",
        lambda tmp: export_nade(NADE(4, 2), _a_file(tmp)),
        "`path`",
    ),
    (
        "export path is a file (topic model)",
        lambda tmp: export_topic_model(TopicModel(3, 6, 10), _a_file(tmp)),
        "`path`",
    ),
    ("export base is a file", lambda tmp: versioned_export_path(_a_file(tmp)), "`base`"),
    ("export version 0", lambda tmp: versioned_export_path(tmp, 0), "`version`"),
    (
        "signature with a fixed batch",
        lambda tmp: export_student(
            _student(), tmp / "e", input_signature=tf.TensorSpec([4, D], tf.float32)
        ),
        "`input_signature`",
    ),
    (
        "signature with an open feature dimension",
        lambda tmp: export_student(
            _student(), tmp / "e", input_signature=tf.TensorSpec([None, None], tf.float32)
        ),
        "`input_signature`",
    ),
    ("serve-check on a file", lambda tmp: serve_check.check(_a_file(tmp)), "`PATH`"),
    ("serve-check rows 0", lambda tmp: serve_check.check(tmp, rows=0), "`rows`"),
]

CASES += [
    ("TF_CONFIG not JSON", lambda _: distribute.parse_tf_config("{not json"), "`TF_CONFIG`"),
    (
        "0 local workers",
        lambda _: distribute.launch_local_workers([sys.executable, "-c", "pass"], 0),
        "`workers`",
    ),
]


def test_the_table_covers_at_least_40_bad_inputs():
    assert len(CASES) + len(CLI_CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "call, names",
    [pytest.param(call, names, id=name) for name, call, names in CASES],
)
def test_bad_input_raises_value_error_naming_the_argument(call, names, tmp_path):
    keras.utils.set_random_seed(0)
    with pytest.raises(ValueError, match=names):
        call(tmp_path)


# ------------------------------------------------------------------------ the command line
# (id, argv, environment additions, pattern the one-line message must contain)
CLI_CASES = [
    ("unknown recipe", ["run", "no-such-recipe"], {}, "no-such-recipe"),
    ("--out is a file", ["run", "ensemble-compression", "--out", "{file}"], {}, "`--out`"),
    ("--json is a folder", ["run", "ensemble-compression", "--json", "{dir}"], {}, "`--json`"),
    ("--seed not an int", ["run", "ensemble-compression", "--seed", "x"], {}, "--seed"),
    ("--devices 0", ["run", "kd-lda", "--strategy", "mirrored", "--devices", "0"], {}, "devices"),
    ("--devices without mirrored", ["run", "kd-lda", "--devices", "2"], {}, "devices"),
    ("unknown strategy", ["run", "kd-lda", "--strategy", "nope"], {}, "--strategy"),
    ("unknown benchmark", ["bench", "nope"], {}, "name"),
    ("serve-check on a file", ["serve-check", "{file}"], {}, "`PATH`"),
    ("serve-check on an empty folder", ["serve-check", "{dir}"], {}, "`PATH`"),
    (
        "--workers 0",
        ["run", "kd-lda", "--strategy", "multiworker", "--workers", "0"],
        {},
        r"`--workers` must be >= 1",
    ),
    (
        "TF_CONFIG not JSON",
        ["run", "kd-lda", "--strategy", "multiworker"],
        {"TF_CONFIG": "{not json"},
        "TF_CONFIG",
    ),
    # Last: it configures logical devices in the driver process before it is refused. (With
    # GPUs `--jit` is allowed; the driver then runs without this row.)
    (
        "--jit with mirrored on CPU",
        ["run", "kd-lda", "--jit", "--strategy", "mirrored", "--devices", "2"],
        {},
        "`--jit`",
    ),
]

# Runs every command in one fresh process, the way the console script would, and records what
# a user would see: the SystemExit code and message, the text argparse wrote to stderr, or the
# traceback of anything else.
_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, os, sys, traceback

    from kdtfp import cli

    results = {}
    for name, argv, env in json.loads(sys.argv[1]):
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                cli.main(argv)
            result = {"outcome": "returned"}
        except SystemExit as stop:
            result = {"outcome": "exit", "code": stop.code if isinstance(stop.code, int) else 1,
                      "message": "" if isinstance(stop.code, int) else str(stop.code)}
        except BaseException:
            result = {"outcome": "traceback", "traceback": traceback.format_exc()}
        result["stderr"] = stderr.getvalue()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        results[name] = result
    print("@@" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    file = folder / "a_file"
    file.write_text("")
    empty = folder / "empty"
    empty.mkdir()
    cases = [
        (name, [arg.format(file=file, dir=empty) for arg in argv], env)
        for name, argv, env, _ in CLI_CASES
        if not (name == "--jit with mirrored on CPU" and tf.config.list_physical_devices("GPU"))
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    completed = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=folder,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("@@"))
    return json.loads(line[2:])


@pytest.mark.parametrize(
    "name, pattern",
    [pytest.param(name, pattern, id=name) for name, _, _, pattern in CLI_CASES],
)
def test_bad_command_line_exits_with_one_line_naming_the_option(name, pattern, cli_results):
    if name not in cli_results:
        pytest.skip("`--jit` with several GPU replicas is allowed")
    result = cli_results[name]
    assert result["outcome"] == "exit", result
    assert result["code"] != 0, result
    assert "Traceback" not in result["stderr"] + result["message"], result
    # Our checks: a one-line SystemExit message. argparse's: usage, then one "error:" line.
    message = result["message"] or result["stderr"].strip().splitlines()[-1]
    assert "\n" not in message.strip(), message
    assert message.startswith("kdtfp") and "error:" in message, message
    assert re.search(pattern, message), message
