"""`kdtfp serve-check PATH`: call every endpoint of an export on valid and malformed requests.

The export is loaded with `tf.saved_model.load` in a fresh Python process in which `import kdtfp`
fails (a `sys.meta_path` blocker, checked at start-up; TensorFlow Probability is hidden too), so
TensorFlow alone serves it, as in production. Every signature (what TensorFlow Serving exposes)
gets, per input:

========================  =======================================================  ===============
request                   built from the input's `TensorSpec`                       passes when
========================  =======================================================  ===============
valid                     7 rows of random 0/1 values (valid binary data, counts    it returns, all
                          and real features alike); ints: 3 for a scalar (e.g.     float outputs
                          `num_samples`), small ints otherwise                      finite
wrong feature dimension   last dimension + 1 (a fixed-shape input: its length + 1)  refused
wrong dtype               a tensor of another dtype (float32 <-> float64, int ->    refused
                          float32, bool -> int32)
NaN                       the valid batch with one NaN in row 0                     refused, or the
                                                                                    other rows'
                                                                                    outputs are
                                                                                    those of the
                                                                                    valid call
empty batch               0 rows                                                    refused or
                                                                                    returned
10^5 rows                 100000 valid rows (`--rows`)                              refused or
                                                                                    returned with
                                                                                    100000 rows
n = 0, n = -1, n = 10^5   a scalar int input (e.g. `sample(num_samples)`)           refused or
                                                                                    returned
========================  =======================================================  ===============

"Refused" means the call raised an error with a non-empty message (its first meaningful line is
shown); every request must leave the serving process alive (a crash fails the check and the
remaining requests go to a new process). kdtfp's exports document (`kdtfp.export`) that they
check each request's shape (`tf.ensure_shape` in every endpoint), dtype (the signature) and, for
float inputs, finiteness (`tf.debugging.check_numerics`), so they refuse the first three
malformed requests, and that an empty batch gives empty outputs. For exports made otherwise, a
NaN that stays in its own row is accepted as handled; one that changes other rows' outputs is
not.

Exit status: 0 when every request passes, 1 when any fails, 2 when the export cannot be loaded
or kdtfp was importable in the serving process.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading

VALID_ROWS = 7
LARGE_ROWS = 100_000
_MARK = "@@serve-check "

# In the serving process: hide kdtfp (and TFP: exports serve with TensorFlow alone), then run
# this file as a plain script.
_BOOT = """
import sys


class _HideKdtfp:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kdtfp", "tensorflow_probability"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by serve-check)")
        return None


sys.meta_path.insert(0, _HideKdtfp())
_file = sys.argv[1]
_scope = {"__name__": "__serve_check_child__", "__file__": _file}
exec(compile(open(_file).read(), _file, "exec"), _scope)
_scope["child_main"](sys.argv[2])
"""


# ------------------------------------------------------------------------ the request plan

CASE_LABELS = {
    "valid": "valid {shape} {dtype}",
    "wrong_dim": "wrong feature dimension {shape}",
    "wrong_dtype": "wrong dtype {dtype}",
    "nan": "NaN in row 0 of {shape}",
    "empty": "empty batch {shape}",
    "large": "{rows} rows",
    "zero": "{arg}=0",
    "negative": "{arg}=-1",
    "large_scalar": "{arg}={rows}",
}


def _kind(spec):
    """'batch' (leading dim None), 'scalar' (rank 0) or 'fixed' (fully known shape)."""
    shape = spec["shape"]
    if shape is None:
        return "unknown"
    if not shape:
        return "scalar"
    return "batch" if shape[0] is None else "fixed"


def plan(signatures):
    """The requests `(endpoint, arg, case)` for each signature, `arg` None for the valid call."""
    requests = []
    for endpoint, signature in signatures.items():
        requests.append((endpoint, None, "valid"))
        for arg, spec in signature["inputs"].items():
            kind = _kind(spec)
            floating = spec["dtype"].startswith(("float", "half", "bfloat"))
            if kind == "batch":
                cases = ["wrong_dim", "wrong_dtype"] + (["nan"] if floating else [])
                cases += ["empty", "large"]
            elif kind == "scalar":
                cases = ["wrong_dtype"]
                if spec["dtype"].startswith(("int", "uint")):
                    cases += ["zero", "negative", "large_scalar"]
            else:
                cases = ["wrong_dim", "wrong_dtype"]
            requests.extend((endpoint, arg, case) for case in cases)
    return requests


def spec_problems(signature):
    """Why a signature's inputs are not explicit serving specs (empty when they are)."""
    problems = []
    for arg, spec in signature["inputs"].items():
        shape = spec["shape"]
        if shape is None:
            problems.append(f"{arg}: unknown rank")
        elif shape and any(dim is None for dim in shape[1:]):
            problems.append(f"{arg}: shape {_shape_text(shape)} leaves a non-batch dimension open")
    return problems


def judge(case, reply, rows):
    """`(passed, outcome text)` for a child's reply to one request (policy in the docstring)."""
    if reply.get("status") == "raised":
        message = reply["message"] or ""
        outcome = f"refused: {reply['error']}: {message}" if message else "refused without message"
        passed = case != "valid" and bool(message)
        return passed, outcome
    shapes = ", ".join(
        f"{key} {_shape_text(out['shape'])} {out['dtype']}" for key, out in reply["outputs"].items()
    )
    if case == "valid":
        if reply["finite"]:
            return True, f"ok: {shapes}"
        return False, f"returned non-finite values: {shapes}"
    if case in ("wrong_dim", "wrong_dtype"):
        return False, f"accepted: {shapes}"
    if case == "nan":
        if reply.get("contained") is False:
            return False, "NaN leaked into other rows' outputs"
        where = "NaN in row 0 only" if reply.get("nan_row") else "row 0 finite, other rows same"
        if reply.get("contained") is None:
            where = f"returned {shapes} (no batch axis to compare)"
        return True, f"handled: {where}"
    if case == "large" and not reply.get("all_rows", True):
        return False, f"returned the wrong number of rows: {shapes}"
        return True, f"handled: {shapes}"
    return True, f"handled: {shapes}"


# --------------------------------------------------------------------------- the parent


def resolve_export(path):
    """The SavedModel folder of `path`: a version folder, or the highest version of a base."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"`PATH` {path!r} does not exist.")
    if not os.path.isdir(path):
        raise ValueError(f"`PATH` {path!r} is a file; give an export folder.")
    from kdtfp.export import export_versions  # the parent may import kdtfp; the child may not

    versions = export_versions(path)
    if versions:  # as TensorFlow Serving: the highest version, even beside an unversioned one
        return os.path.join(path, str(versions[-1]))
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    raise ValueError(
        f"`PATH` {path!r} holds no saved_model.pb and no numbered version folder (1/, 2/, ...)."
    )


class _Server:
    """The serving process: one JSON request per line in, one JSON reply per line out."""

    def __init__(self, path, timeout):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        self.timeout = timeout
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, os.path.abspath(__file__), path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith(_MARK):
                self.lines.put(json.loads(line[len(_MARK) :]))
        self.lines.put(None)

    def _drain(self):
        for line in self.process.stderr:
            self.stderr = (self.stderr + [line.rstrip()])[-20:]

    def receive(self):
        try:
            reply = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            return {"status": "died", "why": f"no reply within {self.timeout:g} s (killed)"}
        if reply is None:
            code = self.process.wait()
            last = next((line for line in reversed(self.stderr) if line.strip()), "")
            return {"status": "died", "why": f"serving process died (exit {code}) {last}".strip()}
        return reply

    def send(self, request):
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        return self.receive()

    def alive(self):
        return self.process.poll() is None

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def check(path, rows=LARGE_ROWS, timeout=600.0, out=None):
    """Runs every request against the export at `path`; prints the table to `out`.

    Args:
        path: a SavedModel folder, or an export base whose highest numbered version is checked.
        rows: rows of the large-batch request (>= 1).
        timeout: seconds one request (or loading) may take before it counts as a failure.
        out: a text stream (default `sys.stdout`).

    Returns:
        The exit status: 0 all passed, 1 some request failed, 2 not loadable / kdtfp visible.
    """
    out = out or sys.stdout
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"`rows` must be an int >= 1, got {rows!r}.")
    if not timeout > 0:
        raise ValueError(f"`timeout` must be > 0, got {timeout!r}.")
    export = resolve_export(path)
    server = _Server(export, timeout)
    hello = server.receive()
    if hello.get("status") != "loaded":
        server.close()
        why = hello.get("why") or f"{hello.get('error')}: {hello.get('message')}"
        print(f"serve-check: cannot load {export}: {why}", file=out)
        return 2
    if not hello["kdtfp_hidden"]:
        server.close()
        print(
            "serve-check: kdtfp was importable in the serving process; not a fair check.", file=out
        )
        return 2
    signatures = hello["signatures"]
    print(
        f"serve-check {export} (loaded with TensorFlow only; `import kdtfp` fails there)", file=out
    )
    failures = 0
    for name, signature in signatures.items():
        inputs = ", ".join(
            f"{arg} {_shape_text(spec['shape'])} {spec['dtype']}"
            for arg, spec in signature["inputs"].items()
        )
        outputs = ", ".join(
            f"{key} {_shape_text(spec['shape'])} {spec['dtype']}"
            for key, spec in signature["outputs"].items()
        )
        problems = spec_problems(signature)
        failures += bool(problems)
        note = f"  NOT EXPLICIT: {'; '.join(problems)}" if problems else ""
        print(f"  {name}({inputs}) -> {outputs}{note}", file=out)
    table = [("endpoint", "request", "check", "outcome")]
    for endpoint, arg, case in plan(signatures):
        request = {"endpoint": endpoint, "arg": arg, "case": case, "rows": rows}
        reply = server.send(request)
        label = _label(signatures[endpoint], arg, case, rows)
        if reply.get("status") == "died":
            passed, outcome = False, f"CRASHED: {reply['why']}"
            server.close()
            server = _Server(export, timeout)
            server.receive()
        else:
            passed, outcome = judge(case, reply, rows)
            if not server.alive():
                passed, outcome = False, f"{outcome}; then the serving process died"
        failures += not passed
        table.append((endpoint, label, "pass" if passed else "FAIL", outcome))
    alive = server.send({"ping": True}).get("status") == "pong"
    server.close()
    failures += not alive
    print(_format_table(table), file=out)
    print(
        f"serve-check: {len(table) - 1} requests, {failures} failed; serving process "
        f"{'alive at the end' if alive else 'NOT alive at the end'}.",
        file=out,
    )
    return 0 if failures == 0 else 1


def _label(signature, arg, case, rows):
    if arg is None:
        text = ", ".join(
            f"{a} {_shape_text(_concrete(spec['shape'], VALID_ROWS))} {spec['dtype']}"
            for a, spec in signature["inputs"].items()
        )
        return f"valid: {text}"
    spec = signature["inputs"][arg]
    if case == "wrong_dim":
        text = CASE_LABELS[case].format(shape=_shape_text(_wrong_shape(spec["shape"])))
    elif case == "wrong_dtype":
        text = CASE_LABELS[case].format(dtype=_other_dtype_name(spec["dtype"]))
    else:
        concrete = _concrete(spec["shape"], 0 if case == "empty" else VALID_ROWS)
        text = CASE_LABELS[case].format(shape=_shape_text(concrete), rows=rows, arg=arg)
    return f"{arg}: {text}"


def _wrong_shape(shape):
    """A valid shape with the last dimension one too long (rank-1 batch: a second axis)."""
    if len(shape) == 1 and shape[0] is None:
        return [VALID_ROWS, 2]
    concrete = _concrete(shape, VALID_ROWS)
    return concrete[:-1] + [concrete[-1] + 1]


def _concrete(shape, rows):
    return [rows if dim is None else dim for dim in (shape or [])]


def _shape_text(shape):
    if shape is None:
        return "[?]"
    return "[" + ", ".join("None" if dim is None else str(dim) for dim in shape) + "]"


def _other_dtype_name(dtype):
    if dtype == "float32":
        return "float64"
    if dtype.startswith(("float", "half", "bfloat")):
        return "float32"
    if dtype == "bool":
        return "int32"
    return "float32"


def _format_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 7)
    return "\n".join(lines)


# ------------------------------------------------------------------- the serving process
# Everything below runs in the child, where kdtfp is hidden: numpy and TensorFlow only.


def _first_line(error):
    """The first informative line of a TensorFlow error message."""
    text = getattr(error, "message", None) or str(error)
    skip = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
    for line in text.splitlines():
        line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line).strip()
        line = re.sub(r"\s*\[\[\{\{node [^]]*\]\]|\s*\[Op:[^]]*\]", "", line).strip()
        line = re.sub(r"^cannot compute \S+ as ", "", line)
        if line and not line.startswith(skip):
            return line[:160]
    return ""


def _send(message):
    sys.stdout.write(_MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def _describe(function):
    def spec_json(spec):
        shape = None if spec.shape.rank is None else list(spec.shape.as_list())
        return {"shape": shape, "dtype": spec.dtype.name}

    inputs = function.structured_input_signature[1]
    outputs = function.structured_outputs
    return {
        "inputs": {key: spec_json(spec) for key, spec in sorted(inputs.items())},
        "outputs": {key: spec_json(spec) for key, spec in sorted(outputs.items())},
    }


def _valid_value(np, spec, rows, rng):
    dtype = spec.dtype
    shape = [rows if dim is None else dim for dim in spec.shape.as_list()]
    if not shape and dtype.is_integer:
        return np.asarray(3, dtype.as_numpy_dtype)
    if dtype.is_bool:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype == "string":
        return np.full(shape, b"a", dtype=object)
    return rng.integers(0, 2, shape).astype(dtype.as_numpy_dtype)


def _malformed(np, tf, spec, case, valid, rows, rng):
    """The malformed value of one input for `case`; `valid` is that input's valid value."""
    dtype = spec.dtype
    if case == "wrong_dim":
        return rng.integers(0, 2, _wrong_shape(spec.shape.as_list())).astype(dtype.as_numpy_dtype)
    if case == "wrong_dtype":
        if dtype == "string":
            return tf.zeros(valid.shape, tf.float32)
        return tf.cast(tf.constant(valid.astype(float)), _other_dtype_name(dtype.name))
    if case == "nan":
        value = valid.copy()
        value.reshape(VALID_ROWS, -1)[0, 0] = np.nan
        return value
    if case == "empty":
        return _valid_value(np, spec, 0, rng)
    if case == "large":
        return _valid_value(np, spec, rows, rng)
    value = {"zero": 0, "negative": -1, "large_scalar": rows}[case]
    return np.asarray(value, dtype.as_numpy_dtype)


def _batch_axis(shape, rows):
    return next((axis for axis, length in enumerate(shape) if length == rows), None)


def _call(tf, function, inputs):
    outputs = function(**{key: tf.convert_to_tensor(value) for key, value in inputs.items()})
    return {key: value.numpy() for key, value in sorted(outputs.items())}


def _nan_contained(np, outputs, clean):
    """`(contained, nan_row)`: rows 1.. equal the clean call's; row 0 has a NaN somewhere.

    `contained` is None when no output has a batch axis to compare along.
    """
    contained, nan_row, compared = True, False, False
    for key, value in outputs.items():
        axis = _batch_axis(value.shape, VALID_ROWS)
        if axis is None or clean[key].shape != value.shape:
            continue
        compared = True
        value, reference = np.moveaxis(value, axis, 0), np.moveaxis(clean[key], axis, 0)
        if np.issubdtype(value.dtype, np.floating):
            contained &= bool(
                np.allclose(value[1:], reference[1:], rtol=1e-4, atol=1e-5, equal_nan=True)
            )
            nan_row |= bool(np.any(np.isnan(value[0])))
        else:
            contained &= bool(np.array_equal(value[1:], reference[1:]))
    return (contained if compared else None), nan_row


def _serve(np, tf, loaded, request):
    function = loaded.signatures[request["endpoint"]]
    specs = function.structured_input_signature[1]
    rng = np.random.default_rng(0)
    valid = {key: _valid_value(np, spec, VALID_ROWS, rng) for key, spec in sorted(specs.items())}
    arg, case, rows = request["arg"], request["case"], request["rows"]
    inputs = dict(valid)
    if arg is not None:
        inputs[arg] = _malformed(np, tf, specs[arg], case, valid[arg], rows, rng)
    try:
        outputs = _call(tf, function, inputs)
    except Exception as error:  # noqa: BLE001 - every refusal is reported, none is fatal
        return {"status": "raised", "error": type(error).__name__, "message": _first_line(error)}
    reply = {
        "status": "returned",
        "outputs": {
            key: {"shape": list(value.shape), "dtype": str(value.dtype)}
            for key, value in outputs.items()
        },
        "finite": all(
            bool(np.all(np.isfinite(value)))
            for value in outputs.values()
            if np.issubdtype(value.dtype, np.floating)
        ),
    }
    if case == "large":
        reply["all_rows"] = all(
            _batch_axis(value.shape, rows) is not None for value in outputs.values() if value.ndim
        )
    if case == "nan":
        reply["contained"], reply["nan_row"] = _nan_contained(
            np, outputs, _call(tf, function, valid)
        )
    return reply


def child_main(path):
    """The serving process: loads `path`, describes it, then answers requests from stdin."""
    try:
        import kdtfp  # noqa: F401

        hidden = False
    except ImportError:
        hidden = True
    import numpy as np
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
        signatures = {name: _describe(fn) for name, fn in sorted(loaded.signatures.items())}
    except Exception as error:  # noqa: BLE001 - reported to the parent
        _send({"status": "failed", "error": type(error).__name__, "message": _first_line(error)})
        return
    if not signatures:
        _send({"status": "failed", "error": "no signatures", "message": "nothing to serve"})
        return
    _send({"status": "loaded", "kdtfp_hidden": hidden, "signatures": signatures})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("ping"):
            _send({"status": "pong"})
            continue
        _send(_serve(np, tf, loaded, request))
