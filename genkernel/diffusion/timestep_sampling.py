"""How a trainer draws training levels and weighs their losses: the densities and loss weightings
of diffusers' training scripts.

A training step draws one level t_n per example from a density p(t) and minimizes

    L = (1/B) Σ_n w(t_n) ℓ_n,      ℓ_n = ‖f(z_n, t_n) − y_n‖² / D

so the ledger's coefficient of example n is c_n = w(t_n) / B (``OptimizerStep.weights``; with w = 1
the plain mean). Both p and w change what the model learns at each noise level, so they are part
of the run (a checkpoint records them) and of every ledger's split by level.

Densities (``DDPMTrainer(timestep_density=...)``):

- :class:`Uniform` (``"uniform"``, default): t uniform over the T training levels, the DDPM paper's
  t ~ U{0, …, T−1} and what diffusers' DDPM and EDM scripts draw.
- :class:`LogitNormal` (``"logit_normal"``) and :class:`ModeDensity` (``"mode"``): Stable Diffusion 3's
  densities (Esser et al. 2024, §3.1), drawn as diffusers' SD3 and FLUX scripts draw them:
  u = ``compute_density_for_timestep_sampling`` in [0, 1], then ``scheduler.timesteps[(u·T).long()]``
  (the grid noisiest first, so u near 0 is the most noise). The index is clamped to T − 1, where
  diffusers would index past the grid at u = 1 (under "mode", a float32 u' that rounds
  to 1: a uniform draw of 0, or at scale −1, where u' = cos²(πu/2), any draw below about 1.5·10⁻⁴).
- :class:`LogNormal` (``"log_normal"``, EDM only): the EDM paper's ln σ ~ N(P_mean, P_std²),
  continuous and unclamped as NVlabs' training loop draws it; the level is t = ¼ ln σ.

Loss weightings (``DDPMTrainer(loss_weighting=...)``):

- :class:`NoWeighting` (``"none"``, default): w = 1. Under EDM the trained loss is already the EDM
  paper's λ(σ)-weighted one (:mod:`~genkernel.diffusion.objectives`).
- :class:`MinSNR` (``"min_snr"``, DDPM only): Min-SNR-γ (Hang et al. 2023) as diffusers'
  text-to-image scripts compute it with ``--snr_gamma``: w = min(SNR_t, γ) / SNR_t for ε-prediction,
  min(SNR_t, γ) / (SNR_t + 1) for v-prediction, min(SNR_t, γ) for x-prediction (SNR from
  ``compute_snr``).
- :class:`SD3Weighting` (``"sigma_sqrt"``, ``"cosmap"``, flow matching only): diffusers'
  ``compute_loss_weighting_for_sd3`` at σ = t / T.

Each object checks at construction of the trainer that it applies to the scheduler (a ValueError
names the alternatives), and ``config()`` is what a checkpoint records.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Union

import torch
from .objectives import (
    DDPM_PROCESS, EDM_PROCESS, EDM_SIGMA_BEYOND_MAX, FLOW_PROCESS, _flow_sigmas, check_prediction_type, level_dtype, noise_process,
    num_train_timesteps, vp_alphas_cumprod,
)

__all__ = [
    "DENSITIES", "WEIGHTINGS", "LogNormal", "LogitNormal", "MinSNR", "ModeDensity", "NoWeighting", "SD3Weighting",
    "Uniform", "make_loss_weighting", "make_timestep_density",
]

# a log-normal σ may exceed the levels check_timesteps accepts (σ > 10 σ_max) at most this often per draw (the
# EDM paper's P_mean = -1.2, P_std = 1.2: 2.5e-11 against σ_max = 80; EDM2's -0.4, 1.0: 7e-13)
LOG_NORMAL_TAIL_LIMIT = 1e-10
MODE_SCALE_MAX = 2 / (math.pi - 2)  # SD3 §3.1: the mode density is a density on [0, 1] for s in [-1, 2/(π − 2)]


def _training_utils():
    """diffusers' ``training_utils``, imported on first use: it imports accelerate (about 5 s), which a run
    with the uniform density and no weighting never needs."""
    from diffusers import training_utils

    return training_utils


def _density_sampler():
    """diffusers' ``compute_density_for_timestep_sampling``, refused where it takes no ``generator=``."""
    sampler = _training_utils().compute_density_for_timestep_sampling
    if "generator" not in inspect.signature(sampler).parameters:
        raise ValueError(
            "this diffusers' compute_density_for_timestep_sampling takes no generator=, so its draws would come "
            "from the global RNG and a resumed run would not continue them: upgrade diffusers (0.42 takes it)"
        )
    return sampler


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive(value: Any, name: str) -> float:
    value = _finite(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def _require_process(scheduler, processes: tuple[str, ...], what: str, instead: str) -> None:
    process = noise_process(scheduler)
    if process not in processes:
        raise ValueError(f"{what} applies to {' and '.join(processes)} schedulers, not {process} "
                         f"({type(scheduler).__name__}): {instead}")


# --- densities ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Uniform:
    """t uniform over the T training levels (:func:`~genkernel.diffusion.objectives.training_levels`)."""

    def check(self, scheduler) -> None:
        check_prediction_type(scheduler)

    def draw(self, scheduler, levels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``levels [T]`` (least noise first) indexed by ``randint(0, T)``: ``[B]`` on the CPU."""
        return levels[torch.randint(0, levels.numel(), (batch_size,), generator=generator)]

    def config(self) -> dict[str, Any]:
        return {"density": "uniform"}


@dataclass(frozen=True)
class _GridDensity:
    """A density over [0, 1] mapped to the grid as diffusers' SD3 script maps it."""

    def check(self, scheduler) -> None:
        check_prediction_type(scheduler)
        _density_sampler()

    def _u(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, scheduler, levels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``scheduler.timesteps[(u·T).long()]`` with u from the density: ``[B]`` on the CPU."""
        u = self._u(batch_size, generator)
        total = levels.numel()
        # the grid noisiest first, as scheduler.timesteps holds it (levels: least noise first)
        indices = (u * total).long().clamp_(0, total - 1)
        return levels.flip(0)[indices]


@dataclass(frozen=True)
class LogitNormal(_GridDensity):
    """SD3's logit-normal density: u = sigmoid(N(mean, std²)) (``--logit_mean``, ``--logit_std``)."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        _finite(self.mean, "LogitNormal mean")
        _positive(self.std, "LogitNormal std")

    def _u(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return _density_sampler()(
            "logit_normal", batch_size, logit_mean=self.mean, logit_std=self.std, device="cpu", generator=generator)

    def config(self) -> dict[str, Any]:
        return {"density": "logit_normal", "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class ModeDensity(_GridDensity):
    """SD3's mode density with heavy tails: u' = 1 − u − s (cos²(πu/2) − 1 + u), u ~ U[0, 1)
    (``--mode_scale``; s in [−1, 2/(π − 2)], where it is a density on [0, 1])."""

    scale: float = 1.29

    def __post_init__(self) -> None:
        scale = _finite(self.scale, "ModeDensity scale")
        if not -1.0 <= scale <= MODE_SCALE_MAX:
            raise ValueError(f"ModeDensity scale must lie in [-1, 2/(π − 2) = {MODE_SCALE_MAX:.4f}] (SD3 §3.1: outside "
                             f"it u leaves [0, 1] and the grid index wraps), got {scale!r}; SD3 uses 1.29")

    def _u(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return _density_sampler()(
            "mode", batch_size, mode_scale=self.scale, device="cpu", generator=generator)

    def config(self) -> dict[str, Any]:
        return {"density": "mode", "scale": self.scale}


@dataclass(frozen=True)
class LogNormal:
    """The EDM paper's ln σ ~ N(mean, std²) (P_mean = −1.2, P_std = 1.2), continuous and unclamped;
    the level is t = ¼ ln σ. EDM schedulers only."""

    mean: float = -1.2
    std: float = 1.2

    def __post_init__(self) -> None:
        _finite(self.mean, "LogNormal mean")
        _positive(self.std, "LogNormal std")

    def check(self, scheduler) -> None:
        _require_process(scheduler, (EDM_PROCESS,), "timestep_density='log_normal' (a continuous σ)",
                         "flow matching draws from the grid: use 'logit_normal' (SD3) or 'uniform'")
        # the levels the objectives and the analyzer accept end at ¼ ln(10 σ_max) (check_timesteps): a density
        # that draws beyond it would stop the run at a random step, with a message about sigmas passed as levels
        sigma_top = EDM_SIGMA_BEYOND_MAX * float(scheduler.config.sigma_max)
        tail = 0.5 * math.erfc((math.log(sigma_top) - self.mean) / (self.std * math.sqrt(2)))
        if tail > LOG_NORMAL_TAIL_LIMIT:
            raise ValueError(
                f"timestep_density {self!r} draws σ > {sigma_top:g} ({EDM_SIGMA_BEYOND_MAX:g} × σ_max, ln σ > "
                f"{math.log(sigma_top):.4g}) with probability {tail:.3g} per example, where levels ¼ ln σ end at "
                f"¼ ln({EDM_SIGMA_BEYOND_MAX:g} σ_max) (beyond it they are taken for sigmas passed as levels): the run "
                "would stop at a random step. Use a narrower density (the EDM paper's LogNormal(mean=-1.2, std=1.2), "
                "EDM2's LogNormal(mean=-0.4, std=1.0)) or an EDM scheduler with a larger sigma_max"
            )

    def draw(self, scheduler, levels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """t = ¼ (mean + std·N(0, 1)) ``[B]`` on the CPU, in the scheduler's level dtype."""
        log_sigma = self.mean + self.std * torch.randn(batch_size, generator=generator, dtype=torch.float64)
        return (0.25 * log_sigma).to(level_dtype(scheduler))

    def config(self) -> dict[str, Any]:
        return {"density": "log_normal", "mean": self.mean, "std": self.std}


Density = Union[Uniform, LogitNormal, ModeDensity, LogNormal]
DENSITIES = {"uniform": Uniform, "logit_normal": LogitNormal, "mode": ModeDensity, "log_normal": LogNormal}


def make_timestep_density(spec: str | Density) -> Density:
    """A density object from its name (:data:`DENSITIES`, with the papers' default parameters) or
    itself; a ValueError names the choices."""
    if isinstance(spec, (Uniform, LogitNormal, ModeDensity, LogNormal)):
        return spec
    if isinstance(spec, str) and spec in DENSITIES:
        return DENSITIES[spec]()
    raise ValueError(f"timestep_density must be one of {sorted(DENSITIES)} or a density object "
                     f"(LogitNormal(mean=, std=), ModeDensity(scale=), LogNormal(mean=, std=)), got {spec!r}")


# --- loss weightings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NoWeighting:
    """w = 1: the plain mean of the per-example losses."""

    def check(self, scheduler) -> None:
        check_prediction_type(scheduler)

    def weights(self, scheduler, timesteps: torch.Tensor) -> None:
        """None: ``OptimizerStep`` takes the mean."""
        return None

    def config(self) -> dict[str, Any]:
        return {"weighting": "none"}


@dataclass(frozen=True)
class MinSNR:
    """Min-SNR-γ weighting (diffusers' ``--snr_gamma``; the paper's γ = 5). DDPM-family schedulers only."""

    gamma: float = 5.0

    def __post_init__(self) -> None:
        _positive(self.gamma, "MinSNR gamma")

    def check(self, scheduler) -> None:
        _require_process(scheduler, (DDPM_PROCESS,), "loss_weighting='min_snr' (SNR from alphas_cumprod)",
                         "flow matching has 'sigma_sqrt' and 'cosmap'; EDM's loss is already weighted")
        if check_prediction_type(scheduler) == "epsilon" and float(vp_alphas_cumprod(scheduler)[-1]) == 0.0:
            raise ValueError(
                "loss_weighting='min_snr' with prediction_type='epsilon' divides by SNR, which is 0 at the last "
                "timestep of this zero-terminal-SNR schedule (rescale_betas_zero_snr=True): use "
                "prediction_type='v_prediction' (w = min(SNR, γ) / (SNR + 1)), as that schedule is meant to be used"
            )

    def weights(self, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """w ``[B]`` float32 on ``timesteps``' device, as diffusers' scripts compute it: SNR of DDPMScheduler's ᾱ
        for the same config (:func:`~genkernel.diffusion.objectives.vp_alphas_cumprod`), which the noisy inputs
        use, not a zero-terminal-SNR sampler's 2**-24 at the last timestep."""
        snr = _training_utils().compute_snr(SimpleNamespace(alphas_cumprod=vp_alphas_cumprod(scheduler)), timesteps)
        clipped = torch.minimum(snr, torch.full_like(snr, self.gamma))
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def config(self) -> dict[str, Any]:
        return {"weighting": "min_snr", "gamma": self.gamma}


@dataclass(frozen=True)
class SD3Weighting:
    """SD3's loss weightings at σ = t / T (``compute_loss_weighting_for_sd3``): "sigma_sqrt" (w = σ⁻²)
    or "cosmap" (w = 2 / (π (1 − 2σ + 2σ²))). Flow-matching schedulers only."""

    scheme: str = "cosmap"

    def __post_init__(self) -> None:
        if self.scheme not in ("sigma_sqrt", "cosmap"):
            raise ValueError(f"SD3Weighting scheme must be 'sigma_sqrt' or 'cosmap', got {self.scheme!r}")

    def check(self, scheduler) -> None:
        _require_process(scheduler, (FLOW_PROCESS,), f"loss_weighting={self.scheme!r} (SD3's, over σ = t / T)",
                         "DDPM has 'min_snr'; EDM's loss is already weighted")
        check_prediction_type(scheduler)

    def weights(self, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """w ``[B]`` on ``timesteps``' device (float64 σ; σ_sqrt is float32 as diffusers returns it)."""
        like = torch.empty(timesteps.shape[0], dtype=torch.float64, device=timesteps.device)
        sigmas = _flow_sigmas(timesteps, num_train_timesteps(scheduler), like)
        return _training_utils().compute_loss_weighting_for_sd3(self.scheme, sigmas)

    def config(self) -> dict[str, Any]:
        return {"weighting": self.scheme}


Weighting = Union[NoWeighting, MinSNR, SD3Weighting]
WEIGHTINGS = {"none": NoWeighting, "min_snr": MinSNR, "sigma_sqrt": lambda: SD3Weighting("sigma_sqrt"),
              "cosmap": lambda: SD3Weighting("cosmap")}


def make_loss_weighting(spec: str | Weighting) -> Weighting:
    """A weighting object from its name (:data:`WEIGHTINGS`) or itself; a ValueError names the choices."""
    if isinstance(spec, (NoWeighting, MinSNR, SD3Weighting)):
        return spec
    if isinstance(spec, str) and spec in WEIGHTINGS:
        return WEIGHTINGS[spec]()
    raise ValueError(f"loss_weighting must be one of {sorted(WEIGHTINGS)} or a weighting object "
                     f"(MinSNR(gamma=), SD3Weighting(scheme)), got {spec!r}")
