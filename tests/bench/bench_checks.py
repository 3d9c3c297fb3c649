"""Checks shared by the benchmark tests."""

import math


def finite_positive(value):
    """True for a finite number > 0 (not a bool): what every timing or ratio field must be."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
