"""A researcher's own diffusion loop end to end: a class-conditional diffusers UNet, DDPMScheduler,
AdamW with warm-up and norm clipping, diffusers' EMAModel, the analyzer observing, a checkpoint and a
resume in fresh objects."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from genkernel.diffusion import NoiseLevelAnalyzer  # noqa: E402

CLASSES, BATCH = 3, 4


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=CLASSES).double()


def _run(scheduler, probe_x, probe_y):
    model = _unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    analyzer = NoiseLevelAnalyzer(scheduler, probe_x, num_bins=3, num_probes=3, controls=0, probe_conditioning=probe_y,
                                  num_classes=CLASSES, progress=False, snapshot_every=0, kernel_points=2)
    return model, optimizer, warmup, ema, analyzer


def _probes_and_batches(seed: int, steps: int):
    """Probe images and classes ``[3, 1, 8, 8]``, ``[3]``, and ``steps`` batches of (clean images,
    classes, timesteps, noise), from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    probe_x, probe_y = torch.randn(3, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (3,), generator=g)
    batches = [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g),
                torch.randint(0, 100, (BATCH,), generator=g), torch.randn(BATCH, 1, 8, 8, generator=g))
               for _ in range(steps)]
    return probe_x, probe_y, batches


def _train(objects, scheduler, batches):
    model, optimizer, warmup, ema, analyzer = objects
    for x0, y, t, noise in batches:
        losses = ((model(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample - noise) ** 2).mean(dim=(1, 2, 3))
        analyzer.observe(losses, t, class_labels=y)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
        ema.step(model.parameters())


def test_resumed_loop_that_counts_from_zero_again_is_refused_and_the_step_count_continues():
    """A resumed loop that binds without ``start_step`` numbered its steps 1, 2, ... again (global
    steps [1, 2, 1], the history and logs with two step 1s); the GAN analyzer already refuses it. Now
    refused before any hook is attached, and a bind with the checkpoint's step count continues the
    uninterrupted run exactly (ledgers, EMA ledgers and step numbers)."""
    torch.set_default_dtype(torch.float64)
    try:
        scheduler = DDPMScheduler(num_train_timesteps=100)
        probe_x, probe_y, batches = _probes_and_batches(1, 3)

        full = _run(scheduler, probe_x, probe_y)
        full[4].bind(full[0], full[1], ema=full[3])
        _train(full, scheduler, batches)

        first = _run(scheduler, probe_x, probe_y)
        first[4].bind(first[0], first[1], ema=first[3])
        _train(first, scheduler, batches[:2])
        saved = [o.state_dict() for o in first]

        resumed = _run(scheduler, probe_x, probe_y)
        for obj, state in zip(resumed, saved):
            obj.load_state_dict(state)
        model, optimizer, _, ema, analyzer = resumed
        with pytest.raises(ValueError, match="start_step=2"):
            analyzer.bind(model, optimizer, ema=ema)  # the loop's count is 2, not 0
        assert analyzer.tracker is None
        assert all(not opt_hooks for opt_hooks in (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks))
        analyzer.bind(model, optimizer, ema=ema, start_step=2)
        _train(resumed, scheduler, batches[2:])

        assert analyzer.global_steps == full[4].global_steps == [1, 2, 3]
        for ours, theirs in ((analyzer.ledgers, full[4].ledgers), (analyzer.ema_ledgers, full[4].ema_ledgers)):
            for name in theirs:
                for field in ("contributions", "rest", "residual", "f_start", "f_end", "traffic"):
                    assert torch.equal(getattr(ours[name], field), getattr(theirs[name], field)), (name, field)
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_resume_that_forgets_to_load_the_model_names_the_model_not_the_ema():
    """The analyzer, optimizer and EMA restored but the model left at its initialization: the first
    resumed step was refused as 'the EMA weights moved in a way that is not β θ̄ + (1 − β) θ' (advice:
    update the EMA after optimizer.step()), blaming the EMA the loop updates correctly. Now the
    model's changed weights are reported first, with the resume named."""
    torch.set_default_dtype(torch.float64)
    try:
        scheduler = DDPMScheduler(num_train_timesteps=100)
        probe_x, probe_y, batches = _probes_and_batches(2, 2)
        first = _run(scheduler, probe_x, probe_y)
        first[4].bind(first[0], first[1], ema=first[3])
        _train(first, scheduler, batches[:1])
        saved = [o.state_dict() for o in first]

        resumed = _run(scheduler, probe_x, probe_y)
        for obj, state in list(zip(resumed, saved))[1:]:  # everything but the model
            obj.load_state_dict(state)
        model, optimizer, _, ema, analyzer = resumed
        analyzer.bind(model, optimizer, ema=ema, start_step=1)
        with pytest.raises(RuntimeError, match="changed outside the tracked optimizer step.*model was not loaded"):
            _train(resumed, scheduler, batches[1:])
    finally:
        torch.set_default_dtype(torch.float32)
