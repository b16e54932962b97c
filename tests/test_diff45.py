"""Conditional and latent misuses of DDPMTrainer and NoiseLevelAnalyzer refused in genkernel's words, before anything
changes: image probes beside a latent trainer fed by a DataLoader, class labels past the model's class table (the
probes', the data's, a DataLoader batch's, the labels to sample), probe conditioning for an unconditional trainer,
probe embeddings of another width, a diffusers UNet without a class table given labels, embeddings of another width
than the UNet's cross-attention, and a level × class split the trainer's labels (or its null class) do not fit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler  # noqa: E402


def class_unet(classes: int | None = 3, channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, num_class_embeds=classes).double()


def text_unet(width: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, norm_num_groups=4, attention_head_dim=2).double()


def tiny_vae(latent_channels: int) -> torch.nn.Module:
    torch.manual_seed(5)
    return diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   latent_channels=latent_channels, norm_num_groups=4, sample_size=16).double()


GENERATOR = torch.Generator().manual_seed(0)
IMAGES = torch.randn(8, 1, 16, 16, generator=GENERATOR, dtype=torch.float64)
DATA = IMAGES[:, :, :8, :8].contiguous()
LABELS = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])


def analyzer(probes: torch.Tensor, **kwargs) -> NoiseLevelAnalyzer:
    return NoiseLevelAnalyzer(make_scheduler(50), probes, num_bins=2, num_probes=4, kernel_points=2, controls=0,
                              progress=False, **kwargs)


def snapshot(trainer: DDPMTrainer) -> dict:
    """Everything a refused start or step must leave as it was: the weights, the optimizer's state, both RNGs and
    the step count."""
    return {"params": [p.detach().clone() for p in trainer.model.parameters()],
            "optimizer": len(trainer.optimizer.state), "rng": torch.get_rng_state(),
            "generator": trainer.generator.get_state(), "step": trainer.global_step}


def assert_unchanged(trainer: DDPMTrainer, before: dict) -> None:
    assert all(torch.equal(a, b) for a, b in zip(before["params"], trainer.model.parameters()))
    assert len(trainer.optimizer.state) == before["optimizer"] == 0
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert torch.equal(trainer.generator.get_state(), before["generator"])
    assert trainer.global_step == before["step"] == 0


def test_image_probes_beside_a_latent_trainer_fed_by_a_dataloader_are_refused_before_the_first_forward():
    """A DataLoader's images are shaped by its first batch, not drawn when the analyzer binds: image probes (1, 16, 16)
    beside a VAE making (2, 8, 8) latents failed with the convolution's "expected input[1, 1, 16, 16] to have 2
    channels" (old code: that RuntimeError). Now a ValueError naming the latent shape, the probes' shape and the fix,
    with the model, the optimizer, both RNGs and the analyzer untouched; the fix it names (the probes encoded)
    then trains, with latent probes whose channel count is the images' not refused at the start."""
    labels = LABELS
    probes = IMAGES[:4]
    tracker = analyzer(probes, probe_conditioning=labels[:4])
    loader = DataLoader(TensorDataset(IMAGES, labels), batch_size=4)
    trainer = DDPMTrainer(class_unet(3, channels=2), make_scheduler(50), loader, conditional=True, vae=tiny_vae(2),
                          progress=False, callbacks=[tracker])
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=r"latents shaped \(2, 8, 8\).*probes are shaped \(1, 16, 16\).*"
                                         r"trainer\.encode\(probe_images\)"):
        trainer.train(1)
    assert_unchanged(trainer, before)
    assert tracker.tracker is None and tracker._start_step is None
    # the fix: the probes' latents
    fixed = analyzer(trainer.encode(probes), probe_conditioning=labels[:4])
    trainer.callbacks = [fixed]
    trainer.train(1)
    assert trainer.global_step == 1 and fixed.tracker is not None
    # latents with the images' one channel (a VAE of 1 latent channel) run through the model: not refused at the start
    same = DDPMTrainer(class_unet(3, channels=1), make_scheduler(50), loader, conditional=True, vae=tiny_vae(1),
                       progress=False)
    latent = analyzer(same.encode(probes), probe_conditioning=labels[:4])
    same.callbacks = [latent]
    same.train(1)
    assert same.global_step == 1


def test_probe_labels_past_the_models_class_table_are_refused_in_the_analyzers_words_before_any_change():
    """Probe labels 3 and -1 beside a UNet of num_class_embeds=3 failed as the probes' first forward ran, "index out
    of range in self" (old code). Now a ValueError naming the labels, the table's rows and the fix, at a trainer's
    start (nothing changed) and at a loop's bind (still unbound, and binds once fixed); so are a loop's step labels
    past the table and a step without the probes' conditioning."""
    probes = DATA[:4]
    for bad, shown in ((torch.tensor([0, 1, 2, 3]), "3"), (torch.tensor([0, -1, 2, 1]), "-1")):
        tracker = analyzer(probes, probe_conditioning=bad)
        trainer = DDPMTrainer(class_unet(3), make_scheduler(50), DATA, labels=LABELS, conditional=True, batch_size=4,
                              progress=False, callbacks=[tracker])
        before = snapshot(trainer)
        with pytest.raises(ValueError, match=rf"probes' class labels \(probe_conditioning=\) hold {shown}, outside the "
                                             r"model's class embedding \(num_class_embeds = 3 rows: labels 0 to 2\): "
                                             r"pass class indices in \[0, 2\]"):
            trainer.train(1)
        assert_unchanged(trainer, before)
        assert tracker.tracker is None
    model = class_unet(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = analyzer(probes, probe_conditioning=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"num_class_embeds=4\)"):
        loop.bind(model, optimizer)
    assert loop.tracker is None
    bound = analyzer(probes, probe_conditioning=torch.tensor([0, 1, 2, 2]))
    bound.bind(model, optimizer)
    # a loop's step: labels past the table (old code: "index out of range in self"), no conditioning beside the
    # probes' (old code: diffusers' "class_labels should be provided"); refused before the optimizer moves
    weights = [p.detach().clone() for p in model.parameters()]
    noise, levels = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 10, 20, 40])
    with pytest.raises(ValueError, match=r"the step's class labels \(conditioning=\) hold 5, outside"):
        bound.step(DATA[:4], noise, levels, conditioning=torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"the step gives the model no input beside \(x_t, t\).*conditioning=labels"):
        bound.step(DATA[:4], noise, levels)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())) and not optimizer.state
    assert bound.ledger.steps == 0


def test_class_labels_past_the_table_are_refused_at_construction_per_batch_and_when_sampling():
    """The data's labels (Tensor data, a DataLoader batch) and the labels to sample past the class table, or
    negative, failed at the first step (or in sample) with "index out of range in self" (old code: that error
    wrapped as "do not fit", an IndexError when sampling). Now ValueErrors naming the labels, the rows, the fix."""
    table = r"outside the model's class embedding \(num_class_embeds = 2 rows: labels 0 to 1\)"
    with pytest.raises(ValueError, match=rf"labels= hold 2, {table}.*num_class_embeds=3\)"):
        DDPMTrainer(class_unet(2), make_scheduler(50), DATA, labels=LABELS + 1, conditional=True, progress=False)
    with pytest.raises(ValueError, match=rf"labels= hold -1, {table}"):
        DDPMTrainer(class_unet(2), make_scheduler(50), DATA, labels=LABELS - 1, conditional=True, progress=False)
    trainer = DDPMTrainer(class_unet(2), make_scheduler(50), DataLoader(TensorDataset(DATA, LABELS + 1), batch_size=4),
                          conditional=True, progress=False)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=rf"the batch's class labels \(conditional=True\) hold 2, {table}"):
        trainer.train(1)
    assert all(torch.equal(a, b) for a, b in zip(before["params"], trainer.model.parameters()))
    assert trainer.global_step == 0 and len(trainer.optimizer.state) == 0
    sampler = DDPMTrainer(class_unet(2), make_scheduler(50), DATA, labels=LABELS, conditional=True, progress=False)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"the labels to sample hold 5, {table}"):
        sampler.sample(2, labels=torch.tensor([0, 5]))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_unet_without_a_class_table_given_labels_and_embeddings_of_another_width_are_refused_at_construction():
    """conditional=True beside a UNet2DModel without a class embedding failed at the first step with diffusers'
    "class_embedding needs to be initialized"; embeddings 5 wide for a UNet2DConditionModel attending to 6 with
    torch's "mat1 and mat2 shapes cannot be multiplied" (old code: both at the first step, no fix named)."""
    with pytest.raises(ValueError, match=r"no class embedding \(num_class_embeds=None\): build it with "
                                         r"UNet2DModel\(\.\.\., num_class_embeds=K\)"):
        DDPMTrainer(class_unet(None), make_scheduler(50), DATA, labels=LABELS, conditional=True, progress=False)
    narrow = torch.randn(8, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"embeddings are 5 wide per token.*cross_attention_dim=6"):
        DDPMTrainer(text_unet(6), make_scheduler(50), DATA, conditional="embeddings", embeddings=narrow, progress=False)


def test_probe_conditioning_the_trainer_does_not_give_its_model_is_refused_before_any_change():
    """Probe labels beside an unconditional trainer failed at the probes' forward with diffusers' "class_embedding
    needs to be initialized"; probe embeddings 5 wide beside data embeddings 6 wide with torch's "mat1 and mat2
    shapes cannot be multiplied" (old code: both). Now ValueErrors naming both sides and the fix, nothing changed."""
    embeddings = torch.randn(8, 5, 6, dtype=torch.float64)
    cases = [
        (dict(probe_conditioning=LABELS[:4]), lambda t: DDPMTrainer(class_unet(None), make_scheduler(50), DATA,
                                                                   progress=False, callbacks=[t]),
         r"model\(x_t, t\) \(conditional=False\), but this analyzer's probes carry probe_conditioning shaped \[\(4,\)\]"),
        (dict(probe_conditioning=torch.randn(4, 5, 5, dtype=torch.float64)),
         lambda t: DDPMTrainer(text_unet(6), make_scheduler(50), DATA, conditional="embeddings", embeddings=embeddings,
                               progress=False, callbacks=[t]),
         r"shaped \[\(5, 6\)\] per example \(its data's embeddings\), this analyzer's probes 1 shaped \[\(5, 5\)\]: "
         r"build it with probe_conditioning="),
    ]
    for kwargs, build, match in cases:
        tracker = analyzer(DATA[:4], **kwargs)
        trainer = build(tracker)
        before = snapshot(trainer)
        with pytest.raises(ValueError, match=match):
            trainer.train(1)
        assert_unchanged(trainer, before)
        assert tracker.tracker is None


def test_a_level_class_split_the_trainers_labels_do_not_fit_is_refused_before_any_step():
    """num_classes=2 beside a trainer whose null class is 2 (classifier-free guidance), num_classes=1 beside labels
    0..1, and num_classes beside data without labels were refused at the first tracked step, after the analyzer had
    bound (old code: the step's refusal, "class_labels must lie in [0, 2)" / "pass class_labels", with the tracker
    built). Now refused at the start with the num_classes that fits, nothing changed; that num_classes trains."""
    cases = [
        (2, dict(labels=LABELS, conditional=True, class_dropout=0.5, null_class=2), r"null class 2, outside.*"
                                                                                    r"num_classes=3"),
        (1, dict(labels=LABELS, conditional=True), r"labels up to 1, outside.*num_classes=2"),
        (2, dict(), r"the trainer's data has no class labels: pass the trainer labels="),
    ]
    for classes, kwargs, match in cases:
        model = class_unet(3) if kwargs else class_unet(None)
        conditioning = dict(probe_conditioning=LABELS[:4]) if kwargs else {}
        tracker = analyzer(DATA[:4], num_classes=classes, **conditioning)
        trainer = DDPMTrainer(model, make_scheduler(50), DATA, batch_size=4, progress=False, callbacks=[tracker],
                              **kwargs)
        before = snapshot(trainer)
        with pytest.raises(ValueError, match=match):
            trainer.train(1)
        assert_unchanged(trainer, before)
        assert tracker.tracker is None
    # the fix for the null class: it counts as a class of its own
    fixed = analyzer(DATA[:4], num_classes=3, probe_conditioning=LABELS[:4])
    trainer = DDPMTrainer(class_unet(3), make_scheduler(50), DATA, labels=LABELS, conditional=True, class_dropout=0.5,
                          null_class=2, batch_size=4, progress=False, callbacks=[fixed])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(1)
    assert trainer.global_step == 1
