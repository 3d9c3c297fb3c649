"""Export a trained student alone as a SavedModel that serves with only TensorFlow installed."""

from __future__ import annotations

import os

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


def _input_spec(student, input_signature):
    if input_signature is not None:
        return input_signature
    symbolic = single_symbolic_input(student)
    if symbolic is not None:
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

    archive.add_endpoint("logits", logits, input_signature=[spec])
    archive.add_endpoint(
        "serve", lambda inputs: tf.nn.softmax(logits(inputs), axis=-1), input_signature=[spec]
    )
    extra = dict(student.export_endpoints()) if hasattr(student, "export_endpoints") else {}
    for name, function in (endpoints or {}).items():
        extra[name] = _bound(student, function)
    for name, function in extra.items():
        if name in ("serve", "logits"):
            raise ValueError(f"Endpoint name {name!r} is reserved.")
        archive.add_endpoint(name, function, input_signature=[spec])
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
        archive.add_endpoint(name, functions[name], input_signature=[spec])
    archive.write_out(path, verbose=False)
    return path
