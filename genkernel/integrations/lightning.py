"""A Lightning callback that attaches a genkernel analyzer to a ``LightningModule``'s training.

Lifecycle::

    analyzer = NoiseLevelAnalyzer(scheduler, probe_data)
    class Denoiser(L.LightningModule):
        def training_step(self, batch, i):
            ...
            losses = per_example_losses                 # [B], with their graph
            self.analyzer.observe(losses, timesteps)    # the one added line
            return losses.mean()
    module = Denoiser(); module.analyzer = analyzer
    L.Trainer(..., callbacks=[GenkernelCallback(analyzer)]).fit(module, loader)
    analyzer.report()

At ``on_train_start`` the callback binds the analyzer to the module (or ``model_attribute`` of it)
and the trainer's first optimizer (Lightning's wrapper is read through); automatic optimization
steps with a closure, which the tracker follows (the step is begun when the closure's backward
and gradient clipping are done); ``accumulate_grad_batches`` and ``gradient_clip_val`` are
followed exactly. Under DDP the callback binds the wrapper Lightning trains, so the ranks' group
gradients are combined as their gradients are. ``on_train_end`` records the final kernel
structure. The analyzer's state is saved in, and restored from, Lightning checkpoints. Every ``fit``
builds its optimizers anew, so an analyzer bound in an earlier fit is refused at the next one (give
each fit its own analyzer and callback; ``ckpt_path=...`` carries the ledgers over). On a GPU,
call :func:`genkernel.set_exact_cuda_mode` before ``fit`` (TF32 off, deterministic kernels):
trackers refuse TF32 convolutions, torch's default.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..core.adapter import unwrap_optimizer
from ..core.errors import LedgerCheckError


class GenkernelCallback(pl.Callback):
    """Binds ``analyzer`` when training starts and finishes it when training ends.

    Args:
        analyzer: a :class:`~genkernel.diffusion.NoiseLevelAnalyzer` (or anything with
            ``bind(model, optimizer, ema=..., start_step=...)``, ``finish()``, ``state_dict()`` and
            ``load_state_dict()``).
        model_attribute: the attribute of the LightningModule holding the trained network (default:
            the LightningModule itself).
        ema: an EMA of the weights the module updates after each step (a second ledger).
    """

    def __init__(self, analyzer: Any, *, model_attribute: str | None = None, ema: Any = None) -> None:
        super().__init__()
        self.analyzer = analyzer
        self.model_attribute = model_attribute
        self.ema = ema

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = getattr(self.analyzer, "tracker", None)
        if tracker is not None:
            self._check_bound_to(tracker, trainer)
            return  # bound already, to this fit's optimizer
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"the module has {len(trainer.optimizers)} optimizers: bind each analyzer to its own model and "
                "optimizer by hand (analyzer.bind) instead of through GenkernelCallback"
            )
        self.analyzer.bind(
            self._model(trainer, pl_module), trainer.optimizers[0], ema=self.ema, start_step=trainer.global_step,
            batch_size=_step_batch(trainer))

    @staticmethod
    def _check_bound_to(tracker: Any, trainer: pl.Trainer) -> None:
        """Refuse a fit whose optimizer is not the one the analyzer was bound to: every ``fit`` calls
        ``configure_optimizers`` again, and steps of a new optimizer never reach the old one's step
        hooks, so the ledger would silently stop while the model trains on."""
        current = [unwrap_optimizer(o) for o in trainer.optimizers]
        if getattr(tracker, "_closed", False) or (len(current) == 1 and current[0] is tracker.optimizer):
            return
        raise ValueError(
            "the analyzer was bound to the optimizer of an earlier fit, and this fit trains with another one "
            "(Lightning calls configure_optimizers at every fit, and a resumed fit restores a new optimizer): its "
            "steps would not reach the ledger. Give every fit a new analyzer and GenkernelCallback (a fit resumed "
            "with ckpt_path=... restores the analyzer's state from the checkpoint), or return the same optimizer "
            "object from configure_optimizers"
        )

    def _model(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """What the analyzer binds: under DDP, the wrapper Lightning trains (the tracker reads the
        process group from it and combines the ranks' group gradients as DDP averages theirs)."""
        from torch.nn.parallel import DistributedDataParallel

        if self.model_attribute is None:
            wrapped = getattr(trainer.strategy, "model", None)
            return wrapped if isinstance(wrapped, DistributedDataParallel) else pl_module
        if trainer.world_size > 1:
            raise ValueError(
                f"model_attribute={self.model_attribute!r} under {trainer.world_size} processes: DDP wraps the "
                "LightningModule, so a submodule's tracker cannot see the gradients averaged across ranks. Let the "
                "callback bind the module itself (model_attribute=None), or train on one process"
            )
        return getattr(pl_module, self.model_attribute)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.analyzer.finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Name clip-by-value as the cause when the tracker's gradient check refused a step under it."""
        algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        if (isinstance(exception, LedgerCheckError) and trainer.gradient_clip_val
                and str(getattr(algorithm, "value", algorithm)) == "value" and hasattr(exception, "add_note")):
            exception.add_note(
                f"genkernel: the Trainer clips gradients by value (gradient_clip_val={trainer.gradient_clip_val}, "
                "gradient_clip_algorithm='value'), which changes each coordinate differently, so the clipped "
                "gradient is no longer the groups' sum times one scalar. Clip by norm "
                "(gradient_clip_algorithm='norm') while the analyzer tracks"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"analyzer": self.analyzer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.analyzer.load_state_dict(state_dict["analyzer"])


def _step_batch(trainer: pl.Trainer) -> int | None:
    """Examples per optimizer step (the loader's batch times the accumulated batches), for the
    cost the analyzer prints at binding; None when the loader does not say."""
    per_batch = getattr(trainer.train_dataloader, "batch_size", None)
    if isinstance(per_batch, bool) or not isinstance(per_batch, int):
        return None
    return per_batch * int(trainer.accumulate_grad_batches)


__all__ = ["GenkernelCallback"]
