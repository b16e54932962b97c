"""A small DDPM trainer on diffusers parts, with the shared callback protocol.

Every update is built as an :class:`~genkernel.core.tracking.step.OptimizerStep` and run through
:func:`~genkernel.core.tracking.callbacks.perform_step`, so an analyzer (a
:class:`~genkernel.core.tracking.callbacks.TrainerCallback`) can take the step over and keep a ledger while
training stays bit-for-bit what it is without it. The trainer draws batches, timesteps and noise
from its own seeded ``torch.Generator`` (never the global one), so analysis passes cannot change
what it trains on.

One step (DESIGN.md section 3):

1. a batch of clean inputs x_n (an epoch-wise permutation of the data);
2. timesteps t ~ U{0, …, T−1} and noise ε ~ N(0, I);
3. z = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε (``scheduler.add_noise``) and the target y (ε, v or x);
4. ``OptimizerStep(model(z, t), diffusion_loss, info={"timesteps": t, ...})`` through the callbacks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapter import output_tensor
from ..core.tracking.callbacks import CallbackStates, TrainerCallback, fire, perform_step
from ..core.tracking.io import atomic_save, load_state
from ..core.tracking.step import OptimizerStep
from .objectives import check_prediction_type, diffusion_loss, noisy_input, num_train_timesteps, training_target

OPTIMIZERS = ("adam", "adamw", "sgd")

__all__ = ["DDPMTrainer", "make_optimizer", "OPTIMIZERS"]


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-3, *, weight_decay: float = 0.0, momentum: float = 0.0):
    """Adam (default), AdamW or SGD over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    key = name.lower() if isinstance(name, str) else name
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not supported here; choose one of {OPTIMIZERS} or pass an optimizer object")


class DDPMTrainer:
    """Trains a denoiser ``model(x_t, t)`` with a ``diffusers.DDPMScheduler``.

    Args:
        model: the denoiser (:class:`~genkernel.diffusion.models.MLPDenoiser`,
            :func:`~genkernel.diffusion.models.tiny_unet`, or any module called as ``model(x_t, t)``).
        scheduler: a ``DDPMScheduler`` (``make_scheduler``); its ``prediction_type`` chooses the target.
        data: ``Tensor[N, *shape]`` clean training inputs (points ``[N, 2]`` or images ``[N, C, H, W]``).
        optimizer: "adam" (default), "adamw", "sgd", or a ``torch.optim.Optimizer`` over ``model``.
        lr, weight_decay, momentum: for a named optimizer.
        batch_size: examples per step (capped at N).
        max_grad_norm: global-norm gradient clipping (inf: none).
        seed: seeds the trainer's own generator (batches, timesteps, noise) and nothing global.
        callbacks: :class:`TrainerCallback` objects (analyzers); more can be appended between
            calls of :meth:`train` (an analyzer may attach after a warm-up).
        checkpoint_dir, checkpoint_every: write ``checkpoint.pt`` atomically every that many steps
            (0: only when :meth:`save_checkpoint` is called); :meth:`resume` continues from it.
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        data: torch.Tensor,
        *,
        optimizer: str | torch.optim.Optimizer = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        batch_size: int = 128,
        max_grad_norm: float = math.inf,
        seed: int = 0,
        callbacks: Sequence[TrainerCallback] = (),
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        progress: bool = True,
    ) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
            raise TypeError(f"data must be a Tensor [N, *shape] of clean training inputs, got {getattr(data, 'shape', type(data).__name__)}")
        if not data.is_floating_point():
            raise TypeError(f"data must be floating point, got {data.dtype}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir to write into")
        self.prediction_type = check_prediction_type(scheduler)
        self.model = model
        self.scheduler = scheduler
        param = next(model.parameters())
        self.data = data.to(device=param.device, dtype=param.dtype)
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
            model, optimizer, lr, weight_decay=weight_decay, momentum=momentum
        )
        self.batch_size = min(batch_size, data.shape[0])
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.callbacks: list[TrainerCallback] = list(callbacks)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.global_step = 0
        self.losses: list[float] = []
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._callback_states = CallbackStates()

    @property
    def num_train_timesteps(self) -> int:
        return num_train_timesteps(self.scheduler)

    # -- one step -----------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        """Draw the next batch from the trainer's generator: indices, clean x, t, ε, z and target."""
        n = self.data.shape[0]
        if self._cursor + self.batch_size > self._order.numel():
            self._order = torch.randperm(n, generator=self.generator)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        clean = self.data[index.to(self.data.device)]
        timesteps = torch.randint(0, self.num_train_timesteps, (index.numel(),), generator=self.generator)
        noise = torch.randn(clean.shape, generator=self.generator, dtype=torch.float64).to(clean)
        timesteps = timesteps.to(clean.device)
        noisy = noisy_input(self.scheduler, clean, noise, timesteps)
        target = training_target(self.scheduler, clean, noise, timesteps)
        return {"indices": index, "clean": clean, "timesteps": timesteps, "noise": noise, "noisy": noisy, "target": target}

    def build_step(self, batch: dict[str, torch.Tensor]) -> OptimizerStep:
        """The :class:`OptimizerStep` for ``batch``: inputs (z, t), target y, per-example MSE."""
        return OptimizerStep(
            self.model,
            self.optimizer,
            diffusion_loss,
            (batch["noisy"], batch["timesteps"]),
            batch["target"],
            max_grad_norm=self.max_grad_norm,
            info={k: batch[k] for k in ("timesteps", "clean", "noise", "indices")},
        )

    def train_step(self) -> float:
        """One update through the callbacks; returns the mean loss."""
        step = self.build_step(self.next_batch())
        losses = perform_step(self.callbacks, self, step)
        self.global_step += 1
        loss = float(losses.mean())
        self.losses.append(loss)
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            self.save_checkpoint()
        return loss

    def train(self, num_steps: int) -> list[float]:
        """Run ``num_steps`` more updates (firing ``on_train_start``/``on_train_end``); mean losses."""
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
        self.model.train()
        self._callback_states.claim(self.callbacks)
        fire(self.callbacks, "on_train_start", self)
        out = []
        bar = tqdm(range(num_steps), desc="ddpm", disable=not self.progress, leave=False)
        for _ in bar:
            out.append(self.train_step())
            bar.set_postfix(loss=f"{out[-1]:.4f}", refresh=False)
        fire(self.callbacks, "on_train_end", self)
        return out

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        num_inference_steps: int | None = None,
        seed: int = 0,
        keep: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Reverse DDPM sampling (``DDPMScheduler.step``) from pure noise.

        Args:
            num_samples: S.
            num_inference_steps: reverse steps (default: all T).
            seed: seeds the sampling generator (the global RNG is untouched).
            keep: timesteps t at which to keep the current sample x_t (the input of the step at t).

        Returns:
            ``(samples [S, *shape], {t: x_t [S, *shape]})``.
        """
        return reverse_sample(self.model, self.scheduler, (num_samples, *self.data.shape[1:]),
                              num_inference_steps=num_inference_steps, seed=seed, keep=keep)

    def save_samples(self, path: str | os.PathLike, num_samples: int = 16, *, num_inference_steps: int | None = None,
                     seed: int = 0) -> torch.Tensor:
        """Generate samples and write them as ``path`` (a PNG: an image grid, or a scatter over the
        data for points) plus ``path`` with suffix ``.pt`` (the tensor). Returns the samples."""
        import matplotlib.pyplot as plt

        samples, _ = self.sample(num_samples, num_inference_steps=num_inference_steps, seed=seed)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(samples.cpu(), path.with_suffix(".pt"))
        if samples.dim() == 2:
            fig, ax = plt.subplots(figsize=(4, 4))
            data = self.data.detach().cpu()
            ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgrey", label="training data")
            ax.scatter(samples[:, 0].cpu(), samples[:, 1].cpu(), s=6, c="C3", label="samples")
            ax.set_aspect("equal", adjustable="datalim")
            ax.legend(fontsize=7)
        else:
            cols = int(math.ceil(math.sqrt(num_samples)))
            rows = int(math.ceil(num_samples / cols))
            fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
            for ax in axes.flat:
                ax.set_axis_off()
            for ax, image in zip(axes.flat, samples.detach().cpu().float()):
                image = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        fig.suptitle(f"samples at step {self.global_step}", fontsize=8)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return samples

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "genkernel.DDPMTrainer/2",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "global_step": self.global_step,
            "losses": list(self.losses),
            "order": self._order.clone(),
            "cursor": self._cursor,
            "callbacks": self._callback_states.save(self.callbacks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "genkernel.DDPMTrainer/2":
            raise ValueError("not a DDPMTrainer checkpoint (written by DDPMTrainer.save_checkpoint)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.global_step = state["global_step"]
        self.losses = list(state["losses"])
        self._order, self._cursor = state["order"].clone(), state["cursor"]
        self._callback_states.load(self.callbacks, state["callbacks"])

    def discard_callback_states(self, keys: Sequence[str]) -> None:
        """Drop loaded callback states no attached callback claims (training then goes on without them)."""
        self._callback_states.discard(keys)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write the trainer (model, optimizer, generator, callbacks' state) atomically."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("pass a path, or build the trainer with checkpoint_dir=")
            path = self.checkpoint_dir / "checkpoint.pt"
        atomic_save(self.state_dict(), path)
        return Path(path)

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load ``path`` (default ``checkpoint_dir/checkpoint.pt``) if it exists; True when loaded."""
        if path is None:
            if self.checkpoint_dir is None:
                return False
            path = self.checkpoint_dir / "checkpoint.pt"
        if not Path(path).is_file():
            return False
        self.load_state_dict(load_state(path, "genkernel.DDPMTrainer/2"))
        return True


@torch.no_grad()
def reverse_sample(
    model: nn.Module,
    scheduler,
    shape: Sequence[int],
    *,
    num_inference_steps: int | None = None,
    seed: int = 0,
    keep: Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DDPM ancestral sampling with a private copy of ``scheduler`` (its timesteps are not touched).

    Returns ``(x_0 samples [S, *shape[1:]], {t: x_t})`` for the requested ``keep`` timesteps (a
    requested t that is not a reverse step of this schedule is snapped to the nearest one; the
    dict is keyed by the step actually used).
    """
    from diffusers import DDPMScheduler

    sampler = DDPMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(num_inference_steps or num_train_timesteps(scheduler))
    steps = [int(t) for t in sampler.timesteps]
    wanted = set()
    for t in keep or ():
        wanted.add(min(steps, key=lambda s: abs(s - int(t))))
    param = next(model.parameters())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(param)
    kept: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for t in steps:
            if t in wanted:
                kept[t] = x.clone()
            timestep = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = output_tensor(model(x, timestep))
            x = sampler.step(out, t, x, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return x, kept
