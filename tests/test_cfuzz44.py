"""Classifier-free guidance's null class checked against the class embedding of a UNet inside a wrapper.

A conditional-model fuzz of the noise-level analyzer (diffusers' class-conditional and cross-attention UNets, CFG
dropout, level × class ledgers, every noise process, SGD/Adam against a brute force) found the ledgers exact; it found
that ``DDPMTrainer(class_dropout=, null_class=K)`` checked the null class against the class table of the model it was
given only, so a diffusers UNet of K class rows inside a wrapper (``PositionalInputs``, a module of the user's) was
accepted and the run failed later with an index error at whichever step first drew a dropped label.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel.diffusion import DDPMTrainer, make_scheduler
from genkernel.diffusion.models import PositionalInputs

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
K = 3  # classes; the null class is K

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_class_unet(num_class_embeds):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds).double()


class OwnWrapper(nn.Module):
    """A user's wrapper: ``model(x_t, t, y)`` returning the UNet's tensor (it has no ``config`` of its own)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, labels):
        return self.unet(x, t, labels).sample


WRAPPERS = {
    "positional_inputs": (lambda unet: PositionalInputs(unet, ("sample", "timestep", "class_labels")), "model.model"),
    "own_module": (OwnWrapper, "model.unet"),
}


def trainer_of(model, **kwargs):
    data = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = torch.arange(8) % K
    return DDPMTrainer(model, make_scheduler(50), data, labels=labels, conditional=True, class_dropout=0.5,
                       null_class=K, batch_size=8, optimizer="sgd", lr=1e-2, progress=False, **kwargs)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_null_class_outside_a_wrapped_unets_class_embedding_is_refused_at_construction_naming_the_submodule(wrapper):
    """The table of K rows inside the wrapper: refused when the trainer is built, naming the submodule and the
    num_class_embeds it needs (old code: accepted; the first step that dropped a label raised "index out of range")."""
    wrap, path = WRAPPERS[wrapper]
    model = wrap(tiny_class_unet(K))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"null_class=3 is not a row.*num_class_embeds=3.*build {path} with "
                                         r"num_class_embeds=4"):
        trainer_of(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the fix the message names: one row more, the null row; the step trains on the dropped labels
    run = trainer_of(wrap(tiny_class_unet(K + 1)))
    run.train(1)
    assert run.global_step == 1


def _latent_unet(in_channels: int, classes: int = 3):
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=classes).double()


def test_image_probes_on_a_latent_trainer_and_float_labels_on_a_class_trainer_are_refused_before_any_step():
    """Probes given as images to a latent trainer (vae=) failed as the analyzer attached, with the convolution's
    own "expected input to have 2 channels"; a floating probe_conditioning on a class-label trainer with torch's
    "Expected tensor for argument #1 'indices'". Fails on the old code: those RuntimeErrors, not the named
    refusals. Nothing moves, and no step is taken."""
    import diffusers

    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 16, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (8,), generator=generator)
    torch.manual_seed(5)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=2, norm_num_groups=4, sample_size=16).double()
    cases = [(images, images[:4], labels[:4], 2, vae, ValueError, r"trainer\.encode\(probe_images\)"),
             (images[:, :, :8, :8].contiguous(), images[:4, :, :8, :8], torch.randn(4, 3, dtype=torch.float64), 1,
              None, TypeError, "LongTensor")]
    for data, probes, conditioning, channels, coder, error, match in cases:
        analyzer = NoiseLevelAnalyzer(make_scheduler(50), probes, num_bins=2, num_probes=4, kernel_points=2,
                                      progress=False, probe_conditioning=conditioning)
        trainer = DDPMTrainer(_latent_unet(channels), make_scheduler(50), data, labels=labels, conditional=True,
                              vae=coder, batch_size=4, progress=False, callbacks=[analyzer])
        before = [p.detach().clone() for p in trainer.model.parameters()]
        with pytest.raises(error, match=match):
            trainer.train(1)
        assert trainer.global_step == 0
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
