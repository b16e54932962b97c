"""The one conversion every figure function needs."""

from __future__ import annotations

import numpy as np


def float_array(x) -> np.ndarray:
    """A Tensor (any device or dtype), array or nested list as a float64 NumPy array; None
    entries (how the JSON writes NaN) become NaN."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
