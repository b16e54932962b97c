"""Denoisers that predict the reverse step's variance too: IDDPM's learned range, DiT's ``learn_sigma``.

Such a model has 2C output channels for C-channel data (dimension 1; a point set's coordinates count
as channels): the first C are the usual prediction F_mean (ε, v or x by the prediction type), the last
C a per-value interpolation v ∈ [−1, 1] between the two fixed variances of DDPM (Nichol & Dhariwal
2021, "Improved DDPM", Eq. 15):

    log Σ_θ(z_t, t) = u log β_t + (1 − u) log β̃_t,      u = (v + 1) / 2,
    β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)                 (the posterior variance; at t = 0, β̃_1)

diffusers samples it with ``DDPMScheduler(variance_type="learned_range")`` (IDDPM's sampler; with
respacing both variances are the respaced process's, β'_t = 1 − ᾱ_t / ᾱ_{t'}); diffusers' DiT pipeline
drops the variance and steps any sampler with the mean channels, which
:func:`~genkernel.diffusion.trainer.reverse_sample` does for samplers other than DDPM. It is trained with
the hybrid objective (Eq. 16) as guided-diffusion's ``training_losses`` and DiT's training script compute it:

    ℓ = ‖F_mean − y‖² / D_mean + λ L_vlb,
    L_vlb(t > 0) = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) / (D_mean ln 2)      (bits per value)
    L_vlb(t = 0) = −log p_θ(x_0 | x_1) / (D_mean ln 2)   (Gaussian discretized to 256 bins on [−1, 1])

where p_θ's mean comes from F_mean with the gradient stopped, so L_vlb trains the variance channels
alone and the MSE the mean channels (λ = 1: DiT's and guided-diffusion's weighting for T = 1000).
The ledger differentiates this loss as it differentiates any per-example loss; the trainer passes
``(y, x_0, z_t, t)`` as the step's targets. The bound is computed in float32 at least (a float16 or
bfloat16 model's outputs are widened: float16 cannot hold the decoder's floor 1e-12, and the bins in the
normal's tails need erfc's digits). An ε-prediction on a zero-terminal-SNR schedule (ᾱ_{T−1} = 0) is
refused: x̂_0 = (z_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t) gives p_θ no mean at t = T − 1.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..core.tracking.step import LossFn
from .objectives import DDPM_PROCESS, check_prediction_type, diffusion_loss, noise_process, vp_alphas_cumprod

LEARNED_RANGE = "learned_range"
__all__ = ["LEARNED_RANGE", "HybridLoss", "describe_loss", "loss_targets", "mean_channels", "predicts_variance",
           "training_loss"]


def predicts_variance(scheduler) -> bool:
    """Whether ``scheduler`` samples a model that predicts its variance (a DDPM-family scheduler with
    ``variance_type="learned_range"``). ``variance_type="learned"`` (the model's raw output taken as the
    variance) is refused with a ValueError: no training objective for it is defined here."""
    if noise_process(scheduler) != DDPM_PROCESS:
        return False
    variance_type = getattr(scheduler.config, "variance_type", None)
    if variance_type == "learned":
        raise ValueError(
            "variance_type='learned' takes the model's raw output as the reverse step's variance, which genkernel "
            "does not train; use variance_type='learned_range' (IDDPM's and DiT's interpolation between β̃_t and β_t)"
        )
    return variance_type == LEARNED_RANGE


def mean_channels(outputs: torch.Tensor, channels: int) -> torch.Tensor:
    """The mean prediction of a learned-variance output ``[B, 2C, ...]``: its first C channels ``[B, C, ...]``."""
    if outputs.dim() < 2 or outputs.shape[1] != 2 * channels:
        raise ValueError(
            f"a model that predicts its variance (variance_type='learned_range') outputs 2C = {2 * channels} channels "
            f"(dimension 1) for C = {channels}-channel data, got outputs of shape {tuple(outputs.shape)}: build it with "
            f"out_channels={2 * channels} (DiTTransformer2DModel(out_channels=2 * in_channels), UNet2DModel(out_channels="
            f"{2 * channels})), or train it with a fixed variance_type"
        )
    return outputs[:, :channels]


def _normal_kl(mean_gap: torch.Tensor, log_var1: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^{log_var1}) ‖ N(mean2, e^{log_var2})) per value, from the gap mean1 − mean2 (formed by the
    caller without the cancellation of two near-equal means)."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + mean_gap ** 2 * torch.exp(-log_var2))


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = erfc(−z/√2) / 2, accurate to the dtype's resolution in the lower tail (torch's float32 ``ndtr`` forms
    1 − (…) there: 0 below z ≈ −5.4 in float32, and float64 loses digits below z ≈ −6)."""
    return 0.5 * torch.special.erfc(-z * (1.0 / math.sqrt(2.0)))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per value of ``x`` in [−1, 1] under N(mean, e^{2 log_scale}) discretized to 256 bins of width
    2/255 (the edge bins take the tails), as DDPM's and IDDPM's decoder L_0, with guided-diffusion's floor of
    1e-12 on a bin's mass. The normal CDF is the exact one (guided-diffusion uses a tanh approximation of it),
    from erfc so that tails keep their digits in float32; a bin above the mean takes its mass from the upper
    tail, Φ(−a) − Φ(−b), where Φ(b) − Φ(a) would subtract two numbers near 1. Call it in float32 or wider
    (the floor 1e-12 is 0 in float16)."""
    inv_std = torch.exp(-log_scale)
    high = inv_std * (x - mean + 1.0 / 255)
    low = inv_std * (x - mean - 1.0 / 255)
    cdf = _normal_cdf
    mass = torch.where(low > 0, cdf(-low) - cdf(-high), cdf(high) - cdf(low))
    tiny = 1e-12
    log_lowest = torch.log(cdf(high).clamp_min(tiny))  # the bin at −1 holds the lower tail
    log_highest = torch.log(cdf(-low).clamp_min(tiny))  # the bin at +1 the upper one
    return torch.where(x < -0.999, log_lowest, torch.where(x > 0.999, log_highest, torch.log(mass.clamp_min(tiny))))


class HybridLoss:
    """IDDPM's hybrid per-example loss ℓ = MSE(F_mean, y) + λ L_vlb for a model with 2C output channels.

    Call as ``loss(outputs [B, 2C, ...], (y, x_0, z_t, t))`` with the training target y, clean inputs
    x_0 and noisy inputs z_t ``[B, C, ...]`` and integer timesteps t ``LongTensor[B]``; returns ``[B]``.
    Every step reads example n's rows only and has no data-dependent branch, so the per-example
    routes (torch.func) compute it as the batch does.

    Args:
        scheduler: the training ``DDPMScheduler`` with ``variance_type="learned_range"``.
        vlb_weight: λ (1, as DiT and guided-diffusion; IDDPM's paper quotes λ = 0.001 for a sum over
            values where this is a mean).
    """

    def __init__(self, scheduler, vlb_weight: float = 1.0) -> None:
        if not predicts_variance(scheduler):
            raise ValueError(
                "HybridLoss trains a model that predicts its variance: build the scheduler with "
                "variance_type='learned_range' (make_scheduler(variance_type='learned_range'))"
            )
        if not (isinstance(vlb_weight, numbers.Real) and not isinstance(vlb_weight, bool) and math.isfinite(vlb_weight)
                and vlb_weight >= 0):
            raise ValueError(f"vlb_weight must be a finite number >= 0, got {vlb_weight!r}")
        self.prediction_type = check_prediction_type(scheduler)
        self.vlb_weight = float(vlb_weight)
        # 1. the forward process's tables, in float64 (ᾱ_t near 1 loses the posterior variance in float32)
        alphas_cumprod = vp_alphas_cumprod(scheduler).detach().to("cpu", torch.float64)
        if self.prediction_type == "epsilon" and bool((alphas_cumprod <= 0).any()):
            # x̂_0 = (z_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t): at ᾱ_t = 0 (z_t = ε) an ε-prediction fixes no mean of p_θ
            raise ValueError(
                "a zero-terminal-SNR schedule (rescale_betas_zero_snr=True: ᾱ_{T−1} = 0) leaves an ε-prediction no "
                "mean for p_θ(x_{T−2} | x_{T−1}) (x̂_0 divides by sqrt(ᾱ_{T−1}) = 0: an infinite L_vlb and NaN "
                "gradients at t = T − 1); train the learned variance with prediction_type='v_prediction' (or "
                "'sample'), as zero-terminal-SNR schedules are meant to be trained"
            )
        if bool((alphas_cumprod >= 1).any()):
            # β_t = 0: q(x_{t−1} | x_t, x_0) has no variance at those levels (0/0: a NaN posterior mean and a log
            # variance of −inf), and the trainer stopped with a NonFiniteError naming examples, not the schedule
            levels = (alphas_cumprod >= 1).nonzero().flatten().tolist()
            raise ValueError(
                f"the schedule has no noise at timesteps {levels[:5]} (ᾱ_t = 1: beta_start = 0, or under 6e-8 in "
                "float32), where the learned variance's posterior q(x_{t-1} | x_t, x_0) is undefined; build the "
                "scheduler with beta_start > 0 (1e-4 is DDPM's)"
            )
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / previous
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        self._tables = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # μ̃_t = c1 x_0 + c2 x_t (DDPM Eq. 7)
            "posterior_mean_clean": betas * previous.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_noisy": (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            # log β̃_t with β̃_0 (zero) replaced by β̃_1, as guided-diffusion clips it
            "posterior_log_variance": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            "log_betas": betas.log(),
        }
        self._tables_on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _at(self, name: str, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at ``timesteps``, shaped ``[B, 1, ...]`` to broadcast over ``like`` ``[B, C, ...]``."""
        if like.device not in self._tables_on:  # moved once per device, not at every step (a GPU sync each time)
            self._tables_on[like.device] = {key: table.to(like.device) for key, table in self._tables.items()}
        values = self._tables_on[like.device][name][timesteps].to(like.dtype)
        return values.reshape(timesteps.shape + (1,) * (like.dim() - 1))

    def __call__(self, outputs: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not (isinstance(targets, tuple) and len(targets) == 4):
            raise TypeError("HybridLoss takes targets (y, x_0, z_t, t): the target, the clean and the noisy inputs, "
                            "and the timesteps")
        target, clean, noisy, timesteps = targets
        prediction = mean_channels(outputs, target.shape[1] if target.dim() > 1 else 1)
        variance_values = outputs[:, prediction.shape[1]:]
        if prediction.shape != target.shape:
            raise ValueError(f"the mean channels {tuple(prediction.shape)} do not match the target {tuple(target.shape)}")
        # 1. L_simple: the mean squared error of the mean channels
        values = prediction[0].numel()
        mse = ((prediction - target) ** 2).reshape(prediction.shape[0], -1).mean(dim=1)
        # 2. p_θ's mean from the mean channels, gradient stopped (Eq. 16: L_vlb trains Σ_θ alone); the bound in
        # float32 at least (float16's range loses the decoder's floor 1e-12 and the tails of its bins)
        wide = torch.promote_types(outputs.dtype, torch.float32)
        frozen, variance_values = prediction.detach().to(wide), variance_values.to(wide)
        clean, noisy = clean.to(device=outputs.device, dtype=wide), noisy.to(device=outputs.device, dtype=wide)
        root, root_rest = self._at("sqrt_alphas_cumprod", timesteps, noisy), self._at("sqrt_one_minus_alphas_cumprod", timesteps, noisy)
        if self.prediction_type == "epsilon":
            predicted_clean = (noisy - root_rest * frozen) / root
        elif self.prediction_type == "sample":
            predicted_clean = frozen
        else:  # v_prediction: x_0 = sqrt(ᾱ) z − sqrt(1 − ᾱ) v
            predicted_clean = root * noisy - root_rest * frozen
        c_clean, c_noisy = self._at("posterior_mean_clean", timesteps, noisy), self._at("posterior_mean_noisy", timesteps, noisy)
        model_mean = c_clean * predicted_clean + c_noisy * noisy
        # μ̃ − μ_θ = c1 (x_0 − x̂_0): the c2 x_t both means hold cancels exactly, not in rounding
        mean_gap = c_clean * (clean - predicted_clean)
        # 3. Σ_θ: log-variance interpolated between log β̃_t and log β_t (Eq. 15)
        low, high = self._at("posterior_log_variance", timesteps, noisy), self._at("log_betas", timesteps, noisy)
        fraction = (variance_values + 1.0) / 2.0
        model_log_variance = fraction * high + (1.0 - fraction) * low
        # 4. L_vlb in bits per value: the KL to the posterior for t > 0, the decoder's NLL at t = 0
        kl = _normal_kl(mean_gap, low, model_log_variance)
        nll = -_discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_variance)
        first = (timesteps == 0).reshape(timesteps.shape + (1,) * (kl.dim() - 1))
        vlb = torch.where(first, nll, kl).reshape(kl.shape[0], -1).sum(dim=1) / (values * math.log(2.0))
        vlb = vlb.to(mse.dtype)
        return mse + self.vlb_weight * vlb


def training_loss(scheduler, vlb_weight: float = 1.0) -> LossFn:
    """The per-example loss a denoiser on ``scheduler`` trains with: :class:`HybridLoss` when it predicts its
    variance (:func:`predicts_variance`), else the mean squared error
    (:func:`~genkernel.diffusion.objectives.diffusion_loss`, for which ``vlb_weight`` must stay 1)."""
    if predicts_variance(scheduler):
        return HybridLoss(scheduler, vlb_weight)
    if vlb_weight != 1.0:
        raise ValueError(
            f"vlb_weight={vlb_weight!r} weighs the variational bound of a model that predicts its variance; this "
            "scheduler's variance is fixed: build it with variance_type='learned_range', or leave vlb_weight at 1"
        )
    return diffusion_loss


def describe_loss(loss_fn: LossFn) -> str:
    """What a report says a step trained with: ``"mse"`` (:func:`~genkernel.diffusion.objectives.diffusion_loss`),
    ``"hybrid: MSE + λ·L_vlb (λ = ...)"`` for a :class:`HybridLoss`, else the callable's qualified name."""
    if isinstance(loss_fn, HybridLoss):
        return f"hybrid: MSE + λ·L_vlb (λ = {loss_fn.vlb_weight:g})"
    if loss_fn is diffusion_loss:
        return "mse"
    return getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)


def loss_targets(loss_fn: LossFn, target: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The step's targets for ``loss_fn`` (:func:`training_loss`): ``(y, x_0, z_t, t)`` for a
    :class:`HybridLoss`, the target y ``[B, *shape]`` alone for the mean squared error."""
    return (target, clean, noisy, timesteps) if isinstance(loss_fn, HybridLoss) else target
