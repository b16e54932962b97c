"""Review of the local torchvision data sets (genkernel.data.torchvision_sets) and of the class pool a
conditional GANTrainer draws its generator's classes from on a DataLoader (core.tracking.batches.
dataset_class_labels, class_sampling="data").

What must hold: the class pool is exactly the labels the loader's batches carry over an epoch (checked
against iterating the loader), or the loader is refused with the fix; reading it draws from no RNG;
torchvision sets are read from local files only, with clear errors naming the files.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import (
    BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset, default_collate,
)
from torch.utils.data.distributed import DistributedSampler

from genkernel.core.tracking.batches import dataset_class_labels
from genkernel.data import load_image_dataset
from test_data import _fake_cifar10, _fake_mnist
from test_gan_dataloader import conditional_gan

pytestmark = pytest.mark.usefixtures("one_thread")


def epoch_labels(data):
    """Brute force: the labels of one epoch of ``data``'s batches, in the order they come."""
    return torch.cat([torch.as_tensor(batch[1]).reshape(-1) for batch in data]).long()


def same_classes(found, data):
    """``found`` holds the labels of one epoch of ``data`` (as a multiset: a shuffled loader's order differs)."""
    assert torch.equal(found.sort().values, epoch_labels(data).sort().values)


def points_and_classes(n=10):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), \
        torch.tensor([0] * 5 + [1] * 3 + [2] * 2)[:n]


# -- datasets whose labels are not their `targets` -------------------------------------------------------------------

class Relabelled(Dataset):
    """`targets` as torchvision keeps them, but __getitem__ gives other labels (2 - y)."""

    def __init__(self, points, classes):
        self.points, self.targets = points, classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.points[i], 2 - self.targets[i]


class RelabelledTensors(TensorDataset):
    def __getitem__(self, i):
        points, classes = self.tensors
        return points[i], 2 - classes[i]


def test_a_dataset_whose_getitem_is_its_own_is_refused_not_read_from_its_targets():
    # before: both accepted, the pool [0]*5 + [1]*3 + [2]*2 while the batches carried [2]*5 + [1]*3 + [0]*2
    points, classes = points_and_classes()
    for dataset in (Relabelled(points, classes), RelabelledTensors(points, classes)):
        data = DataLoader(dataset, batch_size=4)
        assert not torch.equal(classes, epoch_labels(data))  # what the old pool promised and broke
        with pytest.raises(ValueError, match=f"{type(dataset).__name__}.*own __getitem__"):
            dataset_class_labels(data)
        with pytest.raises(ValueError, match="class_sampling='data'.*own __getitem__.*class_sampling='uniform'"):
            conditional_gan(data)
        conditional_gan(data, class_sampling="uniform")


def test_a_collate_fn_of_its_own_is_refused():
    # before: accepted, while the batches' labels were remapped by the collate_fn
    points, classes = points_and_classes()

    def remap(samples):
        x, y = default_collate(samples)
        return x, 2 - y

    data = DataLoader(TensorDataset(points, classes), batch_size=4, collate_fn=remap)
    assert not torch.equal(classes, epoch_labels(data))
    with pytest.raises(ValueError, match="collate_fn of its own \\(remap\\)"):
        dataset_class_labels(data)
    plain = DataLoader(TensorDataset(points, classes), batch_size=4, collate_fn=default_collate)
    assert torch.equal(dataset_class_labels(plain), epoch_labels(plain))


def test_samplers_over_part_of_the_dataset_and_odd_batch_samplers_are_refused():
    # before: SequentialSampler / RandomSampler over range(5) of 10 examples, and a BatchSampler subclass
    # with its own order, were accepted with the pool of all 10 examples
    points, classes = points_and_classes()
    dataset = TensorDataset(points, classes)

    class FirstOnly(BatchSampler):
        def __iter__(self):
            for _ in range(len(self)):
                yield [0] * self.batch_size

    partial = {
        "sequential over 5": DataLoader(dataset, batch_size=2, sampler=SequentialSampler(range(5))),
        "random over 5": DataLoader(dataset, batch_size=2, sampler=RandomSampler(range(5))),
        "batch sampler over 5": DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(range(5)), 2, False)),
    }
    for name, data in partial.items():
        assert epoch_labels(data).numel() == 5, name
        with pytest.raises(ValueError, match="over all 10 examples"):
            dataset_class_labels(data)
    odd = DataLoader(dataset, batch_sampler=FirstOnly(SequentialSampler(dataset), 2, False))
    assert set(epoch_labels(odd).tolist()) == {0}
    with pytest.raises(ValueError, match="batch sampler \\(FirstOnly\\) is not torch's BatchSampler"):
        dataset_class_labels(odd)
    # coverage: refused before as well
    with pytest.raises(ValueError, match="DistributedSampler"):
        dataset_class_labels(DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 2, 0)))
    # accepted: the whole dataset, each example once
    for data in (DataLoader(dataset, batch_size=3), DataLoader(dataset, batch_size=3, shuffle=True),
                 DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(range(10)), 3, False))):
        same_classes(dataset_class_labels(data), data)


def test_drop_last_in_order_leaves_out_the_examples_never_seen():
    # before: the pool held class 2, which no batch ever carried (the last 2 of 10 examples, dropped each epoch):
    # the generator was trained on a class the discriminator never saw real rows of
    points, classes = points_and_classes()
    data = DataLoader(TensorDataset(points, classes), batch_size=4, drop_last=True)
    pool = dataset_class_labels(data)
    assert torch.equal(pool, epoch_labels(data)) and 2 not in pool.tolist()
    run = conditional_gan(data)
    assert torch.equal(run._data_classes, epoch_labels(data))
    # shuffled, each example is dropped equally often: all are kept (coverage)
    shuffled = DataLoader(TensorDataset(points, classes), batch_size=4, drop_last=True, shuffle=True)
    assert torch.equal(dataset_class_labels(shuffled), classes)
    with pytest.raises(ValueError, match="drops all 10 examples"):
        dataset_class_labels(DataLoader(TensorDataset(points, classes), batch_size=16, drop_last=True))


def test_a_resume_with_drop_last_changed_is_refused(tmp_path):
    # before: the checkpoint recorded [5, 3, 2] (class 2 never in a batch) and both loaders resumed alike; the
    # class counts are now those of the examples the batches hold
    points, classes = points_and_classes()
    run = conditional_gan(DataLoader(TensorDataset(points, classes), batch_size=4, drop_last=True))
    run.train(1)
    run.save_checkpoint(tmp_path / "run.pt")
    assert torch.load(tmp_path / "run.pt", weights_only=False)["config"]["class_counts"] == [5, 3, 0]
    other = conditional_gan(DataLoader(TensorDataset(points, classes), batch_size=4))
    with pytest.raises(ValueError, match="class_counts"):
        other.load_checkpoint(tmp_path / "run.pt")


# -- torchvision data sets: MNIST (targets a tensor), CIFAR10 (a list), ImageFolder (samples) ------------------------

def to_points():
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda x: x.reshape(-1)[:2].double())])


def test_torchvision_mnist_and_cifar10_pools_are_their_batches_labels(tmp_path, monkeypatch):
    # coverage: MNIST's targets is a uint8 tensor, CIFAR10's a list of ints; both are read as the batches' labels
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

    _fake_mnist(tmp_path / "m")
    _fake_cifar10(tmp_path / "c", monkeypatch)
    mnist = MNIST(str(tmp_path / "m"), train=False, transform=to_points(), download=False)
    cifar = CIFAR10(str(tmp_path / "c"), train=True, transform=to_points(), download=False)
    assert isinstance(mnist.targets, torch.Tensor) and isinstance(cifar.targets, list)
    for dataset in (mnist, cifar):
        data = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
        same_classes(dataset_class_labels(data), data)
    fashion = tmp_path / "m" / "FashionMNIST"
    (tmp_path / "m" / "MNIST").rename(fashion)  # a subclass keeping MNIST's __getitem__
    data = DataLoader(FashionMNIST(str(tmp_path / "m"), train=False, transform=to_points()), batch_size=4)
    assert torch.equal(dataset_class_labels(data), epoch_labels(data))
    relabelled = FashionMNIST(str(tmp_path / "m"), train=False, transform=to_points(), target_transform=lambda y: 0)
    with pytest.raises(ValueError, match="target_transform"):
        dataset_class_labels(DataLoader(relabelled, batch_size=4))


def image_folder(root, counts):
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_an_image_folders_pool_is_read_from_its_samples(tmp_path):
    # before: read from `targets`; an ImageFolder whose `samples` were edited (a common way to subset or relabel
    # it) without its `targets` gave the old labels: here class 2 (never in a batch) instead of class 0
    from torchvision.datasets import ImageFolder

    image_folder(tmp_path, {"a": 3, "b": 2, "c": 1})
    folder = ImageFolder(str(tmp_path), transform=to_points())
    folder.samples = [(path, 0 if label == 2 else label) for path, label in folder.samples]  # c relabelled a
    data = DataLoader(folder, batch_size=4)
    assert folder.targets == [0, 0, 0, 1, 1, 2]
    assert torch.equal(dataset_class_labels(data), epoch_labels(data))
    assert torch.equal(conditional_gan(data)._data_classes, torch.tensor([0, 0, 0, 1, 1, 0]))


def test_image_folder_class_subsets_give_the_batches_labels(tmp_path):
    # coverage: an empty class folder (allow_empty) and is_valid_file keep classes' indices, some absent
    from torchvision.datasets import ImageFolder

    image_folder(tmp_path, {"a": 3, "b": 2, "c": 2})
    (tmp_path / "empty").mkdir()
    for folder in (ImageFolder(str(tmp_path), transform=to_points(), allow_empty=True),
                   ImageFolder(str(tmp_path), transform=to_points(), allow_empty=True,
                               is_valid_file=lambda p: not p.endswith("1.png"))):
        data = DataLoader(folder, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
        pool = dataset_class_labels(data)
        same_classes(pool, data)
    assert torch.bincount(pool, minlength=4).tolist() == [2, 1, 1, 0]  # a/1.png, b/1.png, c/1.png left out


def test_reading_the_pool_and_building_the_trainer_draw_from_no_global_rng(tmp_path):
    # coverage: a transform drawing from the global RNG is never run to read the labels
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    image_folder(tmp_path, {"a": 2, "b": 2, "c": 2})
    jitter = transforms.Compose([to_points(), transforms.Lambda(lambda x: x + torch.randn(2, dtype=x.dtype))])
    data = DataLoader(ImageFolder(str(tmp_path), transform=jitter), batch_size=2, shuffle=True,
                      generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    dataset_class_labels(data)
    assert torch.equal(before, torch.get_rng_state())
    run = conditional_gan(data)  # seeds the global RNG itself, then builds the trainer
    after_build = torch.get_rng_state()
    run.sample_classes(7)
    assert torch.equal(after_build, torch.get_rng_state())


# -- torchvision_sets: local files only ------------------------------------------------------------------------------

def no_network(monkeypatch):
    import urllib.request

    import torchvision.datasets.utils as utils

    def refuse(*args, **kwargs):
        raise AssertionError("a network access was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    for name in ("download_url", "download_and_extract_archive", "download_file_from_google_drive"):
        monkeypatch.setattr(utils, name, refuse, raising=False)


def test_missing_or_present_files_never_touch_the_network(tmp_path, monkeypatch):
    # coverage: a missing set names its files, a present one is read, neither downloads
    no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="genkernel never downloads"):
        load_image_dataset("mnist", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="genkernel never downloads"):
        load_image_dataset("cifar10", data_root=tmp_path)
    written = _fake_mnist(tmp_path / "m", gz=True)
    images, labels = load_image_dataset("mnist", data_root=tmp_path / "m", train=False)
    assert torch.equal(images[:, 0], torch.from_numpy(written["t10k"][0]).float() / 255)
    _fake_cifar10(tmp_path / "c", monkeypatch)
    assert load_image_dataset("cifar10", data_root=tmp_path / "c")[0].shape == (20, 3, 32, 32)


def test_seeded_subsets_are_reproducible_and_leave_the_global_rng_alone(tmp_path):
    # coverage
    _fake_mnist(tmp_path)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = load_image_dataset("mnist", data_root=tmp_path, per_class=2, seed=0)
    b = load_image_dataset("mnist", data_root=tmp_path, per_class=2, seed=torch.Generator().manual_seed(0))
    c = load_image_dataset("mnist", data_root=tmp_path, per_class=2, seed=1)
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.long and 0 <= float(a[0].min()) <= float(a[0].max()) <= 1


def test_unreadable_legacy_mnist_files_are_refused_by_name(tmp_path):
    # before: torch.load's bare UnpicklingError, advising weights_only=False (running arbitrary code)
    _fake_mnist(tmp_path)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(b"not a tensor file" * 4)
    with pytest.raises(ValueError, match=r"legacy files .*training\.pt.*remove them") as info:
        load_image_dataset("mnist", data_root=tmp_path)
    assert "weights_only" not in str(info.value)


def test_a_file_as_data_root_is_named_as_a_file(tmp_path):
    # before: "does not exist or is not a folder", then paths below the file (.../train-images-idx3-ubyte/MNIST/raw/...)
    _fake_mnist(tmp_path)
    file = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="is a file, not a folder") as info:
        load_image_dataset("mnist", data_root=file)
    assert str(file / "MNIST") not in str(info.value)
