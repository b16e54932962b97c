"""scikit-learn's bundled 8x8 handwritten digits, offline, as image tensors.

The data (1797 images of the UCI optdigits test set, values 0..16) ship inside
scikit-learn, so nothing is downloaded. Intensity scale used throughout genkernel.data:
0 = background, 1 = ink (sklearn's 0..16 divided by 16).
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .toy2d import SeedLike, _check_int, _generator

__all__ = ["load_digits_images", "balanced_subset", "resize_images", "DIGITS_NATIVE_SIZE", "DIGITS_TRAIN_COUNT"]

#: side of sklearn's digit images
DIGITS_NATIVE_SIZE = 8
#: ``split="train"`` is the first DIGITS_TRAIN_COUNT images (75 %), ``"test"`` the rest
DIGITS_TRAIN_COUNT = 1347
_SPLITS = (None, "train", "test")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _as_label_tensor(labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(labels))
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"labels must be a 1-D tensor or array of ints, got {type(labels).__name__}") from exc
    if t.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(t.shape)}; pass labels.reshape(-1)")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"labels must hold integers, got dtype {t.dtype}; pass labels.long()")
    return t.long()


def _check_classes(classes, name: str = "classes") -> Optional[list[int]]:
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray, torch.Tensor, range)) or (
        isinstance(classes, (np.ndarray, torch.Tensor)) and classes.ndim != 1
    ):
        raise TypeError(f"{name} must be a sequence of ints such as [0, 1, 2], got {classes!r}")
    out = []
    for c in list(classes.tolist() if hasattr(classes, "tolist") else classes):
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {c!r}")
        out.append(int(c))
    if not out:
        raise ValueError(f"{name} is empty; pass None for all classes or a non-empty list")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {out}; list each class once")
    return out


def balanced_subset(
    labels,
    per_class: int,
    seed: Optional[SeedLike] = 0,
    *,
    classes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Indices of ``per_class`` examples of each class, ordered by class.

    Parameters
    ----------
    labels : 1-D tensor / array of ints
    per_class : int >= 1
    seed : int, torch.Generator or None
        Which examples of a class are taken: a random subset drawn with ``seed``, or with
        ``seed=None`` the first ``per_class`` in dataset order (no randomness).
    classes : sequence of ints, optional
        Classes to take, in this order. Default: all classes present, ascending.

    Returns
    -------
    LongTensor[len(classes) * per_class]: block c holds the indices of class ``classes[c]``,
    ascending within the block. Raises ValueError if a class has fewer than ``per_class``
    examples.
    """
    lab = _as_label_tensor(labels)
    per_class = _check_int(per_class, "per_class")
    cls = _check_classes(classes)
    if cls is None:
        cls = torch.unique(lab).tolist()
        if not cls:
            raise ValueError("labels is empty; there is nothing to pick from")
    gen = None if seed is None else _generator(seed)
    blocks = []
    for c in cls:
        idx = torch.nonzero(lab == c, as_tuple=False).reshape(-1)
        if idx.numel() < per_class:
            raise ValueError(
                f"class {c} has only {idx.numel()} examples but per_class={per_class}; "
                f"pass per_class <= {idx.numel()} or drop class {c} from classes"
            )
        if gen is None:
            pick = idx[:per_class]
        else:
            pick = idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]
        blocks.append(torch.sort(pick).values)
    return torch.cat(blocks)


def _select(labels: torch.Tensor, classes, per_class, seed) -> torch.Tensor:
    """Indices into ``labels``: per-class balanced (ordered by class) or a class filter (dataset order)."""
    cls = _check_classes(classes)
    if per_class is not None:
        return balanced_subset(labels, per_class, seed, classes=cls)
    if cls is None:
        return torch.arange(labels.numel())
    present = set(torch.unique(labels).tolist())
    missing = [c for c in cls if c not in present]
    if missing:
        raise ValueError(f"classes {missing} do not occur in the data (present: {sorted(present)})")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in cls:
        mask |= labels == c
    return torch.nonzero(mask, as_tuple=False).reshape(-1)


def resize_images(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Bilinear resize of Tensor[N, C, H, W] float images to ``size`` x ``size``.

    Upsampling has no antialiasing (plain bilinear, ``align_corners=False``); downsampling
    (``size`` below the height or the width) uses torch's antialiased bilinear filter, which
    along a growing side is plain bilinear. float16 / bfloat16 images are downsampled in
    float32 and rounded once to their dtype. ``size=None`` or the current size returns the
    input unchanged. Both filters average with non-negative weights, so the result is
    clamped to the input's own range [min, max] (removing rounding only): images in [0, 1]
    stay in [0, 1], images already mapped to [-1, 1] stay in [-1, 1].
    """
    if size is None:
        return images
    size = _check_int(size, "size")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        got = (f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise TypeError(f"images must be a float Tensor[N, C, H, W], got a {got}; "
                        "pass e.g. images.float() or images[:, None] for [N, H, W]")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if images.shape[0] == 0:
        return images.new_zeros(0, images.shape[1], size, size)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images hold NaN or inf values; resize finite images")
    # The range of the input, not [0, 1]: clamping [-1, 1] images to [0, 1] zeroed every negative pixel.
    lo, hi = float(images.min()), float(images.max())
    # Antialias whenever either side shrinks: a non-square image (8 x 48 -> 16 x 16) shrinking along one side
    # only was sampled by plain bilinear there (a 1-in-3 column pattern came out all 0). torch's antialiased
    # filter equals plain bilinear along a side that grows, so square upsampling stays plain bilinear.
    down = size < max(h, w)
    x = images
    if down and x.dtype in (torch.float16, torch.bfloat16):
        # torch has no CPU antialiased kernel for half types (NotImplementedError "compute_index_ranges_weights"):
        # filter in float32 and round once to the input's dtype (on every device, so that they agree).
        x = x.float()
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return out.to(images.dtype).clamp_(lo, hi)


def load_digits_images(
    *,
    size: int = 16,
    classes: Optional[Sequence[int]] = None,
    per_class: Optional[int] = None,
    seed: Optional[SeedLike] = 0,
    split: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits as a float image tensor (offline).

    Parameters
    ----------
    size : int
        Output side. 8 is the native resolution; other sizes are bilinear interpolations
        (``torch.nn.functional.interpolate``, ``align_corners=False``, no antialiasing when
        upsampling). Default 16, the resolution of genkernel's small image models.
    classes : sequence of ints in 0..9, optional
        Keep only these classes.
    per_class : int, optional
        Take this many images of each class (a random subset drawn with ``seed``, or the
        first ones with ``seed=None``); the result is then ordered by class (in the order of
        ``classes``, ascending by default) and within a class by dataset index, as needed for
        "10 images per class, ordered by class" kernel matrices. Without ``per_class`` the
        images keep sklearn's order and ``seed`` is unused.
    seed : int, torch.Generator or None
    split : None, "train" or "test"
        The sklearn set has no official split; ``"train"`` is the first 1347 images (75 %),
        ``"test"`` the last 450, ``None`` all 1797.

    Returns
    -------
    images : Tensor[N, 1, size, size], float32 in [0, 1]; 0 = background, 1 = ink
        (sklearn's 0..16 divided by 16).
    labels : LongTensor[N], digits 0..9.
    """
    size = _check_int(size, "size")
    if seed is not None:
        _generator(seed)  # validated even where unused (no per_class), so a bad seed is not accepted silently
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if classes is not None:
        bad = [c for c in (_check_classes(classes) or []) if not 0 <= c <= 9]
        if bad:
            raise ValueError(f"classes must be digits 0..9, got {bad}")
    raw_images, raw_labels = _raw_digits()
    if split == "train":
        raw_images, raw_labels = raw_images[:DIGITS_TRAIN_COUNT], raw_labels[:DIGITS_TRAIN_COUNT]
    elif split == "test":
        raw_images, raw_labels = raw_images[DIGITS_TRAIN_COUNT:], raw_labels[DIGITS_TRAIN_COUNT:]
    labels = torch.from_numpy(raw_labels.copy())
    idx = _select(labels, classes, per_class, seed)
    images = torch.from_numpy(raw_images[idx.numpy()].copy()).unsqueeze(1) / 16.0
    images = resize_images(images.to(torch.float32), size)
    return images.contiguous(), labels[idx].contiguous()
