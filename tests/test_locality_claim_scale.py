"""The recipes' kernel-locality claim (θ_T − θ₀, beyond the time-blind denoiser) against a change of the states'
scale alone: k̂ = c·g(s)·g(t) passes the raw locality difference (its rows' scale pairs with the band's mean) with no
|Δbin| structure, and a time-conditioned denoiser can learn such a scale where a time-blind one cannot. The claim now
needs the same two tests on standardized rows (:func:`genkernel.diffusion.kernel_locality`'s ``"standardized"``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genkernel.diffusion.locality import kernel_locality, locality_pseudo_values
from recipes import common

pytestmark = pytest.mark.usefixtures("one_thread")

N, LEVELS, BAND = 6, 6, 1


def scale_kernel(falloff: float) -> torch.Tensor:
    """k̂ = 0.5·g(s)·g(t), g falling linearly from 1 to ``falloff`` with the level (1: a constant kernel)."""
    g = torch.linspace(1.0, falloff, LEVELS, dtype=torch.float64).repeat(N)
    return (0.5 * g[:, None] * g[None, :]).fill_diagonal_(1.0)


def local_kernel(scale_falloff: float, seed: int) -> torch.Tensor:
    """Local in |Δbin| on top of a scale g(s)·g(t), with pair-wise noise."""
    generator = torch.Generator().manual_seed(seed)
    bins = torch.arange(LEVELS).repeat(N)
    g = torch.linspace(1.0, scale_falloff, LEVELS, dtype=torch.float64).repeat(N)
    noise = 0.02 * torch.randn(N * LEVELS, N * LEVELS, generator=generator, dtype=torch.float64)
    k = g[:, None] * g[None, :] * (0.5 + 0.5 * torch.exp(-(bins[:, None] - bins[None, :]).abs().double()))
    return (k + noise + noise.T).fill_diagonal_(1.0)


def pseudo(kernel: torch.Tensor) -> dict[str, list[float]]:
    return {rows: locality_pseudo_values(kernel, N, torch.arange(LEVELS), BAND, rows=rows).tolist()
            for rows in ("raw", "standardized")}


def run_from_kernels(seed: int, theta_0: torch.Tensor, theta_T: torch.Tensor, time_blind: torch.Tensor) -> dict:
    """The parts of a diffusion_seed_run result that diffusion_claims reads, with the kernel-locality values
    computed from the three models' kernels as the recipe does (the recipe's own record layout)."""
    def cell(d):
        return {"difference": d, "interval": [d - 0.1, d + 0.1], "n": 4, "measured": True, "control": 0.0}

    rows = [{"level": 10 * i, "bin": i, "traffic": cell(0.5), "share": cell(0.5)} for i in range(3)]
    report = {"config": {"band": BAND, "controls": 2, "kernel_sketch": None}, "measured": True, "notes": [],
              "locality": {"per_level": rows, "median_kappa": 1.0},
              "residual": {"median_rest_share": 0.1, "relative_residual": 1e-3}}
    per_model = {name: {rows: np.asarray(v) for rows, v in pseudo(k).items()}
                 for name, k in (("theta_0", theta_0), ("theta_T", theta_T), ("time_blind", time_blind))}
    return {"seed": seed, "report": report, "reference": None,
            "kernel_locality_per_input": common._kernel_locality_record(per_model),
            "sample_quality": {"score": 0.1, "noise": False}, "retrieval_entropy": [2.0, 1.0],
            "retrieval_entropy_theta_0": [2.0, 1.9]}


def test_standardized_pseudo_values_remove_a_scale_only_kernel():
    """The pseudo-values of a scale-only kernel: the raw ones average the raw difference (> 0.05), the standardized
    ones are 0 to rounding (its standardized rows are one row repeated); both average to kernel_locality's
    difference of the same rows. A bad ``rows`` is refused. Fails on the old code: no ``rows`` option."""
    k = scale_kernel(0.2)
    values = pseudo(k)
    locality = kernel_locality(k, N, torch.arange(LEVELS), BAND)["locality"]
    assert np.mean(values["raw"]) == pytest.approx(locality["difference"], rel=1e-9) and locality["difference"] > 0.05
    assert np.abs(values["standardized"]).max() < 1e-12
    assert np.mean(values["standardized"]) == pytest.approx(locality["standardized"]["difference"], abs=1e-12)
    with pytest.raises(ValueError, match="rows must be one of"):
        locality_pseudo_values(k, N, torch.arange(LEVELS), BAND, rows="scaled")


def test_a_scale_only_rise_beyond_the_time_blind_denoiser_is_not_held():
    """θ₀ and the time-blind denoiser: constant kernels (no structure); θ_T: the same kernel with its states'
    scale learned, g falling to 0.2 + 0.05·seed (no |Δbin| structure). Fails on the old code: the raw change and
    the raw excess over the time-blind denoiser are both above 0 over three seeds, and the claim was held; now
    the standardized change is 0, the claim is not held, and it says why."""
    runs = [run_from_kernels(seed, scale_kernel(1.0), scale_kernel(0.2 + 0.05 * seed), scale_kernel(1.0))
            for seed in range(3)]
    c = common.diffusion_claims(runs)["kernel_locality"]
    assert c["measured"] is True and c["interval"][0] > 0 and c["beyond_time_blind_interval"][0] > 0  # raw: both
    assert c["held"] is False
    assert abs(c["standardized"]["change"]) < 1e-12
    assert "scale" in c["not_held_because"]


def test_a_local_rise_beyond_the_time_blind_denoiser_still_holds():
    """θ_T local in |Δbin| on top of a scale; θ₀ and the time-blind denoiser not local: the raw and standardized
    tests both pass and the claim holds (the standardized test takes no power from a local kernel). Coverage (the
    old code held it on the raw tests alone)."""
    runs = [run_from_kernels(seed, scale_kernel(1.0), local_kernel(0.4, seed), scale_kernel(0.6)) for seed in range(3)]
    c = common.diffusion_claims(runs)["kernel_locality"]
    assert c["held"] is True, c
    assert c["standardized"]["change_interval"][0] > 0 and c["standardized"]["beyond_time_blind_interval"][0] > 0
    assert "not_held_because" not in c


def test_runs_without_the_standardized_values_are_not_judged():
    """A run saved before the standardized values existed: the claim is not measured and says why (not judged on
    the raw difference, which a scale-only kernel passes). Fails on the old code (judged and held)."""
    runs = [run_from_kernels(seed, scale_kernel(1.0), local_kernel(0.4, seed), scale_kernel(0.6)) for seed in range(3)]
    for run in runs:
        del run["kernel_locality_per_input"]["standardized"]
    c = common.diffusion_claims(runs)["kernel_locality"]
    assert c["measured"] is False and c["held"] is None and "standardized" in c["why"]
