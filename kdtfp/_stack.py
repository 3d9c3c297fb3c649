"""Checks that the TensorFlow / Keras / TFP stack kdtfp runs on is consistent.

Run once at `import kdtfp`, before TensorFlow Probability is imported, so that a broken
environment fails with one clear message naming the fix instead of a deep traceback.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os

_FIX = 'pip install "tensorflow>=2.18,<2.22" "tensorflow-probability[tf]>=0.25,<0.26" "keras>=3.12" "numpy<2.4"'


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def stack_problems() -> list[str]:
    """Returns a list of human-readable problems with the installed stack (empty if fine)."""
    problems = []
    tf_version = _version("tensorflow") or _version("tensorflow-cpu")
    if tf_version is None:
        return [f"TensorFlow is not installed. Install the stack with: {_FIX}"]
    if not (2, 18) <= _minor(tf_version) < (2, 22):
        problems.append(f"tensorflow {tf_version} is outside the supported range >=2.18,<2.22.")

    keras_version = _version("keras")
    if keras_version is None or _minor(keras_version) < (3, 12):
        problems.append(f"keras {keras_version} is installed; kdtfp needs Keras 3 (>=3.12).")

    tf_keras_version = _version("tf-keras") or _version("tf_keras")
    if tf_keras_version is None:
        problems.append(
            "tf-keras is missing: TensorFlow Probability 0.25 cannot import without it "
            f'(install "tensorflow-probability[tf]" or tf-keras=={_minor(tf_version)[0]}.{_minor(tf_version)[1]}.*).'
        )
    elif _minor(tf_keras_version) != _minor(tf_version):
        problems.append(
            f"tf-keras {tf_keras_version} does not match tensorflow {tf_version}: "
            f"install tf-keras=={_minor(tf_version)[0]}.{_minor(tf_version)[1]}.*"
        )

    tfp_version = _version("tensorflow-probability")
    if tfp_version is None or _minor(tfp_version) != (0, 25):
        problems.append(f"tensorflow-probability {tfp_version} is installed; kdtfp needs 0.25.")

    numpy_version = _version("numpy")
    if numpy_version is not None and _minor(numpy_version) >= (2, 4):
        problems.append(
            f"numpy {numpy_version} breaks TFP 0.25's tfb.SoftmaxCentered (np.reshape(newshape=...)): "
            'install "numpy<2.4".'
        )

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        problems.append(
            f"KERAS_BACKEND={backend!r}; kdtfp runs on the TensorFlow backend: unset it."
        )
    if "TF_USE_LEGACY_KERAS" in os.environ and os.environ["TF_USE_LEGACY_KERAS"] not in ("", "0"):
        problems.append("TF_USE_LEGACY_KERAS is set; kdtfp needs Keras 3: unset it.")
    return problems


def check_stack() -> None:
    """Raises ImportError with every problem found and the command that fixes them."""
    problems = stack_problems()
    if problems:
        lines = "\n  - ".join(problems)
        raise ImportError(
            f"kdtfp cannot run on this environment:\n  - {lines}\nKnown-good fix: {_FIX}"
        )
