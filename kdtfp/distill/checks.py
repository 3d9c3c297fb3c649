"""Checks a `Distiller` runs before any training step, and the model introspection they need."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def has_symbolic_output(model):
    try:
        return model.output is not None
    except (AttributeError, ValueError):
        return False


def static_output_shape(model):
    if has_symbolic_output(model):
        output = model.output
        return tuple(output.shape) if not isinstance(output, (list, tuple, dict)) else None
    return None


def single_symbolic_input(model):
    """The model's one symbolic input (a KerasTensor), or None (subclassed or several inputs)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return inputs[0] if inputs and len(inputs) == 1 else None


def static_input_shape(model):
    symbolic = single_symbolic_input(model)
    return None if symbolic is None else tuple(symbolic.shape)


def check_same_shape(teacher_shape, student_shape):
    if tuple(teacher_shape)[1:] != tuple(student_shape)[1:]:
        raise ValueError(
            f"`teacher` and `student` outputs differ in shape: teacher {tuple(teacher_shape)}, "
            f"student {tuple(student_shape)}. Output objectives compare them element by element."
        )


def feature_extractor(model, layer_names, role):
    if not has_symbolic_output(model):
        raise ValueError(
            f"Feature distillation needs a functional or sequential `{role}` (its layers' symbolic outputs); "
            f"{model.name!r} is subclassed. Use output objectives, or build the {role} functionally."
        )
    outputs = [model.output]
    for layer_name in layer_names:
        try:
            outputs.append(model.get_layer(layer_name).output)
        except ValueError:
            names = [layer.name for layer in model.layers]
            raise ValueError(
                f"`{role}_layer`={layer_name!r} is not a layer of the {role}; its layers: {names}."
            ) from None
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")


def check_arrays(data, argument):
    """Rejects empty or non-finite NumPy/tensor data before any step runs."""
    if isinstance(data, tf.data.Dataset):
        if int(data.cardinality()) == 0:
            raise ValueError(
                f"`{argument}` is an empty dataset: the transfer set needs at least one batch."
            )
        return
    if data is None or isinstance(data, keras.utils.PyDataset):
        return
    if isinstance(data, dict):
        for key, value in data.items():
            check_arrays(value, f"{argument}[{key!r}]")
        return
    if isinstance(data, (list, tuple)):
        for position, value in enumerate(data):
            check_arrays(value, f"{argument}[{position}]")
        return
    if hasattr(data, "__array__") or isinstance(data, (np.ndarray, tf.Tensor)):
        array = np.asarray(data)
        if array.shape[:1] == (0,) or array.size == 0:
            raise ValueError(f"`{argument}` is empty: the transfer set needs at least one example.")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ValueError(
                f"`{argument}` contains {bad} NaN/Inf values; clean the data before distilling."
            )
