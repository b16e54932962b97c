"""Tests for genkernel.data: toy sets, digits, local MNIST / CIFAR-10 loading, printed digits."""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from genkernel.data import (
    balanced_subset,
    circle_task,
    ellipse_task,
    gaussian_grid,
    gaussian_ring,
    grid_mode_centers,
    load_digits_images,
    load_image_dataset,
    regression_1d,
    render_printed_digits,
    ring_mode_centers,
    two_moons,
)


def _com(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) centres of mass of Tensor[N, 1, H, W]."""
    x = images[:, 0].double()
    rows = torch.arange(x.shape[1], dtype=torch.float64)
    cols = torch.arange(x.shape[2], dtype=torch.float64)
    m = x.sum((1, 2))
    return (x.sum(2) * rows).sum(1) / m, (x.sum(1) * cols).sum(1) / m


# ------------------------------------------------------------------------------------------
# toy 2-D / 1-D sets
# ------------------------------------------------------------------------------------------
def test_gaussian_ring_shapes_near_centres_and_deterministic():
    pts, ids = gaussian_ring(400, num_modes=8, radius=2.0, std=0.02, seed=3)
    assert pts.shape == (400, 2) and pts.dtype == torch.float32
    assert ids.shape == (400,) and ids.dtype == torch.long
    assert torch.bincount(ids, minlength=8).tolist() == [50] * 8
    centers = ring_mode_centers(8, 2.0)
    assert centers.shape == (8, 2)
    assert torch.allclose(centers.norm(dim=1), torch.full((8,), 2.0))
    dist = (pts - centers[ids]).norm(dim=1)
    assert dist.max() < 0.02 * 6  # within 6 sigma of its own centre
    # nearest centre is the own centre
    assert torch.equal(torch.cdist(pts, centers).argmin(1), ids)
    pts2, ids2 = gaussian_ring(400, num_modes=8, radius=2.0, std=0.02, seed=3)
    assert torch.equal(pts, pts2) and torch.equal(ids, ids2)
    pts3, _ = gaussian_ring(400, seed=4)
    assert not torch.equal(pts, pts3)
    g = torch.Generator().manual_seed(3)
    pts4, _ = gaussian_ring(400, seed=g)
    assert torch.equal(pts, pts4)


def test_gaussian_grid():
    pts, ids = gaussian_grid(250, side=5, spacing=2.0, std=0.05, seed=0)
    centers = grid_mode_centers(5, 2.0)
    assert centers.shape == (25, 2)
    assert torch.allclose(centers.mean(0), torch.zeros(2), atol=1e-6)
    assert centers.min() == -4.0 and centers.max() == 4.0
    assert pts.shape == (250, 2) and ids.max() == 24 and ids.min() == 0
    assert ((pts - centers[ids]).norm(dim=1) < 0.05 * 6).all()
    assert torch.equal(gaussian_grid(250, seed=0)[0], pts)


def test_two_moons():
    pts, lab = two_moons(101, noise=0.05, seed=1)
    assert pts.shape == (101, 2) and pts.dtype == torch.float32 and lab.dtype == torch.long
    assert set(lab.tolist()) == {0, 1}
    assert torch.equal(two_moons(101, noise=0.05, seed=1)[0], pts)
    assert not torch.equal(two_moons(101, noise=0.05, seed=2)[0], pts)


def test_circle_task_geometry_and_balance():
    X, y = circle_task(1000, seed=0)
    assert X.shape == (1000, 2) and y.shape == (1000,) and X.dtype == torch.float32
    assert set(y.tolist()) == {-1.0, 1.0}
    assert int((y == 1).sum()) == 500 and int((y == -1).sum()) == 500
    r2 = (X.double() ** 2).sum(1)
    assert (r2[y == 1].sqrt() - 1.0).abs().max() < 1e-6
    assert r2[y == -1].max() <= 0.8 + 1e-6
    # uniform by area: about half the inner points inside radius^2 0.4
    frac = float((r2[y == -1] <= 0.4).double().mean())
    assert 0.4 < frac < 0.6
    X2, y2 = circle_task(1000, seed=0)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    X64, _ = circle_task(10, seed=0, dtype=torch.float64)
    assert X64.dtype == torch.float64
    Xo, yo = circle_task(7, seed=0)
    assert Xo.shape == (7, 2) and int((yo == 1).sum()) == 3


def test_ellipse_task_geometry():
    X, y = ellipse_task(800, a=100.0, level=0.9, seed=2)
    q = 100.0 * X[:, 0].double() ** 2 + X[:, 1].double() ** 2
    assert int((y == 1).sum()) == 400 and int((y == -1).sum()) == 400
    assert (q[y == 1] - 1.0).abs().max() < 1e-5
    assert q[y == -1].max() <= 0.9 + 1e-5
    assert X[:, 0].abs().max() <= 0.1 + 1e-6
    # a = 1 is the isotropic task of Figure 3
    Xc, yc = ellipse_task(200, a=1.0, level=0.9, seed=0)
    r2 = (Xc.double() ** 2).sum(1)
    assert (r2[yc == 1].sqrt() - 1).abs().max() < 1e-6 and r2[yc == -1].max() <= 0.9 + 1e-6


def test_regression_1d():
    x, y = regression_1d("sin", 64, seed=0)
    assert x.shape == (64, 1) and y.shape == (64, 1) and x.dtype == torch.float32
    assert x.min() >= -math.pi - 1e-6 and x.max() <= math.pi + 1e-6
    assert torch.all(x[1:] >= x[:-1])
    assert torch.allclose(y, torch.sin(x), atol=1e-6)
    xs, ys = regression_1d("square", 64, seed=0)
    assert torch.equal(xs, x)
    assert set(ys.reshape(-1).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(ys[x > 0.01], torch.ones_like(ys[x > 0.01]))
    assert torch.equal(ys[x < -0.01], -torch.ones_like(ys[x < -0.01]))
    xg, _ = regression_1d("sin", 5, grid=True)
    assert torch.allclose(xg.reshape(-1), torch.linspace(-math.pi, math.pi, 5))
    assert torch.equal(regression_1d("sin", 64, seed=0)[0], x)


def test_toy_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        regression_1d("cos", 10)
    with pytest.raises(TypeError, match="n must be an int"):
        gaussian_ring(10.5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        gaussian_ring(0)
    with pytest.raises(ValueError, match="radius_sq_inner"):
        circle_task(10, radius_sq_inner=1.2)
    with pytest.raises(ValueError, match="level"):
        ellipse_task(10, level=1.0)
    with pytest.raises(TypeError, match="seed"):
        gaussian_grid(10, seed="x")
    with pytest.raises(ValueError, match="std"):
        gaussian_ring(10, std=-1.0)
    for seed in (-1, 2**64):  # 2**64 overflowed manual_seed ("Overflow when unpacking long long")
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            gaussian_ring(10, seed=seed)
    with pytest.raises(TypeError, match="classes must be a sequence"):
        load_digits_images(classes=torch.tensor(3))  # 0-d: was "'int' object is not iterable"


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------
def test_load_digits_images_shapes_and_scale():
    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert images.min() >= 0 and images.max() <= 1 and images.max() == 1.0
    assert 0.25 < float(images.mean()) < 0.35
    native, lab8 = load_digits_images(size=8)
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert torch.allclose(native[:, 0], torch.tensor(ref.images, dtype=torch.float32) / 16)
    assert torch.equal(lab8, torch.tensor(ref.target))


def test_digits_per_class_ordering_and_determinism():
    images, labels = load_digits_images(per_class=10, seed=0)
    assert images.shape == (100, 1, 16, 16)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(10))
    images2, _ = load_digits_images(per_class=10, seed=0)
    assert torch.equal(images, images2)
    images3, _ = load_digits_images(per_class=10, seed=1)
    assert not torch.equal(images, images3)
    img, lab = load_digits_images(classes=[3, 1], per_class=4, seed=None, size=8)
    assert lab.tolist() == [3] * 4 + [1] * 4
    all8, all_lab = load_digits_images(size=8)
    first3 = torch.nonzero(all_lab == 3).reshape(-1)[:4]
    assert torch.equal(img[:4], all8[first3])
    sub, sub_lab = load_digits_images(classes=[0, 1])
    assert set(sub_lab.tolist()) == {0, 1} and sub.shape[0] == int(((all_lab == 0) | (all_lab == 1)).sum())
    tr, _ = load_digits_images(split="train", size=8)
    te, _ = load_digits_images(split="test", size=8)
    assert tr.shape[0] + te.shape[0] == 1797 and torch.equal(torch.cat([tr, te]), all8)


def test_resize_images_matches_bilinear_for_images_in_minus_one_one():
    """Images already mapped to [-1, 1] (the diffusion / GAN range) were clamped to [0, 1]:
    every negative pixel became 0 (max error 0.96)."""
    from genkernel.data import resize_images

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 12, generator=g, dtype=torch.float64) * 2 - 1
    for size, aa in ((24, False), (7, True)):
        ref = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=aa)
        out = resize_images(x, size)
        assert out.shape == (3, 2, size, size) and float(out.min()) < -0.5
        assert float((out - ref).abs().max()) < 1e-12
        assert x.min() <= out.min() and out.max() <= x.max()
    unit, _ = load_digits_images(size=8, per_class=2)
    up = resize_images(unit, 32)
    assert float(up.min()) >= 0.0 and float(up.max()) <= 1.0
    assert float((resize_images(unit * 2 - 1, 32) - (up * 2 - 1)).abs().max()) < 1e-6  # resize, then map = map, then resize
    with pytest.raises(ValueError, match="NaN"):
        resize_images(torch.full((1, 1, 4, 4), float("nan")), 8)


def test_balanced_subset():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1, 1])
    idx = balanced_subset(labels, 2, seed=None)
    assert idx.tolist() == [1, 3, 2, 5, 0, 4]
    idx = balanced_subset(labels, 3, seed=5)
    assert labels[idx].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(idx, balanced_subset(labels, 3, seed=5))
    assert balanced_subset(labels.numpy(), 1, seed=None, classes=[2, 0]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="class 0 has only 3"):
        balanced_subset(labels, 4)
    with pytest.raises(TypeError, match="integers"):
        balanced_subset(labels.float(), 1)


# ------------------------------------------------------------------------------------------
# MNIST / CIFAR-10 from tiny local files
# ------------------------------------------------------------------------------------------
def _write_idx_images(path: Path, arr: np.ndarray) -> None:
    n, h, w = arr.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, h, w) + arr.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, lab: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x00000801, len(lab)) + lab.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, *, gz: bool = False):
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = np.arange(n, dtype=np.uint8) % 10
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", imgs)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labs)
        out[prefix] = (imgs, labs)
    if gz:
        for f in list(raw.iterdir()):
            with open(f, "rb") as src, gzip.open(str(f) + ".gz", "wb") as dst:
                dst.write(src.read())
            f.unlink()
    return out


def test_mnist_from_tiny_idx_files(tmp_path):
    written = _fake_mnist(tmp_path)
    images, labels = load_image_dataset("mnist", data_root=tmp_path)
    imgs, labs = written["train"]
    assert images.shape == (30, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(labels, torch.from_numpy(labs.astype(np.int64)))
    assert torch.allclose(images[:, 0], torch.from_numpy(imgs).float() / 255)
    test_images, test_labels = load_image_dataset("MNIST", data_root=str(tmp_path), train=False)
    assert test_images.shape == (10, 1, 28, 28)
    assert torch.allclose(test_images[:, 0], torch.from_numpy(written["t10k"][0]).float() / 255)
    # per-class subset, ordered by class, resized to 16
    sub, sub_lab = load_image_dataset("mnist", data_root=tmp_path, per_class=2, size=16, seed=None)
    assert sub.shape == (20, 1, 16, 16) and sub_lab.tolist() == [c for c in range(10) for _ in range(2)]
    assert sub.min() >= 0 and sub.max() <= 1
    lim, lim_lab = load_image_dataset("mnist", data_root=tmp_path, classes=[1, 2], limit=3)
    assert lim_lab.tolist() == [1, 2, 1]


def test_mnist_gz_files_are_accepted(tmp_path):
    written = _fake_mnist(tmp_path, gz=True)
    images, labels = load_image_dataset("mnist", data_root=tmp_path, train=False)
    assert torch.allclose(images[:, 0], torch.from_numpy(written["t10k"][0]).float() / 255)


def test_mnist_missing_files_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST[/\\]raw[/\\]train-images-idx3-ubyte"):
        load_image_dataset("mnist", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("mnist", data_root=tmp_path / "nowhere")


def test_broken_mnist_files_are_refused_clearly_and_leave_nothing_behind(tmp_path):
    _fake_mnist(tmp_path / "truncated", gz=True)
    raw = tmp_path / "truncated" / "MNIST" / "raw"
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])  # a download cut short
    for _ in range(2):  # and again: no half-written file was left to be read as the data
        with pytest.raises(FileNotFoundError, match="truncated"):
            load_image_dataset("mnist", data_root=tmp_path / "truncated")
        assert not (raw / "train-images-idx3-ubyte").exists()
    cases = {
        "labels file as images": lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(
            (raw / "train-labels-idx1-ubyte").read_bytes()),
        "fewer labels": lambda raw: _write_idx_labels(raw / "train-labels-idx1-ubyte", np.arange(20) % 10),
        "more labels": lambda raw: _write_idx_labels(raw / "train-labels-idx1-ubyte", np.arange(40) % 10),
        "labels past 9": lambda raw: _write_idx_labels(raw / "train-labels-idx1-ubyte", np.arange(30) % 12),
    }
    for name, break_it in cases.items():
        root = tmp_path / name.replace(" ", "_")
        _fake_mnist(root)
        break_it(root / "MNIST" / "raw")
        with pytest.raises(ValueError, match="MNIST"):
            load_image_dataset("mnist", data_root=root)


def test_mnist_files_that_are_not_idx_are_refused_by_name(tmp_path):
    """torchvision only asserts on the IDX header: a gzip or HTML file under the plain name
    raised a bare AssertionError with no message."""
    cases = {
        "gzip under the plain name": (lambda f: f.write_bytes(gzip.compress(f.read_bytes())), "gzip-compressed"),
        "html page": (lambda f: f.write_bytes(b"<html>404 Not Found</html>" * 8), "not an MNIST IDX file"),
        "empty": (lambda f: f.write_bytes(b""), "not an MNIST IDX file"),
    }
    for name, (break_it, message) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        _fake_mnist(root)
        break_it(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
        with pytest.raises(ValueError, match=message):
            load_image_dataset("mnist", data_root=root, train=False)


def test_mnist_legacy_processed_files_read_as_uint8_or_refused(tmp_path):
    """torchvision prefers MNIST/processed/{training,test}.pt; float images there were divided by
    255 once more (max 0.0039 instead of 1)."""
    written = _fake_mnist(tmp_path / "ok")
    processed = tmp_path / "ok" / "MNIST" / "processed"
    processed.mkdir()
    legacy = {}
    for fname, prefix in (("training.pt", "train"), ("test.pt", "t10k")):
        imgs, labs = written[prefix]
        legacy[prefix] = (torch.from_numpy(imgs[::-1].copy()), torch.from_numpy(labs[::-1].astype(np.int64)))
        torch.save(legacy[prefix], processed / fname)
    images, labels = load_image_dataset("mnist", data_root=tmp_path / "ok", train=False)
    assert torch.equal(labels, legacy["t10k"][1])  # the processed files win, as in torchvision
    assert torch.equal(images[:, 0], legacy["t10k"][0].float() / 255)
    _fake_mnist(tmp_path / "float")
    processed = tmp_path / "float" / "MNIST" / "processed"
    processed.mkdir()
    for fname in ("training.pt", "test.pt"):
        torch.save((torch.rand(5, 28, 28), torch.arange(5)), processed / fname)  # already in [0, 1]
    with pytest.raises(ValueError, match="not uint8"):
        load_image_dataset("mnist", data_root=tmp_path / "float")


def test_data_root_one_folder_too_deep_names_the_right_one(tmp_path, monkeypatch):
    _fake_mnist(tmp_path / "m")
    for inner in ("MNIST", "MNIST/raw"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"pass data_root={str(tmp_path / 'm')!r}")):
            load_image_dataset("mnist", data_root=tmp_path / "m" / inner)
    _fake_cifar10(tmp_path / "c", monkeypatch)
    with pytest.raises(FileNotFoundError, match=re.escape(f"pass its parent, data_root={str(tmp_path / 'c')!r}")):
        load_image_dataset("cifar10", data_root=tmp_path / "c" / "cifar-10-batches-py")


def _fake_cifar10(root: Path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 4
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f, protocol=2)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072}, f, protocol=2)

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    # torchvision checks the official md5 sums; point it at our tiny files' sums instead
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5("batches.meta")})
    return written


def test_cifar10_from_tiny_pickles(tmp_path, monkeypatch):
    written = _fake_cifar10(tmp_path, monkeypatch)
    images, labels = load_image_dataset("cifar10", data_root=tmp_path)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.float32
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labs = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(images, expected)
    assert labels.tolist() == labs
    test_images, test_labels = load_image_dataset("cifar10", data_root=tmp_path, train=False, size=16)
    assert test_images.shape == (4, 3, 16, 16) and test_labels.tolist() == written["test_batch"][1]
    assert test_images.min() >= 0 and test_images.max() <= 1


def test_cifar10_checksums_are_enforced(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"corrupted")
    with pytest.raises(RuntimeError, match="md5"):
        load_image_dataset("cifar10", data_root=tmp_path)


def test_cifar10_missing_files_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py[/\\]data_batch_1"):
        load_image_dataset("cifar10", data_root=tmp_path)


def test_load_image_dataset_digits_and_bad_names(tmp_path, monkeypatch):
    images, labels = load_image_dataset("digits", per_class=3, size=16)
    assert images.shape == (30, 1, 16, 16) and labels.tolist() == [c for c in range(10) for _ in range(3)]
    native, _ = load_image_dataset("digits", limit=5)
    assert native.shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="digits, mnist, cifar10"):
        load_image_dataset("fashion")
    with pytest.raises(ValueError, match="not both"):
        load_image_dataset("digits", per_class=2, limit=3)
    monkeypatch.delenv("GENKERNEL_DATA_ROOT", raising=False)
    with pytest.raises(ValueError, match="data_root"):
        load_image_dataset("mnist")


# ------------------------------------------------------------------------------------------
# printed digits
# ------------------------------------------------------------------------------------------
FAST_FONTS = ["DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral"]


def test_printed_digits_basic():
    images, labels, variants = render_printed_digits(fonts=FAST_FONTS, per_digit=6, seed=0, return_variants=True)
    hand, _ = load_digits_images(per_class=1)
    assert images.shape == (60, 1) + tuple(hand.shape[-2:]) and images.dtype == torch.float32
    assert torch.equal(labels, torch.arange(10).repeat_interleave(6))
    assert images.min() >= 0 and images.max() <= 1
    assert (images.amax(dim=(1, 2, 3)) > 0.5).all()  # every image has ink
    assert 0.15 < float(images.mean()) < 0.45  # handwritten mean is about 0.3
    assert len(variants) == 6 and len({v["font"] for v in variants}) == 4
    images2, _ = render_printed_digits(fonts=FAST_FONTS, per_digit=6, seed=0)
    assert torch.equal(images, images2)


def test_printed_digits_centred_without_shifts():
    for size in (16, 8):
        images, _ = render_printed_digits(size=size, fonts=FAST_FONTS, shifts=(0,), per_digit=None)
        assert images.shape == (10 * len(FAST_FONTS) * 3, 1, size, size)
        r, c = _com(images)
        centre = (size - 1) / 2
        assert (r - centre).abs().max() < 1.5 and (c - centre).abs().max() < 1.5


def test_printed_digits_fonts_differ_and_shifts_move():
    a, _ = render_printed_digits(fonts=["DejaVu Sans"], sizes=(0.85,), shifts=(0,), per_digit=1)
    b, _ = render_printed_digits(fonts=["DejaVu Serif"], sizes=(0.85,), shifts=(0,), per_digit=1)
    assert ((a - b).abs().sum(dim=(1, 2, 3)) > 1.0).all()
    s, _, var = render_printed_digits(fonts=["DejaVu Sans"], sizes=(0.75,), shifts=(-1, 0, 1), per_digit=None,
                                      return_variants=True)
    r, c = _com(s)
    for j, v in enumerate(var):
        dx, dy = v["shift"]
        assert abs(float(c[j]) - 7.5 - dx) < 0.2 and abs(float(r[j]) - 7.5 - dy) < 0.2
    with pytest.raises(ValueError, match="unknown font"):
        render_printed_digits(fonts=["Comic Sans"])
    with pytest.raises(ValueError, match="per_digit"):
        render_printed_digits(fonts=["DejaVu Sans"], sizes=(0.8,), shifts=(0,), per_digit=2)


def test_printed_digits_small_heights_are_rendered_at_that_height_or_refused():
    """The ink's height is ``sizes`` × size: heights below 0.33 (0.25 + the stroke) all came out
    0.33, so distinct ``sizes`` gave identical images."""
    size = 32
    for height in (0.2, 0.3, 0.5):
        images, _ = render_printed_digits(size=size, fonts=["DejaVu Sans"], sizes=(height,), shifts=(0,), per_digit=1)
        ink_rows = (images[:, 0].amax(dim=2) > 0.02).sum(dim=1).double() / size  # [10] per digit
        assert float((ink_rows - height).abs().max()) <= 2 / size, (height, ink_rows)
    with pytest.raises(ValueError, match="sizes must exceed stroke"):
        render_printed_digits(size=size, fonts=["DejaVu Sans"], sizes=(0.05,), stroke=0.08, per_digit=1)
