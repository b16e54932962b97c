"""Latent diffusion in the built-in trainer: a frozen VAE between the data and the denoiser.

``DDPMTrainer(model, scheduler, images, vae=AutoencoderKL(...))`` trains the denoiser on latents, as
diffusers' text-to-image scripts do: each step's clean images are encoded by the frozen VAE and one
latent is drawn from its posterior, ``z = (mean + std · ξ − shift) · scale`` with ξ ~ N(0, I) from the
trainer's generator (the scripts' ``vae.encode(x).latent_dist.sample() * vae.config.scaling_factor``;
``shift_factor``, SD3's and FLUX's VAEs, subtracted first; a VAE with per-channel ``latents_mean`` and
``latents_std``, Playground v2.5's, gives ``(z − μ_c) · scale / σ_c`` as SDXL's pipelines encode and decode
it). Everything after that (levels, noise,
targets, the analyzers' ledgers and probes) lives in latent space.

Lifecycle: :class:`LatentCoder` ``(vae)`` reads the VAE's ``scaling_factor`` and ``shift_factor``;
:meth:`~LatentCoder.sample_latents` encodes a batch and draws its latents (the trainer's step);
:meth:`~LatentCoder.mode_latents` gives the posterior's mean (no draw: probes for an analyzer, as the
text-to-image example encodes them); :meth:`~LatentCoder.decode` maps latents back to images;
:meth:`~LatentCoder.config` is what a checkpoint records (a resume with another VAE is refused).

The VAE runs under ``torch.no_grad()`` in eval mode (frozen: a VAE with dropout would otherwise draw
from the global RNG, and a step drawn again after a failure would encode otherwise) in its own dtype (an fp16 or bf16 VAE beside a float32
denoiser, as the scripts cast it) and device; the latents are returned in the denoiser's dtype. A
VAE without a posterior (diffusers' ``AutoencoderTiny``, whose ``encode`` gives ``latents``, and
``AutoencoderDC``, Sana's, whose ``encode`` gives ``latent``) is deterministic: nothing is drawn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..core.adapter import eval_mode, first_tensor
from ..core.cost import example_counts

FINGERPRINT_VALUES = 4096  # values read per tensor for the VAE's fingerprint (evenly spaced)


class LatentCoder:
    """The frozen VAE of a latent-diffusion trainer.

    Args:
        vae: a diffusers autoencoder (``AutoencoderKL``, ``AutoencoderTiny``, ...): ``vae.encode(x)`` returns
            an output with ``latent_dist`` (a Gaussian posterior: ``mean``, ``std``), ``latents`` or ``latent``,
            ``vae.decode(z)`` one with ``sample``, and ``vae.config`` holds ``scaling_factor`` (and, where
            the VAE has one, ``shift_factor``).
    """

    def __init__(self, vae: nn.Module) -> None:
        if not (isinstance(vae, nn.Module) and callable(getattr(vae, "encode", None))
                and callable(getattr(vae, "decode", None))):
            raise TypeError(f"vae must be a diffusers autoencoder (AutoencoderKL, ...) with encode() and decode(), "
                            f"got {type(vae).__name__}")
        config = getattr(vae, "config", None)
        scale = None if config is None else config.get("scaling_factor")
        if scale is None:
            raise ValueError(
                f"the {type(vae).__name__} has no config.scaling_factor: the latents are the posterior's draw times "
                "it (Stable Diffusion's VAE: 0.18215); register_to_config(scaling_factor=...) on the VAE"
            )
        shift = config.get("shift_factor")
        self.vae = vae
        self.scaling_factor = float(scale)
        self.shift_factor = 0.0 if shift is None else float(shift)
        self.in_channels = config.get("in_channels")
        self.latents_mean, self.latents_std = latent_statistics(vae, self.shift_factor)
        first = first_tensor(vae, "the vae")
        self.device, self.dtype = first.device, first.dtype
        self._fingerprint = module_fingerprint(vae)

    def _posterior(self, images: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The posterior's ``(mean, std)`` of ``images`` ``[B, C, H, W]`` in float64 (std None for a
        deterministic VAE), encoded ``chunk`` images at a time."""
        if images.dim() != 4:
            raise ValueError(f"a VAE encodes images [B, C, H, W], got a batch shaped {tuple(images.shape)}")
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            raise ValueError(
                f"the VAE encodes images of {self.in_channels} channels, the batch has {images.shape[1]} "
                f"(shape {tuple(images.shape)}): data already encoded to latents trains without vae="
            )
        means, stds = [], []
        with torch.no_grad(), eval_mode(self.vae):  # (frozen: a VAE with dropout would draw from the global RNG)
            for start in range(0, images.shape[0], chunk):
                out = self.vae.encode(images[start : start + chunk].to(device=self.device, dtype=self.dtype))
                posterior = getattr(out, "latent_dist", None)
                if posterior is not None:
                    means.append(posterior.mean.double())
                    stds.append(posterior.std.double())
                elif isinstance(getattr(out, "latents", None), torch.Tensor):  # AutoencoderTiny's
                    means.append(out.latents.double())
                elif isinstance(getattr(out, "latent", None), torch.Tensor):  # AutoencoderDC's (Sana's)
                    means.append(out.latent.double())
                else:
                    raise TypeError(f"{type(self.vae).__name__}.encode gave {type(out).__name__}, with neither "
                                    "latent_dist (a posterior) nor latents / latent (a deterministic encoder's)")
        return torch.cat(means), (torch.cat(stds) if stds else None)

    def _scaled(self, latents: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(latents − shift) · scale``, or per channel ``(latents − μ_c) · scale / σ_c`` for a VAE with
        ``latents_mean``/``latents_std`` (as SDXL's pipelines encode them), on ``device`` in ``dtype``."""
        if self.latents_mean is None:
            return ((latents - self.shift_factor) * self.scaling_factor).to(device=device, dtype=dtype)
        mean, std = (stat.to(latents.device).view(1, -1, *([1] * (latents.dim() - 2)))
                     for stat in (self.latents_mean, self.latents_std))
        return ((latents - mean) * self.scaling_factor / std).to(device=device, dtype=dtype)

    def _unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_scaled` in float64: what the VAE decodes."""
        latents = latents.double()
        if self.latents_mean is None:
            return latents / self.scaling_factor + self.shift_factor
        mean, std = (stat.to(latents.device).view(1, -1, *([1] * (latents.dim() - 2)))
                     for stat in (self.latents_mean, self.latents_std))
        return latents * std / self.scaling_factor + mean

    def sample_latents(self, images: torch.Tensor, generator: torch.Generator, *, device: torch.device,
                       dtype: torch.dtype, chunk: int | None = None) -> torch.Tensor:
        """A latent drawn from each image's posterior: ``[B, c, h, w]`` ``(mean + std · ξ − shift) · scale``
        on ``device`` in ``dtype`` (the denoiser's), ξ drawn from ``generator`` in float64 for the whole
        batch (one draw, however many chunks of ``chunk`` images the encoder ran in)."""
        mean, std = self._posterior(images, chunk or images.shape[0])
        if std is None:
            return self._scaled(mean, device, dtype)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64).to(mean.device)
        return self._scaled(mean + std * noise, device, dtype)

    def mode_latents(self, images: torch.Tensor, *, device: torch.device, dtype: torch.dtype,
                     chunk: int | None = None) -> torch.Tensor:
        """The posterior's mean, scaled: ``[B, c, h, w]`` ``(mean − shift) · scale`` on ``device`` in
        ``dtype`` (nothing drawn)."""
        return self._scaled(self._posterior(images, chunk or images.shape[0])[0], device, dtype)

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (in [-1, 1] as the VAE was trained) of ``latents`` ``[B, c, h, w]``:
        ``vae.decode(z / scale + shift).sample``, in the latents' dtype and device."""
        chunk = chunk or max(1, latents.shape[0])
        out = []
        with torch.no_grad(), eval_mode(self.vae):
            for start in range(0, latents.shape[0], chunk):
                z = self._unscaled(latents[start : start + chunk])
                decoded = self.vae.decode(z.to(device=self.device, dtype=self.dtype))
                out.append(getattr(decoded, "sample", decoded).to(device=latents.device, dtype=latents.dtype))
        return torch.cat(out)

    def encode_macs(self, image_shape: tuple[int, ...]) -> int:
        """Multiply-adds of encoding one image shaped ``image_shape`` ``[C, H, W]`` (the encoder's linear and
        convolutional layers, :func:`~genkernel.core.cost.example_counts`): a trainer's work per example outside
        its model, for the cost estimate's bare step."""
        image = torch.zeros((1, *image_shape), device=self.device, dtype=self.dtype)
        return example_counts(_EncodePass(self), (image,))[1]

    def config(self) -> dict[str, Any]:
        """What a checkpoint records: the VAE's class, factors and a fingerprint of its weights."""
        config = {"class": type(self.vae).__name__, "scaling_factor": self.scaling_factor,
                  "shift_factor": self.shift_factor, "fingerprint": self._fingerprint}
        if self.latents_mean is not None:  # (recorded only when set: a checkpoint of a VAE without them reads as before)
            config.update(latents_mean=self.latents_mean.tolist(), latents_std=self.latents_std.tolist())
        return config


def latent_statistics(vae: nn.Module, shift_factor: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The VAE's per-channel ``config.latents_mean`` and ``config.latents_std`` as float64 ``[c]`` tensors
    (Playground v2.5's SDXL VAE: its latents are ``(z − μ_c) · scale / σ_c``, which SDXL's pipelines
    decode), or ``(None, None)`` when the VAE has neither."""
    config = vae.config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError(
            f"the {type(vae).__name__}'s config has latents_{'mean' if std is None else 'std'} without "
            f"latents_{'std' if std is None else 'mean'}: diffusers' pipelines normalize the latents per channel "
            "only with both; register_to_config both (or neither) on the VAE"
        )
    if shift_factor:
        raise ValueError(
            f"the {type(vae).__name__}'s config has both shift_factor ({shift_factor}) and latents_mean/latents_std: "
            "diffusers' pipelines use one or the other; register_to_config(shift_factor=None) or drop the statistics"
        )
    mean, std = (torch.as_tensor(value, dtype=torch.float64).reshape(-1) for value in (mean, std))
    channels = config.get("latent_channels")
    if mean.shape != std.shape or (channels is not None and mean.numel() != channels):
        raise ValueError(
            f"the {type(vae).__name__}'s latents_mean ({mean.numel()} values) and latents_std ({std.numel()}) "
            f"need one value per latent channel ({channels})"
        )
    if not bool((std > 0).all()):
        raise ValueError(f"the {type(vae).__name__}'s latents_std must be positive, got {std.tolist()}")
    return mean, std


def module_fingerprint(module: nn.Module, values: int = FINGERPRINT_VALUES) -> str:
    """A short hash (SHA-256, 16 hex digits) of ``module``'s parameters and buffers: names, shapes, dtypes
    and up to ``values`` evenly spaced values of each (a VAE of 84M parameters reads in milliseconds)."""
    digest = hashlib.sha256()
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        flat = tensor.detach().reshape(-1)
        picks = torch.linspace(0, max(0, flat.numel() - 1), min(values, flat.numel())).round().long()
        part = flat[picks.to(flat.device)].cpu().contiguous()
        digest.update(str((name, tuple(tensor.shape), part.dtype)).encode())
        digest.update(part.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


__all__ = ["LatentCoder", "latent_statistics", "module_fingerprint"]


class _EncodePass(nn.Module):
    """``coder``'s posterior of images as a module (its VAE a submodule), for :func:`example_counts`' hooks."""

    def __init__(self, coder: LatentCoder) -> None:
        super().__init__()
        self.vae, self._coder = coder.vae, coder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._coder._posterior(images, images.shape[0])[0]
