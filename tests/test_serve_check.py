"""`kdtfp serve-check`: two kinds of kdtfp export pass, a broken export fails.

The exports are built here, small (the recipes' exports come from the same `export_student` and
`export_posterior`), so the test costs three serving processes, not three recipe runs.
"""

from __future__ import annotations

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtfp import cli, serve_check
from kdtfp.export import export_posterior, export_student, export_versions, versioned_export_path
from kdtfp.models import PosteriorEnsemble
from kdtfp.teachers import mlp

ROWS = 100_000  # the large batch; tiny models keep it cheap


def _check(path, **kwargs):
    out = io.StringIO()
    status = serve_check.check(path, out=out, **kwargs)
    return status, out.getvalue()


def test_versioned_export_path_counts_up_from_one(tmp_path):
    base = tmp_path / "export"
    assert versioned_export_path(base) == os.path.join(str(base), "1")
    os.makedirs(base / "1")
    os.makedirs(base / "3")
    os.makedirs(base / "assets")  # not a version: TensorFlow Serving ignores it too
    assert export_versions(base) == [1, 3]
    assert versioned_export_path(base) == os.path.join(str(base), "4")
    assert versioned_export_path(base, 2) == os.path.join(str(base), "2")
    for bad in (0, -1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="`version`"):
            versioned_export_path(base, bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="`base`"):
        versioned_export_path(tmp_path / "file")


def test_student_export_passes_and_base_folder_resolves_to_highest_version(tmp_path):
    keras.utils.set_random_seed(0)
    student = mlp(64, (16,), 10, name="student", seed=0)
    base = tmp_path / "export"
    export_student(student, versioned_export_path(base))
    newest = export_student(student, versioned_export_path(base))
    assert newest.endswith(os.path.join("export", "2"))
    assert serve_check.resolve_export(base) == newest

    status, table = _check(base, rows=ROWS)
    assert status == 0, table
    assert f"serve-check {newest}" in table
    assert "`import kdtfp` fails there" in table
    for endpoint in ("serve", "logits", "serving_default"):
        assert f"{endpoint}(inputs [None, 64] float32)" in table
    assert "Shape of tensor inputs [7,65] is not compatible with expected shape [?,64]" in table
    assert "was expected to be a float tensor but is a double tensor" in table
    assert "refused: InvalidArgumentError: `inputs` has NaN or Inf values" in table
    assert "handled: output_0 [0, 10] float32" in table  # empty batch -> empty output
    assert f"handled: output_0 [{ROWS}, 10] float32" in table
    assert "FAIL" not in table and "alive at the end" in table


def test_posterior_export_passes_with_dict_and_sample_axis_outputs(tmp_path):
    keras.utils.set_random_seed(0)
    student = mlp(8, (4,), 3, name="student", seed=0)
    rng = np.random.default_rng(1)
    samples = [
        [
            (w.numpy() + rng.standard_normal(w.shape)).astype("float32")
            for w in student.trainable_weights
        ]
        for _ in range(3)
    ]
    path = export_posterior(
        PosteriorEnsemble(student, samples, name="posterior"), versioned_export_path(tmp_path, 1)
    )
    status, table = _check(path, rows=ROWS)
    assert status == 0, table
    for endpoint in ("mean_probs", "intervals", "credible_set", "deviance", "sample_probs"):
        assert f"{endpoint}(inputs [None, 8] float32)" in table
    assert f"output_0 [3, {ROWS}, 3] float32" in table  # sample_probs: batch on axis 1
    assert "lower [7, 3] float32, upper [7, 3] float32" in table
    assert "`inputs` has NaN or Inf values" in table
    assert "FAIL" not in table


class _Broken(tf.Module):
    """`serve` leaves the feature dimension open, mixes rows, and exits on an empty batch."""

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="inputs")])
    def serve(self, inputs):
        empty = tf.equal(tf.shape(inputs)[0], 0)

        def die():
            with tf.control_dependencies([tf.raw_ops.Abort(exit_without_error=True)]):
                return tf.zeros([0], tf.float32)

        centred = inputs - tf.reduce_mean(inputs, axis=0)
        return tf.cond(empty, die, lambda: tf.reduce_sum(centred, axis=-1))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="inputs")])
    def rowwise(self, inputs):  # a correct endpoint that lets NaN through, row by row
        return tf.reduce_sum(tf.ensure_shape(inputs, [None, 3]), axis=-1)


def test_broken_export_makes_the_cli_exit_non_zero(tmp_path, capsys):
    module = _Broken()
    signatures = {"serve": module.serve, "rowwise": module.rowwise}
    tf.saved_model.save(module, str(tmp_path / "1"), signatures=signatures)

    status = cli.main(["serve-check", str(tmp_path), "--rows", "1000"])
    table = capsys.readouterr().out
    assert status == 1, table
    assert "NOT EXPLICIT: inputs: shape [None, None] leaves a non-batch dimension open" in table
    assert "accepted: output_0 [7] float32" in table  # wrong feature dimension not refused
    assert "NaN leaked into other rows' outputs" in table
    assert "CRASHED: serving process died" in table  # the empty batch
    assert "handled: output_0 [1000] float32" in table  # the next request went to a new process
    assert "alive at the end" in table
    rowwise = [line for line in table.splitlines() if line.startswith("rowwise ")]
    assert len(rowwise) == 6 and all(" pass " in line for line in rowwise), table
    assert "handled: NaN in row 0 only" in table


def test_a_folder_without_an_export_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="holds no saved_model.pb"):
        cli.main(["serve-check", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["serve-check", str(tmp_path / "missing")])
