"""Offline data (sklearn's bundled sets, Old Faithful) and transfer-set samplers."""

from kdtfp.datasets.offline import Split, load_digits_split, load_faithful
from kdtfp.datasets.transfer import gaussian_inputs, gaussian_noise, pixel_kde, subset

__all__ = [
    "Split",
    "gaussian_inputs",
    "gaussian_noise",
    "load_digits_split",
    "load_faithful",
    "pixel_kde",
    "subset",
]
