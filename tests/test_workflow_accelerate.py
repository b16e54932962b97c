"""End-to-end workflow review (diffusers-style accelerate script): the retrieval analysis of a
class-conditional UNet2DModel, checked against a float64 brute-force kernel."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402  (diffusers imports its classes lazily)

from genkernel.diffusion import retrieval_attribution, reverse_sample  # noqa: E402

T = 20
CLASSES = 3


def conditional_unet() -> torch.nn.Module:
    """A tiny float64 class-conditional ``UNet2DModel`` (``num_class_embeds``): ``model(x, t, labels)``."""
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=4, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=2, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, num_class_embeds=CLASSES,
    )
    return model.double()


def brute_force_kernel(model, states, others) -> torch.Tensor:
    """Normalized trace kernel ``[S, N]`` from explicit per-state Jacobians (one backward per output)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def jacobian(inputs):
        out = model(*inputs).sample.reshape(-1)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
                for i in range(out.numel())]
        return torch.stack(rows)  # [d, P]

    def one(tensors, i):
        return tuple(t[i : i + 1] for t in tensors)

    left = [jacobian(one(states, i)) for i in range(states[0].shape[0])]
    right = [jacobian(one(others, j)) for j in range(others[0].shape[0])]
    k = torch.tensor([[float((a * b).sum()) for b in right] for a in left], dtype=torch.float64)
    da = torch.tensor([float((a * a).sum()) for a in left], dtype=torch.float64)
    db = torch.tensor([float((b * b).sum()) for b in right], dtype=torch.float64)
    return k / (da[:, None] * db[None, :]).sqrt()


def test_retrieval_of_a_class_conditional_unet_takes_both_sides_conditioning_and_matches_brute_force():
    # retrieval_attribution took no conditioning: a UNet2DModel(num_class_embeds=...) failed inside
    # diffusers ("class_labels should be provided when doing class conditioning"), so the retrieval view
    # was unavailable for every class-conditional model the analyzer itself supports.
    model = conditional_unet().eval()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    generator = torch.Generator().manual_seed(3)
    train = torch.rand(4, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    train_labels = torch.tensor([0, 1, 2, 1])
    sample_labels = torch.tensor([2, 0])
    seed = 1
    result = retrieval_attribution(model, scheduler, train, num_samples=2, stages=[T - 1, 0], num_inference_steps=4,
                                   top_k=2, seed=seed, conditioning=sample_labels, train_conditioning=train_labels)
    # the samples are those of the conditional chain
    samples, _ = reverse_sample(model, scheduler, (2, 1, 4, 4), num_inference_steps=4, seed=seed,
                                conditioning=sample_labels)
    assert torch.equal(result.samples, samples)
    # the kernel between (x_s, s, y_sample) and (z_n, s, y_n): the training inputs' fixed noise is the
    # documented one seeded by ``seed`` (generator seed + 7, float64)
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    for k, s in enumerate(result.stages.tolist()):
        t_train = torch.full((4,), s, dtype=torch.long)
        z_train = scheduler.add_noise(train, noise, t_train)
        t_samples = torch.full((2,), s, dtype=torch.long)
        expected = brute_force_kernel(model, (result.states[k], t_samples, sample_labels),
                                      (z_train, t_train, train_labels))
        torch.testing.assert_close(result.kernel[k], expected, rtol=1e-10, atol=1e-12)
    # the training labels are used: other labels give another kernel
    other = retrieval_attribution(model, scheduler, train, num_samples=2, stages=[T - 1, 0], num_inference_steps=4,
                                  top_k=2, seed=seed, conditioning=sample_labels,
                                  train_conditioning=torch.tensor([2, 2, 0, 0]))
    assert torch.equal(other.samples, result.samples)
    assert (other.kernel - result.kernel).abs().max() > 1e-6


def test_retrieval_with_one_sided_or_misshapen_conditioning_is_refused():
    model = conditional_unet().eval()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    train = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    kwargs = dict(num_samples=2, stages=[0], num_inference_steps=2, top_k=1)
    with pytest.raises(ValueError, match="class_labels should be provided.*needs conditioning=.*train_conditioning="):
        retrieval_attribution(model, scheduler, train, **kwargs)  # diffusers' own words, then the fix
    with pytest.raises(ValueError, match="train_conditioning"):
        retrieval_attribution(model, scheduler, train, conditioning=torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match="train_conditioning needs one row per training input"):
        retrieval_attribution(model, scheduler, train, conditioning=torch.tensor([0, 1]),
                              train_conditioning=torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match="one row per sample"):
        retrieval_attribution(model, scheduler, train, conditioning=torch.tensor([0, 1, 2]),
                              train_conditioning=torch.tensor([0, 1, 2]), **kwargs)


def test_observing_after_the_backward_names_the_order_to_fix():
    # A loop that called analyzer.observe after accelerator.backward got torch's "Trying to backward
    # through the graph a second time ... Specify retain_graph=True", which points away from the fix.
    from genkernel.diffusion import MLPDenoiser, NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    scheduler = make_scheduler(T)
    model = MLPDenoiser(2, hidden=8, depth=1, time_dim=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    analyzer = NoiseLevelAnalyzer(scheduler, torch.randn(4, 2), num_bins=2, num_probes=2, kernel_points=2,
                                  controls=0, progress=False)
    analyzer.bind(model, optimizer)
    x0, noise, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([1, 5, 10, 19])
    losses = ((model(scheduler.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1)
    losses.mean().backward()
    with pytest.raises(RuntimeError, match="call observe before"):
        analyzer.observe(losses, t)


def test_float32_adamw_with_default_weight_decay_is_not_refused_for_its_own_decay_rounding():
    # Found in a diffusers-style float32 script (AdamW lr 1e-4, weight_decay 1e-2, GroupNorm weights
    # near 1): PyTorch multiplies θ by (1 − η λ) rounded to float32 (1 − 1e-6 becomes 1 − 1.0133e-6), while
    # the split booked −η λ θ in the rest row; the 3e-8 |θ| difference plus the step's own roundings
    # exceeded the one-ulp allowance and the step was refused ("was the optimizer's state or
    # hyperparameters changed ...?"). The splitter now books the decay applied, 1 − fl(1 − η λ).
    from genkernel import PathKernelTracker

    class Scale(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.w = torch.nn.Parameter(1 + 1e-3 * torch.rand(n))  # like normalization weights

        def forward(self, x):
            return (x * self.w).sum(-1, keepdim=True) / x.shape[-1] ** 0.5

    torch.manual_seed(0)
    model = Scale(2048)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    x, y = torch.randn(8, 2048), torch.randn(8, 1)
    tracker = PathKernelTracker(model, optimizer, lambda out, target: ((out - target) ** 2).mean(dim=1),
                                probes=torch.randn(2, 2048), num_groups=2)
    reference = Scale(2048)
    reference.load_state_dict(model.state_dict())
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=1e-2)
    for _ in range(6):
        tracker.step(x, y, torch.arange(8) % 2)
        reference_optimizer.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        reference_optimizer.step()
    assert tracker.ledger.steps == 6 and torch.equal(model.w, reference.w)
    ledger = tracker.ledger
    identity = ledger.contributions.sum(1) + ledger.rest + ledger.residual - (ledger.f_end - ledger.f_start)
    assert float(identity.abs().max()) < 1e-12 and ledger.relative_residual() < 1e-2
