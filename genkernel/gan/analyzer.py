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
2. group ids from the geometry grouping (fitted once on a reference batch), and, with
   ``control=True``, label-permuted control ids on the *same* step: the tracker keeps the product
   grouping a·G + b, whose two marginals are the measured and the control ledgers, exactly;
3. at evaluation steps, the probes' own geometry (w(z'), group) and the plain kernel-smoothed
   field −J_G(z'; θ_k) Σ_i c_i J_G(z_i; θ_k)ᵀ w_i (one VJP, one JVP: K_G is never formed);
4. the real step through the core tracker (exact split, check, contributions, fresh forward);
5. bookkeeping: window sums of contributions and traffic (measured and control), alignment
   cosines of the step's actual ΔG(z'), mode coverage.

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
from torch.func import functional_call, grad, jvp

from ..core.adapter import analysis_mode, output_tensor, trainable_parameters
from ..core.tracking.callbacks import TrainerCallback, perform_step
from ..core.errors import NonFiniteError
from ..core.tracking.ledger import PathKernelLedger
from ..core.tracking.step import OptimizerStep
from ..core.tracking.tracker import PathKernelTracker
from .geometry import GeometryGrouping, make_grouping
from .losses import GENERATED, PENALTY, REAL, ROLE_NAMES, DiscriminatorObjective, scores_of
from .metrics import cosine, coupling_matrix, mean_interval, mode_coverage, own_share
from .trainer import discriminator_input_gradients


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
        control: keep a label-permutation control on the same trajectory (costs G² groups).
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
        control: bool = True,
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
    ) -> None:
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
        self.control = bool(control)
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
        self._acc: dict[str, torch.Tensor] | None = None  # current window
        self._run: dict[str, torch.Tensor] | None = None  # whole run
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
        tracked_groups = self.num_groups**2 if self.control else self.num_groups
        self.g_tracker = PathKernelTracker(
            self.generator, step.optimizer, step.loss_fn, self.probe_latents,
            num_groups=tracked_groups, quadrature=self.quadrature, max_grad_norm=step.max_grad_norm,
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
        tracked = ids
        if self.control:
            control_ids = ids[torch.randperm(ids.shape[0], generator=self.rng)]
            tracked = ids * self.num_groups + control_ids
        # 3. Probe geometry and the plain kernel-smoothed field at evaluation steps.
        evaluate = (index - 1) % self.eval_every == 0
        if evaluate:
            probe = self._geometry(self.probe_latents, step.loss_fn)
            probe["groups"] = self.grouping(probe["z"], probe["x"], probe["w"], probe["scores"])
            probe["field"] = self._kernel_field(step, geo)
            self._probe_state = probe
        if (index - 1) % self.window == 0:
            self._start_window()
        if self._run is None:
            self._run = self._empty_acc(self._probe_state["groups"])
        # 4. The real step, tracked.
        f_before = self.g_tracker.ledger.f_end.clone()
        contributions = self.g_tracker.track(step, tracked.to(step.inputs[0].device))
        self.g_steps = index
        # 5. Bookkeeping.
        change = self.g_tracker.ledger.f_end - f_before
        measured, control = self._marginals(contributions.contributions)
        for acc in (self._acc, self._run):
            self._accumulate(acc, measured, control, contributions.rest, change)
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
            out = output_tensor(functional_call(self.generator, p, (z,)))
            return (out * (c.view(-1, *([1] * (w.dim() - 1))) * w)).sum()

        def probes(p):
            return output_tensor(functional_call(self.generator, p, (self.probe_latents,)))

        with analysis_mode(self.generator):
            vector = grad(pulled)(params)
            _, field = jvp(probes, (params,), ({n: -v for n, v in vector.items()},))
        return field.detach().reshape(field.shape[0], -1).to(torch.float64)

    def _marginals(self, contributions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Measured ``[M, G, d]`` and control ``[M, G, d]`` contributions from the tracked groups."""
        if not self.control:
            return contributions, None
        m, _, d = contributions.shape
        grid = contributions.view(m, self.num_groups, self.num_groups, d)
        return grid.sum(dim=2), grid.sum(dim=1)

    def _empty_acc(self, probe_groups: torch.Tensor) -> dict[str, torch.Tensor]:
        m, d = self.g_tracker.ledger.f_end.shape
        g = self.num_groups
        zeros = lambda *s: torch.zeros(s, dtype=torch.float64)  # noqa: E731
        return {
            "probe_groups": probe_groups.clone(), "start": self.g_steps,
            "C": zeros(m, g, d), "T": zeros(m, g), "C_ctrl": zeros(m, g, d), "T_ctrl": zeros(m, g),
            "rest": zeros(m, d), "delta": zeros(m, d),
        }

    def _start_window(self) -> None:
        self._acc = self._empty_acc(self._probe_state["groups"])

    @staticmethod
    def _accumulate(acc, measured, control, rest, change) -> None:
        acc["C"] += measured.cpu()
        acc["T"] += measured.norm(dim=2).cpu()
        if control is not None:
            acc["C_ctrl"] += control.cpu()
            acc["T_ctrl"] += control.norm(dim=2).cpu()
        acc["rest"] += rest.cpu()
        acc["delta"] += change.cpu()

    def _coupling(self, acc: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Coupling matrices of traffic and net shares, measured and control, and own-group summaries."""
        g = self.num_groups
        groups = acc["probe_groups"]
        delta = acc["delta"]
        norm_sq = (delta * delta).sum(dim=1)
        safe = torch.where(norm_sq > 0, norm_sq, torch.full_like(norm_sq, float("nan")))

        def traffic_shares(t):
            total = t.sum(dim=1, keepdim=True)
            return t / torch.where(total > 0, total, torch.full_like(total, float("nan")))

        def net_shares(c):
            return torch.einsum("mgd,md->mg", c, delta) / safe[:, None]

        kappa = acc["C"].norm(dim=2).sum(dim=1) / safe.sqrt()
        out: dict[str, Any] = {
            "steps": [int(acc["start"]) + 1, int(self.g_steps)],
            "probe_groups": groups.tolist(),
            "kappa_median": float(kappa.nanmedian()) if torch.isfinite(kappa).any() else float("nan"),
            "residual_share_mean": float(((self._residual_like(acc)) * delta).sum(dim=1).div(safe).nanmean()),
        }
        for kind, fn, key in (("traffic", traffic_shares, "T"), ("net", net_shares, "C")):
            measured = fn(acc[key])
            out[f"{kind}_matrix"] = coupling_matrix(measured, groups, g).tolist()
            own = own_share(measured, groups)
            out[f"{kind}_own"] = mean_interval(own)
            if self.control:
                ctrl = fn(acc[key + "_ctrl"])
                out[f"{kind}_matrix_control"] = coupling_matrix(ctrl, groups, g).tolist()
                own_ctrl = own_share(ctrl, groups)
                out[f"{kind}_own_control"] = mean_interval(own_ctrl)
                out[f"{kind}_own_minus_control"] = mean_interval(own - own_ctrl)
        return out

    @staticmethod
    def _residual_like(acc):
        return acc["delta"] - acc["C"].sum(dim=1) - acc["rest"]

    def _close_window(self, index: int) -> None:
        record = self._coupling(self._acc)
        if self.mode_centers is not None and self.coverage:
            record["coverage"] = self.coverage[-1]
        self.windows.append(record)

    def _record_alignment(self, index: int, contributions, change: torch.Tensor) -> None:
        probe = self._probe_state
        predicted = contributions.contributions.sum(dim=1) + contributions.rest
        local = -probe["w"].reshape(probe["w"].shape[0], -1).to(torch.float64).cpu()
        row: dict[str, Any] = {
            "step": index,
            "cos_local_push": float(cosine(change, local).nanmean()),
            "cos_formula": float(cosine(change, predicted).nanmean()),
            "cos_kernel_field": float(cosine(change, probe["field"]).nanmean()),
            "cos_field_vs_local": float(cosine(probe["field"], local).nanmean()),
            "step_relative_residual": float(contributions.residual.norm() / change.norm().clamp_min(1e-300)),
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
    def generator_ledger(self, *, control: bool = False) -> PathKernelLedger:
        """The generator ledger with the geometry groups (or the control groups), ``[M, G, d]``."""
        if self.g_tracker is None:
            raise RuntimeError("no generator step has been tracked yet")
        base = self.g_tracker.ledger
        if not self.control and control:
            raise ValueError("this analyzer keeps no control (control=False)")
        measured, ctrl = self._marginals(base.contributions)
        ledger = PathKernelLedger(
            contributions=(ctrl if control else measured).clone(), rest=base.rest.clone(), residual=base.residual.clone(),
            f_start=base.f_start.clone(), f_end=base.f_end.clone(),
            traffic=(self._run["T_ctrl"] if control else self._run["T"]).clone(),
            buffer_drift=base.buffer_drift.clone(), steps=base.steps,
        )
        return ledger

    def report(self) -> dict[str, Any]:
        """Everything measured so far, as plain numbers (JSON-ready after float conversion)."""
        out: dict[str, Any] = {"generator_steps": self.g_steps, "discriminator_steps": self.d_steps,
                               "grouping": type(self.grouping).__name__, "group_labels": self.grouping.labels(),
                               "control": self.control}
        if self.g_tracker is not None:
            ledger = self.generator_ledger()
            shares = ledger.shares()
            out["generator"] = {
                **ledger.summary(),
                "mean_group_shares": shares.groups.nanmean(dim=0).tolist(),
                "mean_traffic_shares": ledger.traffic_shares().nanmean(dim=0).tolist(),
                "rest_share_mean": float(shares.rest.nanmean()),
                "residual_share_mean": float(shares.residual.nanmean()),
                "coupling_whole_run": self._coupling(self._run),
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
            "format": "genkernel.GANKernelAnalyzer/1",
            "g_tracker": None if self.g_tracker is None else self.g_tracker.state_dict(),
            "d_tracker": None if self.d_tracker is None else self.d_tracker.state_dict(),
            "grouping": self.grouping.state_dict() if self.grouping.fitted else None,
            "rng": self.rng.get_state(),
            "g_steps": self.g_steps, "d_steps": self.d_steps,
            "alignment": list(self.alignment), "coverage": list(self.coverage), "windows": list(self.windows),
            "fields": list(self.fields), "acc": self._acc, "run": self._run, "probe_state": self._probe_state,
            "discriminator_probes": self.discriminator_probes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved analyzer; trackers are rebuilt at the next step of each phase."""
        if state.get("format") != "genkernel.GANKernelAnalyzer/1":
            raise ValueError("not a GANKernelAnalyzer state (made by analyzer.state_dict())")
        if state["grouping"] is not None:
            self.grouping.load_state_dict(state["grouping"])
        self.rng.set_state(state["rng"])
        self.g_steps, self.d_steps = state["g_steps"], state["d_steps"]
        self.alignment, self.coverage, self.windows = list(state["alignment"]), list(state["coverage"]), list(state["windows"])
        self.fields = list(state["fields"])
        self._acc, self._run, self._probe_state = state["acc"], state["run"], state["probe_state"]
        self.discriminator_probes = state["discriminator_probes"]
        self._pending = {"g_tracker": state["g_tracker"], "d_tracker": state["d_tracker"]}
        self.g_tracker = self.d_tracker = None


__all__ = ["GANKernelAnalyzer"]
