"""Review of genkernel.data (digits, printed digits, toy 2-D sets) against brute-force references."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genkernel.data import (
    gaussian_ring,
    load_digits_images,
    regression_1d,
    render_printed_digits,
    resize_images,
    ring_mode_centers,
)


# ------------------------------------------------------------------------------------------
# resize_images
# ------------------------------------------------------------------------------------------
def test_resize_antialiases_a_non_square_image_shrinking_along_one_side():
    """8 x 48 -> 16 x 16 grows the height and shrinks the width 3x: the width was sampled by plain
    bilinear (antialias only when size < min(H, W)), so a 1-in-3 column pattern (mean 1/3) came out
    all 0. Reference: the separable filter, plain bilinear along the height, then the antialiased
    filter along the width."""
    x = torch.zeros(2, 1, 8, 48, dtype=torch.float64)
    x[..., ::3] = 1.0
    out = resize_images(x, 16)
    rows = F.interpolate(x, size=(16, 48), mode="bilinear", align_corners=False, antialias=False)
    ref = F.interpolate(rows, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert out.shape == (2, 1, 16, 16)
    assert float((out - ref).abs().max()) < 1e-12
    assert abs(float(out.mean()) - 1 / 3) < 0.02  # the ink is kept, not aliased away
    # square images: unchanged (plain bilinear up, antialiased down)
    sq = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for size, aa in ((16, False), (5, True)):
        ref = F.interpolate(sq, size=(size, size), mode="bilinear", align_corners=False, antialias=aa)
        assert torch.equal(resize_images(sq, size), ref.clamp(sq.min(), sq.max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resize_half_precision_downsampling_works_and_matches_float32(dtype):
    """torch has no CPU antialiased kernel for half types: downsampling float16 / bfloat16 images
    raised NotImplementedError ("compute_index_ranges_weights" not implemented for 'Half')."""
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    xh = x.to(dtype)
    out = resize_images(xh, 7)
    ref = resize_images(xh.float(), 7).to(dtype)  # filtered in float32, rounded once
    assert out.dtype == dtype and out.shape == (3, 1, 7, 7)
    assert torch.equal(out, ref)
    assert float(out.min()) >= float(xh.min()) and float(out.max()) <= float(xh.max())
    up = resize_images(xh, 20)  # upsampling kept its native kernel
    assert up.dtype == dtype and up.shape == (3, 1, 20, 20)


def test_resize_bad_images_are_named():
    """The TypeError named neither the dtype nor the shape it got, nor the fix."""
    with pytest.raises(TypeError, match=r"got a torch.int64 tensor of shape \(1, 1, 4, 4\)"):
        resize_images(torch.zeros(1, 1, 4, 4, dtype=torch.long), 8)
    with pytest.raises(TypeError, match=r"shape \(4, 4\)"):
        resize_images(torch.zeros(4, 4), 8)


# ------------------------------------------------------------------------------------------
# unused seeds are still validated
# ------------------------------------------------------------------------------------------
def test_bad_seed_is_refused_even_where_the_seed_is_unused():
    """load_digits_images without per_class and regression_1d(grid=True) do not draw, and took any
    seed silently (seed="0", seed=-1, seed=1.5), unlike every other call with a seed."""
    for bad, exc in (("0", TypeError), (1.5, TypeError), (-1, ValueError)):
        with pytest.raises(exc, match="seed"):
            load_digits_images(size=8, seed=bad)
        with pytest.raises(exc, match="seed"):
            regression_1d("sin", 5, grid=True, seed=bad)
    # valid seeds (and None) still work and do not change the (seed-free) result
    a = load_digits_images(size=8, seed=None)[0]
    assert torch.equal(a, load_digits_images(size=8, seed=torch.Generator().manual_seed(3))[0])
    assert torch.equal(regression_1d("sin", 5, grid=True, seed=None)[0], regression_1d("sin", 5, grid=True)[0])


def test_printed_digits_0d_array_argument_is_named():
    """sizes=np.array(0.8) raised a bare "len() of unsized object" naming no argument."""
    with pytest.raises(TypeError, match="sizes must be a number or a 1-D sequence"):
        render_printed_digits(fonts=["DejaVu Sans"], sizes=np.array(0.8), shifts=(0,), per_digit=1)
    with pytest.raises(TypeError, match="shifts must be a number or a 1-D sequence"):
        render_printed_digits(fonts=["DejaVu Sans"], shifts=np.zeros((1, 1), dtype=np.int64), per_digit=1)


# ------------------------------------------------------------------------------------------
# brute-force references (coverage)
# ------------------------------------------------------------------------------------------
def _reference_glyph(char: str, size: int, height: float, font_path: str, ss: int = 8) -> np.ndarray:
    """Independent rasterizer: point-in-polygon coverage (no Agg) of the filled glyph, scaled to
    ``height * size`` px tall, its area centroid at pixel-index position ((size-1)/2, (size-1)/2)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    from matplotlib.path import Path

    path = TextPath((0, 0), char, size=1.0, prop=FontProperties(fname=font_path))
    ext = path.get_extents()
    polys = [Path(p) for p in path.to_polygons(closed_only=True)]

    def inside_glyph(points):  # even-odd over the contours, so the holes of 0, 6, 8, 9 stay empty
        return np.logical_xor.reduce([p.contains_points(points) for p in polys])

    k = height * size / ext.height  # output px per glyph unit
    # area centroid of the glyph in glyph units, from a fine grid
    gx = np.linspace(ext.x0, ext.x1, 400)
    gy = np.linspace(ext.y0, ext.y1, 400)
    P = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    inside = inside_glyph(P)
    cx, cy = P[inside].mean(0)
    sub = (np.arange(size * ss) + 0.5) / ss  # output-pixel coordinates of sub-samples
    X = cx + (sub - size / 2) / k
    Y = cy - (sub - size / 2) / k  # rows point down
    Q = np.stack(np.meshgrid(X, Y), -1).reshape(-1, 2)
    cov = inside_glyph(Q).reshape(size * ss, size * ss).astype(np.float64)
    return cov.reshape(size, ss, size, ss).mean(axis=(1, 3))


def test_printed_digit_images_match_an_independent_rasterizer_digit_by_digit():
    """Image j of digit k is the glyph of k (upright, not mirrored, at the requested height, centred by
    mass), checked against a point-in-polygon rasterizer; the nearest reference digit is its label."""
    from genkernel.data import available_printed_fonts

    size, height = 16, 0.75
    fonts = ["DejaVu Sans", "DejaVu Serif"]
    images, labels, variants = render_printed_digits(size=size, fonts=fonts, sizes=(height,), shifts=(0,),
                                                     per_digit=None, stroke=0.0, return_variants=True)
    avail = available_printed_fonts()
    for j, v in enumerate(variants):
        refs = np.stack([_reference_glyph(str(k), size, height, avail[v["font"]]) for k in range(10)])
        idx = torch.arange(j, len(labels), len(variants))  # image j of every digit
        assert labels[idx].tolist() == list(range(10))
        got = images[idx, 0].double().numpy()
        err = np.abs(got[:, None] - refs[None]).mean(axis=(2, 3))  # [image, reference digit]
        assert (err.argmin(1) == np.arange(10)).all(), (v["font"], err.argmin(1))
        assert err.diagonal().max() < 0.03, (v["font"], err.diagonal())
        # a vertical flip of the reference is far worse: orientation is checked, not just the label
        flipped = np.abs(got - refs[:, ::-1]).mean(axis=(1, 2))
        assert (flipped[[2, 3, 4, 5, 6, 7, 9]] > 3 * err.diagonal()[[2, 3, 4, 5, 6, 7, 9]]).all()


def test_digits_labels_and_splits_against_sklearn_rows():
    """Every (image, label) pair of a shuffled per-class draw is a row of sklearn's data with that
    target, upright; train and test splits share no image (hashing rows)."""
    from sklearn.datasets import load_digits

    ref = load_digits()
    table = {hashlib.sha1((np.asarray(im, np.float32) / 16).astype(np.float32).tobytes()).hexdigest(): int(t)
             for im, t in zip(ref.images, ref.target)}
    for split in ("train", "test"):
        imgs, labs = load_digits_images(size=8, per_class=20, seed=7, split=split)
        keys = [hashlib.sha1(im[0].numpy().astype(np.float32).tobytes()).hexdigest() for im in imgs]
        assert [table[k] for k in keys] == labs.tolist()
    tr, _ = load_digits_images(size=8, split="train")
    te, _ = load_digits_images(size=8, split="test")
    h_tr = {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in tr}
    h_te = {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in te}
    assert len(h_tr) == len(tr) and len(h_te) == len(te) and not (h_tr & h_te)
    # the 16 x 16 images are the resized 8 x 8 ones, image by image (same order, same labels)
    i16, l16 = load_digits_images(size=16, per_class=5, seed=3, split="test")
    i8, l8 = load_digits_images(size=8, per_class=5, seed=3, split="test")
    assert torch.equal(l16, l8)
    ref16 = F.interpolate(i8, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    assert float((i16 - ref16).abs().max()) < 1e-6


def test_ring_modes_empirical_centres_labels_and_spread():
    """Each mode's empirical mean is ring_mode_centers' centre m (mode 0 on +x, counter-clockwise),
    the empirical per-axis std is ``std``, and the global RNG is left alone."""
    state = torch.get_rng_state()
    n, m, r, std = 16000, 8, 2.0, 0.3
    pts, ids = gaussian_ring(n, num_modes=m, radius=r, std=std, seed=11, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.bincount(ids, minlength=m).tolist() == [n // m] * m
    centres = torch.stack([pts[ids == k].mean(0) for k in range(m)])
    formula = torch.tensor([[r * math.cos(2 * math.pi * k / m), r * math.sin(2 * math.pi * k / m)] for k in range(m)],
                           dtype=torch.float64)
    se = std / math.sqrt(n / m)
    assert float((centres - formula).abs().max()) < 5 * se
    assert float((centres - ring_mode_centers(m, r, dtype=torch.float64)).abs().max()) < 5 * se
    resid = pts - formula[ids]
    assert abs(float(resid.std(0).max()) - std) < 0.02 and abs(float(resid.std(0).min()) - std) < 0.02


def test_the_same_font_by_name_and_by_path_is_refused_as_repeated():
    """fonts=["DejaVu Sans", <path of DejaVuSans.ttf>] passed the repeated-entry check (names differ:
    "DejaVu Sans" / "DejaVuSans") and rendered the same glyphs as two 'fonts'."""
    from genkernel.data import available_printed_fonts

    path = available_printed_fonts()["DejaVu Sans"]
    with pytest.raises(ValueError, match="repeated entries"):
        render_printed_digits(fonts=["DejaVu Sans", path], sizes=(0.8,), shifts=(0,), per_digit=2)
    a, _ = render_printed_digits(fonts=[path], sizes=(0.8,), shifts=(0,), per_digit=1)
    b, _ = render_printed_digits(fonts=["DejaVu Sans"], sizes=(0.8,), shifts=(0,), per_digit=1)
    assert torch.equal(a, b)  # a path is the same font as its name


def test_every_loader_runs_with_the_network_cut(monkeypatch):
    """Coverage: nothing in genkernel.data opens a connection (socket.connect raises here)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("genkernel.data tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from genkernel.data import circle_task, ellipse_task, gaussian_grid, two_moons

    gaussian_ring(8), gaussian_grid(8), two_moons(8), circle_task(8), ellipse_task(8), regression_1d("sin", 8)
    images, labels = load_digits_images(per_class=1, seed=0)
    assert labels.tolist() == list(range(10))
    p, lab = render_printed_digits(fonts=["STIXGeneral"], sizes=(0.8,), shifts=(0,), per_digit=1)
    assert lab.tolist() == list(range(10))


def test_seeds_that_differ_by_a_multiple_of_2_to_the_32_give_different_data():
    """torch's CPU generator keeps the low 32 bits of a seed: gaussian_ring(seed=2**32) was
    gaussian_ring(seed=0) bit for bit (likewise every set, subset and printed-digit draw), while
    seeds up to 2**64 are accepted. Seeds below 2**32 draw exactly what they drew before."""
    from genkernel.data import balanced_subset, circle_task, two_moons

    for a, b in ((0, 2**32), (5, 5 + 2**32), (7, 7 + 3 * 2**32), (2**32 - 1, 2**64 - 1)):
        pa, ia = gaussian_ring(64, seed=a)
        pb, ib = gaussian_ring(64, seed=b)
        assert not torch.equal(pa, pb) and not torch.equal(ia, ib)
        assert not torch.equal(circle_task(32, seed=a)[0], circle_task(32, seed=b)[0])
        assert not torch.equal(two_moons(32, seed=a)[0], two_moons(32, seed=b)[0])
        labels = torch.arange(200) % 2
        assert not torch.equal(balanced_subset(labels, 20, seed=a), balanced_subset(labels, 20, seed=b))
    # below 2**32: the generator is torch's own manual_seed(seed), unchanged
    for s in (0, 123, 2**32 - 1):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(gaussian_ring(40, seed=s)[0], gaussian_ring(40, seed=g)[0])
    assert torch.equal(gaussian_ring(40, seed=2**40)[0], gaussian_ring(40, seed=2**40)[0])  # still deterministic


def test_no_loader_consumes_or_reseeds_a_global_random_state():
    """Coverage: torch's, NumPy's and Python's global generators are left exactly as they were."""
    import random

    from genkernel.data import balanced_subset, circle_task, ellipse_task, gaussian_grid, two_moons

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    gaussian_ring(16, seed=1), gaussian_grid(16, seed=2), two_moons(16, seed=3), circle_task(16, seed=4)
    ellipse_task(16, seed=5), regression_1d("square", 16, seed=6)
    balanced_subset(torch.arange(40) % 4, 3, seed=7)
    load_digits_images(size=8, per_class=2, seed=8)
    render_printed_digits(fonts=["DejaVu Sans"], sizes=(0.8,), per_digit=2, seed=9)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all()
    assert random.getstate() == before[2]
