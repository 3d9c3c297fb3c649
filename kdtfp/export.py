"""Export a trained student alone as a SavedModel that serves with only TensorFlow installed.

Layout: recipes write each export to a numbered version folder, `saved_models/RECIPE/export/1/`,
`.../export/2/`, ... (`versioned_export_path`), the layout TensorFlow Serving's
`--model_base_path=saved_models/RECIPE/export` expects: it serves the highest version.

Signatures: every endpoint has an explicit `tf.TensorSpec` per input (batch dimension `None`,
every other dimension and the dtype fixed) and checks the shape of each request in the graph
(`tf.ensure_shape`), so a request with the wrong feature dimension is refused with
"Shape of tensor inputs [2,65] is not compatible with expected shape [?,64]" rather than failing
somewhere inside the model (or, worse, broadcasting). A float request with NaN or Inf is refused
("`inputs` has NaN or Inf values : Tensor had NaN values"), since a ReLU network would turn the NaN
into a confident prediction. A request of the wrong dtype is refused by the signature itself. An
empty batch gives empty outputs. `kdtfp serve-check PATH` verifies all of this on an export, in
a process where kdtfp cannot be imported.
"""

from __future__ import annotations

import os
import re

import keras
import tensorflow as tf

from kdtfp.distill.checks import single_symbolic_input


def _student_of(model_or_distiller):
    from kdtfp.distill.distiller import Distiller

    if isinstance(model_or_distiller, Distiller):
        return model_or_distiller.student
    if isinstance(model_or_distiller, keras.Model):
        return model_or_distiller
    raise ValueError(
        f"`model_or_distiller` must be a keras.Model or kdtfp.Distiller, got {type(model_or_distiller).__name__}."
    )


def versioned_export_path(base, version=None):
    """The folder for one version of an export under `base`: `base/<version>`.

    TensorFlow Serving (`--model_base_path=base`) serves the highest numbered sub-folder of
    `base` and ignores other names, so a new export never overwrites one being served.

    Args:
        base: the export's base folder, e.g. `saved_models/RECIPE/export` (need not exist; an
            existing file there is an error).
        version: an int >= 1, or None for the next free version (1 + the highest existing one;
            1 when `base` has none).

    Returns:
        `os.path.join(base, str(version))`; e.g. `saved_models/RECIPE/export/1` for a new base.
        The folder itself is not created (the exporters create it).

    Example:

    >>> export_student(distiller, versioned_export_path("saved_models/my-student/export"))
    'saved_models/my-student/export/1'
    """
    base = os.fspath(base)
    if os.path.isfile(base):
        raise ValueError(f"`base`={base!r} is a file; give the export's base folder.")
    if version is None:
        versions = export_versions(base)
        version = versions[-1] + 1 if versions else 1
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"`version` must be an int >= 1 or None, got {version!r}.")
    return os.path.join(base, str(version))


def export_versions(base):
    """The version numbers (sorted ints) of the numbered sub-folders of `base`; [] if none."""
    base = os.fspath(base)
    if not os.path.isdir(base):
        return []
    return sorted(
        int(name)
        for name in os.listdir(base)
        if re.fullmatch(r"[0-9]+", name) and os.path.isdir(os.path.join(base, name))
    )


def check_serving_spec(spec, argument="input_signature"):
    """Checks that `spec` is a serving `tf.TensorSpec`: batch dimension None, the rest fixed.

    Returns `spec`, named "inputs" when it had no name (the signature's input key).
    """
    if not isinstance(spec, tf.TensorSpec):
        raise ValueError(
            f"`{argument}` must be a tf.TensorSpec, e.g. tf.TensorSpec([None, 64], tf.float32), "
            f"got {type(spec).__name__}."
        )
    shape = spec.shape
    if shape.rank is None or shape.rank < 1 or shape[0] is not None:
        raise ValueError(
            f"`{argument}` must have batch dimension None and a known rank, got shape {shape}."
        )
    if any(dim is None for dim in shape[1:]):
        raise ValueError(
            f"`{argument}` must fix every dimension but the batch one, got shape {shape}; e.g. "
            "tf.TensorSpec([None, 64], tf.float32)."
        )
    if spec.name is None:
        spec = tf.TensorSpec(shape, spec.dtype, name="inputs")
    return spec


def checked(function, spec):
    """`function(inputs)` preceded by in-graph checks of the request against `spec`.

    The shape must match `spec` (`tf.ensure_shape`); float inputs must be finite
    (`tf.debugging.check_numerics`): a NaN would otherwise come out as a confident-looking
    prediction (a ReLU maps it to 0). Both are refused with an `InvalidArgumentError` that names
    the input.
    """
    name = spec.name or "inputs"

    def endpoint(inputs):
        inputs = tf.ensure_shape(inputs, spec.shape, name=f"check_{name}")
        if spec.dtype.is_floating:
            inputs = tf.debugging.check_numerics(inputs, f"`{name}` has NaN or Inf values")
        return function(inputs)

    return endpoint


def _input_spec(student, input_signature):
    if input_signature is not None:
        return check_serving_spec(input_signature)
    symbolic = single_symbolic_input(student)
    if symbolic is not None:
        if any(dim is None for dim in symbolic.shape[1:]):
            raise ValueError(
                f"`input_signature` is needed: the student's input shape {tuple(symbolic.shape)} "
                "leaves a dimension other than the batch one open, and a serving signature fixes "
                "them. Pass e.g. `input_signature=tf.TensorSpec([None, 48, 2], tf.float32)`."
            )
        return tf.TensorSpec(
            (None,) + tuple(symbolic.shape[1:]), symbolic.dtype or "float32", name="inputs"
        )
    raise ValueError(
        "`input_signature` is needed: the student has no symbolic input (subclassed model). Pass e.g. "
        "`input_signature=tf.TensorSpec([None, 64], tf.float32)`."
    )


def export_student(model_or_distiller, path, endpoints=None, input_signature=None):
    """Writes the student (alone, never the teacher) as a TensorFlow SavedModel at `path`.

    Endpoints, each taking a float batch `[None, *input_shape]`:

    * `serve`: class probabilities `softmax(logits)`, `[None, classes]`;
    * `logits`: the student's raw outputs;
    * whatever the student adds through a method `export_endpoints()` returning
      `{name: function(inputs) -> tensor}`, and the extra `endpoints` given here
      (`{name: function(student, inputs) -> tensor}`), e.g. intervals, log-probs or samples.

    The export is made with `keras.export.ExportArchive` (DESIGN.md rule 10) and loads with
    `tf.saved_model.load(path)` or `keras.layers.TFSMLayer(path, call_endpoint="serve")` in a
    process where kdtfp is not installed.

    Args:
        model_or_distiller: a trained `kdtfp.Distiller` or the student model itself.
        path: output directory (created; an existing file there is an error).
        endpoints: optional dict of extra endpoints.
        input_signature: a `tf.TensorSpec` when the student has no symbolic input.

    Returns:
        `path`.

    Example:

    >>> kdtfp.export.export_student(distiller, "saved_models/my-student")
    >>> served = tf.saved_model.load("saved_models/my-student")
    >>> served.serve(x)  # probabilities
    """
    student = _student_of(model_or_distiller)
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"`path`={path!r} is a file; give a directory for the SavedModel.")
    spec = _input_spec(student, input_signature)
    archive = keras.export.ExportArchive()
    archive.track(student)

    def logits(inputs):
        return tf.cast(student(inputs, training=False), tf.float32)

    archive.add_endpoint("logits", checked(logits, spec), input_signature=[spec])
    archive.add_endpoint(
        "serve",
        checked(lambda inputs: tf.nn.softmax(logits(inputs), axis=-1), spec),
        input_signature=[spec],
    )
    extra = dict(student.export_endpoints()) if hasattr(student, "export_endpoints") else {}
    for name, function in (endpoints or {}).items():
        extra[name] = _bound(student, function)
    for name, function in extra.items():
        if name in ("serve", "logits"):
            raise ValueError(f"Endpoint name {name!r} is reserved.")
        archive.add_endpoint(name, checked(function, spec), input_signature=[spec])
    archive.write_out(path, verbose=False)
    return path


def _bound(student, function):
    # A closure, not a default argument: tf.function would put the default into the signature.
    return lambda inputs: function(student, inputs)


POSTERIOR_ENDPOINTS = (
    "serve",
    "mean_probs",
    "intervals",
    "credible_set",
    "deviance",
    "sample_probs",
)


def export_posterior(ensemble, path, input_signature=None):
    """Writes a `kdtfp.models.PosteriorEnsemble` (student + posterior samples) as a SavedModel.

    The posterior samples are the ensemble's (non-trainable) weights, so they travel inside the
    SavedModel; the summaries are the ensemble's, computed by TensorFlow ops only (no kdtfp, no
    TFP needed to serve). Endpoints, each taking a float batch `[None, *input_shape]`:

    * `serve` and `mean_probs`: posterior-mean class probabilities, float32 `[None, K]`;
    * `intervals`: a dict `{"lower": [None, K], "upper": [None, K]}` (float32) of the per-class
      equal-tailed `level` intervals;
    * `credible_set`: bool `[None, K]`, the smallest set of classes with mean mass >= `level`;
    * `deviance`: float32 `[None]`, the mean deviance (twice the mean entropy, nats);
    * `sample_probs`: float32 `[r, None, K]`, the class probabilities under every sample.

    Semantics as `PosteriorEnsemble.call` (METHODS.md 4.5). Each endpoint computes only what it
    returns (TensorFlow prunes the unused summaries from its graph).

    Args:
        ensemble: a `kdtfp.models.PosteriorEnsemble`.
        path: output directory (created; an existing file there is an error).
        input_signature: a `tf.TensorSpec` when the student has no symbolic input.

    Returns:
        `path`.

    Example:

    >>> ensemble = kdtfp.models.PosteriorEnsemble.from_sampler(student, sampler)
    >>> kdtfp.export.export_posterior(ensemble, "saved_models/bkd-posterior")
    >>> served = tf.saved_model.load("saved_models/bkd-posterior")
    >>> served.intervals(x)["upper"], served.credible_set(x)
    """
    from kdtfp.models.posterior_ensemble import PosteriorEnsemble

    if not isinstance(ensemble, PosteriorEnsemble):
        raise ValueError(
            f"`ensemble` must be a kdtfp.models.PosteriorEnsemble, got {type(ensemble).__name__}."
        )
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"`path`={path!r} is a file; give a directory for the SavedModel.")
    spec = _input_spec(ensemble.student, input_signature)
    archive = keras.export.ExportArchive()
    archive.track(ensemble)

    def summaries(inputs):
        return ensemble(inputs, training=False)

    def mean_probs(inputs):
        return summaries(inputs)["mean_probs"]

    def intervals(inputs):
        out = summaries(inputs)
        return {"lower": out["lower"], "upper": out["upper"]}

    def sample_probs(inputs):
        return tf.cast(ensemble.sample_probs(inputs), tf.float32)

    functions = {
        "serve": mean_probs,
        "mean_probs": mean_probs,
        "intervals": intervals,
        "credible_set": lambda inputs: summaries(inputs)["credible_set"],
        "deviance": lambda inputs: summaries(inputs)["deviance"],
        "sample_probs": sample_probs,
    }
    for name in POSTERIOR_ENDPOINTS:
        archive.add_endpoint(name, checked(functions[name], spec), input_signature=[spec])
    archive.write_out(path, verbose=False)
    return path
