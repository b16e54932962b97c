"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) split into a draw and a deterministic apply.

DiffAugment shows D every image through a random, differentiable transformation T, real and generated rows
alike, and G's loss through it too: ℓ_G(D(T(G(z)))). The official code (mit-han-lab/data-efficient-gans,
``DiffAugment_pytorch.py``) draws its random numbers inside the transformation, from torch's global generator.
Here the two are apart:

- :meth:`DiffAugment.draw` draws one row of parameters per example, ``[B, P]``, from a ``torch.Generator``
  (the trainer's own, seeded and saved in checkpoints);
- :meth:`DiffAugment.apply` ``(x, params)`` is a deterministic function, differentiable in x (and built of
  comparisons, gathers and arithmetic only, so it runs under ``torch.func.vmap`` one example at a time).

The parameters then travel with the step's rows (inputs or targets), and every evaluation of the loss a
tracker makes (its checks, a per-example pass, quadrature nodes) sees the same augmentation as training.

Policies, as in the official code (``policy="color,translation,cutout"``), applied in that order:

- ``"color"``: brightness x + (r − 0.5), then saturation (x − mean_c x)·2r + mean_c x (mean over channels),
  then contrast (x − mean x)·(r + 0.5) + mean x (mean over channels and pixels), each r ~ U[0, 1) per example;
- ``"translation"``: a shift of each image by integers t_x ∈ [−s_x, s_x], t_y ∈ [−s_y, s_y]
  (s = int(size·ratio + 0.5), ratio 0.125), zero-filled: out[i, j] = x[i + t_x, j + t_y] where inside;
- ``"cutout"``: a square of int(size·ratio + 0.5) pixels (ratio 0.5) set to 0, its centre drawn as the
  official code draws it (its rows and columns clamped to the image).

Parameters (columns of ``params``, :attr:`DiffAugment.columns`): "brightness" (the shift r − 0.5),
"saturation" (the factor 2r), "contrast" (the factor r + 0.5), "translation_x", "translation_y" (the integer
shifts), "cutout_x", "cutout_y" (the official code's offsets) and "cutout" (1: cut, 0: not). The identity
(:meth:`DiffAugment.identity`: shift 0, factors 1, no cutout) returns x bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")
COLUMNS = {
    "color": ("brightness", "saturation", "contrast"),
    "translation": ("translation_x", "translation_y"),
    "cutout": ("cutout_x", "cutout_y", "cutout"),
}


def check_policy(policy: object) -> tuple[str, ...]:
    """``policy`` (``"color,translation,cutout"`` or a sequence of names) as a tuple of names in the order given;
    a ValueError naming the valid ones for an unknown, repeated or empty policy."""
    if isinstance(policy, str):
        names = tuple(p.strip() for p in policy.split(",")) if policy.strip() else ()
    elif isinstance(policy, (list, tuple)) and all(isinstance(p, str) for p in policy):
        names = tuple(policy)
    else:
        raise TypeError(f"policy must be a string such as 'color,translation,cutout' (or a list of names from "
                        f"{POLICIES}), got {type(policy).__name__}")
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown[0]!r} in {policy!r}: the policies are {POLICIES}, "
                         "comma-separated (e.g. 'color,translation,cutout', the official code's)")
    if not names:
        raise ValueError(f"an empty DiffAugment policy augments nothing: name some of {POLICIES} (e.g. "
                         "'color,translation,cutout'), or drop augment=")
    if len(set(names)) != len(names):
        raise ValueError(f"policy {policy!r} names a policy twice: name each of {POLICIES} at most once")
    return names


def _ratio(value: object, name: str) -> float:
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        ratio = float("nan")
    if isinstance(value, (bool, str)) or not 0 <= ratio <= 1:
        raise ValueError(f"{name} must be a number in [0, 1] (a fraction of the image's size), got {value!r}")
    return ratio


class DiffAugment:
    """DiffAugment's policies as :meth:`draw` (random parameters per row) and :meth:`apply` (deterministic).

    Args:
        policy: ``"color,translation,cutout"`` (default, the official code's for small data sets), any
            comma-separated subset, or a list of names; applied in the order named.
        translation_ratio: the largest shift, a fraction of the image's height and width (official: 0.125).
        cutout_ratio: the cut square's side, a fraction of the image's height and width (official: 0.5).

    Images are ``[B, C, H, W]``; other shapes are refused (a ValueError naming the shape).
    """

    def __init__(self, policy: str | Sequence[str] = "color,translation,cutout", *, translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5) -> None:
        self.policy = check_policy(policy)
        self.translation_ratio = _ratio(translation_ratio, "translation_ratio")
        self.cutout_ratio = _ratio(cutout_ratio, "cutout_ratio")
        self.columns: tuple[str, ...] = tuple(c for p in self.policy for c in COLUMNS[p])

    def settings(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        return {"policy": ",".join(self.policy), "translation_ratio": self.translation_ratio,
                "cutout_ratio": self.cutout_ratio}

    def __repr__(self) -> str:
        return (f"DiffAugment(policy={','.join(self.policy)!r}, translation_ratio={self.translation_ratio}, "
                f"cutout_ratio={self.cutout_ratio})")

    def _column(self, name: str) -> int:
        return self.columns.index(name)

    @staticmethod
    def check_images(shape: Sequence[int], what: str = "the samples") -> tuple[int, int]:
        """``(H, W)`` of image rows shaped ``[..., C, H, W]`` (``shape`` without or with the batch); a ValueError
        unless the rows are images ``[C, H, W]``."""
        if len(shape) not in (3, 4):
            raise ValueError(
                f"DiffAugment transforms images [B, C, H, W] (colour over channels, translation and cutout over pixels), "
                f"but {what} are shaped {tuple(shape)}: train without augment= on data that is not images"
            )
        return int(shape[-2]), int(shape[-1])

    def translation_shifts(self, height: int, width: int) -> tuple[int, int]:
        """The largest shifts ``(s_x, s_y)`` in pixels: int(size·ratio + 0.5), as the official code."""
        return int(height * self.translation_ratio + 0.5), int(width * self.translation_ratio + 0.5)

    def cutout_size(self, height: int, width: int) -> tuple[int, int]:
        """The cut square's ``(rows, columns)``: int(size·ratio + 0.5), as the official code."""
        return int(height * self.cutout_ratio + 0.5), int(width * self.cutout_ratio + 0.5)

    def draw(self, batch: int, image_shape: Sequence[int], generator: torch.Generator, *,
             dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """``[batch, P]`` parameters (:attr:`columns`), one row per example, from ``generator``: per policy in
        order, each column's ``batch`` numbers (uniforms drawn in float64, integers with ``torch.randint``), on
        the CPU generator's device and then moved to ``device`` in ``dtype`` (integers are exact in it up to
        2**24 in float32; a ``dtype`` that would round them, bfloat16 beyond 256 pixels, is refused with a
        ValueError). ``image_shape``: the rows' ``[C, H, W]``."""
        height, width = self.check_images(image_shape, "the images to augment")
        exact = 2 / torch.finfo(dtype).eps  # (the largest integer below which every integer is exact in dtype)
        if {"translation", "cutout"} & set(self.policy) and max(height, width) > exact:
            raise ValueError(
                f"DiffAugment.draw in {dtype} rounds the integer shifts and cutout offsets of a {height}×{width} "
                f"image (integers are exact only up to {int(exact)}): draw in float32 or float64"
            )
        values: list[torch.Tensor] = []
        for policy in self.policy:
            if policy == "color":
                # (the official code's: brightness r − 0.5, saturation 2r, contrast r + 0.5)
                values.append(torch.rand(batch, generator=generator, dtype=torch.float64) - 0.5)
                values.append(torch.rand(batch, generator=generator, dtype=torch.float64) * 2)
                values.append(torch.rand(batch, generator=generator, dtype=torch.float64) + 0.5)
            elif policy == "translation":
                shift_x, shift_y = self.translation_shifts(height, width)
                values.append(torch.randint(-shift_x, shift_x + 1, (batch,), generator=generator).double())
                values.append(torch.randint(-shift_y, shift_y + 1, (batch,), generator=generator).double())
            else:
                rows, cols = self.cutout_size(height, width)
                values.append(torch.randint(0, height + (1 - rows % 2), (batch,), generator=generator).double())
                values.append(torch.randint(0, width + (1 - cols % 2), (batch,), generator=generator).double())
                values.append(torch.ones(batch, dtype=torch.float64))
        return torch.stack(values, dim=1).to(device=device, dtype=dtype)

    def identity(self, batch: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """``[batch, P]`` parameters of no augmentation (shift 0, factors 1, no translation, no cutout):
        :meth:`apply` returns x itself, bit for bit (the discriminator's probes are read at them)."""
        neutral = {"saturation": 1.0, "contrast": 1.0}
        row = torch.tensor([neutral.get(c, 0.0) for c in self.columns], dtype=dtype, device=device)
        return row.expand(batch, -1).clone()

    def check_params(self, x: torch.Tensor, params: object) -> torch.Tensor:
        """``params`` as a floating Tensor ``[B, P]`` for images ``x [B, C, H, W]``; a TypeError/ValueError naming
        the fix otherwise."""
        if not isinstance(params, torch.Tensor) or not params.is_floating_point():
            raise TypeError(f"augmentation params must be a floating Tensor [B, {len(self.columns)}] (DiffAugment.draw's "
                            f"columns {self.columns}), got {getattr(params, 'dtype', type(params).__name__)}")
        self.check_images(x.shape[1:] if x.dim() == 4 else x.shape, "the images to augment")
        if x.dim() != 4 or params.shape != (x.shape[0], len(self.columns)):
            raise ValueError(
                f"augmentation params must be [B, {len(self.columns)}] for images [B, C, H, W] (one row of "
                f"{self.columns} per image), got params {tuple(params.shape)} for images {tuple(x.shape)}"
            )
        return params

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]``: the images ``x [B, C, H, W]`` transformed by the policies in order with row b's
        parameters ``params[b]`` (``[B, P]``, :meth:`draw`'s); differentiable in x, deterministic."""
        params = self.check_params(x, params)
        for policy in self.policy:
            if policy == "color":
                x = self._color(x, params)
            elif policy == "translation":
                x = self._translation(x, params)
            else:
                x = self._cutout(x, params)
        return x

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.apply(x, params)

    def _value(self, params: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
        """Column ``name`` as ``[B, 1, 1, 1]`` in ``like``'s dtype."""
        return params[:, self._column(name)].to(like.dtype).view(-1, 1, 1, 1)

    def _integer(self, params: torch.Tensor, name: str) -> torch.Tensor:
        """Column ``name`` as integers ``LongTensor[B]``."""
        return params[:, self._column(name)].round().long()

    def _color(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # (a shift of 0 keeps x itself: x + 0 turns −0.0 into +0.0)
        brightness = self._value(params, "brightness", x)
        x = torch.where(brightness == 0, x, x + brightness)
        # A factor of 1 leaves x as it is, bit for bit ((x − m)·1 + m rounds): the identity params then give x.
        saturation = self._value(params, "saturation", x)
        mean = x.mean(dim=1, keepdim=True)
        x = torch.where(saturation == 1, x, (x - mean) * saturation + mean)
        contrast = self._value(params, "contrast", x)
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return torch.where(contrast == 1, x, (x - mean) * contrast + mean)

    def _translation(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # The official code's indices into the zero-padded image, clamp(i + t + 1, 0, H + 1), taken as two gathers
        # (rows, then columns): the same copies, and no index_put, which vmap cannot batch.
        b, c, h, w = x.shape
        padded = F.pad(x, [1, 1, 1, 1])
        rows = (torch.arange(h, device=x.device) + self._integer(params, "translation_x")[:, None] + 1).clamp(0, h + 1)
        cols = (torch.arange(w, device=x.device) + self._integer(params, "translation_y")[:, None] + 1).clamp(0, w + 1)
        padded = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2))
        return padded.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def _cutout(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # The official code zeroes rows clamp(o − n//2 + k, 0, H − 1), k < n: for every offset it draws, the interval
        # [max(o − n//2, 0), min(o − n//2 + n − 1, H − 1)] (o − n//2 <= H − 1 and o − n//2 + n − 1 >= 0 there).
        b, c, h, w = x.shape
        size_x, size_y = self.cutout_size(h, w)
        first_x = self._integer(params, "cutout_x")[:, None] - size_x // 2
        first_y = self._integer(params, "cutout_y")[:, None] - size_y // 2
        i, j = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (i >= first_x) & (i <= first_x + size_x - 1)
        in_cols = (j >= first_y) & (j <= first_y + size_y - 1)
        cut = (in_rows[:, :, None] & in_cols[:, None, :]) & (self._integer(params, "cutout") != 0)[:, None, None]
        return x * (~cut).to(x.dtype)[:, None]


__all__ = ["DiffAugment", "POLICIES", "check_policy"]
