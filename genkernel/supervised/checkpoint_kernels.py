"""Gradient kernels recorded at stated checkpoints while a model trains, for the path kernel
K^p = Σ_k η_k k_{θ_k} (docs/generalization.md, "The null space").
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..core.adapter import analysis_mode, checked_forward
from ..core.tracking.callbacks import TrainerCallback
from ..core.engine.kernels import gradient_kernel

__all__ = ["CheckpointKernels", "geometric_checkpoints"]


def _whole(value, name: str) -> int:
    """``value`` as an int when it is one (a Python, NumPy or 0-dim integer tensor step count);
    a ValueError naming ``name`` for anything else: a float step would be truncated silently."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (value.is_floating_point() or value.is_complex()) \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an int (a whole number), got {value!r}: a float would be cut to the step "
            "below silently. Round it yourself (int(round(v)); geometric_checkpoints gives int steps)"
        )
    return int(value)


def geometric_checkpoints(steps: int, count: int) -> list[int]:
    """About ``count`` distinct checkpoint steps in [0, steps), 0 first, spaced geometrically."""
    steps, count = _whole(steps, "steps"), _whole(count, "count")
    if steps < 1 or count < 1:
        raise ValueError(f"steps and count must be positive, got steps={steps}, count={count}")
    raw = np.unique(np.round(np.geomspace(1, steps, num=count)).astype(int) - 1)
    return sorted({0, *[int(v) for v in raw if v < steps]})


class CheckpointKernels(TrainerCallback):
    """Records the gradient kernel over training inputs and test probes every ``every`` steps.

    Checkpoints are θ_0, θ_every, θ_2·every, ..., or the steps listed in ``at`` (a left Riemann
    sum of the path): checkpoint k stands for the steps up to the next checkpoint (or the end) and
    gets weight Σ η_s over those steps s, each step's learning rate read from the optimizer as the
    step starts (in :meth:`wrap_step`, so a scheduler stepped in any callback's ``on_step_end``,
    before or after this one, is followed; η_k × that many steps for a constant rate). A callback
    that takes steps over (:class:`LedgerCallback`) must come after this one in the list, or this
    one never sees the steps start (refused). Training changes fastest early, so
    geometrically spaced ``at`` (see
    :func:`geometric_checkpoints`) describe the path better than evenly spaced ones.

    One step size η_k for every parameter is what the sum means: an optimizer whose parameter
    groups have different learning rates, or a trainable parameter the optimizer does not train
    (it would add gradient directions training never moves), is refused at the first checkpoint.
    The kernels and outputs are those of the model in eval mode (dropout off, BatchNorm on its
    running statistics), computed without touching the RNG or training.

    Args:
        train_x: ``[N, ...]`` training inputs; probe_x: ``[M, ...]`` test inputs (probes), the same
            shape per example, dtype and device.
        every: steps between checkpoints (ignored when ``at`` is given); steps: the total number
            of steps of the run (a run of another length is refused: the last checkpoint's weight
            counts the steps up to ``steps``).
        at: explicit checkpoint steps (must include 0, increasing, below ``steps``).

    Attributes after training:
        grams: list of ``[N, N]`` kernels, stored in float64 (computed in the model's dtype,
        ``kernel_dtype``: cast to it before passing them to the spectral tools); crosses: list of
        ``[M, N]``; probe_self: list of ``[M]`` k(x, x); weights: list of floats Σ η_s over each checkpoint's steps; checkpoints:
        their step indices; train_outputs / probe_outputs: lists of ``[N, d]`` / ``[M, d]`` model outputs at each
        checkpoint (for the loss weights w_n = ∂ℓ/∂f of the Domingos sum); not_plain_steps: why the
        run's steps are not plain full-batch gradient steps (empty: they are).
        Use :meth:`path_kernel` for the sums and :meth:`kernel_machine_change` for the
        Domingos reconstruction of the probes' change.
    """

    def __init__(self, train_x: torch.Tensor, probe_x: torch.Tensor, *, every: int = 1, steps: int,
                 at: Sequence[int] | None = None) -> None:
        every, steps = _whole(every, "every"), _whole(steps, "steps")
        if every < 1 or steps < 1:
            raise ValueError(f"every and steps must be positive, got every={every}, steps={steps}")
        if at is None:
            at = range(0, steps, every)
        if isinstance(at, (str, bytes)) or not hasattr(at, "__iter__"):
            raise ValueError(f"at must be a sequence of int steps, got {type(at).__name__}")
        at = [_whole(a, f"at[{i}]") for i, a in enumerate(at)]
        if not at or at[0] != 0 or any(b <= a for a, b in zip(at, at[1:])) or at[-1] >= steps:
            raise ValueError(f"checkpoints must start at 0, increase strictly and stay below steps={steps}; got {at[:10]}")
        for name, t in (("train_x", train_x), ("probe_x", probe_x)):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == 0:
                raise ValueError(f"{name} must be a Tensor with at least one example on dimension 0, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if (train_x.shape[1:], train_x.dtype, train_x.device) != (probe_x.shape[1:], probe_x.dtype, probe_x.device):
            raise ValueError(
                f"train_x {tuple(train_x.shape)} ({train_x.dtype}, {train_x.device}) and probe_x "
                f"{tuple(probe_x.shape)} ({probe_x.dtype}, {probe_x.device}) must agree on the shape per example, "
                "dtype and device: one kernel is computed over both"
            )
        self.train_x, self.probe_x = train_x, probe_x
        self.every, self.steps = every, steps
        self.at = at
        self._next = dict(zip(at, at[1:] + [steps]))
        self.grams: list[torch.Tensor] = []
        self.crosses: list[torch.Tensor] = []
        self.probe_self: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.checkpoints: list[int] = []
        self.train_outputs: list[torch.Tensor] = []
        self.probe_outputs: list[torch.Tensor] = []
        # Why the steps taken are not the plain gradient steps kernel_machine_change sums (empty: they are).
        self.not_plain_steps: list[str] = []

    @staticmethod
    def _step_size(trainer) -> float:
        """The one learning rate of every trainable parameter; refuses several, or a trainable
        parameter the optimizer leaves out (the recorded kernel would count its gradient)."""
        trained = {id(p): float(g["lr"]) for g in trainer.optimizer.param_groups for p in g["params"]}
        named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters: there is no gradient kernel to record")
        left_out = [name for name, p in named if id(p) not in trained]
        if left_out:
            raise ValueError(
                f"parameters {left_out[:5]} are trainable but not in the optimizer: the gradient kernel would count "
                "directions training never moves. Freeze them (p.requires_grad_(False)) or give them to the optimizer"
            )
        rates = sorted({trained[id(p)] for _, p in named})
        if len(rates) != 1:
            raise ValueError(
                f"the optimizer's parameter groups have learning rates {rates[:5]}: the path kernel Σ_k η_k k_θk needs "
                "one step size for every trainable parameter. Train with one learning rate"
            )
        return rates[0]

    def _note_plain_steps(self, trainer) -> None:
        """Note what makes the steps other than full-batch gradient descent on the mean loss."""
        n = self.train_x.shape[0]
        optimizer = trainer.optimizer
        reasons = []
        if type(optimizer) is not torch.optim.SGD:
            reasons.append(f"the optimizer is {type(optimizer).__name__}, not plain SGD")
        else:
            for key in ("momentum", "weight_decay"):
                values = sorted({float(g.get(key, 0.0)) for g in optimizer.param_groups})
                if values != [0.0]:
                    reasons.append(f"SGD has {key} {values}")
            if any(g.get("maximize", False) for g in optimizer.param_groups):
                reasons.append("SGD maximizes")
        batch, examples = getattr(trainer, "batch_size", None), getattr(trainer, "num_examples", None)
        if batch != n or examples != n:
            reasons.append(f"the steps use batches of {batch} from {examples} examples, not all {n} of train_x")
        dropped = [name for name, m in trainer.model.named_modules()
                   if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
        if dropped:  # the steps follow random sub-networks, the kernels the eval-mode network
            reasons.append(f"dropout {dropped[:3]} randomizes the training steps")
        # A BatchNorm in training mode normalizes each step with the batch's statistics, while the kernels and
        # outputs are those of the eval-mode network (running statistics): the steps move another function.
        batch_normed = [name for name, m in trainer.model.named_modules()
                        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                        and (isinstance(m, nn.modules.batchnorm._BatchNorm) or m.track_running_stats)]
        if batch_normed:
            reasons.append(f"normalization {batch_normed[:3]} uses batch statistics in the training steps but running "
                           "statistics in the recorded kernels (put it in eval mode to train on running statistics)")
        self.not_plain_steps += [r for r in reasons if r not in self.not_plain_steps]

    def _note_inputs(self, step) -> None:
        """Note a step whose inputs are not ``train_x``'s rows at the trainer's indices (``step.info["indices"]``,
        which SupervisedTrainer sets): the Domingos sum pairs the kernel's row n (train_x[n]) with the loss
        weight of training example n, so ``train_x`` must be the trainer's dataset, row for row; another
        order or other inputs of the same size gave a sum 116% or 85% off the real change, with no error."""
        reason = ("the steps train on other inputs than train_x at their dataset indices (train_x must be the "
                  "trainer's training inputs, in the same order)")
        indices = step.info.get("indices") if isinstance(step.info, dict) else None
        inputs = step.inputs
        if reason in self.not_plain_steps or not isinstance(indices, torch.Tensor) or len(inputs) != 1:
            return  # (a trainer that states no indices cannot be checked)
        n = self.train_x.shape[0]
        indices = indices.reshape(-1).to(device=self.train_x.device, dtype=torch.long)
        fits = (indices.numel() == inputs[0].shape[0] and inputs[0].shape[1:] == self.train_x.shape[1:]
                and (indices.numel() == 0 or 0 <= int(indices.min()) and int(indices.max()) < n))
        if not fits or self.train_x.dtype != inputs[0].dtype or not torch.equal(
                self.train_x[indices].to(inputs[0].device), inputs[0]):
            self.not_plain_steps.append(reason)

    def _record(self, trainer, step: int) -> None:
        n = self.train_x.shape[0]
        self._step_size(trainer)  # refuses several learning rates or untrained parameters before any kernel
        self._note_plain_steps(trainer)
        both = torch.cat([self.train_x, self.probe_x])
        # In the mode the outputs are computed in (eval, RNG untouched): a training-mode forward would
        # advance state such as spectral norm's power iteration and change training; dropout is off.
        with analysis_mode(trainer.model):
            k = gradient_kernel(trainer.model, both)
        self.kernel_dtype = k.dtype  # the precision the kernels have (the model's), whatever they are stored in
        k = k.to(torch.float64).cpu()
        with torch.no_grad(), analysis_mode(trainer.model):
            out = checked_forward(trainer.model, (both,), name="train_x and probe_x").to(torch.float64).cpu()
        self.train_outputs.append(out[:n])
        self.probe_outputs.append(out[n:])
        self.grams.append(k[:n, :n])
        self.crosses.append(k[n:, :n])
        self.probe_self.append(k[n:, n:].diagonal().clone())
        self.weights.append(0.0)  # on_step_end adds the rate of every step this checkpoint stands for
        self.checkpoints.append(step)

    def on_train_start(self, trainer) -> None:
        if trainer.global_step != 0:
            raise RuntimeError("CheckpointKernels counts steps from 0: attach it to a fresh trainer")
        if self.checkpoints:
            # A second run would append its checkpoints to the first's: path_kernel() would sum both runs'
            # kernels (checkpoints [0, 2, 0, 2], every weight counted twice) with no error.
            raise RuntimeError(
                f"this CheckpointKernels already recorded a run (checkpoints {self.checkpoints[:10]}): a second run "
                "would add its kernels to the first's in path_kernel(). Build a new CheckpointKernels for every run"
            )
        # Nothing kept from a run that failed before its first checkpoint (a reason noted then is not this run's).
        for recorded in (self.grams, self.crosses, self.probe_self, self.weights, self.train_outputs,
                         self.probe_outputs, self.not_plain_steps):
            recorded.clear()
        self._step_rate = None
        self._record(trainer, 0)

    def wrap_step(self, trainer, step, perform):
        # The rate the optimizer applies in this step, whatever callback steps a scheduler and when.
        self._step_rate = self._step_size(trainer)
        return perform()

    def on_step_end(self, trainer, step) -> None:
        done = trainer.global_step + 1  # the trainer increments global_step after the callbacks
        if done > self.steps:
            raise ValueError(
                f"CheckpointKernels was built with steps={self.steps} but the run goes on to step {done}: the last "
                "checkpoint's weight would miss the extra steps. Build it with the run's number of steps"
            )
        if self._step_rate is None:
            raise ValueError(
                f"CheckpointKernels did not see step {done - 1} start (its wrap_step did not run: a callback before it "
                "in the list took the step over), so it cannot tell the step's learning rate. Put CheckpointKernels "
                "before that callback (e.g. a LedgerCallback) in the callbacks"
            )
        self.weights[-1] += self._step_rate  # step done - 1, read as it started, is the last checkpoint's
        self._step_rate = None
        if step.clip_factor < 1.0 and "gradient clipping scaled a step" not in self.not_plain_steps:
            self.not_plain_steps.append("gradient clipping scaled a step")
        if step.weights is not None and "a step weighted its examples" not in self.not_plain_steps:
            self.not_plain_steps.append("a step weighted its examples")
        self._note_inputs(step)
        if done in self._next:
            self._record(trainer, done)

    def on_train_end(self, trainer) -> None:
        if trainer.global_step != self.steps:
            raise ValueError(
                f"CheckpointKernels was built with steps={self.steps} but the run stopped after {trainer.global_step}: "
                "the last checkpoint's weight counts steps that did not happen (and checkpoints after them are "
                "missing). Build it with the run's number of steps"
            )

    def kernel_machine_change(self, loss_weight) -> torch.Tensor:
        """``[M, d]`` the Domingos sum −Σ_k W_k (1/N) Σ_n k_{θ_k}(x, x_n) w_n(θ_k) at the probes,
        W_k = ``weights[k]`` (a left Riemann sum over the checkpoints; for a full-batch mean loss
        and scalar outputs).
        Only steps of plain gradient descent on all of ``train_x`` are such a sum: a run with
        another optimizer (momentum, weight decay, Adam), mini-batches, dropout or clipped steps, or
        steps on other inputs than ``train_x`` row for row (checked against the trainer's dataset
        indices, ``step.info["indices"]``, where the trainer states them) is refused
        (:attr:`not_plain_steps` says why).

        Args:
            loss_weight: ``loss_weight(train_outputs [N, d]) -> [N, d]``, w_n = ∂ℓ_n/∂f, e.g.
                ``lambda f: 2 * (f - y)`` for the squared error (``y`` of shape ``[N, 1]``: a ``[N]``
                ``y`` would broadcast to ``[N, N]`` and is refused). The outputs it receives are the
                recorded ones, float64 on the CPU: close over CPU targets (``y.cpu()``).
        """
        if not self.weights:
            raise RuntimeError("no checkpoint recorded yet: attach the callback to a trainer and train")
        if self.not_plain_steps:
            raise ValueError(
                f"kernel_machine_change sums plain full-batch gradient steps, but {'; '.join(self.not_plain_steps)}: "
                "the sum would not reconstruct the change. Train with torch.optim.SGD (no momentum or weight decay) on "
                "full batches (train_x is the training set, batch_size=len(train_x)), without dropout or clipping; "
                "path_kernel() does not need this"
            )
        n, d = self.train_outputs[0].shape
        if d != 1:
            # The recorded kernels are traces over the outputs; the sum needs the d×d blocks K(x, x_n).
            raise ValueError(
                f"kernel_machine_change needs a model with one output, this one has {d}: the recorded kernels are "
                "traces over the outputs, and the Domingos sum needs their d×d blocks (gradient_kernel(..., "
                "reduce='none'))"
            )
        total = torch.zeros_like(self.probe_outputs[0])
        for w, cross, f in zip(self.weights, self.crosses, self.train_outputs):
            weight = loss_weight(f)
            if not isinstance(weight, torch.Tensor) or weight.shape != f.shape:
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(
                    f"loss_weight must return one weight per recorded output, shape {tuple(f.shape)}, got {shape}; "
                    "targets of shape [N] broadcast against outputs [N, 1]: use y.reshape(-1, 1)"
                )
            total -= w / n * cross @ weight.to(torch.float64)
        return total

    def path_kernel(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gram [N, N], cross [M, N], probe_self [M])`` of K^p = Σ_k η_k k_{θ_k}, summed in float64 and
        returned in :attr:`kernel_dtype`, the dtype the kernels were computed in (the model's): a float32
        model's kernels carry float32 rounding, and the spectral tools (:mod:`genkernel.analysis.spectral`)
        read their rounding floor from the dtype (a float32 path kernel passed as float64 is refused as
        "not PSD", or its rounding-level eigenvalues are taken for eigenfunctions)."""
        if not self.weights:
            raise RuntimeError("no checkpoint recorded yet: attach the callback to a trainer and train")
        w = torch.tensor(self.weights, dtype=torch.float64)
        return (
            torch.einsum("k,kij->ij", w, torch.stack(self.grams)).to(self.kernel_dtype),
            torch.einsum("k,kij->ij", w, torch.stack(self.crosses)).to(self.kernel_dtype),
            torch.einsum("k,ki->i", w, torch.stack(self.probe_self)).to(self.kernel_dtype),
        )
