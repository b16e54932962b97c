"""Log-SNR bins of a schedule whose first level has no noise (β_0 = 0, or ᾱ_0 rounding to 1 in float32).

Before: log SNR at t = 0 was clamped to 690.8 rather than +inf, so "equal log SNR" bins spanned [690.8, min]: ten
bins over T = 1000 had edges [0, 1, ..., 9, 1000], nine bins of one timestep and 991 timesteps in the last, the
probe levels 0..9 (a helper's hunt). A zero-terminal-SNR schedule's -inf was already left out of the range."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genkernel.diffusion.objectives import NoiseBins, training_levels  # noqa: E402


@pytest.mark.parametrize("beta_start", [0.0, 1e-9])
def test_a_noiseless_first_level_is_left_out_of_the_bins_range(beta_start):
    """t = 0 has log SNR +inf and joins the first bin; the bins span the finite levels: the same edges as the
    finite levels' equal log-SNR boundaries give, no bin holding more than 40 % of the timesteps."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=beta_start, beta_end=0.02)
    _, snr = training_levels(scheduler)
    assert snr[0] == math.inf and bool(torch.isfinite(snr[1:]).all())
    bins = NoiseBins(scheduler, 10)
    sizes = (bins.edges[1:] - bins.edges[:-1]).tolist()
    assert max(sizes) <= 400 and sizes.count(1) == 0, bins.edges.tolist()
    bounds = torch.linspace(float(snr[1:].max()), float(snr[1:].min()), 11, dtype=torch.float64)
    for g in range(1, 10):  # each inner edge: the first timestep at or below its boundary
        edge = int(bins.edges[g])
        assert snr[edge] <= bounds[g] < snr[edge - 1], (g, edge)
