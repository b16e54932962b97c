"""Review of the first-class conditional GAN (G(z, y), D(x, y)) in realistic set-ups, against brute force
written here: a generator with class-conditional BatchNorm (training mode) and a class embedding, a
projection discriminator D(x, y) = ψ(φ(x)) + <embed(y), φ(x)> with spectral norm, class ids as int32,
probes of a class never seen in training. References: explicit float64 autograd per class group and the
Jacobian-vector product at the step's midpoint (the midpoint rule's contribution)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from genkernel.gan import GANKernelAnalyzer, GeneratorLoss

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
NZ = 3


class CondBN(nn.Module):
    """Class-conditional BatchNorm: BatchNorm without affine, then per-class scale and shift."""

    def __init__(self, n, k):
        super().__init__()
        self.bn = nn.BatchNorm1d(n, affine=False)
        self.scale, self.shift = nn.Embedding(k, n), nn.Embedding(k, n)
        nn.init.normal_(self.scale.weight, 1.0, 0.1)
        nn.init.normal_(self.shift.weight, 0.0, 0.1)

    def forward(self, h, y):
        return self.bn(h) * self.scale(y) + self.shift(y)


class EmbedG(nn.Module):
    latent_dim = NZ

    def __init__(self, k):
        super().__init__()
        self.num_classes = k
        self.embed = nn.Embedding(k, 4)
        self.l1, self.norm, self.l2 = nn.Linear(NZ + 4, 12), CondBN(12, k), nn.Linear(12, 2)

    def forward(self, z, y):
        return self.l2(torch.relu(self.norm(self.l1(torch.cat([z, self.embed(y)], dim=1)), y)))


class ProjectionD(nn.Module):
    def __init__(self, k):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.a, self.b, self.psi = sn(nn.Linear(2, 12)), sn(nn.Linear(12, 12)), sn(nn.Linear(12, 1))
        self.embed = nn.Embedding(k, 12)

    def forward(self, x, y):
        phi = F.leaky_relu(self.b(F.leaky_relu(self.a(x), 0.2)), 0.2)
        return self.psi(phi).squeeze(1) + (self.embed(y) * phi).sum(dim=1)


def _players(k, seed=0):
    torch.manual_seed(seed)
    return EmbedG(k).to(F64), ProjectionD(k).to(F64)


def _real(n=40):
    gen = torch.Generator().manual_seed(3)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return centres[labels] + 0.1 * torch.randn(n, 2, generator=gen, dtype=F64), labels.to(torch.int32)


def test_class_groups_with_more_classes_than_the_batch_give_each_classs_exact_contribution():
    """A cGAN with more classes than a batch has examples (CIFAR-100 at batch 64; here 10 classes, batch 6),
    analysed with grouping="class" in the user's own hinge loop (real and generated rows in two
    micro-batches, int32 classes, a probe of a class never trained). Each class's contribution equals
    J_G(z', y'; θ_mid) Δθ_c with Δθ_c = −lr ∂/∂θ Σ_{i: y_i = c} ℓ_i / B through training's graph (G's
    BatchNorm in training mode), by explicit autograd. The old code refused it: "has 10 groups but the
    batch has only 6 examples" (an empty class group is the data's, not the grouping's)."""
    k, batch, lr = 10, 6, 0.05
    g, d = _players(k)
    g_opt, d_opt = torch.optim.SGD(g.parameters(), lr=lr), torch.optim.Adam(d.parameters(), lr=1e-3)
    zp = torch.randn(4, NZ, generator=torch.Generator().manual_seed(7), dtype=F64)
    yp = torch.tensor([9, 1, 0, 2], dtype=torch.int32)  # class 9 is never trained
    analyzer = GANKernelAnalyzer(g, d, zp, probe_classes=yp, num_classes=k, grouping="class", controls=1, window=1,
                                 eval_every=1, generator_loss=GeneratorLoss(d, kind="hinge", conditional=True))
    analyzer.bind(g_opt, d_opt)
    data, labels = _real()
    gen = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(2):
        index = torch.randint(0, data.shape[0], (batch,), generator=gen)
        real, real_y = data[index], labels[index]
        with torch.no_grad():
            fake = g(torch.randn(batch, NZ, generator=gen, dtype=F64), real_y)
        d_opt.zero_grad()
        for rows, role, sign in ((real, 1, 1.0), (fake, 0, -1.0)):
            losses = F.relu(1 - sign * d(rows, real_y))
            analyzer.observe_discriminator(losses, torch.full((batch,), role), rows, classes=real_y)
            losses.mean().backward()
        d_opt.step()
        z, y = torch.randn(batch, NZ, generator=gen, dtype=F64), torch.randint(0, 4, (batch,), generator=gen).int()
        steps.append((copy.deepcopy(g), copy.deepcopy(d), z, y))
        g_opt.zero_grad()
        fake = g(z, y)
        losses = -d(fake, y)
        analyzer.observe_generator(losses, z, fake, classes=y)
        losses.mean().backward()
        g_opt.step()
    ledger = analyzer.generator_ledger()
    expected = torch.zeros(4, k, 2, dtype=F64)
    for g0, d0, z, y in steps:  # the step replayed from G's and D's states before it
        for p in d0.parameters():
            p.requires_grad_(False)
        losses = -d0(g0(z, y), y)
        buffers = {n: b.clone() for n, b in g0.named_buffers()}  # after the step's forward, as the tracker reads them
        theta = {n: p.detach().clone() for n, p in g0.named_parameters()}
        moves = []
        for c in range(k):
            grads = torch.autograd.grad((losses * (y == c)).sum() / batch, list(g0.parameters()), retain_graph=True,
                                        allow_unused=True)
            moves.append({n: -lr * (torch.zeros_like(theta[n]) if q is None else q) for n, q in zip(theta, grads)})
        mid = {n: theta[n] + 0.5 * sum(m[n] for m in moves) for n in theta}
        g0.eval()
        jac = jacrev(lambda p: functional_call(g0, {**p, **buffers}, (zp, yp.long())))(mid)
        for c in range(k):
            expected[:, c] += sum((jac[n].reshape(8, -1) @ moves[c][n].reshape(-1)).reshape(4, 2) for n in theta)
    torch.testing.assert_close(ledger.contributions, expected, rtol=0, atol=1e-12)
    assert float(expected[:, :3].abs().max()) > 1e-2 and float(expected[:, 4:].abs().max()) == 0  # classes 4..9 unused
    torch.testing.assert_close(ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual, ledger.delta,
                               rtol=0, atol=1e-12)
    with torch.no_grad():
        end = g.eval()(zp, yp.long())
    torch.testing.assert_close(ledger.f_end, end, rtol=0, atol=1e-12)
    assert analyzer.report()["generator"]["group_counts_total"][4:] == [0] * 6


def test_a_conditional_analyzer_refuses_a_loss_of_the_samples_alone_with_the_fix():
    """The analyzer calls its generator/geometry loss as fn(samples, classes). GeneratorLoss(D) without
    conditional=True, or fn(x), crashed at the first step with a bare "forward() missing 1 required
    positional argument: 'y'" (or "takes 1 positional argument but 2 were given"); the loss-check message told a
    hinge loop to pass GeneratorLoss(D, kind='hinge'), the loss that then crashed."""
    k = 3
    g, d = _players(k)
    zp, yp = torch.randn(4, NZ, dtype=F64), torch.tensor([0, 1, 2, 0])
    for loss in (GeneratorLoss(d, kind="hinge"), lambda x: -d(x)):
        for what in ("generator_loss", "geometry_loss"):
            with pytest.raises(ValueError, match="conditional=True"):
                GANKernelAnalyzer(g, d, zp, probe_classes=yp, num_groups=2, **{what: loss})
    with pytest.raises(ValueError, match="drop conditional=True"):  # and the other way round
        plain = nn.Sequential(nn.Linear(NZ, 2)).to(F64)
        GANKernelAnalyzer(plain, nn.Sequential(nn.Linear(2, 1)).to(F64), zp, num_groups=2,
                          generator_loss=GeneratorLoss(d, conditional=True))
    # a hinge loop with the default (non-saturating) loss is told the conditional fix
    analyzer = GANKernelAnalyzer(g, d, zp, probe_classes=yp, num_groups=2)
    analyzer.bind(torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1))
    z, y = torch.randn(6, NZ, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    fake = g(z, y)
    with pytest.raises(ValueError, match=r"GeneratorLoss\(D, kind='hinge', conditional=True\)"):
        analyzer.observe_generator(-d(fake, y), z, fake, classes=y)


def test_reference_classes_of_any_integer_dtype_give_the_same_grouping_as_long_ids():
    """reference_latents with reference_classes as uint8 (or int32): the grouping is fitted on the same
    geometry as with int64 ids (the constructor's check converted them, but the fit at the first step used the
    raw uint8 ids: "Expected tensor for argument #1 'indices' to have one of the following scalar types: Long,
    Int; but got torch.ByteTensor"). Classes without their latents are refused."""
    from genkernel.gan import GANTrainer

    k = 4
    data, labels = _real()
    zp, yp = torch.randn(4, NZ, generator=torch.Generator().manual_seed(7), dtype=F64), torch.tensor([0, 1, 2, 3])
    zr = torch.randn(12, NZ, generator=torch.Generator().manual_seed(8), dtype=F64)
    centers = []
    for dtype in (torch.int64, torch.uint8, torch.int32):
        g, d = _players(k)
        analyzer = GANKernelAnalyzer(g, d, zp, probe_classes=yp, grouping="direction", num_groups=2, window=1,
                                     eval_every=1, reference_latents=zr, reference_classes=(torch.arange(12) % 3).to(dtype))
        GANTrainer(g, d, data, labels=labels, num_classes=k, loss="hinge", batch_size=6, callbacks=[analyzer],
                   seed=1).train(1)
        centers.append(analyzer.grouping.centers)
    for other in centers[1:]:
        assert torch.equal(other, centers[0])
    with pytest.raises(ValueError, match="pass both, or neither"):
        GANKernelAnalyzer(*_players(k), zp, probe_classes=yp, num_groups=2, reference_classes=torch.arange(12) % 3)


def test_uniform_class_sampling_over_classes_the_data_lacks_is_warned():
    """num_classes larger than the classes the data has (10 declared, 3 used) with class_sampling="uniform":
    the discriminator's rows take the real rows' classes, so D never sees classes 3..9, yet 70 % of the
    generator's rows are drawn from them (G trained against D's untrained embedding rows). Old: silent."""
    import warnings

    from genkernel.gan import GANTrainer

    data, labels = _real()
    with pytest.warns(RuntimeWarning, match=r"no real sample has class \[3, 4, 5, 6, 7, 8, 9\]"):
        trainer = GANTrainer(*_players(10), data, labels=labels, num_classes=10, class_sampling="uniform", batch_size=6)
    drawn = trainer.sample_classes(3000)
    assert float((drawn >= 3).double().mean()) > 0.6  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for k, sampling in ((10, "data"), (3, "uniform")):  # "data" draws the data's classes only; 3 classes all used
            trainer = GANTrainer(*_players(k), data, labels=labels, num_classes=k, class_sampling=sampling, batch_size=6)
            if sampling == "data":  # the data's class frequencies
                counts = torch.bincount(trainer.sample_classes(6000), minlength=k).double() / 6000
                torch.testing.assert_close(counts, torch.bincount(labels.long(), minlength=k).double() / 40, rtol=0,
                                           atol=0.03)


def test_a_trainer_with_more_classes_than_its_generator_embeds_is_refused_when_built():
    """num_classes above what G can embed: the old trainer was built, then a later step failed ("inputs of shapes
    [(6, 3), (6,)] do not fit EmbedG: index out of range in self") once class_sampling="uniform" drew a large id.
    Refused at construction now, from G's num_classes attribute or from G(z, num_classes - 1)."""
    from genkernel.gan import GANTrainer

    data, labels = _real()
    with pytest.raises(ValueError, match="the generator has num_classes=4"):
        GANTrainer(*_players(4), data, labels=labels, num_classes=6, batch_size=6)
    g, d = _players(6)
    g.embed, g.num_classes = nn.Embedding(4, 4).to(F64), None  # no attribute to read: the call with id 5 fails
    with pytest.raises(ValueError, match="every class id up to num_classes - 1 = 5"):
        GANTrainer(g, d, data, labels=labels, num_classes=6, batch_size=6)


def test_a_conditional_trainer_refuses_a_discriminator_of_the_samples_alone():
    """A conditional trainer with D(x): the old trainer was built and its first step failed with "inputs of shapes
    [(12, 2), (12,), (12,)] do not fit DiscriminatorObjective: Sequential.forward() takes 2 positional arguments
    but 3 were given"; refused at construction now, naming D(x, classes)."""
    from genkernel.gan import GANTrainer

    data, labels = _real()
    g, _ = _players(3)
    with pytest.raises(TypeError, match=r"give D a forward\(x, classes\)"):
        GANTrainer(g, nn.Sequential(nn.Linear(2, 1)).to(F64), data, labels=labels, num_classes=3, batch_size=6)
