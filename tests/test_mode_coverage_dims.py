"""GAN mode coverage in any dimension: the radius a sample counts on a mode within holds the same share of a mode's
own samples as sigmas·std does in 2-D.

Before: a fixed sigmas·std radius. A perfect generator of one isotropic Gaussian mode (G(z) = c + σz) was reported
with quality_share 0.988 in 2-D, 0.656 in 8, 0.096 in 16 and 0 in 64 (the mode missed), the real data scoring the
same; GANKernelAnalyzer takes mode_centers of any dimension (a conditional GAN's class means)."""

from __future__ import annotations

import math

import pytest
import torch

from genkernel.gan.metrics import coverage_radius, mode_coverage


@pytest.mark.parametrize("dim", [2, 8, 16, 64])
def test_a_perfect_generator_covers_its_mode_at_the_2d_share_in_any_dimension(dim):
    """20 000 samples of N(c, σ²I): the mode is hit and the share on it is the 2-D rule's 1 − exp(−9/2) = 0.9889
    at 3 sigmas, within sampling error (4 standard errors)."""
    g = torch.Generator().manual_seed(dim)
    center, std = torch.randn(1, dim, generator=g, dtype=torch.float64), 0.3
    samples = center + std * torch.randn(20_000, dim, generator=g, dtype=torch.float64)
    out = mode_coverage(samples, center, std)
    expected = -math.expm1(-4.5)
    assert out["modes_hit"] == 1
    assert abs(out["quality_share"] - expected) <= 4 * math.sqrt(expected * (1 - expected) / 20_000)


def test_the_2d_radius_is_sigmas_std_exactly():
    """coverage: in 2-D the radius is sigmas·std to the bit (a sample at exactly that distance counts, as before);
    in other dimensions it grows with them."""
    assert coverage_radius(0.25, 3.0, 2) == 0.75
    assert coverage_radius(0.25, 3.0, 2) < coverage_radius(0.25, 3.0, 8) < coverage_radius(0.25, 3.0, 64)
    samples = torch.tensor([[0.75, 0.0], [0.0, 0.7500001]], dtype=torch.float64)
    out = mode_coverage(samples, torch.zeros(1, 2, dtype=torch.float64), 0.25)
    assert out["mode_counts"] == [1]
