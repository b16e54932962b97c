"""End-to-end: a class-conditional GAN, G(z, y) and D(x, y), in PyTorch Lightning with manual
optimization, observed through ``observe_*(..., classes=)`` with ``GenkernelCallback``: training is
bit-identical to the run without the analyzer, the generator ledger (split by class) adds up to the
real change of G(z', y') at the probes, and a fit resumed from a Lightning checkpoint in fresh objects
keeps the ledgers of the uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from genkernel.gan import GANKernelAnalyzer  # noqa: E402
from test_workflow_lightning_gan import fit as lightning_fit  # noqa: E402

NZ, C = 3, 3


class CondG(nn.Module):
    """[B, NZ] latents and classes -> [B, 2] points: a class embedding concatenated to z, BatchNorm."""

    num_classes = C

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(C, 4)
        self.net = nn.Sequential(nn.Linear(NZ + 4, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(y)], dim=1))


class ProjectionD(nn.Module):
    """[B, 2] points and classes -> [B] logits: ψ(φ(x)) + <embed(y), φ(x)>."""

    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2))
        self.psi = nn.Linear(16, 1)
        self.embed = nn.Embedding(C, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.phi(x)
        return self.psi(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def probes() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, NZ, generator=torch.Generator().manual_seed(1), dtype=torch.float64), torch.arange(6) % C


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, C, (24,), generator=g)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=torch.float64)
    points = centres[labels] + 0.1 * torch.randn(24, 2, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points, labels), batch_size=8, shuffle=False)


class LightningCGAN(pl.LightningModule):
    """Manual optimization, toggle_optimizer around each player's step; latents and the generator
    step's classes from a generator seeded by the step, so a resumed fit draws what the uninterrupted
    one drew."""

    def __init__(self, analyze: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G, self.D = CondG().double(), ProjectionD().double()
        self.automatic_optimization = False
        z, y = probes()
        self.analyzer = GANKernelAnalyzer(self.G, self.D, z, probe_classes=y, grouping="class", controls=1,
                                          window=2, eval_every=1) if analyze else None

    def configure_optimizers(self):
        return [torch.optim.Adam(self.G.parameters(), lr=2e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.D.parameters(), lr=2e-3, betas=(0.5, 0.999))]

    def draws(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.global_step)
        return torch.randn(b, NZ, generator=g, dtype=torch.float64), torch.randint(0, C, (b,), generator=g)

    def training_step(self, batch, i):
        real, labels = batch
        b = real.shape[0]
        opt_g, opt_d = self.optimizers()
        z, y = self.draws(b)
        self.toggle_optimizer(opt_d)
        x = torch.cat([real, self.G(z, labels).detach()])  # generated rows at the real rows' classes
        classes, roles = torch.cat([labels, labels]), torch.cat([torch.ones(b), torch.zeros(b)]).long()
        losses = F.binary_cross_entropy_with_logits(self.D(x, classes), roles.double(), reduction="none")
        if self.analyzer is not None:
            self.analyzer.observe_discriminator(losses, roles, x, classes=classes)
        opt_d.zero_grad()
        self.manual_backward(losses.mean())
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        fake = self.G(z, y)
        g_losses = F.softplus(-self.D(fake, y))
        if self.analyzer is not None:
            self.analyzer.observe_generator(g_losses, z, fake, classes=y)
        opt_g.zero_grad()
        self.manual_backward(g_losses.mean())
        opt_g.step()
        self.untoggle_optimizer(opt_g)


def fit(module: LightningCGAN, epochs: int, **kwargs) -> pl.Trainer:
    return lightning_fit(module, epochs, data=loader(), **kwargs)


def test_a_lightning_conditional_gan_trains_bit_identical_and_its_class_ledger_adds_up():
    plain = LightningCGAN(analyze=False)
    G0 = copy.deepcopy(plain.G).eval()
    fit(plain, 1)
    observed = LightningCGAN(analyze=True)
    fit(observed, 1)
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name
    analyzer = observed.analyzer
    assert (analyzer.g_steps, analyzer.d_steps) == (3, 3) and analyzer.num_groups == C
    z, y = probes()
    with torch.no_grad():
        change = copy.deepcopy(plain.G).eval()(z, y) - G0(z, y)
    ledger = analyzer.generator_ledger()
    parts = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    assert (parts - change).abs().max() <= 1e-12 * change.abs().max()
    assert ledger.residual.norm() <= 1e-3 * change.norm()
    assert analyzer.report()["discriminator"]["relative_residual"] < 1e-3


def test_a_lightning_conditional_gan_resumed_in_fresh_objects_keeps_its_ledgers(tmp_path):
    straight = LightningCGAN(analyze=True)
    fit(straight, 2)
    first = LightningCGAN(analyze=True)
    fit(first, 1, dirpath=tmp_path)
    resumed = LightningCGAN(analyze=True)
    fit(resumed, 2, ckpt_path=str(next(tmp_path.glob("*.ckpt"))))
    for name in ("g_tracker", "d_tracker"):
        a, b = getattr(straight.analyzer, name).ledger, getattr(resumed.analyzer, name).ledger
        assert a.steps == b.steps == 6
        assert torch.equal(a.contributions, b.contributions), name
    assert resumed.analyzer.g_loop_steps == straight.analyzer.g_loop_steps
