"""What every figure function needs: arrays from tensors or JSON lists, and shared colour limits."""

from __future__ import annotations

import numpy as np


def float_array(x) -> np.ndarray:
    """A Tensor (any device or dtype), array or nested list as a float64 NumPy array; None
    entries (how the JSON writes NaN) become NaN."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def colour_limit(*matrices, absolute: bool = False) -> float:
    """The end of one colour scale shared by several matrices (measured beside control, frames of
    one animation): the largest finite value, or the largest finite |value| with ``absolute=True``
    (a diverging map spans −limit..limit). None entries are skipped. Returns 1.0 when no value is
    finite or the largest is not positive: a limit of 0 gives vmin = vmax, where matplotlib draws
    every value at the map's bottom (zeros of a diverging map read as strongly negative)."""
    arrays = [float_array(m).reshape(-1) for m in matrices if m is not None]
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    values = values[np.isfinite(values)]
    if absolute:
        values = np.abs(values)
    top = float(values.max()) if values.size else 0.0
    return top if top > 0 else 1.0


NO_VALUE_COLOUR = "0.45"  # mid grey: on no diverging or sequential map drawn here, and far from a map's white or pale zero


def heat_colormap(name: str):
    """Matplotlib's colour map ``name`` with a missing (NaN) entry drawn in :data:`NO_VALUE_COLOUR`.

    By default a NaN cell is left transparent, i.e. drawn in the axes' white: on a diverging map
    (RdBu_r, coolwarm) that is the colour of 0, so a probe level or group without a value read as
    "no share"; on magma, as nearly its top. Grey is none of the maps' colours."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=NO_VALUE_COLOUR)
