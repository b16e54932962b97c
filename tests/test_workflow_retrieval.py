"""Retrieval along reverse sampling and kernel locality, against brute-force references.

The kernel is checked with explicit per-example autograd loops in float64; locality statistics
with explicit loops over the definitions in the docstrings.
"""

import math

import numpy as np
import pytest
import torch

from genkernel.diffusion import MLPDenoiser, make_scheduler, retrieval_attribution
from genkernel.diffusion.locality import kernel_locality, locality_per_input, locality_pseudo_values

F64 = torch.float64
T = 20


def _jacobian(model, x, t):
    """[d, P] float64 Jacobian of model(x[None], t[None]) by one backward pass per output."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x[None], t[None]).reshape(-1)
    rows = []
    for j in range(out.numel()):
        grads = torch.autograd.grad(out[j], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).to(F64))
    return torch.stack(rows)


def _normalized_kernel(model, xs, ts, zs, us):
    ja = [_jacobian(model, x, t) for x, t in zip(xs, ts)]
    jb = [_jacobian(model, z, u) for z, u in zip(zs, us)]
    k = torch.tensor([[float((a * b).sum()) for b in jb] for a in ja], dtype=F64)
    da = torch.tensor([float((a * a).sum()) for a in ja], dtype=F64).sqrt()
    db = torch.tensor([float((b * b).sum()) for b in jb], dtype=F64).sqrt()
    return k / (da[:, None] * db[None, :])


def _setup():
    torch.manual_seed(0)
    model = MLPDenoiser(data_dim=2, hidden=8, depth=1, time_dim=4).double()
    return model, make_scheduler(T), torch.randn(5, 2, dtype=F64)


def test_retrieval_takes_stages_as_a_tensor_or_array_and_matches_brute_force():
    """stages as a Tensor (unsorted, repeated) or a NumPy array, as a list would be; every stage's
    kernel against the training inputs (their index order kept) by explicit autograd, its entropy,
    top indices and top share from the definitions."""
    model, scheduler, train = _setup()
    as_list = retrieval_attribution(model, scheduler, train, num_samples=2, stages=[0, 19, 10, 10],
                                    num_inference_steps=None, top_k=2, seed=3)
    for stages in (torch.tensor([0, 19, 10, 10]), np.array([0, 19, 10, 10])):
        got = retrieval_attribution(model, scheduler, train, num_samples=2, stages=stages, num_inference_steps=None,
                                    top_k=2, seed=3)
        assert got.stages.tolist() == as_list.stages.tolist() == [19, 10, 0]
        torch.testing.assert_close(got.kernel, as_list.kernel, rtol=0, atol=0)
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(3 + 7), dtype=F64)
    model.eval()
    for k, s in enumerate(got.stages.tolist()):
        a = scheduler.alphas_cumprod[s].to(F64)
        z = a.sqrt() * train + (1 - a).sqrt() * noise
        ref = _normalized_kernel(model, got.states[k], torch.full((2,), s), z, torch.full((5,), s))
        torch.testing.assert_close(got.kernel[k], ref, rtol=0, atol=1e-12)
        for i in range(2):
            w = ref[i].clamp_min(0)
            p = w / w.sum()
            entropy = -sum(float(v) * math.log(float(v)) for v in p if v > 0) / math.log(5)
            assert abs(float(got.entropy[k, i]) - entropy) < 1e-12
            top = sorted(range(5), key=lambda j: -float(ref[i, j]))[:2]
            assert sorted(got.top_indices[k, i].tolist()) == sorted(top)
            assert abs(float(got.top_share[k, i]) - float(p[top].sum())) < 1e-12


def test_retrieval_refuses_empty_and_out_of_range_stages():
    """A stage outside [0, T) was snapped silently to the first or last reverse step; an empty
    list crashed in torch.stack."""
    model, scheduler, train = _setup()
    for stages, match in (([], "stages is empty"), ([T + 5, 0], r"stages must lie in \[0, 20\)"),
                          ([-3, 10], r"stages must lie in \[0, 20\)")):
        with pytest.raises(ValueError, match=match):
            retrieval_attribution(model, scheduler, train, num_samples=2, stages=stages, num_inference_steps=None,
                                  top_k=2)


def test_retrieval_claim_needs_two_stages():
    """With one stage (num_stages=1, or two requested stages snapped to one reverse step) the claim
    compared a stage with itself and reported a difference of exactly 0."""
    model, scheduler, train = _setup()
    one = retrieval_attribution(model, scheduler, train, num_samples=2, num_stages=1, num_inference_steps=None, top_k=2)
    snapped = retrieval_attribution(model, scheduler, train, num_samples=2, stages=[19, 17], num_inference_steps=2,
                                    top_k=2)
    for result in (one, snapped):
        assert result.stages.numel() == 1
        with pytest.raises(ValueError, match="at least two stages"):
            result.claim()
        assert result.to_json()["entropy_high_minus_low"] is None


def _random_kernel(n, levels, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * levels, 6, generator=g, dtype=F64)
    k = x @ x.T
    d = k.diagonal().sqrt()
    return k / d[:, None] / d[None, :]


def test_kernel_locality_same_input_profile_leaves_out_a_state_against_itself():
    """by_distance_same_input is k̂ between the same clean input at two levels: at |Δbin| = 0 it
    averaged in each state's k̂ with itself (1), e.g. 0.40 for a true -0.36 with two levels per bin,
    and 1 (not NaN) with one level per bin."""
    n = 4
    for bins in ([0, 0, 2, 2, 1], [0, 1, 2, 3], [2, 0, 1, 0]):
        levels = len(bins)
        k = _random_kernel(n, levels)
        got = kernel_locality(k, n, torch.tensor(bins), 1, num_permutations=2)["by_distance_same_input"]
        for delta in range(max(bins) + 1):
            values = [float(k[i * levels + a, i * levels + b]) for i in range(n) for a in range(levels)
                      for b in range(levels) if a != b and abs(bins[a] - bins[b]) == delta]
            if values:
                assert abs(got[delta] - sum(values) / len(values)) < 1e-12
            else:
                assert math.isnan(got[delta])


def test_kernel_locality_below_three_inputs_reports_no_interval():
    """With 2 inputs there is no jackknife; the fallback t-interval over the two per-input values
    (which share every kernel entry) held on an unstructured random kernel."""
    k = _random_kernel(2, 3)
    result = kernel_locality(k, 2, torch.arange(3), 1, num_permutations=4)["locality"]
    assert math.isfinite(result["difference"])
    assert all(math.isnan(v) for v in result["interval"]) and result["held"] is False
    assert result["method"] == "jackknife-t"


def test_locality_functions_check_their_arguments():
    """level_bins as a list works as a Tensor does; a negative band (every state outside: NaN
    everywhere) and num_permutations=0 (no control) are refused by name."""
    n, bins = 4, [0, 1, 2]
    k = _random_kernel(n, 3)
    for fn in (locality_per_input, locality_pseudo_values):
        ref = fn(k, n, torch.tensor(bins), 1, num_permutations=3)
        got = fn(k, n, bins, 1, num_permutations=3)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    for fn in (kernel_locality, locality_per_input, locality_pseudo_values):
        with pytest.raises(ValueError, match="band"):
            fn(k, n, torch.tensor(bins), -1)
        with pytest.raises(ValueError, match="num_permutations"):
            fn(k, n, torch.tensor(bins), 1, num_permutations=0)
        with pytest.raises(TypeError, match="level_bins"):
            fn(k, n, torch.tensor([0.0, 1.0, 2.0]), 1)


def test_kernel_locality_says_why_there_is_no_number():
    """A band that covers every level (or a single bin) leaves nothing outside it: the locality is
    NaN, and the result says why instead of a bare NaN."""
    k = _random_kernel(4, 3)
    for bins, band in (([0, 1, 2], 2), ([0, 1, 2], 7), ([0, 0, 0], 0)):
        result = kernel_locality(k, 4, torch.tensor(bins), band, num_permutations=2)["locality"]
        assert math.isnan(result["difference"]) and result["held"] is False
        assert "outside the band" in result["why"]
    result = kernel_locality(_random_kernel(2, 3), 2, torch.arange(3), 1, num_permutations=2)["locality"]
    assert "at least 3" in result["why"]
