"""Review of genkernel.diffusion.retrieval and genkernel.analysis.neighbors: the retrieval kernel of a
conditional denoiser on a DDIM chain against per-example Jacobians, its weights against numpy, ties in the
top training indices, argument checks before sampling, and bad neighbourhood inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from genkernel.analysis.neighbors import euclidean_neighbors
from genkernel.diffusion import make_scheduler, retrieval_attribution, reverse_sample
from genkernel.diffusion.objectives import noisy_input
from test_ddpm_trainer import ring
from test_lr_schedules_review import ConditionalDenoiser, jacobian

F64 = torch.float64
T = 50

pytestmark = pytest.mark.usefixtures("one_thread")


class TimeOnly(nn.Module):
    """``model(x_t, t)`` = W φ(t) + b (+ 0·x_t): every state at one level has the same parameter gradient, so
    k̂ is 1 for every training input, exactly: all ties."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x, t):
        features = torch.stack([torch.sin(t * 0.01 * k) for k in range(1, 5)], dim=1).to(x.dtype)
        return self.lin(features) + 0 * x


def test_tied_top_indices_go_to_the_lower_index_whatever_the_pool_size():
    """fails on old code: Tensor.topk breaks ties in an N-dependent order ([8, 6, 7] of 10 inputs, [28, 26, 27] of
    40); the top indices must be a stable argsort of −k̂ (lower index first), so a pool's first inputs keep
    their ranks when the pool grows."""
    model = TimeOnly()
    pool = torch.randn(40, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for n in (10, 40):
        result = retrieval_attribution(model, make_scheduler(T), pool[:n], num_samples=2, stages=[30, 5],
                                       num_inference_steps=10, top_k=3)
        assert torch.equal(result.kernel, result.kernel[..., :1].expand_as(result.kernel))  # exact ties in each row
        torch.testing.assert_close(result.kernel, torch.ones_like(result.kernel), rtol=0, atol=1e-15)
        reference = np.argsort(-result.kernel.numpy(), axis=-1, kind="stable")[..., :3]
        assert np.array_equal(result.top_indices.numpy(), reference)
        assert result.top_indices.tolist() == [[[0, 1, 2]] * 2] * 2


def test_top_indices_without_ties_are_the_largest_kernel_entries_in_order():
    """coverage: on a model without ties the stable sort gives what topk gave, largest k̂ first."""
    model = ConditionalDenoiser()
    train, train_labels = ring(7, seed=8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    result = retrieval_attribution(model, make_scheduler(T), train, num_samples=2, stages=[40, 3], top_k=4,
                                   num_inference_steps=10, conditioning=torch.tensor([1, 2]),
                                   train_conditioning=train_labels)
    assert torch.equal(result.top_indices, result.kernel.topk(4, dim=-1).indices)


@pytest.mark.parametrize("name, value, error", [
    ("top_k", 2.0, ValueError), ("top_k", True, ValueError), ("num_samples", 2.0, ValueError),
    ("num_samples", 0, ValueError), ("num_stages", 2.5, ValueError), ("num_stages", 0, ValueError),
])
def test_counts_are_refused_by_name_before_sampling(name, value, error):
    """fails on old code: a float or bool top_k passed the range check and failed after sampling in torch's
    words (topk(): argument 'k' must be int), num_samples=2.0 in randn's, num_samples=0 as "x1 is empty"."""
    kwargs = {"num_samples": 2, "num_stages": 2, "top_k": 2, name: value}
    with pytest.raises(error, match=name):
        retrieval_attribution(TimeOnly(), make_scheduler(T), ring(4), num_inference_steps=5, **kwargs)


def test_numpy_integer_counts_are_accepted():
    """coverage: NumPy integers (counts computed with NumPy) work as ints."""
    result = retrieval_attribution(TimeOnly(), make_scheduler(T), ring(4), num_samples=np.int64(2),
                                   num_stages=np.int64(2), top_k=np.int32(2), num_inference_steps=5)
    assert result.top_indices.shape == (2, 2, 2) and result.kernel.shape == (2, 2, 4)


def test_conditional_retrieval_on_a_ddim_chain_against_per_example_jacobians():
    """coverage: unguided conditional model, DDIM with 10 of 50 steps: the kept states are reverse_sample's,
    k̂ equals per-example float64 Jacobians of (x_s, s, y_sample) against (z_n, s, y_n) with z_n noised by the
    fixed seed + 7 noise (1e-9), and entropy and top share equal numpy's formulas on that kernel."""
    from diffusers import DDIMScheduler

    scheduler = make_scheduler(T)
    model = ConditionalDenoiser(seed=3)
    train, train_labels = ring(6, seed=5), torch.tensor([2, 0, 1, 1, 0, 2])
    labels = torch.tensor([1, 0, 2])
    sampler = DDIMScheduler.from_config(scheduler.config)
    result = retrieval_attribution(model, scheduler, train, num_samples=3, stages=[47, 24, 2], top_k=2,
                                   num_inference_steps=10, seed=5, sampler=sampler, conditioning=labels,
                                   train_conditioning=train_labels)
    samples, kept = reverse_sample(model, scheduler, (3, 2), num_inference_steps=10, seed=5, keep=[47, 24, 2],
                                   sampler=DDIMScheduler.from_config(scheduler.config), conditioning=labels)
    assert result.stages.tolist() == sorted(kept, reverse=True) and len(kept) == 3
    assert torch.equal(result.samples, samples)
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(5 + 7), dtype=F64)
    for k, stage in enumerate(result.stages.tolist()):
        assert torch.equal(result.states[k], kept[stage])
        t = torch.tensor(stage)
        z = noisy_input(scheduler, train, noise, torch.full((6,), stage))
        a = torch.stack([jacobian(model, x, t, y).reshape(-1) for x, y in zip(kept[stage], labels)])
        b = torch.stack([jacobian(model, x, t, y).reshape(-1) for x, y in zip(z, train_labels)])
        expected = (a @ b.T) / a.norm(dim=1)[:, None] / b.norm(dim=1)[None, :]
        torch.testing.assert_close(result.kernel[k], expected, rtol=1e-9, atol=1e-12)
    kernel = result.kernel.numpy()
    weights = np.maximum(kernel, 0)
    for k in range(3):
        for s in range(3):
            w = weights[k, s]
            if w.sum() == 0:
                assert math.isnan(result.entropy[k, s]) and math.isnan(result.top_share[k, s])
                continue
            p = w / w.sum()
            entropy = -sum(v * math.log(v) for v in p if v > 0) / math.log(6)
            assert result.entropy[k, s].item() == pytest.approx(entropy, rel=1e-12, abs=1e-15)
            top = np.argsort(-kernel[k, s], kind="stable")[:2]
            assert result.top_indices[k, s].tolist() == top.tolist()
            assert result.top_share[k, s].item() == pytest.approx(p[top].sum(), rel=1e-12, abs=1e-15)


# -- neighbours -----------------------------------------------------------------------------
def test_euclidean_neighbors_refuse_points_without_features():
    """fails on old code: D = 0 made every distance 0 and returned the first k indices as the "nearest"."""
    with pytest.raises(ValueError, match="D = 0"):
        euclidean_neighbors(torch.zeros(2, 0), torch.zeros(5, 0), 3)


def test_a_non_matrix_names_the_fix():
    """coverage: images [N, C, H, W] are refused with the flattening that fixes them."""
    with pytest.raises(ValueError, match="flatten"):
        euclidean_neighbors(torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2), 1)


def test_default_stages_under_flow_matching_start_at_the_samplers_noisiest_step():
    """fails on old code: the default stages ran from T − 1 (DDPM's noisiest timestep) under flow matching too,
    where the noisiest level is t = T (σ = 1, the Euler sampler's first step); with 50 steps on T = 50, T − 1 = 49
    snapped to the 4th step (49.0, after 50, 49.68, 49.34), so the "noisiest" stage of the claim was not."""
    from genkernel.diffusion import make_flow_scheduler
    from genkernel.diffusion.trainer import make_sampler

    scheduler = make_flow_scheduler(T, shift=3.0)
    sampler = make_sampler(scheduler, None)
    sampler.set_timesteps(T)
    steps = [float(t) for t in sampler.timesteps]
    model = ConditionalDenoiser(continuous=True).net
    result = retrieval_attribution(model, scheduler, ring(4, seed=2), num_samples=2, num_stages=2, top_k=2,
                                   num_inference_steps=T)
    assert result.stages.tolist() == [steps[0], steps[-1]] and steps[0] == T
    # the state at σ = 1 is the initial noise, and the training inputs there are their noise alone
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(result.states[0], noise)
