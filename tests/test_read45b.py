"""A second read of two checks added this session, pinned where they refused a legitimate set-up or cost too much:
diffusion's class-label checks against the model's class tables refused a module of the user's that maps its
labels before the UNet's lookup (-1 to the null row), and the supervised trainer's check of the targets on the
whole dataset built one N × C tensor of zero outputs, read all N again at every ``fit`` call and left a buffer
that the model's forward updates in eval mode (a quantization observer's) moved by its trial forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from genkernel.supervised import SupervisedTrainer, cross_entropy_loss

pytestmark = pytest.mark.usefixtures("one_thread")


class NullForMinusOne(nn.Module):
    """A user's wrapper around a class-conditional UNet that takes -1 as "no class" and looks it up as the
    null row (the last of ``num_class_embeds``): its labels as given are not the table's indices."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, labels):
        null = self.unet.config.num_class_embeds - 1
        return self.unet(x, t, torch.where(labels < 0, torch.full_like(labels, null), labels)).sample


def test_a_users_wrapper_that_maps_its_labels_before_the_unets_lookup_trains_and_samples_with_them():
    """Old code: DDPMTrainer refused labels -1 at construction ("outside the model's class embedding") although the
    wrapper runs them: the table check read the UNet inside a module of the user's, whose forward may map the labels.
    Now only labels that reach a table as given are checked (a diffusers model bare, compiled, in DDP or
    PositionalInputs): the wrapper trains, its analyzer binds with probe labels -1, and it samples them, while the
    same labels given to the bare UNet are still refused at construction."""
    diffusers = pytest.importorskip("diffusers")
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
    from genkernel.diffusion.models import PositionalInputs

    def unet():
        torch.manual_seed(0)
        return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                     up_block_types=("UpBlock2D",) * 2, num_class_embeds=3).double()

    data = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1])
    probes = NoiseLevelAnalyzer(make_scheduler(50), data[:4], probe_conditioning=labels[:4], num_bins=2, num_probes=4,
                                kernel_points=2, controls=0, progress=False)
    trainer = DDPMTrainer(NullForMinusOne(unet()), make_scheduler(50), data, labels=labels, conditional=True,
                          batch_size=4, callbacks=[probes])
    losses = trainer.train(2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert probes.tracker is not None  # (bound: its probes, labels -1 among them, ran through the wrapper)
    samples = trainer.sample(2, labels=torch.tensor([-1, 2]), num_inference_steps=2)[0]
    assert samples.shape == (2, 1, 8, 8) and bool(torch.isfinite(samples).all())
    for model in (unet(), PositionalInputs(unet(), ("sample", "timestep", "class_labels"))):
        with pytest.raises(ValueError, match=r"labels= hold -1, outside the model's class embedding"):
            DDPMTrainer(model, make_scheduler(50), data, labels=labels, conditional=True, batch_size=4)


class CountsCalls(nn.Module):
    """A buffer every forward advances, in eval mode too (as a quantization-aware observer's statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


class Noisy(nn.Module):
    """Draws from the global RNG in every forward (training or not)."""

    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)


def noisy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), Noisy(), CountsCalls(), nn.Tanh(),
                         nn.Linear(6, 4)).double()


def test_the_target_check_leaves_training_bit_for_bit_as_without_it():
    """The check's trial forward (eval mode, the global RNG forked) is invisible to training: a model with BatchNorm in
    training mode, dropout, a forward that draws from the global RNG and a buffer every forward advances trains to the
    same weights, buffers, global RNG state and batch order under cross_entropy_loss (checked) as under the same loss
    by another name (not checked). Old code: the trial forward left the call-count buffer one higher (4 against 3 after
    3 steps), put back now."""

    def run(loss):
        model = noisy_model()
        trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, batch_size=4, seed=3)
        torch.manual_seed(11)
        x = torch.randn(10, 3, dtype=torch.float64)
        y = torch.arange(10) % 4
        history = trainer.fit(x, y, steps=3)
        return model.state_dict(), torch.get_rng_state(), trainer.generator.get_state(), history, model.training

    checked = run(cross_entropy_loss)
    unchecked = run(lambda outputs, targets: cross_entropy_loss(outputs, targets))
    assert int(checked[0]["4.calls"]) == int(unchecked[0]["4.calls"]) == 3
    assert checked[0].keys() == unchecked[0].keys()
    assert all(torch.equal(checked[0][k], unchecked[0][k]) for k in checked[0])
    assert torch.equal(checked[1], unchecked[1]) and torch.equal(checked[2], unchecked[2])
    assert checked[3] == unchecked[3] and checked[4] is unchecked[4] is True


class CrossEntropyRows(TorchFunctionMode):
    """Records the element count of every logits tensor F.cross_entropy is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.cross_entropy:
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


def test_the_target_check_reads_the_outputs_in_bounded_chunks_and_names_where_a_bad_id_lies():
    """Old code called the loss once on zero outputs of the whole dataset, N × C values (5.2M here; 1.28M examples of
    1000 classes: 5 GB, on the model's device). Now at most 2**22 values a call: 2**19 examples of 10 classes are
    checked in two chunks, and a bad id in the last example is refused before any step naming its chunk's examples."""
    n, classes = 2 ** 19, 10
    torch.manual_seed(0)
    model = nn.Linear(2, classes)
    x = torch.randn(n, 2)
    y = torch.arange(n) % classes
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy_loss, batch_size=8)
    with CrossEntropyRows() as seen:
        trainer.fit(x, y, steps=0)
    assert seen.sizes and max(seen.sizes) <= 2 ** 22 and sum(seen.sizes) == n * classes
    y[-1] = classes
    with pytest.raises(ValueError, match=rf"checked on all {n} examples before any step; examples 419430 to {n - 1} "
                                         rf"hold it\): cross_entropy_loss: class ids must lie in \[0, {classes}\)"):
        trainer.fit(x, y, steps=1)
    assert trainer.global_step == 0


def test_targets_already_checked_are_not_read_again_by_the_next_fit_unless_they_changed():
    """``fit(steps=1)`` in a loop: old code ran the trial forward and the loss over all N targets at every call (a
    second full pass here). Now the same, unchanged targets are checked once; targets changed in place since (their
    version moved) are checked again, and an id written out of range is refused before the step; so are targets
    unchanged beside a model whose parameters changed shape (a head of fewer classes put in)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy_loss, batch_size=5)
    x, y = torch.randn(20, 3), torch.arange(20) % 4
    trainer.fit(x, y, steps=1)
    trainer.fit(x, y, steps=1)
    assert forwards == [2, 5, 5]  # (the trial forward of two examples once, then one forward per step)
    y[17] = 4
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 4\)"):
        trainer.fit(x, y, steps=1)
    assert trainer.global_step == 2 and forwards == [2, 5, 5, 2]
    y[17] = 1
    trainer.fit(x, y, steps=1)
    assert trainer.global_step == 3 and forwards == [2, 5, 5, 2, 2, 5]
    with torch.no_grad():  # (a head of 2 classes in place of 4, the targets as they were: checked again)
        model.weight, model.bias = nn.Parameter(model.weight[:2].clone()), nn.Parameter(model.bias[:2].clone())
    with pytest.raises(ValueError, match=r"checked on all 20 examples before any step\): cross_entropy_loss: class ids "
                                         r"must lie in \[0, 2\)"):
        trainer.fit(x, y, steps=1)
    assert trainer.global_step == 3


class Denoiser(nn.Module):
    """model(x_t, t) with BatchNorm, dropout, a global-RNG draw and a call-count buffer before its first convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.count, self.noisy = CountsCalls(), Noisy()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        self.norm, self.drop = nn.BatchNorm2d(1), nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(self.norm(self.conv(self.noisy(self.count(x)))))


@pytest.mark.parametrize("channels", [1, 2])
def test_the_latent_probe_trial_forward_changes_no_mode_rng_or_buffer_whether_it_runs_or_fails(channels):
    """NoiseLevelAnalyzer._probes_fail (one probe's forward beside a DataLoader-fed latent trainer, before any step)
    on a model in training mode: it returns None where the probes run (1 channel) and the convolution's error where
    they do not (2 channels), and leaves every module's mode, the global RNG and every buffer (BatchNorm's statistics,
    a call count advanced before the failing layer) as they were. Old code: the call count was left one higher; the
    eval mode and the forked RNG (coverage: a fault that dropped analysis_mode went unnoticed by test_diff45) are
    pinned here too."""
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    model = Denoiser(channels).double().train()
    probes = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    analyzer = NoiseLevelAnalyzer(make_scheduler(50), probes, num_bins=2, num_probes=4, kernel_points=2, controls=0,
                                  progress=False)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "weight" not in k and "bias" not in k}
    rng = torch.get_rng_state()
    error = analyzer._probes_fail(model)
    assert (error is None) is (channels == 1)
    if channels == 2:
        assert isinstance(error, RuntimeError) and "channels" in str(error)
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert int(model.count.calls) == 0


def test_latent_probes_with_a_label_past_the_table_beside_a_dataloader_latent_trainer_are_blamed_on_the_label():
    """Coverage (right on old code; a fault that dropped on_train_start's probe-label check went unnoticed by
    test_diff45): latents with the images' channel count (a 1-channel VAE, as LDM's f4 keeps 3) and a probe label past
    the UNet's 3-row table (every probe's: the trial forward runs one), beside a DataLoader-fed latent trainer.
    Checked before the latent-probe trial forward, the ValueError names the label; after it, the lookup's failure
    made the probes look like images and the refusal asked for the probes' latents, which they already are."""
    diffusers = pytest.importorskip("diffusers")
    from torch.utils.data import DataLoader, TensorDataset

    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, num_class_embeds=3).double()
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=1, norm_num_groups=4, sample_size=16).double()
    images = torch.randn(8, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer = DDPMTrainer(unet, make_scheduler(50), DataLoader(TensorDataset(images, labels), batch_size=4),
                          conditional=True, vae=vae, progress=False)
    probes = NoiseLevelAnalyzer(make_scheduler(50), trainer.encode(images[:4]),
                                probe_conditioning=torch.full((4,), 5), num_bins=2, num_probes=4, kernel_points=2,
                                controls=0, progress=False)
    trainer.callbacks = [probes]
    with pytest.raises(ValueError, match=r"the probes' class labels \(probe_conditioning=\) hold 5, outside the "
                                         r"model's class embedding \(num_class_embeds = 3 rows"):
        trainer.train(1)
    assert trainer.global_step == 0 and probes.tracker is None


def test_latent_probes_whose_embeddings_do_not_fit_beside_a_dataloader_latent_trainer_are_not_called_images():
    """Old code: latents with the images' channel count (a 1-channel VAE) whose probe embeddings are 5 wide beside a
    UNet attending to 6 (a DataLoader's embeddings are not known before its first batch) failed the trial forward, so
    the probes were taken for images and the refusal asked for their latents (trainer.encode), which they are. Now a
    forward of the VAE's latents with the same embeddings fails too, so the ValueError names the probes' shapes and
    the model's own words instead; the probes with embeddings 6 wide train."""
    diffusers = pytest.importorskip("diffusers")
    from torch.utils.data import DataLoader, TensorDataset

    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6, norm_num_groups=4, attention_head_dim=2).double()
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=1, norm_num_groups=4, sample_size=16).double()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 16, 16, dtype=torch.float64, generator=generator)
    text = torch.randn(8, 3, 6, dtype=torch.float64, generator=generator)
    trainer = DDPMTrainer(unet, make_scheduler(50), DataLoader(TensorDataset(images, text), batch_size=4),
                          conditional="embeddings", vae=vae, progress=False)
    latents = trainer.encode(images[:4])

    def analyzer(width):
        return NoiseLevelAnalyzer(make_scheduler(50), latents, probe_conditioning=text[:4, :, :width], num_bins=2,
                                  num_probes=4, kernel_points=2, controls=0, progress=False)

    trainer.callbacks = [analyzer(5)]
    with pytest.raises(ValueError, match=r"probes of shapes \[\(1, 1, 8, 8\), \(1,\), \(1, 3, 5\)\] do not fit "
                                         r"UNet2DConditionModel") as refused:
        trainer.train(1)
    assert "trainer.encode" not in str(refused.value) and trainer.global_step == 0
    trainer.callbacks = [analyzer(6)]
    trainer.train(1)
    assert trainer.global_step == 1
