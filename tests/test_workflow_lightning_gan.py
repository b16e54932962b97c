"""End-to-end: a DCGAN-style GAN trained the way researchers write it, in PyTorch Lightning with manual
optimization (two Adam(betas=(0.5, 0.999)) optimizers, BatchNorm in G and D, the non-saturating loss,
two D steps per G step, toggle_optimizer, a ModelCheckpoint and a resume from ``ckpt_path``), and in a
hand-written loop that steps D with a closure, checked against float64 brute force: per-example
gradients through the batch's graph, Adam's per-group first moments written out, and the midpoint
Jacobian at the probe latents by forward-mode differentiation."""

from __future__ import annotations

import copy
import glob
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

pl = pytest.importorskip("lightning.pytorch")

from genkernel.gan import GANKernelAnalyzer  # noqa: E402
from genkernel.integrations.lightning import GenkernelCallback  # noqa: E402
from test_trainer_ema import assert_ledger_adds_up  # noqa: E402

NZ, LR, BETAS, EPS = 4, 2e-3, (0.5, 0.999), 1e-8


def generator() -> nn.Module:
    """[B, NZ, 1, 1] -> [B, 1, 8, 8]: DCGAN's transposed convolutions and BatchNorm, tiny."""
    return nn.Sequential(nn.ConvTranspose2d(NZ, 8, 4, 1, 0, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                         nn.ConvTranspose2d(8, 1, 4, 2, 1, bias=False), nn.Tanh()).double()


class Discriminator(nn.Module):
    """[B, 1, 8, 8] -> [B] logits: a strided convolution, BatchNorm, LeakyReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                                  nn.Conv2d(8, 1, 4, 1, 0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def probe_latents() -> torch.Tensor:
    return torch.randn(6, NZ, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def loader() -> torch.utils.data.DataLoader:
    images = torch.tanh(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=8, shuffle=False)


class LightningGAN(pl.LightningModule):
    """Lightning's GAN tutorial flow: manual optimization, toggle_optimizer around each player's step.
    Latents come from a generator seeded by the step, so a resumed fit draws what the uninterrupted one
    drew. With ``trace`` the G steps record what a brute-force ledger needs."""

    def __init__(self, analyze: bool, order: str = "dg", trace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G, self.D = generator(), Discriminator().double()
        self.automatic_optimization = False
        self.order, self.trace = order, [] if trace else None
        self.analyzer = GANKernelAnalyzer(self.G, self.D, probe_latents(), num_groups=2, window=2,
                                          eval_every=1) if analyze else None

    def configure_optimizers(self):
        return [torch.optim.Adam(self.G.parameters(), lr=LR, betas=BETAS),
                torch.optim.Adam(self.D.parameters(), lr=LR, betas=BETAS)]

    def latents(self, b: int, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.global_step + k)
        return torch.randn(b, NZ, 1, 1, generator=g, dtype=torch.float64)

    def d_step(self, real: torch.Tensor, k: int) -> None:
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_d)
        b = real.shape[0]
        x = torch.cat([real, self.G(self.latents(b, k)).detach()])
        roles = torch.cat([torch.ones(b), torch.zeros(b)]).long()
        losses = F.binary_cross_entropy_with_logits(self.D(x), roles.double(), reduction="none")
        if self.analyzer is not None:
            self.analyzer.observe_discriminator(losses, roles, x)
        opt_d.zero_grad()
        self.manual_backward(losses.mean())
        opt_d.step()
        self.untoggle_optimizer(opt_d)

    def g_step(self, b: int) -> None:
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_g)
        z = self.latents(b, 99)
        theta = {n: p.detach().clone() for n, p in self.G.named_parameters()}
        fake = self.G(z)
        losses = F.softplus(-self.D(fake))  # non-saturating
        if self.analyzer is not None:
            self.analyzer.observe_generator(losses, z, fake)
        if self.trace is not None:
            (w,) = torch.autograd.grad(losses.sum(), fake, retain_graph=True)
            per = [torch.autograd.grad(losses[n] / b, list(self.G.parameters()), retain_graph=True) for n in range(b)]
        opt_g.zero_grad()
        self.manual_backward(losses.mean())
        opt_g.step()
        if self.trace is not None:
            state = opt_g.optimizer.state
            self.trace.append({
                "z": z, "x": fake.detach(), "w": w, "per": per, "theta0": theta,
                "theta1": {n: p.detach().clone() for n, p in self.G.named_parameters()},
                "buffers": {n: t.detach().clone() for n, t in self.G.named_buffers()},
                "v": [state[p]["exp_avg_sq"].clone() for p in self.G.parameters()],
                "k": float(state[next(self.G.parameters())]["step"])})
        self.untoggle_optimizer(opt_g)

    def training_step(self, batch, i):
        real = batch[0]
        if self.order == "gd":
            self.g_step(real.shape[0])
        for k in range(2):  # n_critic = 2
            self.d_step(real, k)
        if self.order == "dg":
            self.g_step(real.shape[0])


def fit(module: pl.LightningModule, epochs: int, *, dirpath=None, ckpt_path=None, data=None) -> pl.Trainer:
    """``module`` (its ``.analyzer`` attached by GenkernelCallback when it has one) trained on ``data``
    (default :func:`loader`) for ``epochs`` on the CPU; ``dirpath``: a ModelCheckpoint every epoch."""
    callbacks = [] if module.analyzer is None else [GenkernelCallback(module.analyzer)]
    if dirpath is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=dirpath is not None, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader() if data is None else data, ckpt_path=ckpt_path)
    return trainer


def brute_force_contributions(trace: list[dict], G: nn.Module, grouping, probes: torch.Tensor) -> torch.Tensor:
    """``[M, groups, d]``: Σ_k J(z'; θ_k + Δ_k/2) u_{k,g}, with u_{k,g} = −η m̂_{k,g} ⊘ (√v̂_k + ε) from per-group
    first moments of the groups' summed per-example gradients; the group ids from the analyzer's fitted
    grouping applied to this trace's own w_i = ∂ℓ_i/∂G(z_i)."""
    names = [n for n, _ in G.named_parameters()]
    model = copy.deepcopy(G).eval()
    groups, b1, b2 = grouping.num_groups, BETAS[0], BETAS[1]
    moments, total = None, 0.0
    for rec in trace:
        b = rec["z"].shape[0]
        ids = grouping(rec["z"].reshape(b, -1), rec["x"], rec["w"], torch.zeros(b, dtype=torch.float64))
        grads = [[sum((rec["per"][n][j] for n in range(b) if ids[n] == g), torch.zeros_like(rec["per"][0][j]))
                  for j in range(len(names))] for g in range(groups)]
        moments = [[(0 if moments is None else b1 * moments[g][j]) + (1 - b1) * grads[g][j] for j in range(len(names))]
                   for g in range(groups)]
        k = rec["k"]
        updates = [{names[j]: -LR * (moments[g][j] / (1 - b1 ** k)) / ((rec["v"][j] / (1 - b2 ** k)).sqrt() + EPS)
                    for j in range(len(names))} for g in range(groups)]
        for j, n in enumerate(names):  # the split adds up to Adam's real step, to the rounding of the gradient sums:
            # Σ_n g_n summed per group and in the batch's backward differ by ulps of Σ_n |g_n|, which Adam divides
            # by √v̂ + ε (seen: 2.4e-15 on an update of 2e-3 where √v̂ = 4.4e-7, on one CPU; bit-equal on another)
            real = rec["theta1"][n] - rec["theta0"][n]
            spread = sum(rec["per"][i][j].abs() for i in range(b)) / (1 - b1 ** k)
            rounding = LR * 1e-14 * spread / ((rec["v"][j] / (1 - b2 ** k)).sqrt() + EPS)
            gap = (sum(u[n] for u in updates) - real).abs()
            assert bool((gap <= 1e-12 * float(real.abs().max()) + rounding).all()), (n, float(gap.max()))
        mid = {n: (rec["theta0"][n] + rec["theta1"][n]) / 2 for n in names}

        def outputs(params, rec=rec):
            return functional_call(model, {**params, **rec["buffers"]}, (probes,)).reshape(probes.shape[0], -1)

        total = total + torch.stack([jvp(outputs, (mid,), (u,))[1] for u in updates], dim=1)
    return total


def eval_outputs(G: nn.Module, probes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(G).eval()(probes).reshape(probes.shape[0], -1)


def test_lightning_gan_callback_binds_both_players_bit_identical_and_matches_brute_force():
    """GenkernelCallback(GANKernelAnalyzer) in a manual-optimization LightningModule: bound to the G and
    D optimizers by their parameters (it refused any module with two optimizers before); training is
    bit-identical to the run without it (weights, BatchNorm statistics, Adam state, RNG); the generator
    ledger equals the brute-force split and adds up to the real change of G(z') at the probes."""
    plain = LightningGAN(analyze=False, trace=True)
    G0 = copy.deepcopy(plain.G)
    plain_trainer = fit(plain, 1)
    plain_rng = torch.get_rng_state()
    observed = LightningGAN(analyze=True)
    observed_trainer = fit(observed, 1)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain_trainer.optimizers, observed_trainer.optimizers):
        for sa, sb in zip(a.state.values(), b.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    analyzer = observed.analyzer
    assert (analyzer.g_steps, analyzer.d_steps) == (2, 4)
    assert analyzer.g_loop_steps == [1, 2] and analyzer.d_loop_steps == [1, 2, 3, 4]
    probes = analyzer.probe_latents
    mine = brute_force_contributions(plain.trace, G0, analyzer.grouping, probes)
    ledger = analyzer.generator_ledger()
    contributions = ledger.contributions.reshape(mine.shape)
    assert (contributions - mine).abs().max() <= 1e-12 * mine.abs().max()
    change = eval_outputs(plain.G, probes) - eval_outputs(G0, probes)
    parts = contributions.sum(1) + (ledger.rest + ledger.residual).reshape(change.shape)
    assert (parts - change).abs().max() <= 1e-12 * change.abs().max()
    assert ledger.residual.norm() <= 1e-4 * change.norm()  # midpoint rule at these steps


def test_lightning_gan_resumed_from_checkpoint_in_fresh_objects_gives_the_same_ledgers(tmp_path):
    """G step first, then two D steps; ModelCheckpoint every epoch; a fresh module, analyzer, callback and
    trainer resumed with ckpt_path= reach the uninterrupted run's ledgers exactly, each player's steps
    numbered on from its optimizer's own count."""
    whole = LightningGAN(analyze=True, order="gd")
    fit(whole, 2, dirpath=tmp_path)
    (first,) = glob.glob(str(tmp_path / "epoch=0*.ckpt"))
    resumed = LightningGAN(analyze=True, order="gd")
    fit(resumed, 2, ckpt_path=first)
    a, b = whole.analyzer, resumed.analyzer
    for name, ledger in a.generator_ledgers.items():
        other = b.generator_ledgers[name]
        for field in ("contributions", "rest", "residual", "f_end", "traffic", "buffer_drift"):
            assert torch.equal(getattr(ledger, field), getattr(other, field)), (name, field)
    assert torch.equal(a.discriminator_ledger.contributions, b.discriminator_ledger.contributions)
    assert torch.equal(a.discriminator_ledger.residual, b.discriminator_ledger.residual)
    assert b.g_loop_steps == [1, 2, 3, 4] and b.d_loop_steps == list(range(1, 9))


def test_gan_callback_refuses_an_optimizer_over_both_players():
    """One optimizer over G's and D's parameters cannot be split into the players' steps: refused with the
    fix (it crashed with a TypeError from bind before)."""
    G, D = generator(), Discriminator().double()
    analyzer = GANKernelAnalyzer(G, D, probe_latents(), num_groups=2)
    both = torch.optim.Adam([*G.parameters(), *D.parameters()])
    trainer = SimpleNamespace(optimizers=[both], world_size=1, global_step=0, strategy=SimpleNamespace(model=None),
                              train_dataloader=None, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="one optimizer over G's parameters and one over D's"):
        GenkernelCallback(analyzer).on_train_start(trainer, None)


def _closure_loop(analyzer, steps: int = 3):
    """A hand-written loop that steps D with a closure (observe, zero_grad, backward inside it), G plainly.
    ``analyzer``: ``fn(G, D) -> GANKernelAnalyzer`` or None. Returns G, D, copies of D at the start and
    right after its last step (the G step's forward in training mode moves D's BatchNorm statistics
    after that: the next D step's drift, outside the ledger so far), and the analyzer."""
    torch.manual_seed(0)
    G, D = generator(), Discriminator().double()
    D0 = copy.deepcopy(D)
    if analyzer is not None:
        analyzer = analyzer(G, D)
    opt_g = torch.optim.Adam(G.parameters(), lr=LR, betas=BETAS)
    opt_d = torch.optim.Adam(D.parameters(), lr=LR, betas=BETAS)
    if analyzer is not None:
        analyzer.bind(opt_g, opt_d)
    (real,) = next(iter(loader()))
    for step in range(steps):
        z = torch.randn(8, NZ, 1, 1, dtype=torch.float64)
        x = torch.cat([real, G(z).detach()])
        roles = torch.cat([torch.ones(8), torch.zeros(8)]).long()

        def closure():
            losses = F.binary_cross_entropy_with_logits(D(x), roles.double(), reduction="none")
            if analyzer is not None:
                analyzer.observe_discriminator(losses, roles, x)
            opt_d.zero_grad()
            losses.mean().backward()
            return losses.mean()

        opt_d.step(closure)
        D_last = copy.deepcopy(D)
        z = torch.randn(8, NZ, 1, 1, dtype=torch.float64)
        fake = G(z)
        losses = F.softplus(-D(fake))
        if analyzer is not None:
            analyzer.observe_generator(losses, z, fake)
        opt_g.zero_grad()
        losses.mean().backward()
        opt_g.step()
    return G, D, D0, D_last, analyzer


def test_discriminator_stepped_with_a_closure_is_followed_given_its_probes():
    """With discriminator_probes= the D tracker exists from bind, so observe_discriminator inside
    d_optimizer.step(closure) is followed from the first step: training is unchanged and the D ledger
    adds up (before, the first D step ran untracked and the next one was refused as a model loaded)."""
    d_probes = torch.tanh(torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    G, D, D0, D_last, analyzer = _closure_loop(
        lambda G, D: GANKernelAnalyzer(G, D, probe_latents(), num_groups=2, discriminator_probes=d_probes))
    G_plain, D_plain, _, _, _ = _closure_loop(None)
    for a, b in zip([*G.state_dict().values(), *D.state_dict().values()],
                    [*G_plain.state_dict().values(), *D_plain.state_dict().values()]):
        assert torch.equal(a, b)
    assert (analyzer.g_steps, analyzer.d_steps) == (3, 3)
    ledger = analyzer.discriminator_ledger
    with torch.no_grad():
        change = D_last.eval()(d_probes) - D0.eval()(d_probes)
    parts = ledger.contributions.sum(1).reshape(change.shape) + (ledger.rest + ledger.residual).reshape(change.shape)
    assert (parts - change).abs().max() <= 1e-12 * change.abs().max()


def test_discriminator_stepped_with_a_closure_without_probes_is_refused_with_the_fix():
    """Without discriminator_probes the D tracker is built at the first observed micro-batch, inside that
    step: the step it missed is refused at the next one, naming the closure and discriminator_probes=."""
    with pytest.raises(ValueError, match=r"inside d_optimizer\.step\(closure\).*discriminator_probes="):
        _closure_loop(lambda G, D: GANKernelAnalyzer(G, D, probe_latents(), num_groups=2))


class Float32GAN(LightningGAN):
    """Built in float32 with its analyzer (and probes) in ``__init__``, trained under
    ``precision="64-true"``: Lightning casts the module after the analyzer was built, as it moves it to
    a GPU after ``__init__``."""

    def __init__(self) -> None:
        super().__init__(analyze=False)
        self.G.float()
        self.D.float()
        self.analyzer = GANKernelAnalyzer(self.G, self.D, probe_latents().float(), num_groups=2, window=2, eval_every=1,
                                          discriminator_probes=torch.zeros(4, 1, 8, 8))


def test_gan_callback_moves_the_analyzers_probes_with_the_networks_lightning_casts():
    """The probes follow G and D to the dtype Lightning gives them (bind crashed before: float32 probes,
    float64 weights); the ledgers then add up at the float64 probes."""
    module = Float32GAN()
    G0 = copy.deepcopy(module.G).double()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, precision="64-true", callbacks=[GenkernelCallback(module.analyzer)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader())
    analyzer = module.analyzer
    assert analyzer.probe_latents.dtype == analyzer.discriminator_probes.dtype == torch.float64
    assert (analyzer.g_steps, analyzer.d_steps) == (2, 4)
    ledger = analyzer.generator_ledger()
    change = eval_outputs(module.G, analyzer.probe_latents) - eval_outputs(G0, analyzer.probe_latents)
    parts = ledger.contributions.sum(1).reshape(change.shape) + (ledger.rest + ledger.residual).reshape(change.shape)
    assert (parts - change).abs().max() <= 1e-12 * change.abs().max()


def test_gan_callback_names_the_trainers_mixed_precision_when_it_is_refused():
    """precision="bf16-mixed" is refused by the trackers (autocast); the refusal names the Trainer's setting
    and the fix, not only accelerate's."""

    class Float32Latents(Float32GAN):
        def latents(self, b: int, k: int) -> torch.Tensor:
            return super().latents(b, k).float()

    module = Float32Latents()
    images = torch.tanh(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5)))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, precision="bf16-mixed", callbacks=[GenkernelCallback(module.analyzer)])
    with pytest.raises(RuntimeError, match="mixed precision") as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    assert any("precision='bf16-mixed'" in note and "'32-true'" in note for note in getattr(error.value, "__notes__", []))


def test_lightning_weight_averaging_gives_the_generator_an_ema_ledger():
    """Lightning's WeightAveraging averages the whole module (G and D) once per batch; the callback binds the
    averaged copy of the analyzer's G as its EMA: the generator's EMA ledger adds up, β read from its moves
    (a copy at the first update, then the EMA's 0.9). Old: no EMA ledger."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    module = LightningGAN(analyze=True)
    callbacks = [WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)), GenkernelCallback(module.analyzer)]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader())
    ledger = module.analyzer.generator_ema_ledgers["geometry"]
    assert_ledger_adds_up(ledger)
    assert ledger.relative_residual() < 1e-3
    assert module.analyzer.report()["generator_ema"]["decays"] == pytest.approx([0.0, 0.9], rel=1e-12)


def test_a_bf16_mixed_lightning_gan_is_booked_with_mixed_precision_observe():
    """The same Lightning GAN under precision="bf16-mixed" (autocast around training_step), its analyzer built
    with mixed_precision="observe": G and D train bit for bit as without the analyzer, and every step of both
    players is booked at bfloat16 (the default refuses it: the test above)."""

    class Bf16GAN(LightningGAN):
        def __init__(self, analyze: bool) -> None:
            super().__init__(analyze=False)
            self.G.float()
            self.D.float()
            self.analyzer = GANKernelAnalyzer(self.G, self.D, probe_latents().float(), num_groups=2, window=2,
                                              eval_every=1, mixed_precision="observe",
                                              state_dtype=torch.float32) if analyze else None

        def latents(self, b: int, k: int) -> torch.Tensor:
            return super().latents(b, k).float()

    images = torch.tanh(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5)))
    runs = []
    for analyze in (False, True):
        module = Bf16GAN(analyze)
        callbacks = [GenkernelCallback(module.analyzer)] if analyze else []
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, precision="bf16-mixed",
                             callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=8))
        runs.append(module)
    bare, analyzed = runs
    for a, b in zip([*bare.G.state_dict().values(), *bare.D.state_dict().values()],
                    [*analyzed.G.state_dict().values(), *analyzed.D.state_dict().values()]):
        assert torch.equal(a, b)
    analyzer = analyzed.analyzer
    assert analyzer.g_steps == 2 and analyzer.d_steps == 4
    for tracker in (analyzer.g_tracker, analyzer.d_tracker):
        assert [entry["gradient_precision"] for entry in tracker.gradient_scales] == ["bfloat16"] * tracker.ledger.steps
