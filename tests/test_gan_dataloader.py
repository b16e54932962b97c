"""GANTrainer on a DataLoader: a real data set that does not fit in memory (an ImageFolder), read in
order epoch after epoch through the DDPM trainer's resumable batches (core.tracking.batches).

What must hold: each discriminator step takes the loader's next batch (a last smaller batch gets as
many generated rows and weights 1/b), all else drawn as on Tensor data; a conditional GAN reads the
batch's classes; a run resumed mid-epoch, or continued after a step refused before its update, is
the uninterrupted one bit for bit (with an analyzer, and a Dataset whose augmentation draws from the
global RNG); what a DataLoader cannot go with is refused with the fix. On the code before this, a
DataLoader was refused ("data must be a Tensor").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.gan import DCDiscriminator, DCGenerator, GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from test_conditional_gan import ConditionalD, ConditionalG
from test_ddpm_trainer import ring
from test_failed_step_retry import RefusesOnce
from test_resume import elsewhere, same

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class RealRows(TrainerCallback):
    """The real rows (and their classes) of every discriminator step, as the step holds them."""

    def __init__(self):
        self.real, self.classes, self.weights = [], [], []

    def on_step_end(self, trainer, step):
        if step.phase == "discriminator":
            roles = step.targets
            self.real.append(step.inputs[0][roles == 1].clone())
            self.weights.append(step.weights[roles == 1].clone())
            if len(step.inputs) > 2:
                self.classes.append(step.inputs[2][roles == 1].clone())


class Jittered(Dataset):
    """Points with a random shift drawn from the global RNG as each is loaded (a torchvision-style augmentation)."""

    def __init__(self, points):
        self.points = points

    def __len__(self):
        return self.points.shape[0]

    def __getitem__(self, i):
        return self.points[i] + 0.01 * torch.randn(2, dtype=F64)


def loader(points=None, batch_size=16, seed=2, dataset=None):
    data = TensorDataset(ring(40) if points is None else points) if dataset is None else dataset
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def gan(data, *callbacks, analyzer=False, **kwargs):
    torch.manual_seed(0)
    generator, discriminator = MLPGenerator(2, 2, hidden=16, depth=2).double(), MLPDiscriminator(2, hidden=16, depth=2).double()
    found = [GANKernelAnalyzer(generator, discriminator, torch.randn(6, 2, generator=torch.Generator().manual_seed(1),
                                                                     dtype=F64), window=2, eval_every=1)] if analyzer else []
    settings = dict(d_steps=2, seed=3, loss="wgan-gp")
    settings.update(kwargs)
    return GANTrainer(generator, discriminator, data, callbacks=[*callbacks, *found], **settings)


def test_each_discriminator_step_takes_the_loaders_next_batch_epoch_after_epoch():
    rows = RealRows()
    run = gan(loader(), rows)  # 40 points in batches of 16: 16, 16, 8 per epoch
    run.train(4)  # 8 discriminator steps: two epochs and two batches
    twin = loader()  # the same loader, epoch after epoch: its generator goes on
    expected = [batch for _ in range(3) for (batch,) in twin][:8]
    assert [r.shape[0] for r in rows.real] == [16, 16, 8] * 2 + [16, 16]
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(rows.real, expected))
    # the last, smaller batch: as many generated (and penalty) rows, each real row weighing 1/8
    assert all(torch.equal(w, torch.full_like(w, 1 / r.shape[0])) for w, r in zip(rows.weights, rows.real))
    assert run.g_steps == 4 and run.d_steps_done == 8


def test_a_run_on_a_dataloader_resumes_mid_epoch_bit_for_bit_with_its_analyzer(tmp_path):
    straight = gan(loader(), analyzer=True)
    straight.train(5)
    gan(loader(), analyzer=True, checkpoint_dir=tmp_path, checkpoint_every=2).train(2)  # 4 batches in: mid-epoch
    resumed = gan(loader(), analyzer=True)
    elsewhere()
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    resumed.train(5)
    same(straight.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("phase,count", [("discriminator", 3), ("generator", 2)])
def test_a_refused_step_on_augmented_batches_is_drawn_again_and_a_checkpoint_then_resumes(tmp_path, phase, count):
    def data():
        return loader(dataset=Jittered(ring(40)))

    straight = gan(data())
    torch.manual_seed(5)
    straight.train(4)
    refused = gan(data(), RefusesOnce(count, phase))
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(4)
    refused.save_checkpoint(tmp_path / "after_the_refusal.pt")
    refused.train(4)
    resumed = gan(data())
    elsewhere()
    resumed.load_checkpoint(tmp_path / "after_the_refusal.pt")
    resumed.train(4)
    for run in (refused, resumed):
        same(straight.generator.state_dict(), run.generator.state_dict())
        same(straight.discriminator.state_dict(), run.discriminator.state_dict())
        assert run.history == straight.history


def test_a_conditional_gan_reads_each_batchs_classes():
    points, classes = ring(30), torch.arange(30) % 3
    rows = RealRows()
    data = DataLoader(TensorDataset(points, classes), batch_size=10, shuffle=False)
    torch.manual_seed(0)
    run = GANTrainer(ConditionalG().double(), ConditionalD().double(), data, num_classes=3, class_sampling="uniform",
                     latent_dim=3, loss="hinge", seed=3, callbacks=[rows])
    run.train(4)
    for step, (real, labels) in enumerate(zip(rows.real, rows.classes)):
        rows_in_data = slice(10 * (step % 3), 10 * (step % 3) + 10)
        assert torch.equal(real, points[rows_in_data]) and torch.equal(labels, classes[rows_in_data])
    assert run.batch_size == 10  # the generator steps' batch: the loader's


@pytest.mark.parametrize("kwargs,data,match", [
    (dict(labels=torch.zeros(40, dtype=torch.long)), None, "labels= is for Tensor data"),
    (dict(num_classes=3), None, "class_sampling='data' draws the generator's classes from the data's labels"),
    (dict(), [ring(8), ring(8)], "pass batch_size="),
    (dict(), iter([ring(8)]), "an iterator"),
])
def test_what_a_dataloader_cannot_go_with_is_refused_with_the_fix(kwargs, data, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gan(loader() if data is None else data, **kwargs)


def test_a_conditional_gan_whose_batches_lack_classes_is_refused_at_the_first_batch():
    torch.manual_seed(0)
    run = GANTrainer(ConditionalG().double(), ConditionalD().double(), loader(), num_classes=3,
                     class_sampling="uniform", latent_dim=3, seed=3)
    with pytest.raises(ValueError, match="needs each batch's class labels"):
        run.train(1)
    assert run.d_steps_done == 0


def test_a_dcgan_trains_on_an_image_folder(tmp_path):
    # the real component: torchvision's ImageFolder of PNGs (16×16), its class folders the batch's labels
    from diffusers.training_utils import EMAModel
    from torchvision import datasets, transforms
    from torchvision.utils import save_image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    folder = datasets.ImageFolder(tmp_path, transform=transforms.Compose([
        transforms.Grayscale(), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))
    rows = RealRows()
    torch.manual_seed(0)
    generator = DCGenerator(8, width=8, groups=4)
    run = GANTrainer(generator, DCDiscriminator(width=8), DataLoader(folder, batch_size=4), seed=3, callbacks=[rows],
                     ema=EMAModel(generator.parameters(), decay=0.5))
    run.train(3)
    images = torch.stack([folder[i][0] for i in range(12)])
    assert all(torch.equal(real, images[4 * k:4 * k + 4]) for k, real in enumerate(rows.real))
    assert run.g_steps == 3
    # the sample grid with the EMA's weights is torchvision's grid of sample(weights="ema"), not the model's
    latents = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    run.save_samples(tmp_path / "ema.png", latents, weights="ema")
    save_image((run.sample(latents, weights="ema") + 1) / 2, str(tmp_path / "expected.png"))
    run.save_samples(tmp_path / "model.png", latents)
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("ema", "expected", "model")}
    assert np.array_equal(pixels["ema"], pixels["expected"]) and not np.array_equal(pixels["ema"], pixels["model"])


class FailsOnce(torch.nn.Module):
    """A generator whose ``count``-th forward raises (a discriminator step's fake pass, outside the performed step)."""

    def __init__(self, net, count):
        super().__init__()
        self.net, self.count, self.calls, self.latent_dim = net, count, 0, net.latent_dim

    def forward(self, z):
        self.calls += 1
        if self.calls == self.count:
            raise RuntimeError("device lost in G's pass")
        return self.net(z)


def test_a_discriminator_step_failing_in_gs_fake_pass_hands_its_batch_back():
    # forwards: the trainer's check of G at construction, D step 1 and 2 fake passes, G step 1, then D step 3's
    # fake pass (the 5th) fails: before the step is built, so _perform never sees it
    def make(count):
        torch.manual_seed(0)
        generator = FailsOnce(MLPGenerator(2, 2, hidden=16, depth=2).double(), count)
        return GANTrainer(generator, MLPDiscriminator(2, hidden=16, depth=2).double(),
                          loader(dataset=Jittered(ring(40))), d_steps=2, seed=3, loss="wgan-gp")

    straight = make(count=10**6)
    torch.manual_seed(5)
    straight.train(3)
    failing = make(count=5)
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="device lost"):
        failing.train(3)
    assert failing.d_steps_done == 2
    failing.train(3)
    same(straight.generator.net.state_dict(), failing.generator.net.state_dict())
    same(straight.discriminator.state_dict(), failing.discriminator.state_dict())
    assert failing.history == straight.history


# -- class_sampling="data" on a DataLoader: the generator's classes drawn from the dataset's labels ----------------

class GeneratorClasses(TrainerCallback):
    def __init__(self):
        self.classes = []

    def on_step_end(self, trainer, step):
        if step.phase == "generator":
            self.classes.append(step.info["classes"].clone())


def conditional_gan(data, *callbacks, **kwargs):
    torch.manual_seed(0)
    return GANTrainer(ConditionalG().double(), ConditionalD().double(), data, num_classes=3, latent_dim=3,
                      loss="hinge", seed=3, callbacks=list(callbacks), **kwargs)


def test_a_conditional_gan_on_a_dataloader_draws_its_generator_classes_from_the_datasets_labels():
    # before: refused ("class_sampling='data' ... a DataLoader does not hold in memory"), the default refused
    points, classes = ring(30), torch.tensor([0] * 26 + [1] * 4)  # class 2 absent, class 1 rare
    seen = GeneratorClasses()
    run = conditional_gan(DataLoader(TensorDataset(points, classes), batch_size=10, shuffle=True,
                                     generator=torch.Generator().manual_seed(4)), seen)
    by_hand = classes[torch.randint(0, 30, (50,), generator=torch.Generator().manual_seed(7))]
    assert torch.equal(run.sample_classes(50, generator=torch.Generator().manual_seed(7)), by_hand)
    run.train(6)
    drawn = torch.cat(seen.classes)
    assert drawn.numel() == 60 and int((drawn == 2).sum()) == 0 and int((drawn == 0).sum()) > int((drawn == 1).sum())


def test_an_image_folders_targets_are_its_class_pool_and_what_cannot_give_them_is_refused(tmp_path):
    from torch.utils.data import Subset, WeightedRandomSampler
    from torchvision import datasets, transforms

    rng = np.random.default_rng(0)
    for name, count in (("a", 5), ("b", 2), ("c", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    to_points = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(),
                                    transforms.Lambda(lambda x: x.reshape(-1)[:2].double())])
    folder = datasets.ImageFolder(tmp_path, transform=to_points)
    run = conditional_gan(DataLoader(folder, batch_size=4))
    assert torch.equal(run._data_classes, torch.tensor([0] * 5 + [1] * 2 + [2]))
    run.train(2)
    relabelled = datasets.ImageFolder(tmp_path, transform=to_points, target_transform=lambda y: 2 - y)
    weighted = DataLoader(folder, batch_size=4, sampler=WeightedRandomSampler([1.0] * 8, 8))
    for data, why in ((DataLoader(relabelled, batch_size=4), "target_transform"),
                      (weighted, "WeightedRandomSampler"),
                      (DataLoader(Subset(folder, [0, 5, 7]), batch_size=2), "has no `targets`")):
        with pytest.raises(ValueError, match=f"class_sampling='data'.*{why}.*class_sampling='uniform'"):
            conditional_gan(data)
        conditional_gan(data, class_sampling="uniform")  # each class equally often needs no labels


def test_uniform_classes_absent_from_a_loaders_dataset_warn_as_on_tensor_data():
    data = DataLoader(TensorDataset(ring(12), torch.tensor([0, 1] * 6)), batch_size=6)
    with pytest.warns(RuntimeWarning, match=r"no real sample has class \[2\]"):
        conditional_gan(data, class_sampling="uniform")


def test_a_resume_on_a_dataset_with_other_class_counts_is_refused(tmp_path):
    def data(classes):
        return DataLoader(TensorDataset(ring(12), classes), batch_size=6)

    run = conditional_gan(data(torch.tensor([0, 1, 2] * 4)))
    run.train(2)
    run.save_checkpoint(tmp_path / "run.pt")
    other = conditional_gan(data(torch.tensor([0] * 10 + [1, 2])))
    with pytest.raises(ValueError, match="class_counts"):
        other.load_checkpoint(tmp_path / "run.pt")
    again = conditional_gan(data(torch.tensor([0, 1, 2] * 4)))
    again.load_checkpoint(tmp_path / "run.pt")
    run.train(2)
    again.train(2)
    same(run.generator.state_dict(), again.generator.state_dict())
