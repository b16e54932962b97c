"""``GANTrainer(discriminator_batches="separate")``: a discriminator step shows D its real, generated (and
penalty) rows in one forward and backward each, as PyTorch's DCGAN example does. Checked against that loop
written by hand with a BatchNorm discriminator (where it differs from one joint forward), against the same loop
observed by the analyzer, and on what each forward holds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.core.adapter import seeded_generator, under_torch_func
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPGenerator
from genkernel.gan.losses import REAL

from test_gan_r1 import B, F64, GAMMA, LATENT, LR_D, LR_G, _data, _flat, _pair, _reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_pair(seed=0):
    """An MLP G and a D with BatchNorm in training mode (the DCGAN discriminator's normalization), float64."""
    torch.manual_seed(seed)
    G = MLPGenerator(LATENT, 2, hidden=6, depth=2).to(F64).train()
    D = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.2), nn.Linear(6, 6), nn.BatchNorm1d(6),
                      nn.LeakyReLU(0.2), nn.Linear(6, 1)).to(F64).train()
    return G, D


def _trainer(pair, data, layout, callbacks=(), **kw):
    G, D = pair
    return GANTrainer(G, D, data, batch_size=B, seed=0, discriminator_batches=layout, callbacks=list(callbacks),
                      g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                      d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), **kw)


def _dcgan_loop(G, D, data, iterations, analyzer=None):
    """PyTorch's DCGAN example's step order with the trainer's documented draws: per iteration D(real) and its
    loss's backward, D(G(z).detach()) and its backward, one SGD step of D; then G's step through D (D in training
    mode, its parameters frozen). ``analyzer``: observes each of the three backwards (its only lines)."""
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=LR_G), torch.optim.SGD(D.parameters(), lr=LR_D)
    if analyzer is not None:
        analyzer.bind(g_opt, d_opt)
    gen = seeded_generator(0)
    weights = torch.full((B,), 1.0 / B, dtype=F64)
    for _ in range(iterations):
        real = data[torch.randint(0, data.shape[0], (B,), generator=gen)]
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        with torch.no_grad():
            fake = G(z)
        d_opt.zero_grad()
        for rows, role, loss_of in ((real, REAL, lambda s: F.softplus(-s)), (fake, 0, F.softplus)):
            losses = loss_of(D(rows).reshape(-1))
            if analyzer is not None:
                analyzer.observe_discriminator(losses, torch.full((B,), role), rows, weights=weights)
            (losses * weights).sum().backward()
        d_opt.step()
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        D.requires_grad_(False)
        samples = G(z)
        g_losses = F.softplus(-D(samples).reshape(-1))
        g_opt.zero_grad()
        if analyzer is not None:
            analyzer.observe_generator(g_losses, z, samples)
        g_losses.mean().backward()
        g_opt.step()
        D.requires_grad_(True)
    return G, D


def test_separate_forwards_train_a_batchnorm_discriminator_as_the_dcgan_loop_does():
    """Parameters and BatchNorm's running statistics as the hand-written DCGAN loop's (float64, 1e-12); the joint
    layout (one forward over real and generated rows, batch statistics over both) ends elsewhere."""
    data = _data()
    G0, D0 = _dcgan_loop(*_bn_pair(), data, 3)
    separate = _trainer(_bn_pair(), data, "separate")
    separate.train(3)
    for (name, mine), theirs in zip(separate.discriminator.state_dict().items(), D0.state_dict().values()):
        torch.testing.assert_close(mine.to(F64), theirs.to(F64), rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(_flat(separate.generator), _flat(G0), rtol=1e-12, atol=1e-12)
    joint = _trainer(_bn_pair(), data, "joint")
    joint.train(3)
    assert float((_flat(joint.discriminator) - _flat(D0)).abs().max()) > 1e-4


def test_the_analyzer_books_the_separate_forwards_as_the_observed_dcgan_loop_and_leaves_training_as_it_was():
    """With the analyzer attached training is bit for bit as without it, and D's ledger (per role) equals the one
    the analyzer keeps when it observes the hand-written DCGAN loop, to 1e-9 of its scale; the identity closes."""
    data = _data()
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)

    def analyzer_for(G, D):
        return GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_groups=2, window=4, eval_every=1,
                                 discriminator_probes=probes)

    plain = _trainer(_bn_pair(), data, "separate")
    plain.train(3)
    G, D = _bn_pair()
    owned = analyzer_for(G, D)
    trainer = _trainer((G, D), data, "separate", callbacks=[owned])
    trainer.train(3)
    assert torch.equal(_flat(trainer.discriminator), _flat(plain.discriminator))
    assert torch.equal(_flat(trainer.generator), _flat(plain.generator))

    G1, D1 = _bn_pair()
    observed = analyzer_for(G1, D1)
    _dcgan_loop(G1, D1, data, 3, observed)
    mine, theirs = observed.discriminator_ledger, owned.discriminator_ledger
    assert mine.steps == theirs.steps == 3
    scale = float(theirs.contributions.abs().max())
    assert scale > 0 and float(theirs.contributions[:, REAL].abs().max()) > 1e-3 * scale
    for field in ("contributions", "rest", "delta"):
        torch.testing.assert_close(getattr(mine, field), getattr(theirs, field), rtol=0, atol=1e-9 * scale, msg=field)
    torch.testing.assert_close(theirs.delta, theirs.contributions.sum(1) + theirs.rest + theirs.residual,
                               rtol=0, atol=1e-12)


class CallLog(nn.Module):
    """D wrapped to record each call: its rows and whether it ran inside a torch.func transform (the penalty's
    input gradient)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x):
        self.calls.append((x.shape[0], under_torch_func(x)))
        return self.net(x)


def test_with_r1_each_kind_of_row_has_its_forward_and_only_the_penalty_rows_form_the_input_gradient():
    """R1 at every step, separate forwards, a D that treats rows independently: training equals the hand-written
    R1 loop (1e-10); each D step calls D three times, on the real, the generated and the penalty rows, and only
    the last forms the input gradient (the joint layout: one call, on all 3b rows, inside it). Without penalty
    rows a batch is scored by a plain forward: the input gradient's cost is the penalty rows' alone."""
    data = _data()
    G0, D0 = _reference("nonsaturating", 3, 1, data)
    G, D = _pair()
    logged = CallLog(D)
    trainer = GANTrainer(G, logged, data, r1_gamma=GAMMA, batch_size=B, seed=0, discriminator_batches="separate",
                         g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                         d_optimizer=torch.optim.SGD(logged.parameters(), lr=LR_D))
    trainer.train(3)
    # per iteration: the D step's three forwards, then the G step's D(G(z))
    assert logged.calls == [(B, False), (B, False), (B, True), (B, False)] * 3
    torch.testing.assert_close(_flat(D), _flat(D0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(G), _flat(G0), rtol=1e-10, atol=1e-12)

    G, D = _pair()
    logged = CallLog(D)
    GANTrainer(G, logged, data, r1_gamma=GAMMA, batch_size=B, seed=0).discriminator_step()
    assert logged.calls == [(3 * B, True)]


def test_micro_batches_run_each_kind_of_row_of_each_micro_batch_on_its_own():
    """micro_batches=2 on 5 rows: micro-batch 0 holds 3 real and their 3 generated rows, micro-batch 1 the other
    2 and 2; each kind of row of each micro-batch is one forward, in that order."""
    G, D = _pair()
    logged = CallLog(D)
    trainer = GANTrainer(G, logged, _data(), batch_size=B, seed=0, discriminator_batches="separate", micro_batches=2)
    trainer.discriminator_step()
    assert logged.calls == [(3, False), (3, False), (2, False), (2, False)]
