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
steps with a closure, which the tracker follows (the step is begun when the closure's backward and
gradient clipping are done); ``accumulate_grad_batches`` (an epoch's last, partial accumulation
included), ``gradient_clip_val`` (by norm; clipping by value is refused at the first step it acts
on) and learning-rate schedules are followed exactly; a ``training_step`` returning None after its
``observe`` line is recorded as a step that moves nothing. Every step of the fit is tracked: an
analyzer with ``track_steps`` (a window the built-in trainers follow) is refused, and so is, without
``model_attribute``, a module with no ``forward`` (the probes call the bound network). ``observe``
belongs in ``training_step``: an error raised by one called in the sanity check or a validation loop
says so. Under DDP the callback binds the wrapper Lightning trains, so the ranks' group gradients
are combined as their gradients are. ``on_train_end`` records the final kernel structure. Lightning's
``StochasticWeightAveraging`` over a module with BatchNorm is refused at the start (its extra epoch copies
the average into the module outside any step; not where ``max_steps`` ends the fit before that epoch): average
with ``WeightAveraging()``. The
analyzer's state is saved in, and restored from, Lightning checkpoints by a ``fit`` with ``ckpt_path=`` (a
``validate``/``test``/``predict`` with ``ckpt_path=`` trains nothing and leaves the analyzer as it is, bound in
an earlier fit or not). Every ``fit`` builds
its optimizers anew, so an analyzer bound in an earlier fit is refused at the next one (give each
fit its own analyzer and callback; ``ckpt_path=...`` carries the ledgers over), unless
``configure_optimizers`` returns the same optimizer object: the ledger then goes on, and a new Trainer's
steps (its ``global_step`` from 0 again) are numbered on from the analyzer's last number, not from 1
again. On a GPU, call :func:`genkernel.set_exact_cuda_mode` before ``fit`` (TF32 off, deterministic kernels): trackers
refuse TF32 convolutions, torch's default.

A GAN (:class:`~genkernel.gan.GANKernelAnalyzer`) trains with manual optimization and two
optimizers; the callback binds the analyzer to both, telling them apart by their parameters (the
one over the generator's, the one over the discriminator's, in either order), and numbers each
player's steps from its own count, as an uninterrupted fit does: its optimizer's (Adam's ``state["step"]``),
else the last number of the analyzer's state in the checkpoint, so a resumed fit continues the numbering.
Under manual optimization ``global_step`` counts both players' steps: a fit resumed from a checkpoint without
the analyzer's state, with an optimizer that keeps no count (SGD), needs each player's steps so far,
``GenkernelCallback(analyzer, start_step=(generator_steps, discriminator_steps))``::

    class GAN(L.LightningModule):
        def __init__(self):
            ...; self.automatic_optimization = False
            self.analyzer = GANKernelAnalyzer(self.G, self.D, probe_latents, discriminator_probes=probe_images)
        def training_step(self, batch, i):
            opt_g, opt_d = self.optimizers()
            ...                                                   # D's losses [2B] on real and generated rows
            self.analyzer.observe_discriminator(d_losses, roles, x)
            opt_d.zero_grad(); self.manual_backward(d_losses.mean()); opt_d.step()
            z = ...; fake = self.G(z); g_losses = F.softplus(-self.D(fake).view(-1))
            self.analyzer.observe_generator(g_losses, z, fake)
            opt_g.zero_grad(); self.manual_backward(g_losses.mean()); opt_g.step()
    module = GAN()
    L.Trainer(..., callbacks=[GenkernelCallback(module.analyzer)]).fit(module, loader, ckpt_path=...)
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ..core.adapter import unwrap_optimizer
from ..core.tracking.batches import loader_batch_size
from ..core.errors import LedgerCheckError


class GenkernelCallback(pl.Callback):
    """Binds ``analyzer`` when training starts and finishes it when training ends.

    Args:
        analyzer: a :class:`~genkernel.diffusion.NoiseLevelAnalyzer` (or anything with
            ``bind(model, optimizer, ema=..., start_step=...)``, ``finish()``, ``state_dict()`` and
            ``load_state_dict()``), or a :class:`~genkernel.gan.GANKernelAnalyzer`, bound to the
            module's two optimizers (manual optimization; one over G's parameters, one over D's).
        model_attribute: the attribute of the LightningModule holding the trained network (default:
            the LightningModule itself). Not for a GAN analyzer, which holds G and D itself.
        ema: an EMA of the weights the module updates after each step (a second ledger; for a GAN,
            of the generator's weights). Without it, a fit with Lightning's ``WeightAveraging``
            callback (an ``AveragedModel`` of the module, updated after every step: EMA or SWA) gets
            the ledger of that average of the analyzed network, unless the analyzer says
            ``ema_ledger="none"``.
        start_step: for a GAN analyzer, ``(generator_steps, discriminator_steps)``, the steps each player has
            taken before this fit: needed only where neither the player's optimizer (SGD keeps no step count)
            nor the analyzer's state in the checkpoint says it (a fit resumed from a checkpoint written without
            the callback); a pair that contradicts them is refused.
    """

    def __init__(self, analyzer: Any, *, model_attribute: str | None = None, ema: Any = None,
                 start_step: tuple[int, int] | None = None) -> None:
        super().__init__()
        if not callable(getattr(analyzer, "bind", None)) and not hasattr(analyzer, "observe_generator"):
            # (it failed at the fit's start with "object has no attribute 'bind'", after Lightning's set-up)
            from ..core.tracking.tracker import PathKernelTracker

            fix = ("a PathKernelTracker follows the optimizer it was built on by itself: build it on the optimizer "
                   "configure_optimizers returns, call tracker.observe(losses, groups) in training_step, and train "
                   "without GenkernelCallback" if isinstance(analyzer, PathKernelTracker) else
                   "pass a NoiseLevelAnalyzer, a GANKernelAnalyzer or an object with bind(model, optimizer, ...)")
            raise TypeError(f"GenkernelCallback binds an analyzer to the fit's model and optimizer at the start of "
                            f"training, and {type(analyzer).__name__} has no bind(): {fix}")
        if start_step is not None:
            if not hasattr(analyzer, "observe_generator"):
                raise ValueError("start_step= is for a GANKernelAnalyzer (each player's steps): a fit of one optimizer "
                                 "numbers its steps from the trainer's global_step")
            pair = tuple(start_step) if isinstance(start_step, (tuple, list)) else ()
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
                raise ValueError("start_step must be a pair (generator_steps, discriminator_steps) of non-negative "
                                 f"ints, got {start_step!r}")
            start_step = pair
        self.analyzer = analyzer
        self.model_attribute = model_attribute
        self.ema = ema
        self.start_step = start_step
        self._averaging = None  # the WeightAveraging whose average is bound as the EMA
        self._step_offset = 0  # added to this fit's global_step + 1 for a step's number (_numbered_before)
        self._loaded_offset = 0  # the offset of the fit whose checkpoint this fit resumes (load_state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window = getattr(self.analyzer, "track_steps", None)
        if window is not None:  # followed by the built-in trainers only: every step here would be tracked
            raise ValueError(
                f"the analyzer has track_steps={tuple(window)!r}, a window only genkernel's built-in trainers follow: "
                "GenkernelCallback tracks every step of the fit, so the ledger and report would cover other steps "
                "than the window the report names. Build the analyzer without track_steps and attach it (module."
                "analyzer and the callback) only to a fit of the window: resume with ckpt_path= from a checkpoint at "
                "its first step - 1 and stop with max_steps= at its last (a GAN analyzer whose optimizers keep no step "
                "count, SGD, is also told each player's steps then: GenkernelCallback(analyzer, start_step=(generator_"
                "steps, discriminator_steps)))"
            )
        _refuse_batch_norm_swa(trainer, pl_module)
        if hasattr(self.analyzer, "observe_generator"):  # a GAN analyzer: both players' optimizers
            self._bind_gan(trainer)
            return
        # (a fit resumed from a checkpoint of a fit numbered ahead of its global_step numbers on as that fit did)
        self._step_offset, self._loaded_offset = self._loaded_offset, 0
        tracker = getattr(self.analyzer, "tracker", None)
        if tracker is not None:
            self._check_bound_to(tracker, trainer)
            self._step_offset = self._numbered_before(trainer)
            return  # bound already, to this fit's optimizer
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"the module has {len(trainer.optimizers)} optimizers: bind each analyzer to its own model and "
                "optimizer by hand (analyzer.bind) instead of through GenkernelCallback"
            )
        model = self._model(trainer, pl_module)
        self.analyzer.bind(
            model, trainer.optimizers[0], ema=self._ema(trainer, pl_module, model),
            start_step=trainer.global_step + self._step_offset, batch_size=_step_batch(trainer))

    def _ema(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any) -> Any:
        """The EMA to keep a ledger for: the one given, else the averaged copy of ``model`` that Lightning's
        ``WeightAveraging`` callback keeps (its ``AveragedModel`` holds a copy of the whole module), unless
        the analyzer's ``ema_ledger`` is "none"; else None."""
        self._averaging = None
        if self.ema is not None or getattr(self.analyzer, "ema_ledger", "trainer") == "none":
            return self.ema
        try:
            from lightning.pytorch.callbacks import WeightAveraging
        except ImportError:  # (Lightning before 2.5)
            return None
        averaging = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, WeightAveraging)]
        if not averaging:
            return None
        if len(averaging) > 1:
            raise ValueError(f"the fit has {len(averaging)} WeightAveraging callbacks: pass the one to keep a ledger "
                             "for as GenkernelCallback(analyzer, ema=...), or ema_ledger='none' on the analyzer")
        average = getattr(averaging[0], "_average_model", None)
        module = getattr(model, "module", model)  # (a DDP wrapper's module)
        path = next((name for name, m in pl_module.named_modules() if m is module), None)
        if average is None or path is None:
            raise ValueError(
                "the fit's WeightAveraging callback holds no averaged copy of the analyzed network (it builds one in "
                "setup); pass the EMA as GenkernelCallback(analyzer, ema=...), or ema_ledger='none' on the analyzer"
            )
        self._averaging = averaging[0]
        return average.module.get_submodule(path)

    def _mark_swapped(self, swapped: bool) -> None:
        """WeightAveraging swaps its average into the module for a validation loop (and back after it): the
        bound EMA then holds the trained weights, so a read of the EMA ledger in between must not sync."""
        if getattr(self, "_averaging", None) is None:
            return
        for name in ("tracker", "g_tracker"):
            tracker = getattr(self.analyzer, name, None)
            if tracker is not None and hasattr(tracker, "ema_swapped_out"):
                tracker.ema_swapped_out = swapped

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark_swapped(True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark_swapped(False)

    def _bind_gan(self, trainer: pl.Trainer) -> None:
        """Bind a :class:`~genkernel.gan.GANKernelAnalyzer` to this fit's generator and discriminator
        optimizers, found by their parameters."""
        analyzer = self.analyzer
        if self.model_attribute is not None:
            raise ValueError(
                "model_attribute is for analyzers of one network: a GANKernelAnalyzer already holds its generator and "
                "discriminator (GANKernelAnalyzer(G, D, ...)); drop model_attribute"
            )
        if trainer.world_size > 1:
            raise ValueError(
                f"GenkernelCallback with a GANKernelAnalyzer under {trainer.world_size} processes: DDP wraps the "
                "LightningModule, not the generator and discriminator the analyzer holds, so their trackers cannot "
                "combine the ranks' group gradients. Train on one process while the analyzer tracks"
            )
        current = [unwrap_optimizer(o) for o in trainer.optimizers]
        if getattr(analyzer, "_bound", False):
            mine = [o for o in (analyzer._g_optimizer, analyzer._d_optimizer) if o is not None]
            if all(any(o is c for c in current) for o in mine):
                return  # bound already, to this fit's optimizers
            raise ValueError(
                "the GAN analyzer was bound to the optimizers of an earlier fit, and this fit trains with others "
                "(Lightning calls configure_optimizers at every fit, and a resumed fit restores new optimizers): their "
                "steps would not reach the ledgers. Give every fit a new analyzer and GenkernelCallback (a fit resumed "
                "with ckpt_path=... restores the analyzer's state from the checkpoint)"
            )
        players = {"generator": analyzer._g, "discriminator": analyzer._d}
        found: dict[str, Any] = {}
        for optimizer in current:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for player, module in players.items():
                if owned and owned <= {id(p) for p in module.parameters()}:
                    if player in found:
                        raise ValueError(f"two of the module's optimizers train the {player}: the GAN analyzer follows "
                                         "one optimizer per player")
                    found[player] = optimizer
                    break
            else:
                raise ValueError(
                    "one of the module's optimizers trains parameters outside the analyzer's generator and outside its "
                    "discriminator (or both at once): give configure_optimizers one optimizer over G's parameters and "
                    "one over D's, the modules passed to GANKernelAnalyzer(G, D, ...)"
                )
        if "generator" not in found:
            raise ValueError("no optimizer of the module trains the analyzer's generator: return one over G's parameters "
                             "from configure_optimizers (GANKernelAnalyzer(G, D, ...) must get the module's own G)")
        steps = self._gan_start_steps(trainer, found)
        analyzer.bind(found["generator"], found.get("discriminator"), ema=self._ema(trainer, trainer.lightning_module,
                                                                                   analyzer._g), start_step=steps)

    def _gan_start_steps(self, trainer: pl.Trainer, found: dict[str, Any]) -> tuple[int, int]:
        """Each player's steps so far, ``(generator, discriminator)``, which an uninterrupted fit's analyzer numbers
        on from (each player from its own count: ``g_loop_steps`` 1, 2, ..., ``d_loop_steps`` 1, 2, ...): its
        optimizer's own count (Adam's ``state["step"]``), else the last number of the analyzer's state loaded from
        the checkpoint, else 0 in a fit that starts at ``global_step`` 0, else ``start_step=``. Under manual
        optimization ``global_step`` counts both players' steps, so a fit resumed from a checkpoint without the
        analyzer's state, whose optimizer keeps no count (SGD), is refused without ``start_step=`` rather than
        numbered from it; a ``start_step=`` that contradicts a count read here is refused too."""
        analyzer = self.analyzer
        numbered = {"generator": analyzer.g_loop_steps, "discriminator": analyzer.d_loop_steps}  # a loaded state's
        tracked = {"generator": True, "discriminator": found.get("discriminator") is not None
                   and getattr(analyzer, "track_discriminator", True)}
        given = None if self.start_step is None else dict(zip(("generator", "discriminator"), self.start_step))
        global_step = int(trainer.global_step)
        steps = []
        for player in ("generator", "discriminator"):
            count, source = _optimizer_steps(found.get(player)), "its optimizer's step count"
            if count is None and numbered[player]:
                count = int(numbered[player][-1])
                source = "the last step number of the analyzer's state loaded from the checkpoint"
            if count is None and global_step == 0:
                count, source = 0, "the fit's start (global_step 0)"
            if given is not None:
                if count is not None and given[player] != count and tracked[player]:
                    raise ValueError(
                        f"GenkernelCallback(start_step={tuple(self.start_step)!r}) says the {player} has taken "
                        f"{given[player]} steps, but {source} says {count}: drop start_step= (the callback numbers the "
                        "players' steps from their optimizers' counts and the analyzer's state in the checkpoint), or "
                        "pass the steps each player has taken")
                count = given[player]
            if count is None:
                if tracked[player]:
                    optimizer = type(found[player]).__name__
                    raise ValueError(
                        f"the fit resumes at global_step={global_step}, and neither the {player}'s optimizer "
                        f"({optimizer}, which keeps no step count) nor the checkpoint (no analyzer state in it) says "
                        f"how many of those steps were the {player}'s: under manual optimization global_step counts "
                        "both players' steps, and the analyzer numbers each player's steps from its own count, as an "
                        "uninterrupted fit does. Pass the steps each player has taken, "
                        "GenkernelCallback(analyzer, start_step=(generator_steps, discriminator_steps)), or resume "
                        "from a checkpoint written with the callback attached (it holds the analyzer's numbers)")
                count = 0  # (a player not tracked: no step of it is numbered)
            steps.append(count)
        return steps[0], steps[1]

    def _numbered_before(self, trainer: pl.Trainer) -> int:
        """For a fit that trains on with the optimizer an earlier fit bound (``configure_optimizers`` returning
        the same object): how far the analyzer's step numbers are ahead of this fit's ``global_step``. A new Trainer
        counts from 0 while the optimizer, the model and the ledger go on; numbered ``global_step + 1`` again, its
        steps took the earlier fit's numbers (two steps numbered 1). They are numbered on from the analyzer's last
        number instead; a fit whose ``global_step`` is already there (the same Trainer fit again, a ``ckpt_path=``
        at that step) is numbered by it, as before."""
        numbers = [n for n in getattr(self.analyzer, "global_steps", None) or () if isinstance(n, int)]
        return max(0, max(numbers, default=0) - int(trainer.global_step))

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
            if type(pl_module).forward in (pl.LightningModule.forward, nn.Module.forward):
                # the analyzer's probes call the bound network: it would fail deep inside the binding
                raise ValueError(
                    f"{type(pl_module).__name__} defines no forward, and GenkernelCallback without model_attribute "
                    "binds the LightningModule itself (its probes call module(x_t, t, ...)): name the attribute "
                    "holding the trained network, GenkernelCallback(analyzer, model_attribute='net'), or define forward"
                )
            wrapped = getattr(trainer.strategy, "model", None)
            return wrapped if isinstance(wrapped, DistributedDataParallel) else pl_module
        if trainer.world_size > 1:
            raise ValueError(
                f"model_attribute={self.model_attribute!r} under {trainer.world_size} processes: DDP wraps the "
                "LightningModule, so a submodule's tracker cannot see the gradients averaged across ranks. Let the "
                "callback bind the module itself (model_attribute=None), or train on one process"
            )
        return getattr(pl_module, self.model_attribute)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Number the step about to be recorded as Lightning numbers it (``global_step`` counts optimizer steps
        taken): an accumulation Lightning abandons (``on_train_batch_start`` returning -1 mid-window, its gradients
        cleared at the next window's ``zero_grad``) is no step of Lightning's, though the tracker counts the
        cleared micro-batches as a skipped one. Under manual optimization too: the module's one optimizer is the
        analyzer's (a fit of several is refused at binding), so ``global_step`` counts its steps, and gradients
        cleared mid-accumulation (Lightning's ``on_validation_model_zero_grad`` before a validation loop inside a
        window the module accumulates by hand) are no step either; numbered from the tracker's count, those steps
        were numbered ahead of ``global_step`` (2, 3 where Lightning's were 1, 2) and a fit resumed from a checkpoint
        of the run was refused (the analyzer's numbers past the checkpoint's step). A GAN analyzer (two optimizers,
        ``global_step`` counting both players' steps) numbers each player's steps itself and has no
        ``number_next_step``."""
        number = getattr(self.analyzer, "number_next_step", None)
        if number is not None:
            number(int(trainer.global_step) + 1 + self._step_offset)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.analyzer.finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Name clip-by-value as the cause when the tracker's gradient check refused a step under it, the
        Trainer's setting when a tracker refused its (mixed or half) precision, the validation loop when
        the analyzer was called there, and a skipped batch when a step came without an observed one."""
        self._stage = None  # (Lightning calls no teardown after an exception: a load_state_dict outside a run loads)
        stage = str(getattr(getattr(getattr(trainer, "state", None), "stage", None), "value", ""))
        if stage in ("sanity_check", "validate") and _raised_in_observe(exception) and hasattr(exception, "add_note"):
            loop = "sanity check" if stage == "sanity_check" else "validation"
            exception.add_note(
                f"genkernel: the analyzer was called in the {loop} loop (a step shared by training_step and "
                "validation_step?): a ledger follows the optimizer's steps, so observe only in training_step "
                "(guard a shared step's observe line with `if self.training:`)"
            )
        if ("without an observed micro-batch" in str(exception) and getattr(pl_module, "automatic_optimization", False)
                and hasattr(exception, "add_note")):
            exception.add_note(
                "genkernel: Lightning steps the optimizer (with no gradient) after a training_step that returns None "
                "as well: call analyzer.observe before any `return None` of training_step, and the skipped step is "
                "recorded as one that moves nothing. A non-finite loss cannot be observed (observe raises "
                "NonFiniteError): skip its step in the module's optimizer_step instead, `if optimizer_closure() is not "
                "None: optimizer.step(closure=lambda: None)`, after a training_step that returns None for it unobserved"
            )
        precision = str(getattr(trainer, "precision", ""))
        if ("mixed precision is not supported" in str(exception) and ("mixed" in precision or "16" in precision)
                and hasattr(exception, "add_note")):
            how = "autocast" if "mixed" in precision else "a half-precision copy of the module"
            exception.add_note(
                f"genkernel: the Trainer runs precision={precision!r} ({how}). Track with "
                "L.Trainer(precision='32-true') or '64-true': the ledger must reproduce each update exactly"
                + (", or build the analyzer (or tracker) with mixed_precision='observe' to split the half-precision "
                   "gradients, the rounding left in the residual (docs/observing.md)" if "mixed" in precision else "")
            )
        algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        if (isinstance(exception, LedgerCheckError) and trainer.gradient_clip_val
                and str(getattr(algorithm, "value", algorithm)) == "value" and hasattr(exception, "add_note")):
            exception.add_note(
                f"genkernel: the Trainer clips gradients by value (gradient_clip_val={trainer.gradient_clip_val}, "
                "gradient_clip_algorithm='value'), which changes each coordinate differently, so the clipped "
                "gradient is no longer the groups' sum times one scalar. Clip by norm "
                "(gradient_clip_algorithm='norm') while the analyzer tracks"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage  # (called before a checkpoint's states are restored)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = None  # (a load_state_dict outside a trainer's run loads)

    def state_dict(self) -> dict[str, Any]:
        return {"analyzer": self.analyzer.state_dict(), "step_offset": self._step_offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # trainer.validate / test / predict(ckpt_path=...) restore the callbacks too: such a loop trains nothing, so
        # the analyzer is left as it is, bound in an earlier fit or not (an unbound one given the checkpoint's
        # ledgers would refuse the next fit from step 0 and carry them into a fit that does not resume); a fit
        # with ckpt_path=... loads them
        if getattr(self, "_stage", None) not in (None, "fit"):
            return
        self.analyzer.load_state_dict(state_dict["analyzer"])
        self._loaded_offset = int(state_dict.get("step_offset", 0))


# torch's optimizers that write state["step"] for every parameter at their first step: an empty state is no step taken
_COUNTING_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in (
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop", "SparseAdam")
    if hasattr(torch.optim, name))


def _optimizer_steps(optimizer: Any) -> int | None:
    """The steps an optimizer has taken (the largest ``state["step"]`` over its parameters: Adam, AdamW,
    RMSprop keep one, restored with a checkpoint; 0 for one of torch's counting optimizers with no state yet: a
    player that has not stepped, a discriminator warm-up's generator); None when it keeps none (SGD)."""
    counts = [float(state["step"]) for state in ([] if optimizer is None else optimizer.state.values())
              if isinstance(state, dict) and "step" in state]
    if counts:
        return int(max(counts))
    inner = unwrap_optimizer(optimizer) if optimizer is not None else None
    if type(inner) in _COUNTING_OPTIMIZERS and not inner.state:
        return 0
    return None


def _refuse_batch_norm_swa(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse, before any step, a fit with Lightning's ``StochasticWeightAveraging`` over a module with BatchNorm
    and a finite ``max_epochs``: after the last epoch that callback copies its average into the module and runs
    one more epoch of ``training_step`` with no backward (to recompute the BatchNorm statistics). The analyzer's
    hooks found the parameters changed outside any step there and the fit failed at its very end, after every
    training step, naming no averaging (a run that trains to the end without the analyzer). A fit whose
    ``max_steps`` ends it before that epoch (Lightning stops at ``max_steps`` before starting another epoch) never
    runs it and is not refused: it trains as it would without the callback."""
    try:
        from lightning.pytorch.callbacks import StochasticWeightAveraging
    except ImportError:  # (a Lightning without it)
        return
    swa = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, StochasticWeightAveraging)]
    if not swa:
        return
    if trainer.max_epochs in (None, -1):  # (no extra BatchNorm epoch: the average is copied in at the end only)
        return
    if not _reaches_swa_batch_norm_epoch(trainer, swa[0]):
        return
    norms = [name for name, m in pl_module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ValueError(
            f"the fit has Lightning's StochasticWeightAveraging and the module has BatchNorm ({norms[0]!r}): after the "
            "last epoch that callback copies its average into the module and runs one more epoch of training_step "
            "without backward to recompute the BatchNorm statistics, a change of the weights outside any optimizer "
            "step that no ledger can book (the fit would fail at its end). Average with Lightning's WeightAveraging "
            "instead (WeightAveraging() averages as SWA does, and GenkernelCallback keeps a ledger of the average), "
            "then recompute the average's statistics after the fit (torch.optim.swa_utils.update_bn); or train "
            "without the analyzer"
        )


def _reaches_swa_batch_norm_epoch(trainer: pl.Trainer, swa: Any) -> bool:
    """Whether the fit can reach the epoch ``swa`` (a ``StochasticWeightAveraging``) adds after the last one for the
    BatchNorm statistics: False only where ``max_steps`` is hit first (every epoch before it steps
    ceil(batches / accumulate_grad_batches) times: 2 epochs of 2 batches and max_steps=4 stop before it, and trained
    as without the callback when they were refused); True where that cannot be known (an iterable dataset's unknown
    length, a ``max_time``, a Lightning without these attributes)."""
    max_steps = getattr(trainer, "max_steps", -1)
    batches = getattr(trainer, "num_training_batches", None)
    accumulate = getattr(trainer, "accumulate_grad_batches", None)
    try:
        last = int(swa.swa_end)  # (the last epoch of the fit as asked for, 0-based: the extra one comes after it)
    except Exception:  # (its on_fit_start not run, or a Lightning that names it otherwise)
        return True
    if (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0
            or not isinstance(batches, int) or isinstance(batches, bool) or batches <= 0
            or not isinstance(accumulate, int) or accumulate <= 0):
        return True
    return max_steps > (last + 1) * -(-batches // accumulate)


def _raised_in_observe(exception: BaseException) -> bool:
    """Whether ``exception`` was raised inside one of genkernel's ``observe*`` verbs."""
    frame = exception.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        if code.co_name.startswith("observe") and f"{os.sep}genkernel{os.sep}" in code.co_filename:
            return True
        frame = frame.tb_next
    return False


def _step_batch(trainer: pl.Trainer) -> int | None:
    """Examples per optimizer step (the loader's batch times the accumulated batches), for the
    cost the analyzer prints at binding; None when the loader does not say."""
    # (an epoch of fewer examples than the accumulated batches hold: every step trains the epoch's examples)
    return loader_batch_size(trainer.train_dataloader, int(trainer.accumulate_grad_batches))


__all__ = ["GenkernelCallback"]
