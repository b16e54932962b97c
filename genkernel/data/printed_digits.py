"""Printed (typeset) digits 0-9, rendered offline with the fonts matplotlib ships.

Out-of-domain counterparts of the handwritten digits (the paper's Figure 5): same
resolution (``size``, default 16 like :func:`genkernel.data.load_digits_images`), same
intensity scale (0 = background, 1 = ink), ink roughly as heavy as the handwritten set's
(mean pixel about 0.3 at the defaults, against 0.305 for sklearn's digits), the glyph's
height filling most of the image and its centre of mass at the image centre before shifts.

Each glyph outline comes from :class:`matplotlib.textpath.TextPath` with the font file,
is filled and stroked (the stroke thickens thin printed strokes towards handwritten
weight) with matplotlib's Agg renderer at 4x resolution, and is box-averaged down to
``size``: the pixel value is the ink coverage of the pixel.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .toy2d import SeedLike, _check_float, _check_int, _generator

__all__ = ["render_printed_digits", "available_printed_fonts", "DEFAULT_PRINTED_FONTS"]

# display name -> file in matplotlib's mpl-data/fonts/ttf
_FONT_FILES = {
    "DejaVu Sans": "DejaVuSans.ttf",
    "DejaVu Sans Bold": "DejaVuSans-Bold.ttf",
    "DejaVu Sans Oblique": "DejaVuSans-Oblique.ttf",
    "DejaVu Serif": "DejaVuSerif.ttf",
    "DejaVu Serif Bold": "DejaVuSerif-Bold.ttf",
    "DejaVu Serif Italic": "DejaVuSerif-Italic.ttf",
    "DejaVu Sans Mono": "DejaVuSansMono.ttf",
    "DejaVu Sans Mono Bold": "DejaVuSansMono-Bold.ttf",
    "STIXGeneral": "STIXGeneral.ttf",
    "STIXGeneral Bold": "STIXGeneralBol.ttf",
    "STIXGeneral Italic": "STIXGeneralItalic.ttf",
    "Computer Modern Roman": "cmr10.ttf",
    "Computer Modern Sans": "cmss10.ttf",
    "Computer Modern Typewriter": "cmtt10.ttf",
}
#: fonts used when ``fonts=None`` (those present in the installed matplotlib)
DEFAULT_PRINTED_FONTS = tuple(_FONT_FILES)

_SUPERSAMPLE = 4


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_printed_fonts() -> dict[str, str]:
    """Fonts usable by name in :func:`render_printed_digits`: {display name: .ttf path}.

    Only fonts whose file exists in the installed matplotlib (mpl-data/fonts/ttf) are listed.
    """
    d = _font_dir()
    return {name: str(d / f) for name, f in _FONT_FILES.items() if (d / f).is_file()}


def _resolve_fonts(fonts) -> list[tuple[str, str]]:
    avail = available_printed_fonts()
    if fonts is None:
        out = [(n, p) for n, p in avail.items() if n in DEFAULT_PRINTED_FONTS]
        if not out:
            raise FileNotFoundError(f"no font files found in {_font_dir()}; is matplotlib installed correctly?")
        return out
    if isinstance(fonts, (str, os.PathLike)):
        fonts = [fonts]
    if not isinstance(fonts, Sequence) or len(fonts) == 0:
        raise TypeError(f"fonts must be None or a non-empty sequence of font names / .ttf paths, got {fonts!r}")
    out = []
    for f in fonts:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"fonts entries must be names or paths, got {f!r}")
        if isinstance(f, str) and f in avail:
            out.append((f, avail[f]))
        elif Path(f).suffix.lower() in (".ttf", ".otf") and Path(f).is_file():
            out.append((Path(f).stem, str(Path(f))))
        else:
            raise ValueError(
                f"unknown font {str(f)!r}: pass one of {sorted(avail)} or the path of an existing .ttf/.otf file"
            )
    names = [n for n, _ in out]
    # by file as well as by name: "DejaVu Sans" and the path of DejaVuSans.ttf are one font, and passed
    # together they gave pairs of identical variants (identical images under two entries of the variants)
    files = [os.path.realpath(p) for _, p in out]
    if len(set(names)) != len(names) or len(set(files)) != len(files):
        raise ValueError(f"fonts has repeated entries: {names} (files {files}); list each font once")
    return out


def _check_number_tuple(values, name: str, *, integer: bool) -> tuple:
    if isinstance(values, (numbers.Real,)) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, np.ndarray) and values.ndim != 1:  # len() of a 0-d array raised a bare "unsized object"
        raise TypeError(f"{name} must be a number or a 1-D sequence of numbers, got an array of shape {values.shape}")
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)) or len(values) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of numbers, got {values!r}")
    out = []
    for v in values:
        if integer:
            out.append(_check_int(v, name, minimum=-(2**31)))
        else:
            out.append(_check_float(v, name, positive=True))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {out}")
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _glyph(font_path: str, char: str):
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    path = TextPath((0.0, 0.0), char, size=1.0, prop=FontProperties(fname=font_path))
    ext = path.get_extents()
    if ext.height <= 0 or ext.width <= 0:
        raise ValueError(f"font {font_path} has no outline for {char!r}; choose another font")
    return path, ext


def _rasterize(path, ext, scale: float, stroke_px: float, offset: tuple[float, float], canvas: int) -> np.ndarray:
    """Ink coverage (H x W float64 in [0, 1]) of the glyph on a square hi-res canvas.

    The glyph's bounding-box centre goes to the canvas centre plus ``offset`` = (right, down)
    in canvas pixels; ``scale`` maps glyph units to canvas pixels.
    """
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.transforms import Affine2D

    renderer = RendererAgg(canvas, canvas, 72)  # at 72 dpi one point is one pixel
    gc = renderer.new_gc()
    gc.set_antialiased(True)
    gc.set_foreground((1.0, 1.0, 1.0))
    gc.set_linewidth(stroke_px)
    gc.set_joinstyle("round")
    gc.set_capstyle("round")
    cx, cy = (ext.x0 + ext.x1) / 2.0, (ext.y0 + ext.y1) / 2.0
    # display y points up, image rows point down: a downward offset lowers y
    tr = Affine2D().translate(-cx, -cy).scale(scale).translate(canvas / 2.0 + offset[0], canvas / 2.0 - offset[1])
    renderer.draw_path(gc, path, tr, (1.0, 1.0, 1.0, 1.0))
    gc.restore()
    return np.asarray(renderer.buffer_rgba())[..., 3].astype(np.float64) / 255.0


def _centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    """(row, col) centre of mass of a 2-D non-negative array, in pixel-index coordinates."""
    m = a.sum()
    ii = np.arange(a.shape[0], dtype=np.float64)
    jj = np.arange(a.shape[1], dtype=np.float64)
    return float((a.sum(1) * ii).sum() / m), float((a.sum(0) * jj).sum() / m)


_GLYPH_CACHE_BYTES = 256 * 2**20
_glyph_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()


def _centred_glyph(font_path: str, char: str, size: int, height: float, stroke: float) -> np.ndarray:
    """:func:`_render_centred_glyph`, kept in a least-recently-used cache of at most
    ``_GLYPH_CACHE_BYTES`` (a count bound of 4096 canvases held 8 GiB at size 64: 2 MiB each)."""
    key = (font_path, char, size, height, stroke)
    if key in _glyph_cache:
        _glyph_cache.move_to_end(key)
        return _glyph_cache[key]
    canvas = _render_centred_glyph(*key)
    _glyph_cache[key] = canvas
    held = sum(a.nbytes for a in _glyph_cache.values())
    while held > _GLYPH_CACHE_BYTES and len(_glyph_cache) > 1:
        _, dropped = _glyph_cache.popitem(last=False)
        held -= dropped.nbytes
    return canvas


def _render_centred_glyph(font_path: str, char: str, size: int, height: float, stroke: float) -> np.ndarray:
    """Hi-res coverage on a padded canvas (side 2*size*S), centre of mass at the canvas centre.

    The glyph is scaled so its ink (fill plus stroke) is ``height * size`` output pixels tall,
    shrunk if needed so that, centred by mass, it fits inside the central size x size window.
    """
    path, ext = _glyph(font_path, char)
    ss = _SUPERSAMPLE
    win = size * ss  # the output window, in hi-res pixels
    canvas = 2 * win
    stroke_px = stroke * size * ss
    target = height * win - stroke_px  # the outline's height: the stroke adds half its width above and below
    scale = target / ext.height
    if scale * ext.width + stroke_px > 0.98 * win:
        scale = max(0.98 * win - stroke_px, 0.25 * win) / ext.width
    centre = (canvas - 1) / 2.0
    offset = (0.0, 0.0)
    for _ in range(6):
        a = _rasterize(path, ext, scale, stroke_px, offset, canvas)
        r, c = _centre_of_mass(a)
        offset = (offset[0] + centre - c, offset[1] + centre - r)
        a = _rasterize(path, ext, scale, stroke_px, offset, canvas)
        rows = np.nonzero(a.max(1) > 0.02)[0]
        cols = np.nonzero(a.max(0) > 0.02)[0]
        # half extent of the ink around the centre, to the outer pixel edges
        half = max(centre - rows[0], rows[-1] - centre, centre - cols[0], cols[-1] - centre) + 0.5
        if half <= win / 2.0 + 1e-9:
            break
        shrink = (win / 2.0) / half * 0.995
        scale *= shrink
        offset = (offset[0] * shrink, offset[1] * shrink)
    a.setflags(write=False)
    return a


def _crop(a: np.ndarray, size: int, shift: tuple[int, int]) -> np.ndarray:
    """Output image (size x size) from the padded hi-res canvas, glyph moved by shift = (dx, dy)."""
    ss = _SUPERSAMPLE
    win = size * ss
    start = (a.shape[0] - win) // 2
    dx, dy = shift
    # moving the glyph right by dx means the window moves left by dx
    r0, c0 = start - dy * ss, start - dx * ss
    out = np.zeros((win, win), dtype=np.float64)
    rs, re = max(r0, 0), min(r0 + win, a.shape[0])
    cs, ce = max(c0, 0), min(c0 + win, a.shape[1])
    if rs < re and cs < ce:
        out[rs - r0:re - r0, cs - c0:ce - c0] = a[rs:re, cs:ce]
    return out.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render_printed_digits(
    *,
    size: int = 16,
    fonts: Optional[Sequence[Union[str, os.PathLike]]] = None,
    sizes: Sequence[float] = (0.75, 0.85, 0.95),
    shifts: Sequence[int] = (-1, 0, 1),
    per_digit: Optional[int] = 10,
    stroke: float = 0.08,
    seed: SeedLike = 0,
    return_variants: bool = False,
):
    """Digits 0-9 typeset in matplotlib's bundled fonts, as images like the handwritten sets.

    A *variant* is a (font, glyph height, x shift, y shift) combination from ``fonts`` x
    ``sizes`` x ``shifts`` x ``shifts``. ``per_digit`` variants are drawn once (with ``seed``,
    cycling through the fonts so that as many distinct fonts as possible are used) and every
    digit is rendered with the same variants, so image j of digit k and image j of digit k'
    differ only in the digit.

    Parameters
    ----------
    size : int
        Output side in pixels (default 16, matching :func:`load_digits_images`; 8 matches
        sklearn's native digits, 28 MNIST).
    fonts : sequence of names or .ttf/.otf paths, optional
        Names from :func:`available_printed_fonts` (DejaVu Sans / Serif / Sans Mono and
        variants, STIXGeneral, Computer Modern). Default: all of them.
    sizes : sequence of floats in (stroke, 1]
        Glyph heights (ink including the stroke) as a fraction of ``size``. A glyph is made
        smaller when needed so that, centred by mass, it stays inside the image.
    shifts : sequence of ints
        Pixel offsets applied after centring, to x (right) and y (down) independently; ink
        moved past the border is cut.
    per_digit : int or None
        Images per digit; None renders every variant.
    stroke : float >= 0
        Width of the outline stroke drawn on top of the filled glyph, as a fraction of
        ``size`` (0.08 = 1.3 px at 16): it brings the printed strokes near handwritten weight.
    seed : int or torch.Generator
        Chooses the variants.
    return_variants : bool
        Also return the list of variants (dicts with keys font, font_path, height, shift).

    Returns
    -------
    images : Tensor[10 * per_digit, 1, size, size], float32 in [0, 1]; 0 = background,
        1 = ink. Ordered by class: images [k*per_digit, (k+1)*per_digit) show digit k.
        Before shifts each glyph's centre of mass is at the image centre ((size-1)/2, within
        a fraction of a pixel).
    labels : LongTensor[10 * per_digit], ``arange(10).repeat_interleave(per_digit)``.
    variants : list of dicts, only with ``return_variants=True``; entry j describes image j of
        every digit.
    """
    size = _check_int(size, "size", minimum=4)
    font_list = _resolve_fonts(fonts)
    heights = _check_number_tuple(sizes, "sizes", integer=False)
    if any(h > 1.0 for h in heights):
        raise ValueError(f"sizes are fractions of the image height and must be <= 1, got {heights}")
    shift_vals = _check_number_tuple(shifts, "shifts", integer=True)
    if any(abs(s) >= size // 2 for s in shift_vals):
        raise ValueError(f"shifts must be smaller than half the image ({size // 2} px), got {shift_vals}")
    stroke = _check_float(stroke, "stroke", nonnegative=True)
    if stroke > 0.3:
        raise ValueError(f"stroke is a fraction of the image side and must be <= 0.3, got {stroke}")
    # The ink's height is the outline's plus the stroke: a height at most the stroke leaves no outline.
    if any(h <= stroke for h in heights):
        raise ValueError(f"sizes must exceed stroke={stroke} (the ink's height includes the stroke's width), "
                         f"got {heights}; pass larger sizes or a thinner stroke")
    if not isinstance(return_variants, bool):
        raise TypeError(f"return_variants must be a bool, got {return_variants!r}")
    gen = _generator(seed)

    per_font = [(h, dx, dy) for h in heights for dy in shift_vals for dx in shift_vals]
    total = len(font_list) * len(per_font)
    if per_digit is None:
        chosen = [(f, c) for f in range(len(font_list)) for c in range(len(per_font))]
    else:
        per_digit = _check_int(per_digit, "per_digit")
        if per_digit > total:
            raise ValueError(
                f"per_digit={per_digit} exceeds the {total} distinct variants "
                f"({len(font_list)} fonts x {len(heights)} sizes x {len(shift_vals)}^2 shifts); "
                "pass a smaller per_digit or more fonts / sizes / shifts"
            )
        font_order = torch.randperm(len(font_list), generator=gen).tolist()
        combo_order = [torch.randperm(len(per_font), generator=gen).tolist() for _ in font_list]
        used = [0] * len(font_list)
        chosen = []
        for j in range(per_digit):
            f = font_order[j % len(font_list)]
            chosen.append((f, combo_order[f][used[f]]))
            used[f] += 1

    variants = []
    for f, c in chosen:
        h, dx, dy = per_font[c]
        variants.append({"font": font_list[f][0], "font_path": font_list[f][1], "height": h, "shift": (dx, dy)})

    images = np.zeros((10 * len(variants), 1, size, size), dtype=np.float32)
    for k in range(10):
        for j, v in enumerate(variants):
            hires = _centred_glyph(v["font_path"], str(k), size, v["height"], stroke)
            images[k * len(variants) + j, 0] = _crop(hires, size, v["shift"])
    images_t = torch.from_numpy(images).clamp_(0.0, 1.0)
    labels = torch.arange(10, dtype=torch.long).repeat_interleave(len(variants))
    if return_variants:
        return images_t, labels, variants
    return images_t, labels
