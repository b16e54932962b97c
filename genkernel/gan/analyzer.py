"""GANKernelAnalyzer: the generator's exact path-kernel ledger split by discriminator gradient geometry.

DESIGN.md section 3. For a generator step with latents z_i and weights w_i = ∇_x ℓ_G(D(x)) at
x = G(z_i), the change of the generator at a probe latent z' is, exactly up to the measured residual,

    ΔG(z') = Σ_g C(z', g) + C_rest(z') + R(z'),   C(z', g) = Σ_k J̄_k(z') u_{k,g},

and for one plain SGD step u_{k,g} = −η Σ_{i∈g} c_i J_G(z_i)ᵀ w_i, i.e. ΔG(z') ≈ −(η/B) Σ_i K_G(z', z_i) w_i:
a kernel-smoothed field of discriminator input gradients. Groups g follow the discriminator's
geometry (:mod:`genkernel.gan.geometry`). The discriminator keeps its own ledger at fixed probe
points, grouped into generated / real / gradient-penalty examples (and by mode for mixtures).

Per generator step (numbered as in :meth:`GANKernelAnalyzer._generator_step`):

1. w_i, G(z_i), D(G(z_i)) at θ_k (analysis mode, forked RNG; training untouched);
2. group ids from the geometry grouping (fitted once on a reference batch), and, for each of the
   ``controls`` control partitions, label-permuted ids on the *same* step: the tracker splits the
   geometry partition and every control partition at once, each into its own exact ledger;
3. at evaluation steps, the probes' own geometry (w(z'), group) and the plain kernel-smoothed
   field −J_G(z'; θ_k) Σ_i c_i J_G(z_i; θ_k)ᵀ w_i (one VJP, one JVP: K_G is never formed);
4. the real step through the core tracker (exact split, check, contributions, fresh forward);
5. bookkeeping: windows are differences of the ledgers between their first and last step
   (:meth:`PathKernelLedger.since`); alignment cosines of the step's actual ΔG(z'), mode coverage.

Use it as a :class:`TrainerCallback` of :class:`GANTrainer`, or in your own loop::

    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(64, 2), grouping="direction")
    step = OptimizerStep(G, g_opt, GeneratorLoss(D), z, phase="generator")
    with frozen(D):                       # D in eval mode, parameters frozen, during G steps
        perform_step([analyzer], None, step)
    analyzer.report()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import grad, jvp

from ..core import grouping as grouping_layer
from ..core.adapter import analysis_mode, call_with, output_tensor, trainable_parameters
from ..core.errors import NonFiniteError
from ..core.tracking.callbacks import TrainerCallback, perform_step
from ..core.tracking.ledger import PathKernelLedger
from ..core.tracking.step import OptimizerStep
from ..core.tracking.tracker import PathKernelTracker
from ..stats import mean_interval
from .geometry import GeometryGrouping, make_grouping
from .losses import GENERATED, PENALTY, REAL, ROLE_NAMES, DiscriminatorObjective, scores_of
from .metrics import cosine, mode_coverage
from .trainer import discriminator_input_gradients

GEOMETRY = "geometry"
FORMAT = "genkernel.GANKernelAnalyzer/2"


def _check_discriminator_frozen(discriminator: nn.Module) -> None:
    """Generator steps must see D without training-mode state changes (spectral norm's power iteration)."""
    moving = [
        name or type(discriminator).__name__
        for name, m in discriminator.named_modules()
        if m.training and (any(True for _ in m.buffers(recurse=False)) or isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)))
    ]
    if moving:
        raise ValueError(
            f"the discriminator has modules in training mode with state that a forward pass changes ({moving[:3]}, e.g. "
            "spectral norm's power iteration) during a generator step: the analysis would change training. "
            "Wrap generator steps in `with genkernel.gan.frozen(discriminator):` (eval mode, frozen parameters)."
        )


class GANKernelAnalyzer(TrainerCallback):
    """Generator and discriminator path-kernel ledgers of a GAN, split by discriminator geometry.

    Args:
        generator, discriminator: G (latents ``[B, k]`` -> samples) and D (samples -> one score each).
        probe_latents: ``[M, k]`` fixed probe latents z' (64 is a good size).
        grouping: "direction" (k-means of w/|w|), "mode" (pushed-to mode, needs ``mode_centers``),
            "nearest_mode", "magnitude", "confidence", a :class:`GeometryGrouping`, or a callable
            ``fn(z, x, w, scores) -> LongTensor[B]`` (with ``num_groups``).
        num_groups: G for the groupings that take a count.
        mode_centers, mode_std: real mixture modes ``[num_modes, dim]`` and their std (2-D): enables
            mode coverage, the direction-to-nearest-mode alignment and mode groups for D.
        controls: number of label-permutation control partitions kept on the same trajectory
            (0: none); each adds G group rows to every generator step's cost.
        window: generator steps per coupling window (coupling over training).
        eval_every: generator steps between alignment / coverage evaluations (must divide ``window``).
        coverage_latents: number of fixed latents for mode coverage.
        coverage_sigmas: a sample is "on" a mode within this many std.
        reference_latents: ``[R, k]`` latents the grouping is fitted on (default: the first batch
            together with the probes).
        track_discriminator: keep D's ledger too.
        discriminator_probes: ``[P, ...]`` fixed points for D's ledger (default: 32 real and 32
            generated samples of the first discriminator step).
        discriminator_groups: "role" (generated / real / penalty) or "role_mode" (real by mode,
            generated by nearest mode, penalty; needs ``mode_centers``).
        quadrature: quadrature rule of both trackers (DESIGN.md section 2).
        seed: the analyzer's own random generator (permutation control, coverage latents).
        name: the key of this analyzer's state in a trainer's checkpoint (default the class name).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        probe_latents: torch.Tensor,
        *,
        grouping: str | GeometryGrouping | Callable = "direction",
        num_groups: int = 8,
        mode_centers: torch.Tensor | None = None,
        mode_std: float | None = None,
        controls: int = 1,
        window: int = 20,
        eval_every: int = 5,
        coverage_latents: int = 512,
        coverage_sigmas: float = 3.0,
        reference_latents: torch.Tensor | None = None,
        track_discriminator: bool = True,
        discriminator_probes: torch.Tensor | None = None,
        discriminator_groups: str = "role",
        quadrature: str = "midpoint",
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if isinstance(controls, bool) or not isinstance(controls, int) or controls < 0:
            raise ValueError(f"controls must be a non-negative int (permutation control partitions), got {controls!r}")
        if not isinstance(probe_latents, torch.Tensor) or probe_latents.dim() != 2:
            raise ValueError(f"probe_latents must be a Tensor [M, latent_dim], got {getattr(probe_latents, 'shape', type(probe_latents).__name__)}")
        if window < 1 or eval_every < 1 or window % eval_every:
            raise ValueError(f"window ({window}) and eval_every ({eval_every}) must be positive, eval_every dividing window")
        if discriminator_groups not in ("role", "role_mode"):
            raise ValueError(f"discriminator_groups must be 'role' or 'role_mode', got {discriminator_groups!r}")
        if discriminator_groups == "role_mode" and mode_centers is None:
            raise ValueError("discriminator_groups='role_mode' needs mode_centers")
        if mode_centers is not None and mode_std is None:
            raise ValueError("mode_centers needs mode_std (the std of each real mode) for mode coverage")
        self.generator = generator
        self.discriminator = discriminator
        self.mode_centers = None if mode_centers is None else torch.as_tensor(mode_centers, dtype=torch.float64)
        self.mode_std = mode_std
        self.grouping = make_grouping(grouping, num_groups=num_groups, centers=self.mode_centers, seed=seed)
        self.num_groups = self.grouping.num_groups
        self.controls = controls
        self.name = name
        self.window = window
        self.eval_every = eval_every
        self.coverage_sigmas = coverage_sigmas
        self.reference_latents = reference_latents
        self.track_discriminator = track_discriminator
        self.discriminator_groups = discriminator_groups
        self.quadrature = quadrature
        self.rng = torch.Generator().manual_seed(seed)
        self.probe_latents = self._checked_latents(probe_latents, "probe_latents")
        self.coverage_latents = torch.randn(coverage_latents, probe_latents.shape[1], generator=self.rng, dtype=torch.float64).to(probe_latents)
        self.discriminator_probes = discriminator_probes

        self.g_tracker: PathKernelTracker | None = None
        self.d_tracker: PathKernelTracker | None = None
        self._pending: dict[str, Any] | None = None
        self.g_steps = 0
        self.d_steps = 0
        self.alignment: list[dict[str, float]] = []
        self.coverage: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.fields: list[dict[str, torch.Tensor]] = []  # probe fields at evaluation steps (for figures)
        self._window_start: dict[str, PathKernelLedger] | None = None  # the ledgers when the window opened
        self._window_groups: torch.Tensor | None = None  # the probes' geometry groups at the window's start
        self._run_groups: torch.Tensor | None = None  # ... at the first tracked step (whole-run coupling)
        self._probe_state: dict[str, torch.Tensor] | None = None

    # -- validation ----------------------------------------------------------------------------
    def _checked_latents(self, latents: torch.Tensor, name: str) -> torch.Tensor:
        expected = getattr(self.generator, "latent_dim", None)
        if expected is not None and latents.shape[1] != expected:
            raise ValueError(
                f"{name} have latent dimension {latents.shape[1]} but the generator expects {expected}: "
                f"pass a Tensor [M, {expected}]"
            )
        try:
            with torch.no_grad(), analysis_mode(self.generator), analysis_mode(self.discriminator):
                samples = output_tensor(self.generator(latents))
                scores = self.discriminator(samples)
        except (RuntimeError, TypeError, IndexError) as error:
            raise ValueError(f"{name} of shape {tuple(latents.shape)} do not fit the generator/discriminator: {error}") from error
        scores_of(scores)  # one value per example, or a clear error
        return latents

    def _check_fillable(self, groups: int, batch: int, what: str) -> None:
        if groups > batch:
            raise ValueError(
                f"{what} has {groups} groups but the batch has only {batch} examples: the groups cannot all be filled "
                "(groups would be empty by construction, not by geometry). Use fewer groups or a larger batch."
            )

    # -- protocol ------------------------------------------------------------------------------
    def wrap_step(self, trainer: Any, step: OptimizerStep, perform: Callable[[], torch.Tensor]) -> torch.Tensor:
        if step.phase == "generator":
            return self._generator_step(step)
        if step.phase == "discriminator":
            return self._discriminator_step(step) if self.track_discriminator else perform()
        return perform()

    def perform(self, step: OptimizerStep) -> torch.Tensor:
        """Run one prepared step through this analyzer (for your own training loop)."""
        return perform_step([self], None, step)

    # -- generator -----------------------------------------------------------------------------
    def _geometry(self, latents: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
        """1. ``{"z", "x", "w", "losses", "scores"}`` at the current θ (no training state touched)."""
        x, w, losses = discriminator_input_gradients(self.generator, loss_fn, latents)
        with torch.no_grad(), analysis_mode(self.discriminator):
            scores = scores_of(self.discriminator(x)).detach()
        return {"z": latents.detach(), "x": x, "w": w, "losses": losses, "scores": scores}

    def _build_generator_tracker(self, step: OptimizerStep, geo: dict[str, torch.Tensor]) -> None:
        z = step.inputs[0]
        if z.dim() != 2 or z.shape[1] != self.probe_latents.shape[1]:
            raise ValueError(
                f"the generator step's latents have shape {tuple(z.shape)} but the probe latents are "
                f"[M, {self.probe_latents.shape[1]}]: probes and training latents must share the latent dimension"
            )
        self._check_fillable(self.num_groups, step.batch, f"grouping {type(self.grouping).__name__}")
        if not self.grouping.fitted:
            if self.reference_latents is not None:
                ref = self._geometry(self._checked_latents(self.reference_latents, "reference_latents"), step.loss_fn)
            else:
                probe = self._geometry(self.probe_latents, step.loss_fn)
                ref = {k: torch.cat([geo[k], probe[k]]) for k in ("z", "x", "w", "scores")}
            self.grouping.fit(ref["z"], ref["x"], ref["w"], ref["scores"])
        self.g_tracker = PathKernelTracker(
            self.generator, step.optimizer, step.loss_fn, self.probe_latents,
            num_groups=self.partitions, quadrature=self.quadrature, max_grad_norm=step.max_grad_norm,
        )
        if self._pending and self._pending.get("g_tracker") is not None:
            self.g_tracker.load_state_dict(self._pending["g_tracker"])

    def _generator_step(self, step: OptimizerStep) -> torch.Tensor:
        if step.model is not self.generator:
            raise ValueError("the generator step trains a different model than the analyzer's generator")
        _check_discriminator_frozen(self.discriminator)
        index = self.g_steps + 1
        # 1. Geometry of the batch at θ_k.
        geo = self._geometry(step.inputs[0], step.loss_fn)
        if not torch.isfinite(geo["losses"]).all() or not torch.isfinite(geo["w"]).all():
            bad = torch.nonzero(~torch.isfinite(geo["losses"])).flatten().tolist()
            raise NonFiniteError(
                f"generator step {index} (phase generator): non-finite generator loss or discriminator gradient "
                f"(examples {bad[:10]}); the step was not applied and the ledgers keep the {index - 1} generator steps before"
            )
        if self.g_tracker is None:
            self._build_generator_tracker(step, geo)
        # 2. Group ids (and permuted control ids on the same step).
        ids = self.grouping(geo["z"], geo["x"], geo["w"], geo["scores"])
        tracked = {GEOMETRY: ids}
        for control in self.control_names:
            tracked[control] = ids[torch.randperm(ids.shape[0], generator=self.rng)]
        # 3. Probe geometry and the plain kernel-smoothed field at evaluation steps.
        evaluate = (index - 1) % self.eval_every == 0
        if evaluate:
            probe = self._geometry(self.probe_latents, step.loss_fn)
            probe["groups"] = self.grouping(probe["z"], probe["x"], probe["w"], probe["scores"])
            probe["field"] = self._kernel_field(step, geo)
            self._probe_state = probe
        if (index - 1) % self.window == 0:
            self._window_start = {name: ledger.copy() for name, ledger in self.g_tracker.ledgers.items()}
            self._window_groups = self._probe_state["groups"].clone()
        if self._run_groups is None:
            self._run_groups = self._probe_state["groups"].clone()
        # 4. The real step, tracked.
        f_before = self.g_tracker.ledger.f_end.clone()
        device = step.inputs[0].device
        contributions = self.g_tracker.track(step, {name: t.to(device) for name, t in tracked.items()})
        self.g_steps = index
        # 5. Bookkeeping.
        change = (self.g_tracker.ledger.f_end - f_before).cpu()
        if evaluate:
            self._record_alignment(index, contributions, change)
        if index % self.window == 0:
            self._close_window(index)
        return contributions.losses

    def _kernel_field(self, step: OptimizerStep, geo: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[M, d]`` −J_G(z') Σ_i c_i J_G(z_i)ᵀ w_i = −Σ_i c_i K_G(z', z_i) w_i at θ_k (a VJP then a JVP)."""
        params = {n: p.detach() for n, p in trainable_parameters(self.generator).items()}
        c = (torch.full((step.batch,), 1.0 / step.batch) if step.weights is None else step.weights).to(geo["w"])
        z, w = geo["z"], geo["w"]

        def pulled(p):  # Σ_i c_i ⟨G_p(z_i), w_i⟩: its θ-gradient is Σ_i c_i J(z_i)ᵀ w_i
            out = output_tensor(call_with(self.generator, p, (z,)))
            return (out * (c.view(-1, *([1] * (w.dim() - 1))) * w)).sum()

        def probes(p):
            return output_tensor(call_with(self.generator, p, (self.probe_latents,)))

        with analysis_mode(self.generator):
            vector = grad(pulled)(params)
            _, field = jvp(probes, (params,), ({n: -v for n, v in vector.items()},))
        return field.detach().reshape(field.shape[0], -1).to(torch.float64)

    @property
    def partitions(self) -> dict[str, int]:
        """The generator tracker's partitions: ``{"geometry": G, "control_0": G, ...}``."""
        return {GEOMETRY: self.num_groups, **{name: self.num_groups for name in self.control_names}}

    @property
    def control_names(self) -> list[str]:
        return [f"control_{i}" for i in range(self.controls)]

    def _coupling(self, ledgers: dict[str, PathKernelLedger], probe_groups: torch.Tensor) -> dict[str, Any]:
        """Coupling matrices of traffic and net shares, measured and (averaged over the controls)
        control, and each probe's share from its own geometry group against the controls', from
        ledgers over a window (or the whole run)."""
        g = self.num_groups
        measured = ledgers[GEOMETRY]
        delta = measured.delta.cpu()

        def shares(ledger: PathKernelLedger) -> dict[str, torch.Tensor]:
            return {"traffic": grouping_layer.traffic_shares(ledger.traffic.cpu()),
                    "net": grouping_layer.net_shares(ledger.contributions.cpu(), delta)}

        mine = shares(measured)
        controls = [shares(ledgers[name]) for name in self.control_names]
        kappa = measured.cancellation_ratio().cpu()
        out: dict[str, Any] = {
            "steps": [self.g_steps - measured.steps + 1, int(self.g_steps)],
            "probe_groups": probe_groups.tolist(),
            "kappa_median": float(kappa.nanmedian()) if torch.isfinite(kappa).any() else float("nan"),
            "residual_share_mean": float(grouping_layer.part_share(measured.residual.cpu(), delta).nanmean()),
        }
        for kind in ("traffic", "net"):
            out[f"{kind}_matrix"] = grouping_layer.average_by_probe_group(mine[kind], probe_groups, g).tolist()
            own = grouping_layer.own_share(mine[kind], probe_groups)
            out[f"{kind}_own"] = mean_interval(own).as_dict()
            if controls:
                matrices = [grouping_layer.average_by_probe_group(c[kind], probe_groups, g) for c in controls]
                out[f"{kind}_matrix_control"] = torch.stack(matrices).mean(0).tolist()
                own_control = torch.stack([grouping_layer.own_share(c[kind], probe_groups) for c in controls])
                out[f"{kind}_own_control"] = mean_interval(own_control.mean(0)).as_dict()
                out[f"{kind}_own_minus_control"] = grouping_layer.measured_minus_control(own, own_control)
        return out

    def _close_window(self, index: int) -> None:
        window = {name: ledger.since(self._window_start[name]) for name, ledger in self.g_tracker.ledgers.items()}
        record = self._coupling(window, self._window_groups)
        if self.mode_centers is not None and self.coverage:
            record["coverage"] = self.coverage[-1]
        self.windows.append(record)

    def _record_alignment(self, index: int, contributions, change: torch.Tensor) -> None:
        probe = self._probe_state
        predicted = (contributions.contributions.sum(dim=1) + contributions.rest).cpu()
        local = -probe["w"].reshape(probe["w"].shape[0], -1).to(torch.float64).cpu()
        row: dict[str, Any] = {
            "step": index,
            "cos_local_push": float(cosine(change, local).nanmean()),
            "cos_formula": float(cosine(change, predicted).nanmean()),
            "cos_kernel_field": float(cosine(change, probe["field"].cpu()).nanmean()),
            "cos_field_vs_local": float(cosine(probe["field"].cpu(), local).nanmean()),
            "step_relative_residual": float(contributions.residual.norm().cpu() / change.norm().clamp_min(1e-300)),
            "change_norm": float(change.norm(dim=1).mean()),
        }
        snapshot = {"step": index, "x": probe["x"].cpu(), "w": probe["w"].cpu(), "field": probe["field"].cpu(), "change": change.cpu()}
        if self.mode_centers is not None:
            x = probe["x"].reshape(probe["x"].shape[0], -1).to(torch.float64).cpu()
            nearest = self.mode_centers[torch.cdist(x, self.mode_centers).argmin(dim=1)]
            row["cos_nearest_mode"] = float(cosine(change, nearest - x).nanmean())
            with torch.no_grad(), analysis_mode(self.generator):
                samples = output_tensor(self.generator(self.coverage_latents)).detach().cpu()
            cov = mode_coverage(samples, self.mode_centers, self.mode_std, self.coverage_sigmas)
            cov["step"] = index
            self.coverage.append(cov)
        self.alignment.append(row)
        self.fields.append(snapshot)

    # -- discriminator -------------------------------------------------------------------------
    def _discriminator_groups(self, step: OptimizerStep) -> torch.Tensor:
        roles = step.info.get("roles")
        if roles is None and isinstance(step.targets, torch.Tensor) and step.targets.dtype == torch.long:
            roles = step.targets
        if not isinstance(roles, torch.Tensor) or roles.shape != (step.batch,):
            raise ValueError(
                "discriminator steps need step.info['roles'], a LongTensor[B] with 0 for generated, 1 for real and 2 "
                "for gradient-penalty examples (GANTrainer sets it)"
            )
        roles = roles.cpu().long()
        if self.discriminator_groups == "role":
            return roles
        k = self.mode_centers.shape[0]
        x = step.inputs[0].detach().reshape(step.batch, -1).to(torch.float64).cpu()
        nearest = torch.cdist(x, self.mode_centers).argmin(dim=1)
        labels = step.info.get("real_labels")
        real_mode = nearest if labels is None else torch.where(labels.cpu() >= 0, labels.cpu(), nearest)
        ids = torch.where(roles == REAL, real_mode, k + nearest)
        return torch.where(roles == PENALTY, torch.full_like(ids, 2 * k), ids)

    def discriminator_group_labels(self) -> list[str]:
        if self.discriminator_groups == "role":
            return list(ROLE_NAMES)
        k = self.mode_centers.shape[0]
        return [f"real m{m}" for m in range(k)] + [f"generated m{m}" for m in range(k)] + ["penalty"]

    def _discriminator_step(self, step: OptimizerStep) -> torch.Tensor:
        ids = self._discriminator_groups(step)
        if self.d_tracker is None:
            num = 3 if self.discriminator_groups == "role" else 2 * self.mode_centers.shape[0] + 1
            self._check_fillable(num, step.batch, f"discriminator grouping {self.discriminator_groups!r}")
            if self.discriminator_probes is None:
                x, roles = step.inputs[0], ids if self.discriminator_groups == "role" else step.info["roles"]
                roles = roles.to(x.device)
                self.discriminator_probes = torch.cat([x[roles == REAL][:32], x[roles == GENERATED][:32]]).detach().clone()
            probes = self.discriminator_probes.to(step.inputs[0])
            if isinstance(step.model, DiscriminatorObjective):
                probes = (probes, torch.full((probes.shape[0],), GENERATED, dtype=torch.long, device=probes.device))
            self.d_tracker = PathKernelTracker(
                step.model, step.optimizer, step.loss_fn, probes, num_groups=num,
                quadrature=self.quadrature, max_grad_norm=step.max_grad_norm,
            )
            if self._pending and self._pending.get("d_tracker") is not None:
                self.d_tracker.load_state_dict(self._pending["d_tracker"])
        result = self.d_tracker.track(step, ids.to(step.inputs[0].device))
        self.d_steps += 1
        return result.losses

    # -- results -------------------------------------------------------------------------------
    @property
    def generator_ledgers(self) -> dict[str, PathKernelLedger]:
        """The generator's ledgers: ``"geometry"`` (groups: the discriminator-geometry groups) and
        ``"control_i"`` (permuted labels on the same steps)."""
        if self.g_tracker is None:
            raise RuntimeError("no generator step has been tracked yet")
        return self.g_tracker.ledgers

    def generator_ledger(self, partition: str = GEOMETRY) -> PathKernelLedger:
        """The generator ledger of ``partition`` (default the geometry groups), ``[M, G, d]``."""
        ledgers = self.generator_ledgers
        if partition not in ledgers:
            raise ValueError(f"unknown partition {partition!r}; the generator tracker keeps {list(ledgers)}")
        return ledgers[partition]

    @property
    def discriminator_ledger(self) -> PathKernelLedger:
        """The discriminator's ledger at its probes, grouped by role (or role and mode)."""
        if self.d_tracker is None:
            raise RuntimeError("no discriminator step has been tracked yet (track_discriminator=True and train)")
        return self.d_tracker.ledger

    def report(self) -> dict[str, Any]:
        """Everything measured so far, as plain numbers (JSON-ready after float conversion)."""
        out: dict[str, Any] = {"generator_steps": self.g_steps, "discriminator_steps": self.d_steps,
                               "grouping": type(self.grouping).__name__, "group_labels": self.grouping.labels(),
                               "controls": self.controls}
        if self.g_tracker is not None:
            ledger = self.generator_ledger()
            shares = ledger.shares()
            out["generator"] = {
                **ledger.summary(),
                "mean_group_shares": shares.groups.nanmean(dim=0).tolist(),
                "mean_traffic_shares": ledger.traffic_shares().nanmean(dim=0).tolist(),
                "rest_share_mean": float(shares.rest.nanmean()),
                "residual_share_mean": float(shares.residual.nanmean()),
                "coupling_whole_run": self._coupling(self.g_tracker.ledgers, self._run_groups),
            }
            out["windows"] = self.windows
            out["alignment"] = self.alignment
            out["coverage"] = self.coverage
        if self.d_tracker is not None:
            ledger = self.d_tracker.ledger
            shares = ledger.shares()
            out["discriminator"] = {
                **ledger.summary(),
                "group_labels": self.discriminator_group_labels(),
                "mean_group_shares": shares.groups.nanmean(dim=0).tolist(),
                "mean_traffic_shares": ledger.traffic_shares().nanmean(dim=0).tolist(),
                "buffer_drift_norm": float(ledger.buffer_drift.norm()),
            }
        return out

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": {"num_groups": self.num_groups, "controls": self.controls, "grouping": type(self.grouping).__name__},
            "g_tracker": None if self.g_tracker is None else self.g_tracker.state_dict(),
            "d_tracker": None if self.d_tracker is None else self.d_tracker.state_dict(),
            "grouping": self.grouping.state_dict() if self.grouping.fitted else None,
            "rng": self.rng.get_state(),
            "g_steps": self.g_steps, "d_steps": self.d_steps,
            "alignment": list(self.alignment), "coverage": list(self.coverage), "windows": list(self.windows),
            "fields": list(self.fields), "probe_state": self._probe_state,
            "window_start": None if self._window_start is None else {k: v.state_dict() for k, v in self._window_start.items()},
            "window_groups": self._window_groups, "run_groups": self._run_groups,
            "discriminator_probes": self.discriminator_probes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved analyzer; trackers are rebuilt at the next step of each phase."""
        if state.get("format") != FORMAT:
            raise ValueError("not a GANKernelAnalyzer state (made by analyzer.state_dict())")
        mine = {"num_groups": self.num_groups, "controls": self.controls, "grouping": type(self.grouping).__name__}
        if state["config"] != mine:
            raise ValueError(f"the saved analyzer had settings {state['config']}, this one {mine}; build it with the same settings")
        if state["grouping"] is not None:
            self.grouping.load_state_dict(state["grouping"])
        self.rng.set_state(state["rng"])
        self.g_steps, self.d_steps = state["g_steps"], state["d_steps"]
        self.alignment, self.coverage, self.windows = list(state["alignment"]), list(state["coverage"]), list(state["windows"])
        self.fields = list(state["fields"])
        self._probe_state = state["probe_state"]
        starts = state["window_start"]
        self._window_start = None if starts is None else {k: PathKernelLedger.from_state_dict(v) for k, v in starts.items()}
        self._window_groups, self._run_groups = state["window_groups"], state["run_groups"]
        self.discriminator_probes = state["discriminator_probes"]
        self._pending = {"g_tracker": state["g_tracker"], "d_tracker": state["d_tracker"]}
        self.g_tracker = self.d_tracker = None


__all__ = ["GANKernelAnalyzer"]
