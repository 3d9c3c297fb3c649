"""Offline data (sklearn's bundled sets, Old Faithful), synthetic data with known truth, and
transfer-set samplers."""

from kdtfp.datasets.offline import Split, load_digits_split, load_faithful
from kdtfp.datasets.sequences import SwitchingARData, switching_ar
from kdtfp.datasets.strokes import StrokeData, pen_strokes, stroke_points
from kdtfp.datasets.synthetic import KnownProbabilities, softmax_truth
from kdtfp.datasets.transfer import gaussian_inputs, gaussian_noise, pixel_kde, subset

__all__ = [
    "KnownProbabilities",
    "Split",
    "StrokeData",
    "SwitchingARData",
    "gaussian_inputs",
    "gaussian_noise",
    "load_digits_split",
    "load_faithful",
    "pen_strokes",
    "pixel_kde",
    "softmax_truth",
    "stroke_points",
    "switching_ar",
    "subset",
]
