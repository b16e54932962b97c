"""GenkernelCallback on a text-conditioned diffusion fit as people write it in Lightning today: a tiny
``UNet2DConditionModel`` on cached prompt embeddings, ``accumulate_grad_batches=2``, clipping by norm, AdamW with a
per-step warm-up schedule from ``configure_optimizers``, and diffusers' ``EMAModel`` kept in the module and passed
to the callback as ``ema=``. The fit's model and EMA ledgers equal those of the same micro-batches observed in a
plain PyTorch loop, training is bit-identical with and without the callback, a fit resumed mid-epoch continues
the uninterrupted one, and an EMA built before Lightning casts the module is refused at binding."""

import functools
import warnings

import pytest
import torch

from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from genkernel.integrations.lightning import GenkernelCallback  # noqa: E402

F64 = torch.float64
T, TOKENS, WIDTH = 100, 3, 8  # timesteps; prompt embeddings [TOKENS, WIDTH] per example
BATCH, ACCUMULATE, CLIP = 3, 2, 0.05
SCHEDULER = make_scheduler(T)
_data = torch.Generator().manual_seed(3)
IMAGES = torch.randn(12, 2, 4, 4, generator=_data, dtype=F64)
EMBEDDINGS = torch.randn(12, TOKENS, WIDTH, generator=_data, dtype=F64)  # the cached text encodings


def text_unet(dtype=F64):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=4, attention_head_dim=2,
    ).to(dtype)


def analyzer():
    probes = torch.Generator().manual_seed(9)
    return NoiseLevelAnalyzer(SCHEDULER, torch.randn(4, 2, 4, 4, generator=probes, dtype=F64), num_bins=3,
                              num_probes=4, kernel_points=2, kernel_sketch=1, controls=0, progress=False,
                              probe_conditioning=torch.randn(4, TOKENS, WIDTH, generator=probes, dtype=F64))


def batch_at(index):
    """The batch at loader position ``index`` (12 examples, 4 batches an epoch): ``(images [3, 2, 4, 4],
    embeddings [3, TOKENS, WIDTH])``. Taken by position, not from the loader: Lightning restarts a plain
    loader's iterator on a mid-epoch resume, and the resumed fit must train on the uninterrupted one's rows."""
    rows = torch.arange(BATCH) + BATCH * (index % 4)
    return IMAGES[rows], EMBEDDINGS[rows]


def per_example_losses(unet, epoch, index):
    """ε-prediction losses ``[3]`` of the batch at ``index``, with noise and timesteps drawn from the batch's
    position; returns ``(losses [3], timesteps LongTensor[3])``."""
    x0, embeddings = batch_at(index)
    draws = torch.Generator().manual_seed(1000 * epoch + index)
    noise = torch.randn(x0.shape, generator=draws, dtype=x0.dtype)
    t = torch.randint(0, T, (BATCH,), generator=draws)
    prediction = unet(SCHEDULER.add_noise(x0, noise, t), t, embeddings).sample
    return ((prediction - noise) ** 2).mean((1, 2, 3)), t


def adamw_with_warmup(params):
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / 3))


class TextToImage(pl.LightningModule):
    """The EMA steps in ``on_train_batch_end`` when the batch stepped the optimizer (``global_step`` moved);
    ``ema_in_optimizer_step`` steps it in ``optimizer_step`` instead, before a step checkpoint is saved
    (ModelCheckpoint's ``on_train_batch_end`` runs before the module's, so a checkpoint written there holds the
    EMA one update behind, and a fit resumed from it misses that update)."""

    def __init__(self, tracked=None, *, unet_dtype=F64, ema_in_optimizer_step=False):
        super().__init__()
        self.unet = text_unet(unet_dtype)
        self.analyzer = tracked
        self.ema = EMAModel(self.unet.parameters(), decay=0.9)
        self.ema_in_optimizer_step = ema_in_optimizer_step
        self.stepped_at = 0

    def training_step(self, batch, index):
        losses, t = per_example_losses(self.unet, self.current_epoch, index)
        if self.analyzer is not None:
            self.analyzer.observe(losses, t)
        return losses.mean()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema_in_optimizer_step:
            self.ema.step(self.unet.parameters())

    def on_train_batch_end(self, outputs, batch, index):
        if not self.ema_in_optimizer_step and self.trainer.global_step != self.stepped_at:
            self.stepped_at = self.trainer.global_step
            self.ema.step(self.unet.parameters())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.ema.load_state_dict(checkpoint["ema"])
        self.stepped_at = checkpoint["global_step"]

    def configure_optimizers(self):
        optimizer, schedule = adamw_with_warmup(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(module, tracked=None, *, checkpoints=None, ckpt_path=None, **settings):
    """``module`` after a fit (64-true) over a loader of 4 batches an epoch; the callback gets ``module.ema``."""
    callbacks = [] if tracked is None else [GenkernelCallback(tracked, model_attribute="unet", ema=module.ema)]
    if checkpoints is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_train_steps=1))
    settings = {"logger": False, "enable_checkpointing": checkpoints is not None, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0,
                "precision": "64-true", "accumulate_grad_batches": ACCUMULATE, "gradient_clip_val": CLIP, **settings}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(callbacks=callbacks, **settings).fit(
            module, torch.utils.data.DataLoader(torch.arange(12), batch_size=BATCH), ckpt_path=ckpt_path)
    return module


def all_equal(tensors, others):
    tensors, others = list(tensors), list(others)
    return len(tensors) == len(others) and all(torch.equal(a, b) for a, b in zip(tensors, others))


@functools.lru_cache(maxsize=1)
def uninterrupted_fit():
    """``(analyzer, module, bare module)`` of 3 optimizer steps (max_steps=3 ends in the second epoch), the EMA
    stepped in on_train_batch_end; the bare module trained without the callback. Shared by two tests."""
    bare = fit(TextToImage(), max_steps=3)
    tracked = analyzer()
    return tracked, fit(TextToImage(tracked), tracked, max_steps=3), bare


def test_coverage_a_text_unet_fit_with_accumulation_clipping_warmup_and_ema_has_the_plain_loops_ledgers():
    """coverage: 3 optimizer steps (max_steps=3 ends in the second epoch; 2 micro-batches a step), clipping by norm
    acting at every step, a per-step LambdaLR, an EMAModel stepped in on_train_batch_end. Weights and EMA are
    bit-identical with a fit without the callback; model and EMA ledgers equal those of a plain PyTorch loop
    observing the same micro-batches (measured: equal bit for bit), the model ledger adds up to 1e-13, steps
    are numbered 1..3 and the EMA decays read are EMAModel's own (0, 2/11, 3/12)."""
    tracked, module, bare = uninterrupted_fit()
    assert all_equal(module.unet.parameters(), bare.unet.parameters())
    assert all_equal(module.ema.shadow_params, bare.ema.shadow_params)

    unet, by_hand = text_unet(), analyzer()
    optimizer, schedule = adamw_with_warmup(unet.parameters())
    ema = EMAModel(unet.parameters(), decay=0.9)
    by_hand.bind(unet, optimizer, ema=ema)
    steps = 0
    for micro_batch in range(6):  # positions 0-3 of epoch 0, then 0-1 of epoch 1
        epoch, index = divmod(micro_batch, 4)
        losses, t = per_example_losses(unet, epoch, index)
        by_hand.observe(losses, t)
        (losses.mean() / ACCUMULATE).backward()
        if (index + 1) % ACCUMULATE == 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            ema.step(unet.parameters())
            steps += 1
    by_hand.finish()
    assert steps == 3 and all_equal(unet.parameters(), bare.unet.parameters())

    for ours, theirs in ((tracked.ledger, by_hand.ledger), (tracked.ema_ledgers["level"], by_hand.ema_ledgers["level"])):
        assert ours.steps == theirs.steps == 3
        for name in ("contributions", "rest", "residual", "delta"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=1e-12)
    ledger = tracked.ledger
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta, rtol=0,
                               atol=1e-13)
    assert [s["micro_batches"] for s in tracked.tracker.gradient_scales] == [2, 2, 2]
    assert all(s["scale_times_micro_batches"] < 0.1 for s in tracked.tracker.gradient_scales)  # clipping acted
    assert tracked.report()["global_steps"] == [1, 3]
    assert tracked.report()["ema"]["decays"] == pytest.approx([0.0, 2 / 11, 3 / 12], rel=1e-12)


def test_coverage_a_text_unet_fit_resumed_mid_epoch_continues_the_uninterrupted_ledgers(tmp_path):
    """coverage: a checkpoint after optimizer step 1 (mid-epoch: 2 steps an epoch) holding the EMA (stepped in
    optimizer_step here, before the checkpoint is written); the fit resumed from it with ckpt_path= in fresh objects
    reaches step 3 with the uninterrupted fit's weights, EMA, model ledger and EMA ledger bit for bit, and numbers
    its steps as it does."""
    straight, straight_module, _ = uninterrupted_fit()

    def run(max_steps, **kwargs):
        tracked = analyzer()
        return tracked, fit(TextToImage(tracked, ema_in_optimizer_step=True), tracked, max_steps=max_steps, **kwargs)

    run(1, checkpoints=tmp_path)
    (checkpoint,) = tmp_path.glob("*step=1.ckpt")
    resumed, resumed_module = run(3, ckpt_path=checkpoint)
    assert all_equal(resumed_module.unet.parameters(), straight_module.unet.parameters())
    assert all_equal(resumed_module.ema.shadow_params, straight_module.ema.shadow_params)
    for ours, theirs in ((resumed.ledger, straight.ledger), (resumed.ema_ledgers["level"], straight.ema_ledgers["level"])):
        assert ours.steps == theirs.steps == 3
        for name in ("contributions", "rest", "residual", "delta"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert resumed.report()["global_steps"] == straight.report()["global_steps"] == [1, 3]


def test_an_ema_built_in_init_before_lightning_casts_the_module_to_float64_is_refused_at_binding():
    """precision="64-true" casts the module after its __init__, so an EMAModel built there over a float32 UNet
    holds float32 shadows of float64 weights (the bare fit trains on, averaging in float32). Old: bound without a
    word; the first EMA update then failed its ledger check (at step 2's start, or, after this 1-step fit, at every
    read of ema_ledgers or report()) with "moved in a way that is not β θ̄ + (1 − β) θ ... update the EMA right
    after optimizer.step()" (gap 7.3e-9, the float32 rounding of the copied weights), blaming the update's order.
    Now refused when the callback binds, before a step, naming the dtypes and where to build the EMA."""
    tracked = analyzer()
    module = TextToImage(tracked, unet_dtype=torch.float32)
    before = [p.detach().clone() for p in module.unet.parameters()]
    with pytest.raises(ValueError, match=r"EMA holds '.*' in float32 but the model's parameter is float64.*on_fit_start"):
        fit(module, tracked, max_steps=1)
    assert all_equal((p.float() for p in module.unet.parameters()), before)  # refused before any step
    assert tracked.tracker is None
