"""Stage-wise attribution of generated samples: the retrieval kernel along reverse sampling.

docs/diffusion.md. At each kept reverse step s, the normalized gradient kernel at the final
parameters between the current sample's state (x_s, s) and the training images noised to the
same level, (z_n = sqrt(ᾱ_s) x_n + sqrt(1 − ᾱ_s) ε_n, s) with fixed ε_n, says which training
examples the denoiser treats as similar at that stage. Turning k̂ into weights
p_n = max(k̂_n, 0) / Σ_m max(k̂_m, 0), its normalized entropy H(p) / log N is 1 for uniform
averaging over the training set and small when a few neighbours dominate (the feature-memory
view: broad averaging at high noise, near-neighbour retrieval at low noise). The reverse chain
is DDPM's by default; any diffusers sampler on the training noise schedule (DDIM, with fewer
steps) gives its own chain, whose states are compared the same way.

A conditional denoiser ``model(x_t, t, *conditioning)`` (class labels: ``UNet2DModel`` with
``num_class_embeds``) is sampled with ``conditioning`` (one row per sample) and compared with the
training examples under their own ``train_conditioning`` (one row per training input): the kernel
is between the states (x_s, s, y_sample) and (z_n, s, y_n), as the analyzer's probes and kernel
checkpoints pass (x, t, *conditioning).

A model sampled with classifier-free guidance (``guidance_scale=w``, ``null_conditioning=``) steps
with F̃ = F(∅) + w (F(y) − F(∅)) (:mod:`~genkernel.diffusion.guidance`), so the samples' side of the
kernel is that function's: ∇_θ F̃ = w ∇_θ F(y) + (1 − w) ∇_θ F(∅), and
k(s̃, n) = w k((x_s, y), n) + (1 − w) k((x_s, ∅), n), normalized by ‖∇_θ F̃(x_s)‖ (from the 2S × 2S
kernel of the two branches), against the training inputs under their own labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .kernels import eval_mode, state_kernel
from ..core.adapter import as_tuple, first_tensor, like_parameter, positive_int, seed_bits
from ..core.grouping import measured_minus_control
from ..stats import crossed_interval
from .objectives import EDM_PROCESS, FLOW_PROCESS, check_timesteps, level_dtype, noise_process, noisy_input, training_levels
from .guidance import null_conditioning_rows
from .learned_variance import predicts_variance
from .trainer import reverse_sample

__all__ = ["RetrievalResult", "entropy_drop_claim", "leave_one_out_entropy", "retrieval_attribution",
           "normalized_entropy", "top_weight_share"]


def normalized_entropy(kernel: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` k̂ rows -> ``[...]`` entropy of p ∝ max(k̂, 0), divided by log N (NaN if all <= 0)."""
    weights = kernel.clamp_min(0).to(torch.float64)
    total = weights.sum(dim=-1, keepdim=True)
    p = weights / torch.where(total > 0, total, torch.full_like(total, math.nan))
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=-1)
    # A row with no positive k̂ has no distribution: NaN, not the 0 of a fully concentrated one.
    entropy = torch.where(total[..., 0] > 0, entropy, torch.full_like(entropy, math.nan))
    return entropy / math.log(kernel.shape[-1])


def top_weight_share(kernel: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` k̂ rows and ``[..., k]`` indices -> ``[...]`` weight p ∝ max(k̂, 0) carried by
    those entries (NaN where no k̂ is positive: there is no distribution, as in
    :func:`normalized_entropy`; a 0 would read as "the top examples carry nothing")."""
    weights = kernel.clamp_min(0).to(torch.float64)
    total = weights.sum(dim=-1)
    return weights.gather(-1, indices).sum(-1) / torch.where(total > 0, total, torch.full_like(total, math.nan))


def leave_one_out_entropy(kernel: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` k̂ rows -> ``[..., N]``: entry n is :func:`normalized_entropy` of the row without training
    input n (divided by log(N − 1)); NaN where the rest has no positive k̂. Needs N >= 3."""
    n = kernel.shape[-1]
    if n < 3:
        raise ValueError(f"leaving one of {n} training inputs out leaves fewer than 2: no entropy to normalize")
    w = kernel.clamp_min(0).to(torch.float64)
    wlogw = torch.where(w > 0, w * w.log(), torch.zeros_like(w))
    rest = w.sum(dim=-1, keepdim=True) - w  # Σ over the other inputs
    rest_wlogw = wlogw.sum(dim=-1, keepdim=True) - wlogw
    positive = rest > 0
    safe = torch.where(positive, rest, torch.ones_like(rest))
    entropy = safe.log() - rest_wlogw / safe  # −Σ p log p with p = w / rest
    return torch.where(positive, entropy, torch.full_like(entropy, math.nan)) / math.log(n - 1)


def entropy_drop_claim(first: torch.Tensor, last: torch.Tensor, *, confidence: float = 0.95) -> dict[str, Any]:
    """The broad-to-narrow claim from the retrieval kernels ``[S, N]`` of two stages (noisiest first): per
    sample, normalized entropy at ``first`` minus at ``last``, its mean, and the interval of that mean over
    samples × training inputs (:func:`~genkernel.stats.crossed_interval`; :meth:`RetrievalResult.claim`).

    Returns:
        ``{"measured", "control", "difference", "interval", "confidence", "n", "samples", "training_inputs",
        "controls", "method", "units", "held"}`` (and ``"why"`` where there is no interval).
    """
    if first.dim() != 2 or first.shape != last.shape:
        raise ValueError(f"first and last must be two stages' [S, N] kernels of the same shape, got "
                         f"{tuple(first.shape)} and {tuple(last.shape)}")
    e_first, e_last = normalized_entropy(first), normalized_entropy(last)
    out = measured_minus_control(e_first, e_last, confidence=confidence)
    rows = torch.isfinite(e_first) & torch.isfinite(e_last)
    n = first.shape[-1]
    out.update(samples=int(rows.sum()), training_inputs=int(n), units="samples × training inputs (crossed)")
    if n < 3 or int(rows.sum()) < 2:
        why = (f"{n} training input(s): the interval's jackknife over the training inputs needs at least 3"
               if n < 3 else
               f"{int(rows.sum())} sample(s) with a defined entropy at both stages: the interval needs at least 2")
        return {**out, "interval": [math.nan, math.nan], "method": "crossed-jackknife-t", "held": False, "why": why}
    drop = (e_first - e_last)[rows]
    # θ₋ₙ: the mean drop over the same samples with training input n left out at both stages (a sample whose only
    # positive k̂ is input n has no entropy without it: left out of that θ₋ₙ)
    leave_out = (leave_one_out_entropy(first[rows]) - leave_one_out_entropy(last[rows])).nanmean(dim=0)
    interval = crossed_interval(drop, leave_out, estimate=out["difference"], confidence=confidence)
    out.update(interval=[interval.low, interval.high], n=interval.n, method=interval.method,
               held=interval.above(0.0))
    if not interval.defined:
        out["why"] = ("no interval: the drop has no spread over samples and training inputs, or leaving a training "
                      "input out leaves a sample without a positive k̂ (no entropy)")
    return out


@dataclass
class RetrievalResult:
    """Retrieval along the reverse chain.

    Attributes:
        stages: ``[K]`` reverse timesteps s (high noise first).
        states: ``[K, S, *shape]`` the samples x_s at each stage.
        samples: ``[S, *shape]`` the final samples.
        kernel: ``[K, S, N]`` k̂((x_s, s), (z_n, s)).
        entropy: ``[K, S]`` normalized entropy of the retrieval weights.
        top_indices: ``[K, S, top_k]`` training indices with the largest k̂ (by decreasing k̂; equal
            k̂ in increasing index order, whatever N).
        top_share: ``[K, S]`` weight p carried by the top_k training examples.
    """

    stages: torch.Tensor
    states: torch.Tensor
    samples: torch.Tensor
    kernel: torch.Tensor
    entropy: torch.Tensor
    top_indices: torch.Tensor
    top_share: torch.Tensor

    def claim(self) -> dict[str, Any]:
        """"Broad at high noise, narrow at low noise": entropy at the first (noisiest) stage minus
        entropy at the last, paired over samples, with a 95 % interval; held when it lies above 0.

        The samples are independent only given the training inputs they are compared with: every
        sample meets the same N noised training inputs (x_n and its fixed noise ε_n), which move all
        their entropies together. The interval is :func:`~genkernel.stats.crossed_interval`: the
        samples' spread plus a delete-one-training-input jackknife (``method`` "crossed-jackknife-t").
        Over samples alone (the interval before) it was too narrow: on a trained ring denoiser
        (16 inputs, 8 samples) the mean drop's spread over draws of ε_n and the sampling noise was
        0.030 against a mean standard error of 0.019 over samples, and over 300 draws of the samples,
        ε_n and the 16 inputs (of 64) the interval lay above the drop's mean 10.3 % of the time at a
        nominal 2.5 % (19 % with 8 inputs and 16 samples); the crossed interval 3.7 % (3.7 %). With
        fewer than 3 training inputs or 2 samples with a defined entropy there is no interval:
        ``held`` False with ``why``.

        Raises:
            ValueError: with fewer than two stages (one stage compared with itself would read as a
                difference of exactly 0).
        """
        if self.stages.numel() < 2:
            raise ValueError(
                f"the claim compares the noisiest stage with the cleanest, but this result has {self.stages.numel()} "
                f"stage(s) {self.stages.tolist()}: pass at least two stages that are different reverse steps "
                "(requested stages are snapped to the sampler's steps, so raise num_inference_steps or space them out)"
            )
        return entropy_drop_claim(self.kernel[0], self.kernel[-1])

    def to_json(self) -> dict[str, Any]:
        def finite(values: torch.Tensor) -> list[float | None]:  # strict JSON: NaN (no sample had weights) as None
            return [None if not math.isfinite(v) else v for v in values.tolist()]

        return {
            "stages": self.stages.tolist(),
            "mean_entropy": finite(self.entropy.nanmean(dim=1)),
            "mean_top_share": finite(self.top_share.nanmean(dim=1)),
            "top_indices": self.top_indices.tolist(),
            # None: one stage; an undefined interval end (NaN) as None, as every number here
            "entropy_high_minus_low": _strict(self.claim()) if self.stages.numel() >= 2 else None,
        }


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts and lists) as None: strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def retrieval_attribution(
    model: nn.Module,
    scheduler,
    train_data: torch.Tensor,
    *,
    num_samples: int = 4,
    stages: Sequence[int] | None = None,
    num_stages: int = 5,
    num_inference_steps: int | None = 100,
    top_k: int = 5,
    output_sketch: int | None = None,
    seed: int = 0,
    sampler: Any = None,
    step_kwargs: Mapping[str, Any] | None = None,
    conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    train_conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    guidance_scale: float = 1.0,
    null_conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> RetrievalResult:
    """Generate ``num_samples`` by reverse sampling and compute the retrieval kernel at stages.

    Args:
        train_data: ``[N, *shape]`` clean training inputs (a subset is fine; N sets the cost).
        stages: integer reverse timesteps in [0, T) to analyse (flow matching: real t = σ·T in [0, T];
            EDM: real t = ¼ ln σ; the states then kept at the sampler's float timesteps) (a list, Tensor
            or array; snapped to
            the sampler's steps, where two may become one); default ``num_stages`` evenly spaced from
            the noisiest (T − 1; flow matching: T, σ = 1; EDM: the noisiest training level) to the cleanest.
        output_sketch: None for the exact kernel, V directions for images.
        seed: seeds sampling, the fixed training noise and the sketch.
        sampler, step_kwargs: the reverse sampler (default DDPM; a diffusers scheduler class or
            instance on the training schedule, e.g. ``DDIMScheduler``) and its ``step`` arguments
            (:func:`~genkernel.diffusion.trainer.reverse_sample`). A stage that snaps to a fractional
            timestep of the sampler (``EulerDiscreteScheduler`` with ``timestep_spacing="linspace"``)
            is refused: its state is not at the integer timestep the kernel is evaluated at.
        conditioning: a conditional model's extra inputs for the samples, a Tensor (class labels
            ``LongTensor[S]``) or tuple of Tensors with ``num_samples`` rows; used for sampling and
            for the samples' states in the kernel.
        train_conditioning: the training inputs' own extra inputs, the same kinds with N rows
            (their class labels ``LongTensor[N]``). Give both or neither.
        guidance_scale, null_conditioning: classifier-free guidance (a model trained with label
            dropout): the samples are drawn with F(∅) + w (F(y) − F(∅)), ∅ = ``null_conditioning``
            (shaped as ``conditioning``, e.g. the null class in every row; a part None: the samples' own), and
            their side of the
            kernel is that function's gradient (module docstring). w = 1 (default): the conditional model.

    Returns:
        The :class:`RetrievalResult` (stages from the noisiest).
    """
    if not isinstance(train_data, torch.Tensor) or train_data.dim() < 2:
        raise TypeError(f"train_data must be a Tensor [N, *shape], got {getattr(train_data, 'shape', type(train_data).__name__)}")
    n = train_data.shape[0]
    # checked before sampling: a float or bool count would otherwise fail (or pass as 1) deep inside torch
    top_k, num_samples = positive_int(top_k, "top_k"), positive_int(num_samples, "num_samples")
    if stages is None:
        num_stages = positive_int(num_stages, "num_stages")
    if n < 2 or not 1 <= top_k <= n:
        raise ValueError(f"need at least 2 training inputs and 1 <= top_k <= N; got N={n}, top_k={top_k}")
    extra = () if conditioning is None else as_tuple(conditioning, name="conditioning")
    train_extra = () if train_conditioning is None else as_tuple(train_conditioning, name="train_conditioning")
    if len(extra) != len(train_extra):
        raise ValueError(
            f"conditioning has {len(extra)} tensor(s) but train_conditioning {len(train_extra)}: a conditional model "
            "needs both, the samples' (num_samples rows) and the training inputs' own (N rows, e.g. their class labels)"
        )
    if any(c.shape[0] != num_samples for c in extra):
        raise ValueError(f"conditioning needs one row per sample ({num_samples}), got {[tuple(c.shape) for c in extra]}")
    if any(c.shape[0] != n for c in train_extra):
        raise ValueError(f"train_conditioning needs one row per training input ({n}), got "
                         f"{[tuple(c.shape) for c in train_extra]}")
    total = int(scheduler.config.num_train_timesteps)
    if stages is None:
        if noise_process(scheduler) == EDM_PROCESS:  # real levels ¼ ln σ, from the noisiest training level down
            levels = training_levels(scheduler)[0]
            stages = torch.linspace(float(levels[-1]), float(levels[0]), num_stages).tolist()
        else:  # the noisiest level: T − 1 under DDPM, T (σ = 1, the flow sampler's first step) under flow matching
            noisiest = total if noise_process(scheduler) == FLOW_PROCESS else total - 1
            stages = torch.linspace(noisiest, 0, num_stages).round().long().tolist()
    # A Tensor or array of stages is fine (reverse_sample takes one too); values outside [0, T)
    # would be snapped silently to the first or last reverse step.
    stages = torch.as_tensor(stages).reshape(-1)
    if stages.numel() == 0:
        raise ValueError("stages is empty: pass at least one reverse timestep in [0, T) (or stages=None for num_stages)")
    stages = check_timesteps(stages, scheduler, name="stages").tolist()
    if float(guidance_scale) != 1.0 and predicts_variance(scheduler):
        # F̃'s mean channels are guided, its variance channels the conditional output's: its gradient is no
        # combination w ∇F(y) + (1 − w) ∇F(∅) of whole outputs, which the guided kernel assembles
        raise ValueError(
            "retrieval with guidance_scale != 1 is not defined here for a model that predicts its variance "
            "(variance_type='learned_range'): its guided output guides the mean channels only; attribute the "
            "conditional model (guidance_scale=1)"
        )
    param = first_tensor(model, "the model")
    if not extra:
        _check_unconditional_call(model, train_data.to(param), level_dtype(scheduler))
    samples, kept = reverse_sample(
        model, scheduler, (num_samples, *train_data.shape[1:]), num_inference_steps=num_inference_steps, seed=seed,
        keep=stages, sampler=sampler, step_kwargs=step_kwargs, conditioning=conditioning,
        guidance_scale=guidance_scale, null_conditioning=null_conditioning,
    )  # (reverse_sample checks the guidance arguments)
    guidance_scale = float(guidance_scale)
    null_extra = () if guidance_scale == 1.0 else null_conditioning_rows(null_conditioning, extra)
    order = sorted(kept, reverse=True)
    generator = torch.Generator().manual_seed(seed_bits(seed) + 7)  # (reverse_sample checked the seed)
    clean = train_data.to(param)
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64).to(param)

    def on_device(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(like_parameter(c, param) for c in tensors)

    extra, train_extra, null_extra = on_device(extra), on_device(train_extra), on_device(null_extra)
    kernels, states = [], []
    for s in order:
        x_s = kept[s]
        t_samples = torch.full((num_samples,), s, dtype=level_dtype(scheduler), device=param.device)  # as sampled
        t_train = torch.full((n,), s, dtype=level_dtype(scheduler), device=param.device)
        z_train = noisy_input(scheduler, clean, noise, t_train)
        with eval_mode(model):  # as sampled (reverse_sample runs the model in eval mode)
            if guidance_scale == 1.0:
                kernels.append(state_kernel(model, (x_s, t_samples, *extra), (z_train, t_train, *train_extra),
                                            output_sketch=output_sketch, seed=seed))
            else:
                kernels.append(_guided_kernel(model, (x_s, t_samples), extra, null_extra, guidance_scale,
                                              (z_train, t_train, *train_extra), output_sketch, seed))
        states.append(x_s.detach().cpu())
    kernel = torch.stack(kernels).cpu()  # [K, S, N]
    entropy = normalized_entropy(kernel)
    top_indices = _top_indices(kernel, top_k)
    top_share = top_weight_share(kernel, top_indices)
    return RetrievalResult(
        stages=torch.tensor(order), states=torch.stack(states), samples=samples.detach().cpu(), kernel=kernel,
        entropy=entropy, top_indices=top_indices, top_share=top_share,
    )


def _top_indices(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., N]`` k̂ rows -> ``[..., k]`` indices of the k largest, by decreasing k̂, equal k̂ in increasing
    index order (as :func:`~genkernel.analysis.neighbors.kernel_neighbors`). ``Tensor.topk`` breaks ties in an
    order that depends on N (a model whose k̂ is equal over the training set lists other examples for a
    subset of the same training data), so a stable sort of −k̂ (negation is exact) is used instead."""
    return torch.sort(-kernel, dim=-1, stable=True).indices[..., :k].contiguous()


def _guided_kernel(model: nn.Module, state: tuple[torch.Tensor, torch.Tensor], conditioning: tuple[torch.Tensor, ...],
                   null_conditioning: tuple[torch.Tensor, ...], scale: float, others: tuple[torch.Tensor, ...],
                   output_sketch: int | None, seed: int) -> torch.Tensor:
    """``[S, N]`` normalized kernel between the guided function F̃ = w F(y) + (1 − w) F(∅) at the S
    states and the N ``others``, from the two branches' kernels (module docstring):

    1. k̂ ``[2S, N]`` of the conditional and the null rows against the others (normalized);
    2. their unnormalized ``[2S, 2S]`` kernel G, whose diagonal gives each branch's norm;
    3. k(s̃, n) / ‖n‖ = w k̂(y, n) ‖y‖ + (1 − w) k̂(∅, n) ‖∅‖, divided by
       ‖s̃‖ = sqrt(w² G_yy + 2 w (1 − w) G_y∅ + (1 − w)² G_∅∅) (0 where that is 0, as normalize_kernel does).
    """
    s = state[0].shape[0]
    both = tuple(torch.cat([a, a]) for a in state) + tuple(torch.cat([c, u]) for c, u in zip(conditioning, null_conditioning))
    k_hat = state_kernel(model, both, others, output_sketch=output_sketch, seed=seed)
    gram = state_kernel(model, both, output_sketch=output_sketch, seed=seed, normalize=False)
    norms = gram.diagonal().clamp_min(0).sqrt()
    rows = torch.arange(s)
    g_yy, g_nn, g_yn = gram[rows, rows], gram[rows + s, rows + s], gram[rows, rows + s]
    w = scale
    scaled = w * k_hat[:s] * norms[:s, None] + (1 - w) * k_hat[s:] * norms[s:, None]
    guided_norm = (w * w * g_yy + 2 * w * (1 - w) * g_yn + (1 - w) ** 2 * g_nn).clamp_min(0).sqrt()
    return torch.where(guided_norm[:, None] > 0, scaled / guided_norm.clamp_min(torch.finfo(scaled.dtype).tiny)[:, None],
                       torch.zeros_like(scaled))


def _check_unconditional_call(model: nn.Module, train_data: torch.Tensor, level_dtype: torch.dtype) -> None:
    """Call ``model(x, t)`` on one training row (no gradient, eval mode): a conditional model fails
    there in its own words ("missing argument", diffusers' "class_labels should be provided"), which
    are kept, followed by the arguments that fix it."""
    t = torch.zeros(1, dtype=level_dtype, device=train_data.device)
    try:
        with torch.no_grad(), eval_mode(model):
            model(train_data[:1], t)
    except (TypeError, ValueError) as error:
        kind = TypeError if isinstance(error, TypeError) else ValueError
        raise kind(
            f"{error} (retrieval_attribution called the model as model(x_t, t): a conditional model needs "
            "conditioning= (one row per sample, e.g. the class labels to sample) and train_conditioning= (the "
            "training inputs' own, one row per input))"
        ) from error
