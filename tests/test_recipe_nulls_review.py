"""The diffusion recipes' kernel-locality and retrieval claims are judged against the null model (the
time-blind denoiser, a network that cannot see the noise level), and their ``baseline`` is that null
model's value of the same statistic: value − baseline is the difference the claim is judged on.

Hand-built runs (the keys :func:`recipes.common.diffusion_claims` reads), and one tiny run of the protocol
whose time-blind denoiser is the trained model itself (an identity: its retrieval is θ_T's)."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from recipes import common


def _run(seed: int, *, rise: float = 0.5, blind_rise: float | None = None, blind_offsets=(0.0, 0.0, 0.0),
         entropy_T=None, entropy_0=None, entropy_blind=None, blind_noise: bool = False) -> dict:
    """A run as :func:`recipes.common.diffusion_seed_run` saves it (NaN as None), with the numbers given."""
    def cell(d):
        return {"difference": d, "interval": [d - 0.1, d + 0.1], "n": 4, "measured": True, "control": 0.0}

    rows = [{"level": 10 * i, "bin": i, "traffic": cell(0.5 + 0.01 * seed), "share": cell(0.5)} for i in range(3)]
    report = {"config": {"band": 1, "controls": 2, "kernel_sketch": None}, "measured": True, "notes": [],
              "locality": {"per_level": rows, "median_kappa": 1.0},
              "residual": {"median_rest_share": 0.1, "relative_residual": 1e-3}}
    g = np.random.default_rng(seed)
    theta_0 = g.normal(0.002, 0.001, 6)
    theta_T = theta_0 + rise + g.normal(0, 0.01, 6)
    kernel = {"theta_0": list(theta_0), "theta_T": list(theta_T)}
    if blind_rise is not None:
        kernel["time_blind"] = list(theta_0 + blind_rise + g.normal(0, 0.01, 6) + blind_offsets[seed % 3])
    kernel["standardized"] = {name: list(values) for name, values in kernel.items()}  # no scale effect
    run = {"seed": seed, "report": report, "reference": None, "kernel_locality_per_input": kernel,
           "sample_quality": {"score": 0.1, "noise": False},
           "retrieval_entropy": entropy_T if entropy_T is not None else [[0.9] * 4, [0.2 + 0.01 * seed + d for d in
                                                                                    (0.0, 0.02, -0.02, 0.01)]],
           "retrieval_entropy_theta_0": entropy_0 if entropy_0 is not None else [[0.9] * 4, [0.85] * 4]}
    if entropy_blind is not None:
        run["retrieval_entropy_time_blind"] = entropy_blind
        run["sample_quality_time_blind"] = {"score": 0.9 if blind_noise else 0.2, "noise": blind_noise}
    return run


def _mean_interval_of(per_seed_units: list[np.ndarray]):
    """The brute-force interval: over the seeds' means (several seeds), over the units (one)."""
    if len(per_seed_units) == 1:
        return common.mean_interval(np.asarray(per_seed_units[0], dtype=np.float64))
    return common.over_seeds([float(np.mean(u)) for u in per_seed_units])


def test_kernel_locality_null_that_rises_as_much_is_the_baseline_and_the_claim_fails():
    """Fails on the old code: the baseline was θ₀'s locality level (0.002 here) beside a θ_T − θ₀ rise of
    0.5, though the claim is judged against the time-blind denoiser, which rises as much (θ_T − time-blind
    +0.03, −0.03, 0 in the three seeds). Now the baseline is the null model's θ_T − θ₀ with its interval
    over seeds, value − baseline is the judged difference, and the claim is not held."""
    runs = [_run(s, rise=0.5, blind_rise=0.5, blind_offsets=(-0.03, 0.03, 0.0)) for s in range(3)]
    c = common.diffusion_claims(runs)["kernel_locality"]
    assert c["measured"] is True and c["interval"][0] > 0.4  # the rise from θ₀ is large ...
    assert c["held"] is False  # ... and the null model's is as large
    k = [r["kernel_locality_per_input"] for r in runs]
    null = _mean_interval_of([np.subtract(x["time_blind"], x["theta_0"]) for x in k])
    assert c["baseline"]["value"] == pytest.approx(null.estimate, abs=1e-12)
    assert c["baseline"]["interval"] == pytest.approx([null.low, null.high], abs=1e-12)
    assert c["baseline"]["value"] > 0.45 and c["baseline"]["what"].startswith("null model: time-blind denoiser")
    assert c["value"] - c["baseline"]["value"] == pytest.approx(c["beyond_time_blind"], abs=1e-12)
    level_0 = _mean_interval_of([np.asarray(x["theta_0"]) for x in k])
    assert c["theta_0"] == pytest.approx(level_0.estimate, abs=1e-12)  # θ₀'s level kept, in the extras


def test_kernel_locality_beyond_the_null_holds_with_the_null_as_baseline_on_the_same_units():
    """Fails on the old code (baseline θ₀'s level, 0.002, not the null model's rise 0.05). One seed: units
    are the clean inputs; a unit undefined in the null model (NaN, saved as null) is left out of value,
    baseline and their difference alike, so value − baseline is exactly the difference judged."""
    run = _run(0, rise=0.5, blind_rise=0.05)
    run["kernel_locality_per_input"]["time_blind"][2] = None
    c = common.diffusion_claims([run])["kernel_locality"]
    # one run compares θ_T with θ₀ and the null model, trained apart: not judged (common.ONE_RUN_WHY), numbers kept
    assert c["held"] is None and c["measured"] is False and c["why"] == common.ONE_RUN_WHY
    assert c["n"] == 5 and c["dropped"] == 1 and c["interval"][0] > 0
    k = run["kernel_locality_per_input"]
    keep = [i for i in range(6) if i != 2]
    blind = np.asarray(k["time_blind"], dtype=np.float64)[keep]
    null = common.mean_interval(blind - np.asarray(k["theta_0"])[keep])
    change = common.mean_interval(np.asarray(k["theta_T"])[keep] - np.asarray(k["theta_0"])[keep])
    assert c["baseline"]["value"] == pytest.approx(null.estimate, abs=1e-12) and 0.03 < null.estimate < 0.07
    assert c["baseline"]["interval"] == pytest.approx([null.low, null.high], abs=1e-12)
    assert c["value"] == pytest.approx(change.estimate, abs=1e-12)
    assert c["value"] - c["baseline"]["value"] == pytest.approx(c["beyond_time_blind"], abs=1e-12)


def test_retrieval_fall_that_the_null_model_shows_too_is_not_held():
    """Fails on the old code: judged against θ₀ alone (drop 0.05), a θ_T drop of 0.7 was held although the
    time-blind denoiser's samples (same initial noise) fall as much (±0.02 per sample). Now the baseline is
    the time-blind denoiser's drop − θ₀'s, per sample, and the claim is not held."""
    wobble = np.array([0.02, -0.02, 0.01, -0.01])
    blind = [[0.9] * 4, list(0.2 + wobble)]  # θ_T's last stage: 0.2, 0.22, 0.18, 0.21
    run = _run(0, entropy_blind=blind)
    c = common.diffusion_claims([run])["retrieval_broad_to_narrow"]
    assert c["interval"][0] > 0.5 and c["beyond_time_blind_interval"][0] < 0  # not beyond the null
    assert c["measured"] is False and c["held"] is None and c["why"] == common.ONE_RUN_WHY  # (and one run)
    null = common.mean_interval((0.9 - (0.2 + wobble)) - (0.9 - 0.85))
    assert c["baseline"]["value"] == pytest.approx(null.estimate, abs=1e-12)
    assert c["baseline"]["interval"] == pytest.approx([null.low, null.high], abs=1e-12)
    assert c["baseline"]["what"].startswith("null model: time-blind denoiser")
    assert c["value"] - c["baseline"]["value"] == pytest.approx(c["beyond_time_blind"], abs=1e-12)
    assert c["theta_0"] == pytest.approx(0.05, abs=1e-12)
    # a null model that does not fall: held, the same baseline rule
    flat = common.diffusion_claims([_run(0, entropy_blind=[[0.9] * 4, list(0.85 + wobble)])])["retrieval_broad_to_narrow"]
    assert flat["beyond_time_blind_interval"][0] > 0 and flat["held"] is None  # one run: not judged
    assert flat["baseline"]["value"] == pytest.approx(float(np.mean(-wobble)), abs=1e-12)
    seeds = [_run(s, entropy_blind=[[0.9] * 4, list(0.85 + wobble)]) for s in range(3)]
    assert common.diffusion_claims(seeds)["retrieval_broad_to_narrow"]["held"] is True  # three seeds: held


def test_retrieval_with_time_blind_samples_that_are_noise_is_judged_against_theta_0_and_says_so():
    """Fails on the old code (its baseline named θ₀ without saying the time-blind null was run and why it
    was not used). The null model's samples are noise by sample_quality's rule: its retrieval is not a usable
    null, so the claim rests on θ₀ alone and says which null was used."""
    runs = [_run(s, entropy_blind=[[0.9] * 4, [0.2] * 4], blind_noise=(s == 1)) for s in range(3)]
    for r, d in zip(runs, (0.0, 0.01, 0.02)):
        r["retrieval_entropy"] = [[0.9] * 4, [0.2 + d] * 4]
    c = common.diffusion_claims(runs)["retrieval_broad_to_narrow"]
    assert c["held"] is True  # against θ₀ only (the time-blind's drop, equal to θ_T's, is not used)
    assert c["baseline"]["value"] == pytest.approx(0.05, abs=1e-12)
    what = c["baseline"]["what"]
    assert what.startswith("θ₀") and "time-blind" in what and "noise" in what
    assert "0.90" in c["time_blind_null"] and "beyond_time_blind" not in c


def test_without_the_time_blind_run_the_baselines_say_the_null_was_not_run():
    """Fails on the old code (kernel baseline: θ₀'s level, 0.002, shown as if it were the null; retrieval
    baseline: θ₀ with no word of the missing null). Kernel: not measured, baseline value None, 'not run'
    (in which seeds, when some ran it); retrieval: judged against θ₀, its baseline saying the time-blind
    null was not run."""
    runs = [_run(s) for s in range(3)]
    claims = common.diffusion_claims(runs)
    k = claims["kernel_locality"]
    assert k["measured"] is False and k["held"] is None and "time-blind" in k["why"]
    assert k["baseline"]["value"] is None and "not run" in k["baseline"]["what"]
    r = claims["retrieval_broad_to_narrow"]
    assert r["held"] is True and r["baseline"]["value"] == pytest.approx(0.05, abs=1e-12)
    assert r["baseline"]["what"].startswith("θ₀") and "time-blind null model was not run" in r["baseline"]["what"]
    mixed = [_run(0, blind_rise=0.05, entropy_blind=[[0.9] * 4, [0.85] * 4]), _run(1), _run(2, blind_rise=0.05)]
    claims = common.diffusion_claims(mixed)
    assert "not run in seeds [1]" in claims["kernel_locality"]["baseline"]["what"]
    assert claims["kernel_locality"]["measured"] is False
    assert "not run in seeds [1, 2]" in claims["retrieval_broad_to_narrow"]["baseline"]["what"]


def test_protocol_runs_the_time_blind_retrieval_on_the_same_noise(monkeypatch):
    """Fails on the old code (no time-blind retrieval in the run). The time-blind denoiser here is the model
    itself (same initialization, batches and noise), so its retrieval, on the same initial noise, must give
    θ_T's entropies (to 1e-12) and the claim's baseline must equal its value: not held. Samples of so short a
    training are noise, so the limit is lifted to make the claim measured."""
    from genkernel.data import gaussian_ring
    from genkernel.diffusion import TimeIgnoringDenoiser, make_scheduler

    monkeypatch.setattr(common, "SAMPLE_NOISE_LIMIT", math.inf)
    s = dict(num_bins=3, num_probes=6, band=0, controls=1, reference="kernel", snapshot_every=0, kernel_every=0,
             kernel_points=3, kernel_sketch=None, warmup_steps=0, window_steps=3, batch_size=16, lr=2e-3,
             retrieval_samples=3, retrieval_train=16, retrieval_stages=3, inference_steps=6, checkpoint_every=0)
    spec = {
        "load": lambda sd: (gaussian_ring(32, num_modes=4, radius=2.0, std=0.05, seed=sd)[0],
                            gaussian_ring(16, num_modes=4, radius=2.0, std=0.05, seed=sd + 1000)[0]),
        "model": lambda: TimeIgnoringDenoiser(2, hidden=8), "time_blind": lambda: TimeIgnoringDenoiser(2, hidden=8),
        "scheduler": lambda: make_scheduler(50, "linear", "epsilon"), "retrieval": {}, "images": False,
    }
    args = argparse.Namespace(torch_device=torch.device("cpu"), mode="smoke", checkpoint_dir=None)
    run = common.diffusion_seed_run(spec, args, s, 0)[0]
    entropy = np.asarray(run["retrieval_entropy"], dtype=np.float64)
    blind = np.asarray(run["retrieval_entropy_time_blind"], dtype=np.float64)
    assert blind.shape == entropy.shape == (3, 3)
    np.testing.assert_allclose(blind, entropy, rtol=0, atol=1e-12)
    assert run["sample_quality_time_blind"]["score"] == pytest.approx(run["sample_quality"]["score"], abs=1e-12)
    assert run["timing"]["retrieval_time_blind_s"] > 0
    c = common.diffusion_claims([run])["retrieval_broad_to_narrow"]
    assert c["held"] is not True and c["baseline"]["value"] == pytest.approx(c["value"], abs=1e-12)


def test_every_level_traffic_claim_is_judged_against_the_tracked_null_model():
    """Fails on the old code: with the time-blind denoiser tracked over the same window (reference 'ledger'),
    the every-level traffic claim was held on 'above 0 at every level' while the null model showed the same
    locality (equal at every level up to ±0.02 per seed), and its baseline named the per-bin-parameter positive
    control (value None). Now it is held only beyond the null at every level, and its baseline is the null's
    value at the worst level, over seeds."""
    runs = [_run(s) for s in range(3)]
    for r, d in zip(runs, (0.02, -0.02, 0.0)):
        def shifted(cell, d=d):
            return {**cell, "difference": cell["difference"] + d, "interval": [v + d for v in cell["interval"]]}

        rows = [{**row, "traffic": shifted(row["traffic"])} for row in r["report"]["locality"]["per_level"]]
        r["reference"] = {"locality": {"per_level": rows}}
    c = common.diffusion_claims(runs)["traffic_locality_every_level"]
    assert c["interval"][0] > 0.45 and c["held"] is False
    null = common.over_seeds([0.52, 0.49, 0.52])
    assert c["baseline"]["value"] == pytest.approx(null.estimate, abs=1e-12)
    assert c["baseline"]["interval"] == pytest.approx([null.low, null.high], abs=1e-12)
    assert c["baseline"]["what"].startswith("null model: time-blind denoiser")
    assert c["value"] - c["baseline"]["value"] == pytest.approx(c["beyond_null"], abs=1e-12)
    # one run: the levels' intervals cannot be paired (per-probe values are not saved): held only where the run's
    # interval lies above the null's at every level; here they overlap
    one = common.diffusion_claims([runs[0]])["traffic_locality_every_level"]
    assert one["held"] is None and one["why"] == common.ONE_RUN_WHY  # one run against a null model: not judged
    assert one["baseline"]["value"] == pytest.approx(0.52, abs=1e-12)
    assert one["baseline"]["interval"] == pytest.approx([0.42, 0.62], abs=1e-12)
    # without the null: held on the levels alone, its baseline saying no null model was run
    c = common.diffusion_claims([_run(s) for s in range(3)])["traffic_locality_every_level"]
    assert c["held"] is True and c["baseline"]["value"] is None and "was not run" in c["baseline"]["what"]


def test_traffic_locality_and_its_null_rest_on_the_same_levels():
    """Fails on the old code: a probe level undefined in the null model's ledger (NaN, saved as null) was left
    out of the baseline but not of the value (value 0.6 over three levels, baseline over two), so value −
    baseline (0.6 − 0.25 = 0.35) was not the judged beyond_null (0.3). Now both rest on the same levels."""
    run = _run(0)
    diffs = (0.5, 0.6, 0.7)
    for row, d in zip(run["report"]["locality"]["per_level"], diffs):
        row["traffic"] = {**row["traffic"], "difference": d, "interval": [d - 0.1, d + 0.1]}
    null = [0.2, 0.3, None]
    run["reference"] = {"locality": {"per_level": [
        {**row, "traffic": {**row["traffic"], "difference": v}} for row, v in zip(run["report"]["locality"]["per_level"], null)]}}
    c = common.diffusion_claims([run])["traffic_locality"]
    assert c["value"] == pytest.approx(0.55, abs=1e-12) and c["n"] == 2 and c["dropped"] == 1
    assert c["baseline"]["value"] == pytest.approx(0.25, abs=1e-12)
    assert c["value"] - c["baseline"]["value"] == pytest.approx(c["beyond_null"], abs=1e-12)
