"""`kdtfp._stack`: the import-time check of the TensorFlow / Keras / TFP / numpy stack."""

from __future__ import annotations

import importlib.metadata

import pytest

from kdtfp import _stack

GOOD = {
    "tensorflow": "2.21.0",
    "keras": "3.15.1",
    "tf-keras": "2.21.0",
    "tensorflow-probability": "0.25.0",
    "numpy": "2.3.5",
}


def fake_versions(monkeypatch, **changes):
    """Makes `importlib.metadata.version` (as `kdtfp._stack._version` calls it) report `changes`.

    Keys use `_` for `-`; a value of None means "not installed".
    """
    versions = dict(GOOD)
    versions.update({name.replace("_", "-"): value for name, value in changes.items()})

    def version(dist):
        value = versions.get(dist.replace("_", "-"))
        if value is None:
            raise importlib.metadata.PackageNotFoundError(dist)
        return value

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert _stack.metadata.version is version  # the module kdtfp._stack reads from


@pytest.fixture(autouse=True)
def tensorflow_backend(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)


def test_installed_stack_has_no_problems():
    assert _stack.stack_problems() == []
    _stack.check_stack()


def test_known_good_versions_have_no_problems(monkeypatch):
    fake_versions(monkeypatch)
    assert _stack.stack_problems() == []


def check_stack_message():
    with pytest.raises(ImportError) as error:
        _stack.check_stack()
    message = str(error.value)
    assert "kdtfp cannot run on this environment" in message
    assert _stack._FIX in message
    return message


def test_missing_tf_keras_raises_import_error_naming_the_fix(monkeypatch):
    fake_versions(monkeypatch, tf_keras=None)
    message = check_stack_message()
    assert "tf-keras is missing" in message
    assert 'install "tensorflow-probability[tf]" or tf-keras==2.21.*' in message


def test_tf_keras_of_another_minor_raises_import_error_naming_the_fix(monkeypatch):
    fake_versions(monkeypatch, tf_keras="2.20.1")
    message = check_stack_message()
    assert "tf-keras 2.20.1 does not match tensorflow 2.21.0" in message
    assert "install tf-keras==2.21.*" in message


def test_numpy_2_4_raises_import_error_naming_the_fix(monkeypatch):
    fake_versions(monkeypatch, numpy="2.4.0")
    problems = _stack.stack_problems()
    assert len(problems) == 1
    assert "numpy 2.4.0 breaks TFP 0.25" in problems[0]
    assert 'install "numpy<2.4"' in problems[0]
    check_stack_message()


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"tensorflow": None}, "TensorFlow is not installed"),
        ({"tensorflow": "2.17.1"}, "tensorflow 2.17.1 is outside the supported range"),
        ({"tensorflow": "2.22.0"}, "tensorflow 2.22.0 is outside the supported range"),
        ({"keras": "2.15.0"}, "kdtfp needs Keras 3"),
        ({"keras": None}, "kdtfp needs Keras 3"),
        ({"tensorflow_probability": "0.24.0"}, "kdtfp needs 0.25"),
        ({"tensorflow_probability": None}, "kdtfp needs 0.25"),
    ],
    ids=["no_tf", "old_tf", "new_tf", "keras_2", "no_keras", "old_tfp", "no_tfp"],
)
def test_other_inconsistent_stacks_raise_import_error(monkeypatch, changes, expected):
    fake_versions(monkeypatch, **changes)
    assert expected in check_stack_message()


def test_tensorflow_cpu_distribution_is_accepted(monkeypatch):
    fake_versions(monkeypatch, tensorflow=None, tensorflow_cpu="2.21.0")
    assert _stack.stack_problems() == []


def test_release_candidate_versions_are_parsed(monkeypatch):
    fake_versions(monkeypatch, tensorflow="2.21.0rc1", tf_keras="2.21.0rc0")
    assert _stack.stack_problems() == []


def test_non_tensorflow_backend_or_legacy_keras_raises(monkeypatch):
    fake_versions(monkeypatch)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    message = check_stack_message()
    assert "KERAS_BACKEND='jax'" in message
    assert "TF_USE_LEGACY_KERAS is set" in message


def test_several_problems_are_reported_together(monkeypatch):
    fake_versions(monkeypatch, tf_keras=None, numpy="2.4.1")
    message = check_stack_message()
    assert "tf-keras is missing" in message and "numpy 2.4.1" in message
