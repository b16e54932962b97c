"""What every figure function needs: arrays from tensors or JSON lists, shared colour limits and ranges, the heat
maps' colour map with its grey for a missing number (and the colour bar's note of it), and the ends of the claims'
intervals to draw (none for a refused one)."""

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
NO_VALUE_LABEL = "grey: no value"  # what a heat map's colour bar says where some cell is NaN


def heat_colormap(cmap):
    """Matplotlib's colour map ``cmap`` (a name, or a :class:`~matplotlib.colors.Colormap`) with a missing (NaN)
    entry drawn in :data:`NO_VALUE_COLOUR`; returns a new Colormap (the registered one is left as it is).

    By default a NaN cell is left transparent, i.e. drawn in the axes' white: on a diverging map
    (RdBu_r, coolwarm) that is the colour of 0, so a probe level or group without a value read as
    "no share"; on magma, as nearly its top; on viridis, as a cell beside the map. Grey is none of the
    maps' colours. Every heat map of the package takes its map from here, sequential or diverging."""
    import matplotlib

    base = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    return base.with_extremes(bad=NO_VALUE_COLOUR)


def drawn_interval(results) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the ends of the intervals of ``results`` (claim dicts with ``"interval"``: ``[low, high]``,
    ends or the whole None where there is none) to draw, two float arrays, NaN (nothing drawn) where a result has no
    interval or carries a ``why``: a refused interval (too few units, a covering band, where it can be finite and
    of rounding width) drawn as a bar or a band read as evidence. Every figure that draws a claim's interval, the
    report's and the plotting module's, reads its ends here."""
    ends = [(None, None) if r.get("why") else (r.get("interval") or (None, None)) for r in results]
    low = float_array([e[0] for e in ends]).reshape(-1)
    high = float_array([e[1] for e in ends]).reshape(-1)
    return low, high


def no_value_note(*matrices) -> str:
    """:data:`NO_VALUE_LABEL` when some entry of ``matrices`` (None entries skipped as matrices; None inside a
    matrix read as NaN) is NaN, else "": the text a heat map's colour bar carries so that its grey cells are read
    as missing numbers, not as a colour of the scale."""
    return NO_VALUE_LABEL if any(np.isnan(float_array(m)).any() for m in matrices if m is not None) else ""


def colour_range(vmin: float, vmax: float) -> tuple[float, float]:
    """``(vmin, vmax)`` as a colour scale can draw it: unchanged where ``vmin < vmax``; where the two are equal
    (a constant matrix, e.g. an all-ones normalized kernel), widened symmetrically about the value as matplotlib
    widens a single-valued colour bar's scale (by 10 % of |value|, ±0.1 about 0), so the value is drawn at the
    map's middle and reads as itself on the bar. Left equal, matplotlib's ``Normalize`` drew every cell at the
    map's bottom (as the scale's minimum) while a colour bar of the same image moved its own scale to the widened
    one, so two panels of one value showed two colours.

    Raises ValueError for ``vmin > vmax`` or a non-finite end (an inverted or undefined scale draws no value
    honestly)."""
    vmin, vmax = float(vmin), float(vmax)
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise ValueError(f"colour range [{vmin}, {vmax}] has a non-finite end: pass the finite range of the values "
                         "drawn (colour_limit skips NaN entries)")
    if vmin > vmax:
        # (both ends in full: ends a rounding apart read "[1, 1]" at 6 digits, an inversion of equal numbers)
        raise ValueError(f"colour range [{vmin!r}, {vmax!r}] is inverted (vmin > vmax): pass vmin <= vmax")
    # a range within rounding of one value is one value (matplotlib's colour bar widens below ~1e-15 relative too)
    if vmax - vmin <= 1e-15 * max(abs(vmin), abs(vmax)) or vmax == vmin:
        centre = 0.5 * (vmin + vmax)
        half = 0.1 * abs(centre) if centre != 0 else 0.1
        return centre - half, centre + half
    return vmin, vmax
