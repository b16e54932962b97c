"""Workflow checks of genkernel.data against independent references (the formulas, sklearn)."""

import math

import torch

from genkernel.data import regression_1d


def test_square_wave_ends_keep_their_own_side_in_float32_and_float64():
    """float32(pi) > pi: sign(sin x) gave the grid's -pi the value +1 and its +pi the value -1 (the
    other side's), so the exact square wave scored R² 0.98 instead of 1 on regression_kernels' grid."""
    for dtype in (torch.float32, torch.float64):
        x, y = regression_1d("square", 400, grid=True, dtype=dtype)
        ref = torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, 0.0)).to(dtype)  # the square wave on [-pi, pi]
        assert torch.equal(y, ref), dtype
        assert y[0].item() == -1.0 and y[-1].item() == 1.0
        yt = y.reshape(-1).double()
        r2 = 1 - float(((ref.reshape(-1).double() - yt) ** 2).mean()) / float(((yt - yt.mean()) ** 2).mean())
        assert r2 == 1.0
        xs, ys = regression_1d("square", 3, grid=True, dtype=dtype)
        assert xs.reshape(-1).tolist()[1] == 0.0 and ys.reshape(-1).tolist() == [-1.0, 0.0, 1.0]  # 0 at the jump x = 0
        xr, yr = regression_1d("square", 2000, seed=3, dtype=dtype)
        assert torch.equal(yr, torch.sign(xr))
        assert bool((xr.abs() <= math.pi + 1e-6).all())
