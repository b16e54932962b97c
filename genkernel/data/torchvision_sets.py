"""Image data sets as tensors: sklearn digits, and MNIST / CIFAR-10 from local files.

Nothing here downloads. MNIST and CIFAR-10 are read through ``torchvision.datasets``
(``download=False``, torchvision's own checksum checks intact) from a folder the user
provides:

    DATA_ROOT/MNIST/raw/train-images-idx3-ubyte     (the four standard MNIST files,
    DATA_ROOT/MNIST/raw/train-labels-idx1-ubyte      gunzipped; ``.gz`` files are
    DATA_ROOT/MNIST/raw/t10k-images-idx3-ubyte       gunzipped in place if that is
    DATA_ROOT/MNIST/raw/t10k-labels-idx1-ubyte       all there is; torchvision's legacy
                                                     MNIST/processed/training.pt and test.pt,
                                                     uint8 images, are read instead when
                                                     both exist)

    DATA_ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
                                                    (cifar-10-python.tar.gz extracted; a
                                                     tarball in DATA_ROOT is extracted)

``DATA_ROOT`` is the ``data_root`` argument, or the environment variable
``GENKERNEL_DATA_ROOT`` when ``data_root`` is None.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .digits import _check_classes, _select, load_digits_images, resize_images
from .toy2d import SeedLike, _check_int

__all__ = ["load_image_dataset", "SUPPORTED_DATASETS", "DATA_ROOT_ENV"]

SUPPORTED_DATASETS = ("digits", "mnist", "cifar10")
DATA_ROOT_ENV = "GENKERNEL_DATA_ROOT"

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
# the recipes' command-line form of data_root: the messages name both, read from Python or from a recipe's command line
CLI_OPTION = "--data-root"
_HOW_TO_GET = "download them on a machine with internet access and copy them here (genkernel never downloads)"


def _resolve_root(name: str, data_root) -> Path:
    if data_root is None:
        env = os.environ.get(DATA_ROOT_ENV)
        if not env:
            raise ValueError(
                f"{name!r} is read from local files: pass data_root=<folder> ({CLI_OPTION} <folder> on a recipe's "
                f"command line), or set the environment variable {DATA_ROOT_ENV}; see genkernel.data.torchvision_sets "
                "for the expected layout"
            )
        data_root = env
    if not isinstance(data_root, (str, os.PathLike)):
        raise TypeError(f"data_root must be a str or os.PathLike folder, got {type(data_root).__name__}")
    root = Path(data_root).expanduser()
    if root.exists() and not root.is_dir():
        raise FileNotFoundError(  # the type the docstring names for a data_root that holds no data set
            f"data_root {str(root)!r} is a file, not a folder: pass the folder DATA_ROOT holding the {name} files "
            f"(for {name}: {_expected_layout(name, Path('DATA_ROOT'))})"
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_root {str(root)!r} does not exist or is not a folder; create it and put the {name} files "
            f"in it ({_expected_layout(name, root)}); {_HOW_TO_GET}"
        )
    return root


def _expected_layout(name: str, root: Path) -> str:
    if name == "mnist":
        return "expected " + ", ".join(str(root / "MNIST" / "raw" / f) for f in MNIST_FILES)
    return f"expected {root / CIFAR10_FOLDER}/ holding " + ", ".join(CIFAR10_FILES)


# ----------------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------------
# first four bytes of the IDX files: 0, 0, type 0x08 (unsigned byte), number of dimensions
_IDX_MAGIC = {"images": b"\x00\x00\x08\x03", "labels": b"\x00\x00\x08\x01"}


def _check_idx_header(path: Path) -> None:
    """Refuse a file that is not an uint8 IDX file of the kind its name says (torchvision only asserts)."""
    kind = "images" if "-images-" in path.name else "labels"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        raise ValueError(
            f"the MNIST file {path} is still gzip-compressed under the uncompressed name: rename it to "
            f"{path.name}.gz (genkernel gunzips it) or gunzip it yourself"
        )
    if head != _IDX_MAGIC[kind]:
        other = [k for k, m in _IDX_MAGIC.items() if m == head]
        what = f"an MNIST {other[0]} file" if other else "not an MNIST IDX file"
        raise ValueError(
            f"the MNIST file {path} starts with bytes {head.hex(' ') or '(empty)'}, expected {_IDX_MAGIC[kind].hex(' ')} "
            f"for {kind}: it is {what}; put the standard MNIST {kind} file under this name"
        )


def _prepare_mnist(root: Path) -> Path:
    """Check the four raw files; gunzip ``.gz`` copies in place if only those exist.

    Returns the folder torchvision reads: ``MNIST/processed`` when its legacy ``training.pt``
    and ``test.pt`` are both there (torchvision prefers them), else ``MNIST/raw``.
    """
    raw = root / "MNIST" / "raw"
    legacy = root / "MNIST" / "processed"
    if (legacy / "training.pt").is_file() and (legacy / "test.pt").is_file():
        return legacy  # torchvision's old cached format, which it still reads
    missing = []
    for fname in MNIST_FILES:
        target = raw / fname
        if target.is_file():
            continue
        gz = raw / (fname + ".gz")
        if gz.is_file():
            partial = target.with_name(target.name + ".partial")
            try:  # into a temporary name, renamed once whole: a failed gunzip leaves no file behind
                with gzip.open(gz, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.replace(target)
            except (OSError, EOFError) as exc:  # EOFError: a truncated .gz
                partial.unlink(missing_ok=True)
                raise FileNotFoundError(
                    f"found {gz} but could not gunzip it to {target} ({type(exc).__name__}: {exc}): the file may be "
                    f"truncated (download it again) or {raw} not writable; or gunzip it yourself (gunzip -k {gz})"
                ) from exc
            continue
        missing.append(target)
    if missing:
        hint = ""
        for alt in (root / "raw", root):
            if (alt / MNIST_FILES[0]).is_file() or (alt / (MNIST_FILES[0] + ".gz")).is_file():
                inside = {root / "raw": "MNIST", root: "raw"}[alt]  # data_root = DATA_ROOT/MNIST or DATA_ROOT/MNIST/raw?
                if root.name == inside and (inside == "MNIST" or root.parent.name == "MNIST"):
                    parent = root.parent if inside == "MNIST" else root.parent.parent
                    hint = (f" (data_root is the MNIST/{'' if inside == 'MNIST' else 'raw/'} folder itself: pass "
                            f"data_root={str(parent)!r}, {CLI_OPTION} {str(parent)!r} on a recipe's command line; "
                            "torchvision reads DATA_ROOT/MNIST/raw)")
                else:
                    hint = f" (MNIST files were found in {alt}: move them to {raw})"
                break
        raise FileNotFoundError(
            "MNIST files missing: expected " + ", ".join(str(m) for m in missing)
            + " (the standard MNIST files, gunzipped or .gz; torchvision needs all four, train and test)"
            + hint + f"; {_HOW_TO_GET}"
        )
    for fname in MNIST_FILES:
        _check_idx_header(raw / fname)
    return raw


def _load_mnist(root: Path, train: bool, classes, per_class, limit, seed):
    from torchvision.datasets import MNIST

    where = _prepare_mnist(root)
    try:
        ds = MNIST(str(root), train=train, download=False)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) of a legacy file that is no tensor pair
        raise ValueError(
            f"torchvision reads MNIST from its legacy files {where / 'training.pt'} and {where / 'test.pt'} when both "
            f"exist, and could not read them ({type(exc).__name__}): they are not "
            f"torchvision's (uint8 images, labels) pairs; remove them to read {root / 'MNIST' / 'raw'}"
        ) from exc
    except (RuntimeError, ValueError, TypeError, IndexError, EOFError, AssertionError) as exc:  # a wrong file
        raise ValueError(f"torchvision could not read MNIST from {where} ({type(exc).__name__}: {exc}): are the "
                         "image and label files the standard ones, whole, and each under its own name?") from exc
    data = torch.as_tensor(ds.data)  # uint8 [N, 28, 28]
    targets = torch.as_tensor(ds.targets)
    split = "train" if train else "t10k"
    # Scaled below by 1/255: float images (e.g. a legacy processed/*.pt already in [0, 1]) came out 255x too dark.
    if data.dtype != torch.uint8:
        raise ValueError(f"the MNIST {split} images in {where} are {data.dtype}, not uint8 0..255 as torchvision's "
                         "MNIST files hold; remove that folder's files (or put the standard files there)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"the MNIST {split} labels in {where} are {targets.dtype}, not integers")
    labels = targets.long()
    if data.dim() != 3 or data.shape[1:] != (28, 28):
        raise ValueError(f"the MNIST {split} images in {where} have shape {tuple(data.shape)}, not [N, 28, 28]: is the "
                         "images file a labels file?")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"the MNIST {split} files in {where} hold {data.shape[0]} images but {labels.numel()} labels: "
                         "they must be one pair from the same set")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"the MNIST {split} labels in {where} run from {int(labels.min())} to {int(labels.max())}, "
                         "not 0..9")
    idx = _select(labels, classes, per_class, seed)
    if limit is not None:
        idx = idx[:limit]
    images = data[idx].to(torch.float32).unsqueeze(1) / 255.0
    return images, labels[idx]


# ----------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------
def _prepare_cifar10(root: Path) -> None:
    folder = root / CIFAR10_FOLDER
    missing = [folder / f for f in CIFAR10_FILES if not (folder / f).is_file()]
    tarball = root / CIFAR10_TARBALL
    if missing and tarball.is_file():
        from torchvision.datasets.utils import check_integrity, extract_archive
        from torchvision.datasets import CIFAR10

        if not check_integrity(str(tarball), CIFAR10.tgz_md5):
            raise RuntimeError(
                f"{tarball} does not match torchvision's md5 for {CIFAR10_TARBALL} (corrupted or not the "
                f"official file); replace it with the official python version of CIFAR-10"
            )
        try:
            extract_archive(str(tarball), str(root))
        except OSError as exc:
            raise FileNotFoundError(
                f"found {tarball} but could not extract it into {root} ({exc}); run "
                f"`tar -xzf {tarball} -C {root}` yourself"
            ) from exc
        missing = [folder / f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        if (root / CIFAR10_FILES[0]).is_file():
            hint = (f"data_root is the {CIFAR10_FOLDER} folder itself: pass its parent, data_root={str(root.parent)!r} "
                    f"({CLI_OPTION} {str(root.parent)!r} on a recipe's command line)"
                    if root.name == CIFAR10_FOLDER else f"CIFAR-10 files were found in {root}: move them into {folder}")
            raise FileNotFoundError(
                f"CIFAR-10 files missing in {folder} ({hint}; torchvision reads DATA_ROOT/{CIFAR10_FOLDER})")
        raise FileNotFoundError(
            "CIFAR-10 files missing: expected " + ", ".join(str(m) for m in missing)
            + f" (the python version of CIFAR-10: extract {CIFAR10_TARBALL} into {root}, or put the "
            f"tarball there); {_HOW_TO_GET}"
        )


def _load_cifar10(root: Path, train: bool, classes, per_class, limit, seed):
    from torchvision.datasets import CIFAR10

    _prepare_cifar10(root)
    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as exc:
        raise RuntimeError(
            f"the CIFAR-10 files in {root / CIFAR10_FOLDER} are present but torchvision rejected them ({exc}): "
            "they fail its md5 check, i.e. they are corrupted or not the official python version; "
            "replace them with a fresh copy of cifar-10-python.tar.gz, extracted"
        ) from exc
    labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    idx = _select(labels, classes, per_class, seed)
    if limit is not None:
        idx = idx[:limit]
    data = np.asarray(ds.data)[idx.numpy()]  # uint8 [n, 32, 32, 3]
    images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return images.contiguous(), labels[idx]


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------
def load_image_dataset(
    name: str,
    *,
    data_root: Optional[Union[str, os.PathLike]] = None,
    train: bool = True,
    size: Optional[int] = None,
    classes: Optional[Sequence[int]] = None,
    per_class: Optional[int] = None,
    limit: Optional[int] = None,
    seed: Optional[SeedLike] = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an image classification set as tensors, offline.

    Parameters
    ----------
    name : "digits", "mnist" or "cifar10" (case-insensitive)
        "digits" is scikit-learn's bundled 8x8 set (:func:`load_digits_images`, no files
        needed; ``train`` picks its fixed 75 % / 25 % split). "mnist" and "cifar10" are read
        with ``torchvision.datasets.MNIST`` / ``CIFAR10`` (``download=False``) from
        ``data_root``; the module docstring gives the expected layout.
    data_root : folder, optional
        Default: the environment variable ``GENKERNEL_DATA_ROOT``. Unused for "digits".
    train : bool
        Training split (True) or test split (False).
    size : int, optional
        Resize to ``size`` x ``size`` (bilinear; antialiased when downsampling, e.g. MNIST
        28 -> 16). None keeps the native size: 8 (digits), 28 (MNIST), 32 (CIFAR-10).
    classes : sequence of ints, optional
        Keep only these classes.
    per_class : int, optional
        That many images per class, ordered by class (see :func:`balanced_subset`; drawn
        with ``seed``, or the first ones with ``seed=None``).
    limit : int, optional
        Keep only the first ``limit`` images (after the class filter, in dataset order);
        a split with fewer images is returned whole, so check ``len(images)``. Cannot be
        combined with ``per_class``.
    seed : int, torch.Generator or None

    Returns
    -------
    images : Tensor[N, C, H, W], float32 in [0, 1] (C = 1 for digits / MNIST with 0 =
        background and 1 = ink; C = 3, RGB, for CIFAR-10).
    labels : LongTensor[N], classes 0..9.

    Raises
    ------
    ValueError for an unknown name or bad arguments; FileNotFoundError naming the expected
    paths when MNIST / CIFAR-10 files are missing; RuntimeError when files are present but
    fail torchvision's checksum.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {SUPPORTED_DATASETS}, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SUPPORTED_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}")
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {train!r}")
    if size is not None:
        size = _check_int(size, "size")
    if per_class is not None:
        per_class = _check_int(per_class, "per_class")
    if limit is not None:
        limit = _check_int(limit, "limit")
        if per_class is not None:
            raise ValueError("pass either per_class (a balanced, class-ordered subset) or limit (the first N images), not both")
    cls = _check_classes(classes)
    if cls is not None:
        bad = [c for c in cls if not 0 <= c <= 9]
        if bad:
            raise ValueError(f"classes must be in 0..9 for {key}, got {bad}")

    if key == "digits":
        images, labels = load_digits_images(
            size=8 if size is None else size, classes=cls, per_class=per_class, seed=seed,
            split="train" if train else "test",
        )
        if limit is not None:
            images, labels = images[:limit].contiguous(), labels[:limit].contiguous()
        return images, labels

    root = _resolve_root(key, data_root)
    loader = _load_mnist if key == "mnist" else _load_cifar10
    images, labels = loader(root, train, cls, per_class, limit, seed)
    images = resize_images(images, size)
    return images.contiguous(), labels.contiguous()
