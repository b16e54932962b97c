"""What every figure function needs: arrays from tensors or JSON lists, shared colour limits and ranges, the heat
maps' colour map with its grey for a missing number (and the colour bar's note of it, and its extend where a value
lies beyond the scale), and the ends of the claims' intervals to draw (none for a refused one) with their bars'
lengths."""

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


# where some cell is ±inf (imshow draws ±inf in the bad colour too, the grey of a NaN)
NO_FINITE_LABEL = "grey: no value or ±inf"


def no_value_note(*matrices) -> str:
    """:data:`NO_VALUE_LABEL` when some entry of ``matrices`` (None entries skipped as matrices; None inside a
    matrix read as NaN) is NaN, :data:`NO_FINITE_LABEL` when some entry is ±inf, else "": the text a heat map's
    colour bar carries so that its grey cells are read as missing numbers, not as a colour of the scale.

    (±inf counts: matplotlib's imshow masks every non-finite entry and draws it in the map's bad colour, the grey
    of a NaN, and the note read only NaN, so an infinite cell was grey with nothing saying what grey meant.)"""
    arrays = [float_array(m) for m in matrices if m is not None]
    if any(np.isinf(a).any() for a in arrays):
        return NO_FINITE_LABEL
    return NO_VALUE_LABEL if any(np.isnan(a).any() for a in arrays) else ""


def clip_extend(vmin: float, vmax: float, *matrices) -> str:
    """A colour bar's ``extend`` for the scale ``[vmin, vmax]`` drawing ``matrices`` (None entries skipped):
    "min" / "max" / "both" where some finite entry lies below / above the scale (drawn at its end's colour, as if
    it were the end's value), "neither" where every finite entry is drawn at its own colour. Non-finite entries are
    grey (:func:`no_value_note`), not clipped."""
    arrays = [float_array(m).reshape(-1) for m in matrices if m is not None]
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    values = values[np.isfinite(values)]
    low = bool(values.size) and float(values.min()) < float(vmin)
    high = bool(values.size) and float(values.max()) > float(vmax)
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(low, high)]


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


def error_lengths(estimate, low, high) -> tuple[np.ndarray, np.ndarray]:
    """``(below, above)``: the lengths of the error bars from ``estimate`` down to ``low`` and up to ``high`` (float
    arrays of one shape, or scalars), as ``errorbar(yerr=[below, above])`` takes them: NaN (no bar) where an end or the
    estimate is not finite (NaN: no interval; ±inf: a bar of infinite length, which matplotlib refused with "'yerr'
    must not contain negative values" and lost the whole figure), 0 where the estimate lies beyond an end by rounding
    only (a zero-width interval whose ends were summed in another order than the estimate).

    Raises ValueError where the estimate lies outside its interval beyond rounding: its bar cannot be drawn about
    it, and a bar clipped to the estimate would state another interval than the one recorded."""
    est, lo, hi = (np.asarray(float_array(v), dtype=np.float64) for v in (estimate, low, high))
    est, lo, hi = np.broadcast_arrays(est, lo, hi)
    ok = np.isfinite(est) & np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore", over="ignore"):
        below, above = np.where(ok, est - lo, np.nan), np.where(ok, hi - est, np.nan)
        scale = np.maximum(np.maximum(np.abs(est), np.abs(lo)), np.abs(hi))
    rounding = 1e-9 * np.where(ok, scale, 0.0)
    outside = ok & ((below < -rounding) | (above < -rounding))
    if outside.any():
        i = tuple(np.argwhere(outside)[0]) if outside.ndim else ()
        raise ValueError(f"estimate {float(est[i])!r} lies outside its interval [{float(lo[i])!r}, {float(hi[i])!r}]: "
                         "an error bar is drawn about its estimate; pass the interval computed for this estimate")
    return np.where(ok, np.maximum(below, 0.0), np.nan), np.where(ok, np.maximum(above, 0.0), np.nan)
