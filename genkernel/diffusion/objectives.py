"""DDPM training objective: schedulers, prediction targets, the per-example loss, noise-level bins.

A training contribution is a triple i = (n, t, ε) (docs/diffusion.md). With ᾱ_t the
scheduler's cumulative product of (1 − β):

    z_i = sqrt(ᾱ_t) x_n + sqrt(1 − ᾱ_t) ε                        (DDPMScheduler.add_noise)

and the denoiser f(z_i, t) regresses a target y_i that depends on the prediction type:

    epsilon        y = ε
    v_prediction   y = v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_n       (DDPMScheduler.get_velocity)
    sample         y = x_n

for every scheduler with ``alphas_cumprod`` (an Euler or DPM-Solver one too: its own add_noise is its sampling
parameterization), with the coefficients in float32 at least (:func:`_vp_coefficients`).

The loss is the mean squared error over the D output values, ℓ_i = ‖f(z_i, t) − y_i‖² / D, so
the ledger's loss weight (docs/ledger.md: w = ∂ℓ/∂f) is, for every prediction type,

    w_i = 2 (f(z_i, t) − y_i) / D.

Only y differs, and with it what w measures: the error of the predicted noise, of the
predicted velocity, or of the predicted clean input. The ledger differentiates the loss that was
really trained, so it needs no conversion between them (:func:`loss_weight` returns w).

Flow matching (rectified flow, the objective of Stable Diffusion 3 and FLUX; diffusers'
``FlowMatchEulerDiscreteScheduler``) is the other noise process handled here. Its level is the
model's timestep t in [0, T] with σ = t / T, and

    z_i = (1 − σ) x_n + σ ε,      y = ε − x_n                       ("flow": dz/dσ)

as diffusers' flow-matching training scripts compute them (``noisy = (1 − σ) x + σ ε``,
``target = noise − x``); log SNR = 2 log((1 − σ) / σ). Training levels are the scheduler's own
grid of T timesteps (σ_i·T, shifted by ``shift``); a level between grid points (continuous-time
training) is fine too. The loss and w are the same mean squared error.

EDM (Karras et al. 2022; diffusers' ``EDMEulerScheduler``) is the third. Its level is the model's
timestep t = c_noise = ¼ ln σ (real, negative for σ < 1; σ = exp(4t)), the noise is z = x + σ ε
(``add_noise``), the network F sees c_in z and its denoised output is D = c_skip z + c_out F
(``precondition_outputs``), with

    c_in = 1 / s,   c_skip = σ_d² / s²,   c_out = ±σ σ_d / s,   s = sqrt(σ² + σ_d²)

(c_out negative for ``prediction_type="v_prediction"``). The EDM paper's loss λ(σ) ‖D − x‖² with
λ = 1 / c_out² = (σ² + σ_d²) / (σ σ_d)² equals ‖F − y‖² with the effective target

    y = (x − c_skip z) / c_out = ±(σ x / σ_d − σ_d ε) / s,

so here the network input is c_in z (:func:`noisy_input`), the target is y
(:func:`training_target`), and the loss and w are the same mean squared error of F: the ledger
differentiates the weighted EDM loss exactly. (diffusers' SDXL DreamBooth script with
``--do_edm_style_training`` and an EDM scheduler trains the unweighted ‖D − x‖² = c_out² ‖F − y‖²
instead: a loop of its own passes those losses to ``observe``, whose ledger differentiates whatever
loss was trained; :class:`~genkernel.diffusion.trainer.DDPMTrainer` and ``analyzer.step`` train the
weighted one.) log SNR = 2 ln(σ_d / σ). Training levels are the T
timesteps diffusers' EDM training draws from (``scheduler.timesteps[indices]``, indices in [0, T),
of the constructor's Karras or exponential grid); a level between grid points is fine too.
"""

from __future__ import annotations

import functools
import math

import torch

from ..core.adapter import targets_per_example

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # DDPM-family schedulers (alphas_cumprod)
FLOW = "flow"  # the prediction type of a flow-matching scheduler: y = ε − x
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")  # what EDMEulerScheduler.precondition_outputs takes
DDPM_PROCESS, FLOW_PROCESS, EDM_PROCESS = "ddpm", "flow_matching", "edm"  # the noise processes (noise_process)
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")

__all__ = [
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
    "make_scheduler",
    "make_flow_scheduler",
    "make_edm_scheduler",
    "is_flow_matching",
    "is_edm",
    "noise_process",
    "level_dtype",
    "training_levels",
    "noise_schedule_config",
    "same_noise_schedule",
    "check_prediction_type",
    "check_timesteps",
    "training_target",
    "dream_correction",
    "diffusion_loss",
    "loss_weight",
    "timestep_bins",
    "bin_centers",
    "bin_edges",
    "BIN_SPACINGS",
    "NoiseBins",
]


def make_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    *,
    clip_sample: bool = False,
    **kwargs,
):
    """A ``diffusers.DDPMScheduler`` with a checked schedule and prediction type.

    ``clip_sample`` defaults to False (diffusers' default clips the predicted x0 to [-1, 1],
    which is right for images scaled to [-1, 1] and wrong for 2-D point sets of radius 2).
    """
    from diffusers import DDPMScheduler

    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type,
        clip_sample=clip_sample, **kwargs
    )


def make_flow_scheduler(num_train_timesteps: int = 1000, shift: float = 1.0, **kwargs):
    """A ``diffusers.FlowMatchEulerDiscreteScheduler``: flow matching with levels t = σ·T on its grid of
    T timesteps (``shift`` > 1 moves the grid towards noise, as SD3's shift=3.0 does)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift), **kwargs)


def make_edm_scheduler(
    num_train_timesteps: int = 1000,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    sigma_data: float = 0.5,
    sigma_schedule: str = "karras",
    prediction_type: str = "epsilon",
    **kwargs,
):
    """A ``diffusers.EDMEulerScheduler`` with checked settings: EDM with levels t = ¼ ln σ on its grid
    of σ from ``sigma_max`` down to ``sigma_min`` (``"karras"`` with ``rho``, or ``"exponential"``)."""
    from diffusers import EDMEulerScheduler

    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    numbers = {"sigma_min": sigma_min, "sigma_max": sigma_max, "sigma_data": sigma_data}
    for key, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be below sigma_max, got {sigma_min!r} and {sigma_max!r}")
    if sigma_schedule not in ("karras", "exponential"):
        raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {sigma_schedule!r}")
    if prediction_type not in EDM_PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {EDM_PREDICTION_TYPES}")
    return EDMEulerScheduler(
        num_train_timesteps=num_train_timesteps, sigma_min=float(sigma_min), sigma_max=float(sigma_max),
        sigma_data=float(sigma_data), sigma_schedule=sigma_schedule, prediction_type=prediction_type, **kwargs
    )


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching scheduler (diffusers' ``FlowMatch*`` classes: sigmas and
    no ``alphas_cumprod``)."""
    return type(scheduler).__name__.startswith("FlowMatch") and not hasattr(scheduler, "alphas_cumprod")


def is_edm(scheduler) -> bool:
    """Whether ``scheduler`` is diffusers' ``EDMEulerScheduler`` (or a subclass). Not the other ``EDM*``
    classes: ``EDMDPMSolverMultistepScheduler`` builds another grid (T points, a final σ = 0 among its
    sigmas), which training levels read as this one's would get wrong."""
    return any(cls.__name__ == "EDMEulerScheduler" for cls in type(scheduler).__mro__)


def noise_process(scheduler) -> str:
    """The scheduler's noise process: ``"flow_matching"``, ``"edm"`` or ``"ddpm"`` (every other scheduler;
    :func:`check_prediction_type` refuses those without ``alphas_cumprod``)."""
    if is_flow_matching(scheduler):
        return FLOW_PROCESS
    return EDM_PROCESS if is_edm(scheduler) else DDPM_PROCESS


def level_dtype(scheduler) -> torch.dtype:
    """The dtype of the timesteps a model is given: torch.long for DDPM-family schedulers,
    torch.float32 under flow matching (diffusers' own ``timesteps`` = σ·T) and EDM (t = ¼ ln σ)."""
    return torch.long if noise_process(scheduler) == DDPM_PROCESS else torch.float32


def _check_flow_config(scheduler) -> None:
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError(
            "the flow-matching scheduler has use_dynamic_shifting=True: its training levels depend on the image "
            "resolution (mu), which the scheduler does not hold; build it with use_dynamic_shifting=False and "
            "the shift your training uses (make_flow_scheduler(shift=...))"
        )


def training_levels(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels a training example can take and their log SNR, least noise first.

    Returns:
        ``(levels [T], log_snr [T])`` on the CPU: for a DDPM-family scheduler the integer timesteps
        0..T−1 (LongTensor) and log(ᾱ_t / (1 − ᾱ_t)); for a flow-matching scheduler the float32
        timesteps σ·T of its training grid (the grid its constructor builds; ``set_timesteps`` for
        sampling does not change it) and 2 log((1 − σ) / σ); for an EDM scheduler the float32
        timesteps ¼ ln σ of its constructor's grid that diffusers' EDM training draws (all but σ_min)
        and 2 ln(σ_d / σ). log SNR is float64 and non-increasing, −inf at a level of pure noise
        (ᾱ_t = 0, σ = 1 under flow matching).
    """
    check_prediction_type(scheduler)
    if is_flow_matching(scheduler):
        _check_flow_config(scheduler)
        grid = type(scheduler).from_config(scheduler.config)  # a fresh copy: the training grid, not a sampling one
        levels = grid.timesteps.detach().to("cpu", level_dtype(scheduler)).flip(0)
        sigma = levels.to(torch.float64) / num_train_timesteps(scheduler)
        return levels, 2 * (torch.log1p(-sigma) - torch.log(sigma))
    if is_edm(scheduler):
        grid_t, grid_sigma = _edm_grid(scheduler)
        # diffusers' EDM training draws scheduler.timesteps[randint(0, T)]: the T noisiest of the grid's
        # T + 1 points (σ_max first); the last, σ_min, is never drawn. Ascending t: least noise first.
        levels, sigma = grid_t[1:].clone(), grid_sigma[1:]
        return levels, 2 * (math.log(scheduler.config.sigma_data) - torch.log(sigma))
    # On the CPU: diffusers' add_noise moves the scheduler's alphas_cumprod to the samples' device
    # for good, and levels are bookkeeping, not model work.
    alphas = vp_alphas_cumprod(scheduler).detach().to("cpu", torch.float64)
    # A level with no noise (ᾱ = 1: β_0 = 0, or under 6e-8 in float32) has log SNR +inf, as a zero-terminal one
    # has -inf: the bins span the finite range either way. (The clamp made it 690.8, and "equal log SNR" bins of
    # [690.8, min] put nine of ten bins on t = 0..8 and 991 timesteps in the last.)
    snr = torch.log(alphas / (1 - alphas).clamp_min(1e-300))
    return torch.arange(alphas.numel()), torch.where(alphas >= 1, torch.full_like(snr, math.inf), snr)


def _edm_grid(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [T + 1] float32, σ [T + 1] float64)`` of an EDM scheduler's training grid, ascending t (σ_min first):
    the grid its constructor builds, whatever ``set_timesteps`` did to the object since."""
    # keyed by the constructor's settings ("_" entries are diffusers' bookkeeping, some of them lists)
    items = ((k, tuple(v) if isinstance(v, list) else v) for k, v in scheduler.config.items() if not k.startswith("_"))
    return _edm_grid_of((type(scheduler), tuple(sorted(items))))


@functools.lru_cache(maxsize=16)
def _edm_grid_of(key) -> tuple[torch.Tensor, torch.Tensor]:
    cls, items = key
    grid = cls.from_config(dict(items))  # a fresh copy: the training grid, not a sampling one
    count = int(grid.config.num_train_timesteps) + 1  # sigmas has a final 0 (or σ_min) appended for sampling
    return grid.timesteps.detach().to("cpu", torch.float32).flip(0), grid.sigmas[:count].to(torch.float64).flip(0)


def _edm_sigmas(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ of EDM levels ``timesteps [B]`` shaped to broadcast over ``like [B, *shape]``, in float64 on its device:
    the grid's σ at a level that is one of the grid's timesteps (what diffusers' ``add_noise`` and training
    scripts read: exp(4t) of a float32 t is σ only to float32 rounding), exp(4t) between them."""
    grid_t, grid_sigma = _edm_grid(scheduler)
    t = timesteps.detach().to("cpu", torch.float64)
    index = torch.searchsorted(grid_t.to(torch.float64), t).clamp(max=grid_t.numel() - 1)
    on_grid = grid_t.to(torch.float64)[index] == t
    sigma = torch.where(on_grid, grid_sigma[index], torch.exp(4 * t))
    return sigma.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


SCHEDULE_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr")  # what sets ᾱ_t
FLOW_SCHEDULE_KEYS = ("shift", "use_dynamic_shifting")  # what sets a flow-matching scheduler's training grid
# what sets an EDM scheduler's grid (σ range, schedule, rho), its preconditioning (σ_d) and target
EDM_SCHEDULE_KEYS = ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho", "prediction_type")


def noise_schedule_config(scheduler) -> dict:
    """The scheduler's config entries that set its training levels (a DDPM-family scheduler's betas,
    and so ᾱ_t; a flow-matching scheduler's shift; an EDM scheduler's σ grid, σ_d and prediction type),
    as plain values for a checkpoint."""
    process = noise_process(scheduler)
    out = {} if process == DDPM_PROCESS else {"process": process}
    keys = {DDPM_PROCESS: SCHEDULE_KEYS, FLOW_PROCESS: FLOW_SCHEDULE_KEYS, EDM_PROCESS: EDM_SCHEDULE_KEYS}[process]
    for key in keys:
        value = scheduler.config.get(key)
        listed = value is not None and not isinstance(value, (str, bool, int, float))  # trained_betas: a list or array
        out[key] = [float(v) for v in value] if listed else value
    return out


def same_noise_schedule(ours, theirs) -> bool:
    """Whether two schedulers train on the same levels with the same noise and target: the same kind
    (DDPM-family, flow matching or EDM), prediction type and T, and ᾱ_t (or the flow or EDM grid's
    levels) equal to a relative 1e-6 (compared on the CPU: training moves ᾱ_t to the model's device);
    under EDM also the same σ_d (it sets the preconditioning and so the target)."""
    if noise_process(ours) != noise_process(theirs):
        return False
    try:
        if check_prediction_type(theirs) != check_prediction_type(ours):
            return False
    except ValueError:
        return False
    if is_edm(ours) and float(ours.config.sigma_data) != float(theirs.config.sigma_data):
        return False
    if noise_process(ours) != DDPM_PROCESS:
        a, b = training_levels(ours)[0].double(), training_levels(theirs)[0].double()
    else:
        # (as DDPMScheduler reads their config: a zero-terminal-SNR Euler/DPM/UniPC scheduler's 2**-24 at T-1 is 0)
        a = vp_alphas_cumprod(ours).detach().to("cpu", torch.float64)
        b = vp_alphas_cumprod(theirs).detach().to("cpu", torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=0))


def check_prediction_type(scheduler) -> str:
    """The scheduler's prediction type; a ValueError naming the supported ones otherwise."""
    config = getattr(scheduler, "config", None)
    if is_flow_matching(scheduler) and config is not None:
        return FLOW
    kind = getattr(config, "prediction_type", None) if config is not None else None
    edm = is_edm(scheduler) and config is not None and "sigma_data" in config
    if edm and kind in EDM_PREDICTION_TYPES:
        return kind
    if edm or kind not in PREDICTION_TYPES or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"the scheduler ({type(scheduler).__name__}, prediction_type {kind!r}) is not one the diffusion "
            f"analyzer handles: a DDPM-family scheduler with alphas_cumprod and prediction_type one of "
            f"{', '.join(PREDICTION_TYPES)} (make_scheduler(prediction_type=...)), a flow-matching "
            "FlowMatchEulerDiscreteScheduler (make_flow_scheduler), or an EDMEulerScheduler with prediction_type "
            f"one of {', '.join(EDM_PREDICTION_TYPES)} (make_edm_scheduler)"
        )
    return kind


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def check_timesteps(timesteps: torch.Tensor, scheduler, *, name: str = "timesteps") -> torch.Tensor:
    """Return ``timesteps [B]`` after checking them: a DDPM-family scheduler's as a LongTensor of
    integers in [0, T); a flow-matching scheduler's as given (floats or integers) in [0, T]; an EDM
    scheduler's as given (finite floats up to ¼ ln(10 σ_max): :func:`_edm_timesteps`)."""
    process = noise_process(scheduler)
    if process == FLOW_PROCESS:
        return _flow_timesteps(timesteps, num_train_timesteps(scheduler), name)
    if process == EDM_PROCESS:
        return _edm_timesteps(timesteps, scheduler, name)
    return _integer_timesteps(timesteps, num_train_timesteps(scheduler), name)


def _real_timesteps(timesteps: torch.Tensor, name: str, what: str) -> torch.Tensor | None:
    """``timesteps [B]`` as float64 CPU values (None if empty) after checking they are a 1-D real Tensor
    (``what``: the level's formula, for the message)."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
        raise TypeError(f"{name} must be a 1-D Tensor [B] of timesteps {what}, got "
                        f"{getattr(timesteps, 'shape', type(timesteps).__name__)}")
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"{name} must be real timesteps {what}, got dtype {timesteps.dtype}")
    return timesteps.detach().to("cpu", torch.float64) if timesteps.numel() else None


def _flow_timesteps(timesteps: torch.Tensor, total: int, name: str) -> torch.Tensor:
    """``timesteps [B]`` on its device after checking they are real numbers t in [0, T] (σ = t / T in [0, 1])."""
    values = _real_timesteps(timesteps, name, "t = σ·T")
    if values is not None:
        if not bool(torch.isfinite(values).all()) or float(values.min()) < 0 or float(values.max()) > total:
            raise ValueError(
                f"{name} of a flow-matching scheduler are t = σ·T and must lie in [0, {total}] (σ in [0, 1]); got "
                f"values from {float(values.min()):g} to {float(values.max()):g} (pass timesteps, not sigmas: "
                "scheduler.timesteps[indices], or sigmas * num_train_timesteps)"
            )
    return timesteps


EDM_LEVEL_SLACK = 1e-5  # levels ¼ ln σ computed in float64 from float32 σ differ from diffusers' float32 ones by ~1e-7
# σ up to this many times σ_max is a level (booked to the last bin): the EDM paper's unclamped ln σ ~ N(−1.2, 1.2)
# exceeds σ_max = 80 about once in 6·10^5 draws, 800 about once in 4·10^10; sigmas passed in place of
# levels (up to σ_max, where ¼ ln(10 σ_max) is 1.67) still exceed it within a few examples
EDM_SIGMA_BEYOND_MAX = 10.0


def _edm_range(scheduler) -> tuple[float, float]:
    """The levels ``(¼ ln σ_min, ¼ ln σ_max)`` of an EDM scheduler's grid (its float32 ends, as float)."""
    grid_t = _edm_grid(scheduler)[0]
    return float(grid_t[0]), float(grid_t[-1])


def _edm_timesteps(timesteps: torch.Tensor, scheduler, name: str) -> torch.Tensor:
    """``timesteps [B]`` on its device after checking they are finite real numbers t = ¼ ln σ with σ at most
    :data:`EDM_SIGMA_BEYOND_MAX` times σ_max (to :data:`EDM_LEVEL_SLACK`, or to the rounding of float16 /
    bfloat16 levels). Levels beyond the grid's range (σ below σ_min or above σ_max: a σ drawn continuously,
    as the EDM paper's ln σ ~ N(P_mean, P_std), unclamped) are levels too; the bins book them to the end bins.
    Levels below ¼ ln σ_min are negative, so neither grid indices nor sigmas."""
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1 and not (
            timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool):
        raise TypeError(
            f"{name} of an EDM scheduler are real levels t = ¼ ln σ (a float Tensor), got dtype {timesteps.dtype}: "
            "these look like grid indices; pass scheduler.timesteps[indices]"
        )
    values = _real_timesteps(timesteps, name, "t = ¼ ln σ")
    top = 0.25 * math.log(EDM_SIGMA_BEYOND_MAX * float(scheduler.config.sigma_max))
    # float16 / bfloat16 levels (mixed-precision loops): their rounding (an ulp at the top) is allowed;
    # past the two checks above, timesteps is a 1-D floating-point Tensor
    slack = max(EDM_LEVEL_SLACK, torch.finfo(timesteps.dtype).eps * abs(top))
    if values is not None and (not bool(torch.isfinite(values).all()) or float(values.max()) > top + slack):
        config = scheduler.config
        raise ValueError(
            f"{name} of an EDM scheduler are t = c_noise = ¼ ln σ, finite and at most {top:.6g} (σ up to "
            f"{EDM_SIGMA_BEYOND_MAX:g} × σ_max = {EDM_SIGMA_BEYOND_MAX * config.sigma_max:g}; the grid's σ range is "
            f"[{config.sigma_min:g}, {config.sigma_max:g}]); got values from {float(values.min()):g} to "
            f"{float(values.max()):g}: pass the timesteps the model is given (scheduler.timesteps[indices], or "
            "0.25 * log(sigma) of a σ drawn continuously), not sigmas or indices"
        )
    return timesteps


def _flow_sigmas(timesteps: torch.Tensor, total: int, like: torch.Tensor) -> torch.Tensor:
    """σ = t / T shaped to broadcast over ``like [B, *shape]``, in its dtype (computed in float64)."""
    sigma = (timesteps.to(torch.float64) / total).to(device=like.device, dtype=like.dtype)
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def _integer_timesteps(timesteps: torch.Tensor, total: int, name: str) -> torch.Tensor:
    """``timesteps`` as a LongTensor[B] on its device after checking they are integers in [0, T = total)."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
        raise TypeError(f"{name} must be a 1-D integer Tensor [B], got {getattr(timesteps, 'shape', type(timesteps).__name__)}")
    # (a bool mask passed the old check as the levels 0 and 1: observe(losses, t > 50) booked every example to the
    # first bin, silently)
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"{name} must be integer timesteps (a LongTensor), got dtype {timesteps.dtype}")
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= total):
        raise ValueError(
            f"{name} must lie in [0, {total}) (the scheduler's num_train_timesteps); got values from "
            f"{int(timesteps.min())} to {int(timesteps.max())}"
        )
    return timesteps.long()


def _check_state(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``timesteps [B]`` after checking them (:func:`check_timesteps`) and the shapes of ``clean``/``noise``."""
    if not isinstance(clean, torch.Tensor) or not isinstance(noise, torch.Tensor) or clean.dim() < 1:
        raise TypeError("clean inputs and noise must be Tensors [B, *shape]")
    # an integer input (uint8 images not yet scaled to [-1, 1]) would take the level's coefficients cast to
    # integers: sqrt(ᾱ_t) -> 0, sqrt(1 − ᾱ_t) -> 0 or 1
    for what, tensor in (("clean inputs", clean), ("noise", noise)):
        if not tensor.is_floating_point():
            raise TypeError(f"{what} must be a floating-point Tensor, got dtype {tensor.dtype}: convert images to "
                            "float and scale them (to [-1, 1] for DDPM-style training) before adding noise")
    if clean.shape != noise.shape:
        raise ValueError(f"clean inputs {tuple(clean.shape)} and noise {tuple(noise.shape)} must have the same shape")
    # diffusers indexes alphas_cumprod with t: t = -1 would silently read ᾱ_{T-1}, and a t of
    # another length broadcasts against the batch
    timesteps = check_timesteps(timesteps, scheduler)
    if timesteps.shape[0] != clean.shape[0]:
        raise ValueError(f"need one timestep per example: the batch has {clean.shape[0]} examples, timesteps has "
                         f"{timesteps.shape[0]} values")
    return timesteps


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target y ``[B, *shape]`` for ``clean``, ``noise`` ``[B, *shape]`` and ``timesteps [B]``
    (:func:`check_timesteps`): ε, x, or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x (``DDPMScheduler.get_velocity``'s numbers,
    its coefficients in float32 at least: :func:`_vp_coefficients`); under
    flow matching ε − x; under EDM the network's effective target (x − c_skip z) / c_out
    = ±(σ x / σ_d − σ_d ε) / sqrt(σ² + σ_d²) (− for v_prediction), in ``clean``'s dtype."""
    kind = check_prediction_type(scheduler)
    timesteps = _check_state(scheduler, clean, noise, timesteps)
    if is_edm(scheduler):
        # the closed form, not (x − c_skip z) / c_out: at σ_min ~ 0.002 that divides a difference of
        # nearly equal terms by c_out ~ σ, losing ~3 digits in float32
        sigma, data = _edm_sigmas(scheduler, timesteps, clean), float(scheduler.config.sigma_data)
        scale = torch.sqrt(sigma**2 + data**2) * (1 if kind == "epsilon" else -1)
        return clean * (sigma / (data * scale)).to(clean.dtype) - noise * (data / scale).to(clean.dtype)
    if kind == FLOW:
        return noise - clean
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    signal, spread = _vp_coefficients(scheduler, timesteps, clean)
    return signal * noise - spread * clean


def dream_correction(scheduler, timesteps: torch.Tensor, noise: torch.Tensor, prediction: torch.Tensor,
                     noisy: torch.Tensor, target: torch.Tensor, detail_preservation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DREAM's corrected noisy input and target ``(z', y')``, each ``[B, *shape]`` in ``noisy``'s and ``target``'s
    dtypes (Zhou et al. 2024, "Diffusion Rectification and Estimation-Adaptive Models"; diffusers'
    ``compute_dream_and_update_latents``, its numbers: the coefficients in float32 at least, as
    :func:`_vp_coefficients`), for a DDPM-family scheduler with ε-prediction:

    1. δ = λ_t (ε − ε̂), ε̂ = ``prediction`` the model's own no-grad output at (z, t), λ_t = sqrt(1 − ᾱ_t)^p with
       p = ``detail_preservation`` (the paper's p = 1);
    2. z' = z + sqrt(1 − ᾱ_t) δ, the noisy input moved towards what the model would see if it were right;
    3. y' = y + δ (y = ε): the target the step regresses.

    ``noise`` is ε (the target's noise, without input perturbation), ``noisy`` z, ``target`` y, ``timesteps``
    LongTensor[B]; nothing here carries a graph: the step trains on (z', y') as data."""
    if check_prediction_type(scheduler) != "epsilon" or noise_process(scheduler) != DDPM_PROCESS:
        raise ValueError(
            f"DREAM corrects ε-prediction on a DDPM-family scheduler (diffusers' compute_dream_and_update_latents "
            f"raises for v-prediction); this scheduler is {noise_process(scheduler)} with prediction_type "
            f"{check_prediction_type(scheduler)!r}: train with prediction_type='epsilon' or without DREAM"
        )
    timesteps = _check_state(scheduler, noisy, noise, timesteps)
    if prediction.shape != noise.shape or target.shape != noise.shape:
        raise ValueError(
            f"DREAM needs the model's prediction and the target shaped as the noise {tuple(noise.shape)}, got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)} (a model that predicts its variance too has no one "
            "ε̂ to correct by: train it without DREAM)"
        )
    wide = torch.promote_types(noisy.dtype, torch.float32)
    alphas = vp_alphas_cumprod(scheduler).detach().to(noisy.device, wide)[timesteps.detach().to(noisy.device)]
    spread = ((1 - alphas) ** 0.5).reshape(-1, *([1] * (noisy.dim() - 1)))
    delta = (noise - prediction.detach().to(noise.dtype)) * (spread ** float(detail_preservation)).to(noise.dtype)
    return noisy + (spread * delta).to(noisy.dtype), target + delta.to(target.dtype)


def vp_alphas_cumprod(scheduler) -> torch.Tensor:
    """``[T]`` ᾱ_t of a scheduler with ``alphas_cumprod``, as ``DDPMScheduler`` computes it for the same config: what
    every DDPM training script (``DDPMScheduler.from_pretrained``) trains with. Euler, EulerAncestral, DPM-Solver and
    UniPC with ``rescale_betas_zero_snr=True`` set ᾱ_{T-1} = 2**-24 for their sampling (so that σ stays finite),
    where the rescaled schedule, and DDPMScheduler, have 0: it is 0 here. (With 2**-24 every inner log-SNR bin edge
    moved, [0, 9, 82, ...] for [0, 8, 67, ...], and the noisy input at t = 999 kept 2.4e-4 of the signal.)"""
    alphas = scheduler.alphas_cumprod
    if getattr(scheduler.config, "rescale_betas_zero_snr", False) and float(alphas[-1]) == 2.0**-24:
        alphas = alphas.clone()
        alphas[-1] = 0.0
    return alphas


def _vp_coefficients(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(ᾱ_t), sqrt(1 − ᾱ_t))`` of integer ``timesteps [B]``, shaped to broadcast over ``like [B, *shape]``,
    in its dtype and on its device. Computed as ``DDPMScheduler.add_noise`` computes them (ᾱ_t cast to the samples'
    dtype, then ``ᾱ ** 0.5`` and ``(1 − ᾱ) ** 0.5``), so float32 and float64 samples get its numbers bit for bit,
    but in float32 at least and rounded once to a float16 / bfloat16 dtype.

    Not ``scheduler.add_noise`` / ``get_velocity``: (1) DDPMScheduler's cast ᾱ_t to the samples' dtype before
    1 − ᾱ_t, so in float16 ᾱ_0 = 0.9999 rounds to 1 and t = 0, 1 get no noise at all (in bfloat16 t = 0..9 of
    a linear schedule, and 33% error in sqrt(1 − ᾱ_t) beyond); (2) the other schedulers with ``alphas_cumprod``
    (Euler, LMS, Heun, KDPM2, DPM-Solver, UniPC, ...) add noise in their own sampling parameterization (Euler's
    x + σ ε, indexed by their sampling grid), not the z = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε that the bins, log SNR and
    every DDPM training script (``DDPMScheduler.from_pretrained`` of the same config) use, and have no get_velocity
    (the old code's noise was off by up to 227 for Euler's at t = 999)."""
    wide = torch.promote_types(like.dtype, torch.float32)
    # on the samples' device, as add_noise computes them there (a CUDA power may round otherwise than the CPU's)
    alphas = vp_alphas_cumprod(scheduler).detach().to(like.device, wide)[timesteps.detach().to(like.device)]
    shape = (-1, *([1] * (like.dim() - 1)))
    signal, spread = alphas**0.5, (1 - alphas) ** 0.5
    return signal.to(like.dtype).reshape(shape), spread.to(like.dtype).reshape(shape)


def noisy_input(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """z = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε ``[B, *shape]``, ``DDPMScheduler.add_noise``'s numbers in ``clean``'s
    dtype with its coefficients computed in float32 at least (:func:`_vp_coefficients`; ``timesteps``:
    LongTensor[B] in [0, T)); under flow matching z = (1 − σ) x + σ ε with
    σ = t / T (``timesteps [B]`` in [0, T]); under EDM what the network is given, c_in (x + σ ε) =
    (x + σ ε) / sqrt(σ² + σ_d²) with σ = exp(4t) (``precondition_inputs`` of ``add_noise``)."""
    timesteps = _check_state(scheduler, clean, noise, timesteps)
    if is_edm(scheduler):
        sigma = _edm_sigmas(scheduler, timesteps, clean)
        c_in = 1 / torch.sqrt(sigma**2 + float(scheduler.config.sigma_data) ** 2)
        return (clean + noise * sigma.to(clean.dtype)) * c_in.to(clean.dtype)
    if is_flow_matching(scheduler):
        # σ and 1 − σ in float32 at least, each rounded once to clean's dtype: in bfloat16 σ = 0.999 rounds to 1, so
        # 1 − σ of the rounded σ dropped the signal at t = 999 and was up to 30% off at t = 990..997 (float32 / float64
        # unchanged: there the wide dtype is clean's own)
        wide = torch.promote_types(clean.dtype, torch.float32)
        sigma = (timesteps.to(torch.float64) / num_train_timesteps(scheduler)).to(device=clean.device, dtype=wide)
        sigma = sigma.reshape(-1, *([1] * (clean.dim() - 1)))
        return (1 - sigma).to(clean.dtype) * clean + sigma.to(clean.dtype) * noise
    signal, spread = _vp_coefficients(scheduler, timesteps, clean)
    return signal * clean + spread * noise


def _flat_pair(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``outputs`` and ``targets`` as ``[B, D]``; a ValueError unless each example has D values in both."""
    targets = targets_per_example(outputs, targets, "the diffusion loss")
    return outputs.reshape(outputs.shape[0], -1), targets.reshape(outputs.shape[0], -1)


def diffusion_loss(outputs: torch.Tensor, targets: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-example mean squared error ``[B]`` (mean over the D output values, not over the batch), in float32 for
    float16 / bfloat16 outputs (as diffusers' training scripts compute it), else in the outputs' dtype."""
    if isinstance(targets, tuple):
        targets = targets[0]
    if (isinstance(targets, torch.Tensor) and outputs.dim() >= 2 and targets.dim() == outputs.dim()
            and targets.shape[0] == outputs.shape[0] and outputs.shape[1] == 2 * targets.shape[1]
            and outputs.shape[2:] == targets.shape[2:]):
        raise ValueError(
            f"the model outputs {outputs.shape[1]} channels for {targets.shape[1]}-channel targets: a model that "
            "predicts its variance too (DiT's learn_sigma, IDDPM) trains on a DDPM scheduler with "
            "variance_type='learned_range' (make_scheduler(variance_type='learned_range'): the hybrid loss of "
            "genkernel.diffusion.learned_variance); flow matching and EDM have no learned variance. Otherwise build "
            f"it with out_channels={targets.shape[1]}"
        )
    flat, target = _flat_pair(outputs, targets)
    # in float32 at least, and returned so, as diffusers' scripts compute it (F.mse_loss(pred.float(),
    # target.float())): a float16 square of an error below 8e-3 is subnormal, and so is a loss below 6e-5 (errors
    # ~1e-3, a trained model's at low noise, gave per-example losses 1.5% to 2.6% off)
    wide = torch.promote_types(torch.promote_types(flat.dtype, target.dtype), torch.float32)
    diff = flat.to(wide) - target.to(wide)
    return (diff * diff).mean(dim=1)


def loss_weight(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """w = ∂ℓ/∂f = 2 (f − y) / D, ``[B, D]`` (the same formula for every prediction type; float32 for float16 /
    bfloat16 outputs, as :func:`diffusion_loss`)."""
    flat, target = _flat_pair(outputs, targets)
    wide = torch.promote_types(torch.promote_types(flat.dtype, target.dtype), torch.float32)  # as diffusion_loss
    return 2.0 * (flat.to(wide) - target.to(wide)) / flat.shape[1]


def _check_bin_counts(num_bins: int, total: int) -> None:
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"the number of timesteps T must be a positive int, got {total!r}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= total:
        raise ValueError(f"num_bins must be an int in [1, {total}] (T; more bins than timesteps leaves bins empty), "
                         f"got {num_bins!r}")


def _check_in_range(timesteps: torch.Tensor, total: int) -> torch.Tensor:
    """``timesteps`` as a CPU LongTensor[B] after checking they are integers in [0, T); clamping would
    put t = -1 in the first bin and t >= T in the last, bins those levels are not in."""
    if isinstance(timesteps, torch.Tensor) and timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be integer timesteps (a LongTensor), got dtype {timesteps.dtype}")
    return _integer_timesteps(timesteps, total, "timesteps").cpu()


def timestep_bins(timesteps: torch.Tensor, num_bins: int, total: int) -> torch.Tensor:
    """Bin id ``floor(t · G / T)`` of every timestep, ``LongTensor[B]`` in [0, G) (``timesteps``: integers in
    [0, T))."""
    _check_bin_counts(num_bins, total)
    _check_in_range(timesteps, total)
    return torch.div(timesteps.long() * num_bins, total, rounding_mode="floor")


def bin_edges(num_bins: int, total: int) -> torch.Tensor:
    """``[G + 1]`` first timestep of each bin, then T: bin g holds t with edges[g] <= t < edges[g+1]."""
    _check_bin_counts(num_bins, total)
    return torch.tensor([-(-g * total // num_bins) for g in range(num_bins + 1)], dtype=torch.long)


def bin_centers(num_bins: int, total: int) -> torch.Tensor:
    """``LongTensor[G]`` the middle timestep of every bin (the probe levels s)."""
    edges = bin_edges(num_bins, total)
    return torch.div(edges[:-1] + edges[1:] - 1, 2, rounding_mode="floor")


BIN_SPACINGS = ("log_snr", "timestep")


class NoiseBins:
    """Bins of the training timesteps (the groups of the noise-level analysis).

    ``spacing="log_snr"`` (default): every bin spans the same width of log SNR_t =
    log(ᾱ_t / (1 − ᾱ_t)), so a bin is a step in signal-to-noise ratio, not in t (equal-width t bins
    put 4 of 10 bins of a linear schedule where sqrt(ᾱ_t) <= 0.12, inputs that are nearly pure
    noise). ``spacing="timestep"``: equal widths in t, ``floor(t · G / T)``. Either way bin 0 holds
    the least noise and a bin is a contiguous range of timesteps. The log-SNR bins span the finite
    log SNR of the training levels (:func:`training_levels`): a zero-terminal-SNR schedule
    (``rescale_betas_zero_snr=True``, ᾱ_{T−1} = 0) puts its last timestep, at log SNR −∞, in the last
    bin, and so does flow matching its level t = T (σ = 1).

    Under flow matching a level is any real t in [0, T]: the edges are real numbers (the log-SNR
    boundaries mapped to t = T σ, σ = 1 / (1 + exp(λ / 2))), levels below the first boundary join
    bin 0 and levels beyond the last join the last bin, and a bin's centre is the level at the
    middle of its log-SNR range (between grid points, as continuous-time training visits them).
    Under EDM likewise, over t = ¼ ln σ in [¼ ln σ_min, ¼ ln σ_max]: log SNR = 2 ln σ_d − 8t is
    linear in t, so the log-SNR and the timestep spacings give the same equal widths of t (the
    first spans the grid's levels' log SNR, the second the whole range of t).

    Attributes:
        edges: ``Tensor[G + 1]`` the first timestep of every bin, then T (DDPM: a LongTensor; flow
            matching: float64, the first 0 and the last T, inclusive; EDM: float64, from ¼ ln σ_min
            to ¼ ln σ_max inclusive).
        centers: ``Tensor[G]`` the probe level of every bin: the timestep whose log SNR is
            nearest the middle of the bin's range (``"log_snr"``), or the middle timestep (DDPM: a
            LongTensor; flow matching and EDM: float32, as the scheduler's timesteps).
        log_snr: ``Tensor[G + 1]`` log SNR at the bins' edges (their ends: ``log_snr[g]`` at
            ``edges[g]``, the first at the least noisy training level, the last at the noisiest).
    """

    def __init__(self, scheduler, num_bins: int, spacing: str = "log_snr"):
        if spacing not in BIN_SPACINGS:
            raise ValueError(f"spacing must be one of {BIN_SPACINGS}, got {spacing!r}")
        total = num_train_timesteps(scheduler)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= total:
            raise ValueError(f"num_bins must be an int in [1, {total}] (num_train_timesteps), got {num_bins!r}")
        self.num_bins, self.total, self.spacing = num_bins, total, spacing
        self.scheduler = scheduler  # checks real levels (check_timesteps) and maps them to log SNR
        self.process = noise_process(scheduler)
        self.flow = self.process == FLOW_PROCESS
        self.real = self.process != DDPM_PROCESS  # real levels and edges (flow matching, EDM)
        levels, snr = training_levels(scheduler)
        self.snr_of_t = snr  # at the training levels (DDPM: indexed by t)
        finite = snr[torch.isfinite(snr)]
        if spacing == "log_snr" and finite.numel() == 0:
            raise ValueError("the scheduler's alphas_cumprod has no level with ᾱ_t > 0: use bin_spacing='timestep'")
        # The bins span the finite range: a zero-terminal-SNR schedule (rescale_betas_zero_snr=True)
        # has ᾱ_{T-1} = 0 and log SNR -inf there, which spread over the bins put every other
        # timestep in bin 0 and one timestep in each other bin. Levels at -inf join the last bin.
        bounds = None if spacing == "timestep" else torch.linspace(
            float(finite.max()), float(finite.min()), num_bins + 1, dtype=torch.float64)
        if self.real:
            self._real_bins(snr, bounds)
        elif spacing == "timestep":
            self.edges = bin_edges(num_bins, total)
            self.centers = bin_centers(num_bins, total)
        else:
            edges = [0]
            for g in range(1, num_bins):
                # the first timestep whose log SNR has fallen to or below the bin's boundary
                first = int(torch.searchsorted(-snr, -bounds[g]).item())
                edges.append(min(max(first, edges[-1] + 1), total - (num_bins - g)))
            edges.append(total)
            self.edges = torch.tensor(edges, dtype=torch.long)
            middles = (bounds[:-1] + bounds[1:]) / 2
            centers = []
            for g in range(num_bins):
                ts = torch.arange(int(self.edges[g]), int(self.edges[g + 1]))
                centers.append(int(ts[(snr[ts] - middles[g]).abs().argmin()]))
            self.centers = torch.tensor(centers, dtype=torch.long)
        if not self.real:
            self.log_snr = torch.cat([snr[self.edges[:-1]], snr[-1:]])

    def _level_range(self) -> tuple[float, float]:
        """The least and the most noisy real level: (0, T) under flow matching, (¼ ln σ_min, ¼ ln σ_max) under EDM."""
        return (0.0, float(self.total)) if self.flow else _edm_range(self.scheduler)

    def _level_of_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The real level at log SNR λ (float64): t = T σ with σ = 1 / (1 + exp(λ / 2)) under flow matching,
        t = ¼ ln σ with σ = σ_d exp(−λ / 2) under EDM."""
        if self.flow:
            return self.total * torch.sigmoid(-log_snr / 2)
        return (math.log(self.scheduler.config.sigma_data) - log_snr / 2) / 4

    def _log_snr_of_level(self, t: torch.Tensor) -> torch.Tensor:
        """log SNR at real levels ``t`` (float64): 2 log((1 − σ) / σ), σ = t / T; under EDM 2 ln σ_d − 8t."""
        if self.flow:
            sigma = t / self.total
            return 2 * (torch.log1p(-sigma) - torch.log(sigma))
        return 2 * math.log(self.scheduler.config.sigma_data) - 8 * t

    def _real_bins(self, snr: torch.Tensor, bounds: torch.Tensor | None) -> None:
        """Edges, centres and log SNR of bins over real levels (flow matching, EDM)."""
        low, high = self._level_range()
        if bounds is None:  # equal widths of t
            self.edges = torch.linspace(low, high, self.num_bins + 1, dtype=torch.float64)
            middles = (self.edges[:-1] + self.edges[1:]) / 2
        else:  # equal widths of log SNR, mapped to levels
            inner = self._level_of_log_snr(bounds[1:-1])
            self.edges = torch.cat([torch.full((1,), low, dtype=torch.float64), inner,
                                    torch.full((1,), high, dtype=torch.float64)])
            middles = self._level_of_log_snr((bounds[:-1] + bounds[1:]) / 2)
        self.centers = middles.to(torch.float32)  # level_dtype of real levels
        self.log_snr = torch.cat([snr[:1], self._log_snr_of_level(self.edges[1:-1]), snr[-1:]])

    def __call__(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B]`` the bin of every timestep (``timesteps``: integers in [0, T); under flow
        matching real numbers in [0, T]; under EDM real numbers t = ¼ ln σ, :func:`check_timesteps`)."""
        if self.real:
            t = check_timesteps(timesteps, self.scheduler).detach().to("cpu", torch.float64)
            bins = (torch.searchsorted(self.edges, t, right=True) - 1).clamp(0, self.num_bins - 1)
            return bins.to(timesteps.device)
        t = _check_in_range(timesteps, self.total)
        return (torch.searchsorted(self.edges, t, right=True) - 1).to(timesteps.device)

    def describe(self) -> dict:
        """Plain numbers for reports: spacing, edges, centers and the log SNR at the edges."""
        return {"spacing": self.spacing, "edges": self.edges.tolist(), "centers": self.centers.tolist(),
                "log_snr_at_edges": [round(float(v), 4) for v in self.log_snr]}
