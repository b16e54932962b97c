"""LoRA fine-tuning of a diffusers UNet (peft adapters through diffusers' ``add_adapter``, the
DreamBooth-LoRA and SD-LoRA scripts' path): a frozen base, low-rank adapters on the attention
projections, text conditioning (``encoder_hidden_states``), AdamW with weight decay, and the
analyzer observing the loop. Coverage: the ledger equals a float64 brute force written by hand
(per-example autograd over the trainable parameters only, AdamW by hand), the frozen base never
moves, and training is bit-identical with and without the analyzer, for DDPM and flow matching.
"""

from __future__ import annotations

import pytest
import torch

from genkernel.diffusion import NoiseLevelAnalyzer, make_flow_scheduler, make_scheduler, noisy_input, training_target
from test_flow_matching_review import brute_force_adamw, close

pytest.importorskip("peft")

F64 = torch.float64
T = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).double()
    unet.requires_grad_(False)  # the scripts freeze the base, then add the adapters
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return unet


def fine_tune(scheduler, *, analyze: bool, steps: int = 3, batch: int = 3):
    """An observed LoRA loop; returns (unet, analyzer or None, the steps' examples for the brute force)."""
    unet = lora_unet()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(1)
    probes = torch.randn(4, 2, 4, 4, generator=gen, dtype=F64)
    probe_text = torch.randn(4, 3, 8, generator=gen, dtype=F64)
    analyzer = None
    if analyze:
        analyzer = NoiseLevelAnalyzer(scheduler, probes, num_bins=3, num_probes=3, controls=0, kernel_points=2,
                                      probe_conditioning=probe_text, progress=False)
        analyzer.bind(unet, optimizer)
    examples = []
    for _ in range(steps):
        x0 = torch.randn(batch, 2, 4, 4, generator=gen, dtype=F64)
        noise, text = torch.randn_like(x0), torch.randn(batch, 3, 8, generator=gen, dtype=F64)
        levels = torch.randint(0, T, (batch,), generator=gen)
        t = levels.float() + 0.5 if scheduler.config.get("shift") is not None else levels  # flow: real levels
        z, target = noisy_input(scheduler, x0, noise, t), training_target(scheduler, x0, noise, t)
        losses = ((unet(z, t, text).sample - target) ** 2).mean(dim=(1, 2, 3))
        if analyzer is not None:
            analyzer.observe(losses, t)
            bins = analyzer.bins(t)
            examples.append([((z[n : n + 1], t[n : n + 1], text[n : n + 1]), target[n : n + 1], 1 / batch, int(bins[n]))
                             for n in range(batch)])
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return unet, analyzer, examples


@pytest.mark.parametrize("objective", ["ddpm", "flow_matching"])
def test_a_lora_fine_tune_keeps_an_exact_ledger_and_trains_as_without_the_analyzer(objective):
    scheduler = make_flow_scheduler(T, shift=3.0) if objective == "flow_matching" else make_scheduler(T)
    base = lora_unet()
    unet, analyzer, examples = fine_tune(scheduler, analyze=True)
    bare, _, _ = fine_tune(scheduler, analyze=False)
    assert all(torch.equal(p, q) for p, q in zip(unet.parameters(), bare.parameters()))
    frozen = [(n, p) for n, p in unet.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in frozen)
    assert not all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in unet.named_parameters() if p.requires_grad)
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    expected, _, reference, _ = brute_force_adamw(lora_unet(), examples, probes, 3, lr=1e-3, weight_decay=1e-2)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-13) for p, q in zip(unet.parameters(), reference.parameters()))
    ok, gap = close(analyzer.contributions, expected, 1e-9)
    assert ok, gap
    assert analyzer.residual()["relative_residual"] < 1e-3
