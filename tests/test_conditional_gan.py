"""A conditional GAN (G(z, y), D(x, y)) through the wrappers the GAN analyzer's error message
advises: the class one-hot concatenated to the latents, and G's output carrying it on to D. The
advice must be exact, not merely runnable: the generator's ledger describes the unwrapped G's change
at the probes' own classes, the label coordinates carry nothing, and training is unchanged. (The
first-class route, ``GANTrainer(..., num_classes=)`` and ``GANKernelAnalyzer(..., probe_classes=)``, is
checked against these wrappers in tests/test_conditional_gan_native.py.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.gan import GANKernelAnalyzer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
NZ, C, B = 3, 3, 12


class ConditionalG(nn.Module):
    """G(z, y): ``[B, NZ]`` latents and ``LongTensor[B]`` classes -> ``[B, 2]`` points."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NZ + C, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, z, y):
        return self.net(torch.cat([z, F.one_hot(y, C).to(z)], dim=1))


class ConditionalD(nn.Module):
    """D(x, y): ``[B, 2]`` points and classes -> ``[B]`` logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + C, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x, F.one_hot(y, C).to(x)], dim=1)).squeeze(1)


class WithClassG(nn.Module):
    """The advised generator wrapper: ``z' = [z, one_hot(y)]`` -> ``[G(z, y), one_hot(y)]``."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, z_and_class):
        z, onehot = z_and_class[:, :NZ], z_and_class[:, NZ:]
        return torch.cat([self.g(z, onehot.argmax(dim=1)), onehot], dim=1)


class WithClassD(nn.Module):
    """The advised discriminator wrapper: ``x' = [x, one_hot(y)]`` -> ``D(x, y)``."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, x_and_class):
        return self.d(x_and_class[:, :2], x_and_class[:, 2:].argmax(dim=1))


def with_class(values, classes):
    return torch.cat([values, F.one_hot(classes, C).to(values)], dim=1)


def data(steps=4):
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)
    out = []
    for _ in range(steps):
        y_real = torch.randint(0, C, (B,), generator=g)
        real = centres[y_real] + 0.1 * torch.randn(B, 2, generator=g, dtype=F64)
        y_fake = torch.randint(0, C, (B,), generator=g)
        out.append((with_class(real, y_real), with_class(torch.randn(B, NZ, generator=g, dtype=F64), y_fake),
                    with_class(torch.randn(B, NZ, generator=g, dtype=F64), y_fake.flip(0))))
    return out


def players(seed=0):
    torch.manual_seed(seed)
    g, d = ConditionalG().to(F64), ConditionalD().to(F64)
    return g, d, torch.optim.SGD(g.parameters(), lr=0.05), torch.optim.Adam(d.parameters(), lr=1e-3)


ROLES = torch.cat([torch.ones(B), torch.zeros(B)]).long()


def loop(g, d, g_opt, d_opt, batches, analyzer=None):
    """A conditional GAN loop written on the wrappers (BCE, D on real and generated rows together)."""
    G, D = WithClassG(g), WithClassD(d)
    for real, z_d, z_g in batches:
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_discriminator(losses, ROLES, x)
        losses.mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(B, dtype=F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_generator(losses, z_g, fake)
        losses.mean().backward()
        g_opt.step()


def test_a_conditional_gan_through_the_advised_wrappers_is_tracked_exactly():
    probe_classes = torch.arange(8) % C
    probes = with_class(torch.randn(8, NZ, generator=torch.Generator().manual_seed(7), dtype=F64), probe_classes)
    batches = data()

    bare = players()
    loop(*bare, batches)
    g, d, g_opt, d_opt = players()
    g_start = ConditionalG().to(F64)
    g_start.load_state_dict(g.state_dict())
    analyzer = GANKernelAnalyzer(WithClassG(g), WithClassD(d), probes, grouping="direction", num_groups=2,
                                 controls=1, window=2, eval_every=1)
    analyzer.bind(g_opt, d_opt)
    loop(g, d, g_opt, d_opt, batches, analyzer)

    # training is unchanged, bit for bit
    for a, b in zip([*bare[0].parameters(), *bare[1].parameters()], [*g.parameters(), *d.parameters()]):
        assert torch.equal(a, b)
    ledger = analyzer.generator_ledger()
    assert ledger.steps == len(batches)
    # the ledger's change is the unwrapped G's change at the probes' own classes, computed here directly
    z, y = probes[:, :NZ], probes[:, NZ:].argmax(dim=1)
    with torch.no_grad():
        real_change = g(z, y) - g_start(z, y)
    torch.testing.assert_close(ledger.delta[:, :2], real_change, rtol=0, atol=1e-12)
    # the class coordinates G carries on: no change, no contribution, no rest
    for part in (ledger.delta, ledger.contributions, ledger.rest, ledger.residual):
        assert float(part[..., 2:].abs().max()) == 0.0
    # the identity and a small residual (plain SGD on G, midpoint rule)
    total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12)
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 1e-3
    # the kernel-smoothed field moves only the point coordinates (K_G is zero on the class ones)
    assert analyzer.fields and all(float(f["field"].reshape(len(probes), -1)[:, 2:].abs().max()) == 0.0
                                   for f in analyzer.fields)


def test_grouping_a_conditional_gans_generator_steps_by_class_matches_a_brute_force():
    """``grouping=`` a function of the latents groups the generator's training latents by class. One
    plain SGD step: each class's contribution at the probes is J(θ_mid) · (−η ∇ mean-loss share of that
    class's latents), computed here by forward-mode products through the unwrapped G (midpoint rule)."""
    from torch.func import functional_call, jvp

    probe_classes = torch.arange(6) % C
    probes = with_class(torch.randn(6, NZ, generator=torch.Generator().manual_seed(8), dtype=F64), probe_classes)
    (real, z_d, z_g), = data(1)
    g, d, g_opt, d_opt = players()
    by_class = GANKernelAnalyzer(WithClassG(g), WithClassD(d), probes, grouping=lambda z, x, w, scores: z[:, NZ:].argmax(dim=1),
                                 num_groups=C, controls=1, window=1, eval_every=1)
    by_class.bind(g_opt, d_opt)
    loop(g, d, g_opt, d_opt, [(real, z_d, z_g)], by_class)
    ledger = by_class.generator_ledger()
    assert ledger.contributions.shape[1] == C

    # brute force: replay the step from the same start on fresh copies
    g0, d0, g_opt0, d_opt0 = players()
    G0, D0 = WithClassG(g0), WithClassD(d0)
    with torch.no_grad():
        fake = G0(z_d)
    d_opt0.zero_grad()
    F.binary_cross_entropy_with_logits(D0(torch.cat([real, fake])), ROLES.to(F64)).backward()
    d_opt0.step()  # D as the loop stepped it, before G's step
    theta0 = {k: v.detach().clone() for k, v in g0.named_parameters()}
    losses = F.binary_cross_entropy_with_logits(D0(G0(z_g)), torch.ones(B, dtype=F64), reduction="none")
    classes = z_g[:, NZ:].argmax(dim=1)
    lr = g_opt0.param_groups[0]["lr"]
    theta1 = {k: theta0[k] - lr * gr for k, gr in zip(theta0, torch.autograd.grad(losses.mean(), list(g0.parameters()),
                                                                                  retain_graph=True))}
    mid = {k: (theta0[k] + theta1[k]) / 2 for k in theta0}
    z, y = probes[:, :NZ], probes[:, NZ:].argmax(dim=1)
    for c in range(C):
        share = (losses * (classes == c)).sum() / B  # this class's part of the mean loss
        grads = torch.autograd.grad(share, list(g0.parameters()), retain_graph=True)
        update = {k: -lr * gr for k, gr in zip(theta0, grads)}
        _, change = jvp(lambda p: functional_call(g0, p, (z, y)), (mid,), (update,))
        torch.testing.assert_close(ledger.contributions[:, c, :2], change, rtol=1e-9, atol=1e-12)
