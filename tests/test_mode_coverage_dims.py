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


@pytest.mark.parametrize("setting, message", [
    (dict(coverage_sigmas=float("inf")), "sigmas must be a finite number > 0"),
    (dict(coverage_sigmas=-1.0), "sigmas must be a finite number > 0"),
    (dict(mode_std=float("nan")), "std must be a finite number > 0"),
])
def test_the_analyzer_checks_its_coverage_settings_when_it_is_built(setting, message):
    """Before: a coverage radius it cannot use was accepted, and the run stopped at its first coverage, after the
    window's training steps."""
    from genkernel.data import ring_mode_centers
    from genkernel.gan import GANKernelAnalyzer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    G = MLPGenerator(2, 2, hidden=8, depth=2).to(torch.float64)
    D = MLPDiscriminator(2, hidden=8, depth=2).to(torch.float64)
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = dict(mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05) | setting
    with pytest.raises(ValueError, match=message):
        GANKernelAnalyzer(G, D, probes, grouping="mode", **options)
