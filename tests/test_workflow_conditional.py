"""Conditional DDPM workflows: a trainer that cannot call a conditional model says what to change."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genkernel.diffusion import DDPMTrainer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def _scheduler():
    return diffusers.DDPMScheduler(num_train_timesteps=100)


def _class_unet():
    """A tiny class-conditional UNet2DModel (4 class embeddings, no attention), seeded."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=4, add_attention=False,
    )


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def test_trainer_labels_given_to_class_conditional_unet_without_conditional_flag_names_the_flag():
    model = _class_unet()
    data, labels = _data()
    trainer = DDPMTrainer(model, _scheduler(), data, labels=labels, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="pass conditional=True"):
        trainer.train(1)


def test_trainer_class_labels_into_cross_attention_unet_points_to_embedding_conditioning():
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
    )
    data, labels = _data()
    trainer = DDPMTrainer(model, _scheduler(), data, labels=labels, conditional=True, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="encoder_hidden_states.*conditional='embeddings'"):
        trainer.train(1)


def test_observe_null_class_outside_num_classes_says_to_count_it():
    """Classifier-free guidance trains a null class: labels num_classes..; the refusal says to count it."""
    from genkernel.diffusion import NoiseLevelAnalyzer

    model = _class_unet()
    data, labels = _data()
    scheduler = _scheduler()
    analyzer = NoiseLevelAnalyzer(scheduler, data, num_bins=2, num_probes=4, probe_conditioning=labels, controls=0,
                                  kernel_points=2, num_classes=3, progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    analyzer.bind(model, optimizer)
    y = torch.tensor([0, 3, 1, 3])  # 3: the null class of classifier-free guidance
    noise, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 40, 70, 99])
    losses = ((model(scheduler.add_noise(data[:4], noise, t), t, class_labels=y).sample - noise) ** 2).mean(dim=(1, 2, 3))
    with pytest.raises(ValueError, match=r"got labels in \[0, 3\].*null class.*num_classes=4"):
        analyzer.observe(losses, t, class_labels=y)
