"""Fuzz of the diffusion analyzer over random combinations (helper "dfuzz", session 42).

The fuzzer (kept outside the repository) ran random combinations of noise process, schedule, prediction type,
density, weighting, model, dtype, optimizer, lr schedule, micro-batches, clipping, EMA, bins, controls,
quadrature, group state, trainer / observed loop / analyzer.step, track_steps windows and save/load, and checked
each against references written independently of genkernel. These tests pin what it found.
"""
import warnings

import pytest
import torch

from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_float32_ema_ledger_is_not_refused_when_the_steps_shrink():
    """A float32 class-conditional UNet trained by flow matching (SD3's σ⁻² weighting, global-norm clipping, SGD
    with weight decay, a StepLR halving the rate every step) with diffusers' EMAModel: four steps train, and the
    EMA weights' ledger adds up to the EMA's real change of the probes' outputs (checked here against a forward at
    the EMA weights before and after, 1e-4 of the change).

    Fails on the old code: reading the EMA ledger after step 4 raised LedgerCheckError ("the EMA offsets of
    'up_blocks.0.resnets.0.norm1.bias' do not add up to the EMA's move"): the offsets carry the error of the
    earlier steps' fitted (1 − β) (imprecise where the moves are a few ulps of the weights), up to 1.0e-11 on a
    move of 1.0e-9, which the check compared against the floor of the current, smaller move alone
    (core/tracking/ema.py: EMALedgers.sync). The next step of training would have been refused the same way."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    warnings.filterwarnings("ignore")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    torch.manual_seed(51)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        layers_per_block=1, norm_num_groups=4, add_attention=False, num_class_embeds=4)
    g = torch.Generator().manual_seed(44)
    x = torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64).float() * 0.5
    labels = (torch.arange(32) % 8) % 3
    analyzer = NoiseLevelAnalyzer(scheduler, x[:16], probe_conditioning=(labels[:16] % 4,), num_bins=4, band=0,
                                  controls=1, quadrature="simpson", num_probes=5, kernel_points=2, seed=44,
                                  progress=False, num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.01)
    ema = EMAModel(model.parameters(), decay=0.8)
    trainer = DDPMTrainer(model, scheduler, x, labels=labels, conditional=True, optimizer=optimizer,
                          lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), batch_size=8,
                          micro_batches=3, max_grad_norm=0.5, loss_weighting="sigma_sqrt", ema=ema, seed=44,
                          callbacks=[analyzer], progress=False)

    def ema_outputs():
        live = [p.detach().clone() for p in model.parameters()]
        ema.copy_to(model.parameters())
        z, t, y = analyzer.probes(next(model.parameters()))
        with torch.no_grad():
            out = model.eval()(z, t, y).sample.reshape(z.shape[0], -1).double()
        for p, v in zip(model.parameters(), live):
            p.data.copy_(v)
        return out

    before = ema_outputs()
    trainer.train(4)
    ledger = analyzer.ema_ledgers["level"]  # (the sync of step 4's EMA update)
    change = ema_outputs() - before
    booked = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    assert float((booked - change).norm()) <= 1e-4 * float(change.norm())
    assert float(ledger.residual.norm()) <= 1e-3 * float(change.norm())


def test_an_output_that_overflowed_is_not_called_random():
    """The eval-mode repeatability check (core/engine/kernels.py: repeatable_output) of a model whose output
    overflows to inf on the same input twice: the two passes agree, so the output is returned (the non-finite
    kernel is refused later as non-finite, with its own words).

    Fails on the old code: _close took inf − inf = NaN as a difference and refused the model as "not deterministic
    in eval mode ... noise injection, F.dropout ..." (the fuzzer's flow-matching run with SD3's σ⁻² weighting and
    no clipping diverged to weights of 1.9e17 and was refused so at its fourth step)."""
    from genkernel.core.engine.kernels import repeatable_output

    model = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.fill_(1e308)
        model.bias.zero_()
    x = torch.full((1, 2), 10.0, dtype=torch.float64)
    out = repeatable_output(model, (x,), dict(model.named_parameters()), "x")
    assert out.shape == (1, 2) and bool(torch.isinf(out).all())
