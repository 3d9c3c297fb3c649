"""Similarity-preserving distillation loss (Tung & Mori, ICCV 2019; Saeedi et al., AAAI 2022)."""

from __future__ import annotations

import math

import keras
from keras import ops

KERNELS = ("dot", "cosine", "rbf")

#: Rows of the similarity matrix (or feature rows) shorter than this are treated as zero rows.
_NORM_FLOOR = 1e-12


def _gram(features, kernel, bandwidth):
    """The `[b, b]` similarity matrix of `features` `[b, d]` (float32) under `kernel`."""
    if kernel == "dot":
        gram = ops.matmul(features, ops.transpose(features))
        norms = ops.sqrt(ops.sum(ops.square(gram), axis=-1, keepdims=True))
        return gram / ops.maximum(norms, _NORM_FLOOR)
    if kernel == "cosine":
        norms = ops.sqrt(ops.sum(ops.square(features), axis=-1, keepdims=True))
        unit = features / ops.maximum(norms, _NORM_FLOOR)
        return ops.matmul(unit, ops.transpose(unit))
    # rbf: squared distances from the Gram matrix, clipped at 0 against round-off.
    squares = ops.sum(ops.square(features), axis=-1)
    gram = ops.matmul(features, ops.transpose(features))
    distances = ops.maximum(squares[:, None] + squares[None, :] - 2.0 * gram, 0.0)
    if bandwidth is None:
        variance = ops.stop_gradient(_median_off_diagonal(distances))
    else:
        variance = ops.cast(bandwidth, "float32") ** 2
    return ops.exp(-distances / (2.0 * ops.maximum(variance, _NORM_FLOOR)))


def _median_off_diagonal(distances):
    """Median of the off-diagonal entries of a `[b, b]` matrix (lower median; XLA-friendly).

    The diagonal is set to +inf and the `b * b` values sorted, so the `b (b - 1)` off-diagonal
    values come first (each pair twice, which leaves the median unchanged).
    """
    size = ops.shape(distances)[0]
    masked = ops.where(ops.eye(size, dtype="bool"), float("inf"), distances)
    ordered = ops.sort(ops.reshape(masked, (-1,)))
    index = ops.maximum((size * (size - 1) - 1) // 2, 0)
    median = ops.take(ordered, index)
    return ops.where(ops.isfinite(median), median, 1.0)  # b = 1: no pairs


@keras.saving.register_keras_serializable(package="kdtfp")
class SimilarityPreserving(keras.losses.Loss):
    """Squared Frobenius distance between the batch similarity matrices of teacher and student.

    For teacher features `A_T` `[b, d_T]` (`y_true`) and student features `A_S` `[b, d_S]`
    (`y_pred`) of the same `b` examples, with `d_T` and `d_S` free to differ:

    ```
    G_T = k(A_T), G_S = k(A_S)                       # [b, b] each
    loss = sum_ij (G_T[i, j] - G_S[i, j])**2 / b**2  # ONE scalar per batch
    ```

    with the kernel `k`:

    * `"dot"` (default, Tung & Mori's SP-KD): `G = A A^T`, then each ROW of `G` divided by its
      L2 norm (`G[i, :] / ||G[i, :]||`). Rows have unit norm, so `0 <= loss <= 4 / b`.
    * `"cosine"`: `G[i, j] = <a_i, a_j> / (||a_i|| ||a_j||)` (rows of `A` normalised first).
    * `"rbf"`: `G[i, j] = exp(-||a_i - a_j||**2 / (2 h**2))`. With `bandwidth=None`, `h**2` is
      the median of the off-diagonal squared distances of that side's batch (the median
      heuristic, computed per batch and per side, with no gradient through it); a number fixes
      `h` for both sides.

    `"dot"`, `"cosine"` and `"rbf"` with the median heuristic are invariant to rescaling either
    side's features (`A -> c A`, `c > 0`); `"rbf"` with a fixed bandwidth is not. Every kernel is
    invariant to permuting feature columns (topics, states), since only `b x b` matrices are
    compared. A zero feature row (or zero row of `G`) is left as zeros, not NaN.

    The loss couples the examples of a batch, so it is one value per batch, not a mean of
    per-example values: `sample_weight` is not supported (a `ValueError` says so).

    **Under `tf.distribute`.** Each replica sees its own sub-batch, so it builds the
    similarity matrices of that sub-batch only (pairs across replicas are not compared). Keras
    divides each replica's value by the replica count and sums the gradients, so with `R`
    replicas the loss minimised is the MEAN of the `R` sub-batch losses (each `/ (b/R)**2`),
    which is also what the metric `unscale(value)` averaged over replicas reports. It equals
    the single-device loss of the global batch only for `R = 1`: on one device, the equivalent
    objective is the mean of this loss over the `R` consecutive blocks of the global batch. Keep
    per-replica batches large (>= 64, class-stratified) for the constraint to bind.

    Implementation note: Keras's `Loss.__call__` skips the per-replica division for a scalar
    returned by `call`, so `call` returns the value with shape `[1]` and the reduction (sum
    over one element) applies the division. Computed in float32, also under mixed precision.

    Args:
        kernel: `"dot"`, `"cosine"` or `"rbf"`.
        bandwidth: RBF bandwidth `h > 0`, or None for the median heuristic. Only for `"rbf"`.
        reduction: keep the default (`"sum_over_batch_size"` over the single value).
        name, dtype: as for every `keras.losses.Loss`.

    Example:

    >>> loss = kdtfp.losses.SimilarityPreserving()
    >>> loss(teacher_features, student_features)  # [b, 64] vs [b, 12] -> scalar
    """

    def __init__(
        self,
        kernel="dot",
        bandwidth=None,
        reduction="sum_over_batch_size",
        name="similarity_preserving",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if kernel not in KERNELS:
            raise ValueError(
                f"SimilarityPreserving: `kernel` must be one of {KERNELS}, got {kernel!r}."
            )
        if bandwidth is not None:
            if kernel != "rbf":
                raise ValueError(
                    f"SimilarityPreserving: `bandwidth` is for kernel='rbf' only, got "
                    f"bandwidth={bandwidth!r} with kernel={kernel!r}."
                )
            try:
                bandwidth = float(bandwidth)
            except (TypeError, ValueError):
                raise ValueError(
                    f"SimilarityPreserving: `bandwidth` must be a number > 0 or None, got {bandwidth!r}."
                ) from None
            if not (bandwidth > 0.0 and math.isfinite(bandwidth)):
                raise ValueError(
                    f"SimilarityPreserving: `bandwidth` must be a finite number > 0, got {bandwidth}."
                )
        self.kernel = kernel
        self.bandwidth = bandwidth

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                "SimilarityPreserving is one value per batch (it compares pairs of examples): "
                "`sample_weight` is not supported."
            )
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        if len(y_true.shape) != 2 or len(y_pred.shape) != 2:
            raise ValueError(
                "SimilarityPreserving: teacher features (`y_true`) and student features "
                f"(`y_pred`) must be [batch, features] matrices, got shapes {tuple(y_true.shape)} "
                f"and {tuple(y_pred.shape)}."
            )
        if (
            y_true.shape[0] is not None
            and y_pred.shape[0] is not None
            and y_true.shape[0] != y_pred.shape[0]
        ):
            raise ValueError(
                f"SimilarityPreserving: `y_true` (teacher features) has {y_true.shape[0]} rows but "
                f"`y_pred` (student features) has {y_pred.shape[0]}: they must be the same examples."
            )
        teacher = _gram(ops.cast(y_true, "float32"), self.kernel, self.bandwidth)
        student = _gram(ops.cast(y_pred, "float32"), self.kernel, self.bandwidth)
        batch = ops.cast(ops.shape(y_pred)[0], "float32")
        value = ops.sum(ops.square(teacher - student)) / ops.maximum(batch, 1.0) ** 2
        return ops.reshape(value, (1,))

    def get_config(self):
        config = super().get_config()
        config.update({"kernel": self.kernel, "bandwidth": self.bandwidth})
        return config
