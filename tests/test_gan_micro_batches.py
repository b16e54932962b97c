"""GANTrainer(micro_batches=K): both players' steps run their batch in K micro-batches (gradient
accumulation), a discriminator micro-batch being real rows j with their generated rows G(z_j) (and
WGAN-GP's interpolates of those pairs) in one forward of D. Checked against a hand-written accumulating
loop (bit for bit) and the whole batch at once (float64, to rounding); an attached GANKernelAnalyzer
books such steps exactly (ledger identity, the same groups as K = 1) and leaves training bit for bit
as it is without it, BatchNorm, dropout and spectral norm included; checkpoints keep K."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.core.tracking.step import OptimizerStep
from genkernel.data import gaussian_ring
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.gan.losses import (
    DEFAULT_GP_WEIGHT, GENERATED, PENALTY, REAL, DiscriminatorLoss, DiscriminatorObjective, GeneratorLoss,
)
from genkernel.gan.trainer import frozen

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def _data():
    data, _ = gaussian_ring(64, radius=2.0, std=0.05, seed=0)
    return data.to(F64)


def _pair(seed=0):
    torch.manual_seed(seed)
    return MLPGenerator(2, 2, hidden=8, depth=2).to(F64), MLPDiscriminator(2, hidden=8, depth=2).to(F64)


class _BatchNormG(nn.Module):
    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Dropout(0.2), nn.Linear(8, 2))

    def forward(self, z):
        return self.net(z)


def _coupled_pair(seed=0):
    """G with BatchNorm and dropout; D with spectral norm, BatchNorm and dropout (all in training mode)."""
    torch.manual_seed(seed)
    D = nn.Sequential(spectral_norm(nn.Linear(2, 8)), nn.BatchNorm1d(8), nn.SiLU(), nn.Dropout(0.2), nn.Linear(8, 1))
    return _BatchNormG().to(F64), D.to(F64)


def _state(*modules):
    return [t.detach().clone() for m in modules for t in [*m.parameters(), *m.buffers()]]


def _optimizer_state(optimizer):
    return [t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _analyzer(G, D):
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return GANKernelAnalyzer(G, D, probes, grouping="direction", num_groups=2, controls=1, window=2, eval_every=1,
                             quadrature="simpson")


@pytest.mark.parametrize("loss, k, b", [("nonsaturating", 3, 7), ("wgan-gp", 2, 5)])
def test_micro_batches_are_a_hand_written_accumulating_gan_loop(loss, k, b):
    """K micro-batches of a batch K does not divide (sizes 3, 2, 2 and 3, 2): the trainer's parameters and
    Adam states equal, bit for bit, a loop that draws the rows and latents, runs G on micro-batch j's
    latents, D once on real rows j with their generated rows (and interpolates), and backpropagates
    Σ_{n ∈ j} ℓ_n / b, micro-batch after micro-batch, before one step of each player; and, float64, the
    whole batch at once (K = 1) to rounding."""
    data = _data()
    G, D = _pair()
    trainer = GANTrainer(G, D, data, batch_size=b, micro_batches=k, loss=loss, seed=3)
    trainer.train(2)

    G2, D2 = _pair()
    g_opt = torch.optim.Adam(G2.parameters(), lr=1e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(D2.parameters(), lr=1e-3, betas=(0.5, 0.999))
    critic = DiscriminatorObjective(D2, penalty=loss == "wgan-gp")
    d_loss, g_loss = DiscriminatorLoss(loss, DEFAULT_GP_WEIGHT, "logit", discriminator=D2), GeneratorLoss(D2, loss, "logit")
    rng = torch.Generator().manual_seed(3)
    micro = [slice(0, 3), slice(3, 5)] + ([slice(5, 7)] if k == 3 else [])
    for _ in range(2):
        real = data[torch.randint(0, data.shape[0], (b,), generator=rng)]
        z = torch.randn(b, 2, generator=rng, dtype=F64)
        with torch.no_grad():
            fake = [G2(z[r]) for r in micro]
        parts = [real, torch.cat(fake)]
        if loss == "wgan-gp":
            eps = torch.rand(b, generator=rng, dtype=F64).view(-1, 1)
            parts.append(eps * real + (1 - eps) * parts[1])
        d_opt.zero_grad()
        for r in micro:
            x = torch.cat([p[r] for p in parts])
            roles = torch.cat([torch.full((r.stop - r.start,), role) for role in (REAL, GENERATED, PENALTY)[:len(parts)]])
            losses = d_loss(critic(x, roles), roles)
            (losses * torch.full_like(losses, 1.0 / b)).sum().backward()
        d_opt.step()
        z = torch.randn(b, 2, generator=rng, dtype=F64)
        with frozen(D2):
            g_opt.zero_grad()
            for r in micro:
                (g_loss(G2(z[r]), None).sum() / b).backward()
            g_opt.step()
    assert _equal(_state(G, D), _state(G2, D2))
    assert _equal(_optimizer_state(trainer.g_optimizer), _optimizer_state(g_opt))
    assert _equal(_optimizer_state(trainer.d_optimizer), _optimizer_state(d_opt))

    G1, D1 = _pair()
    GANTrainer(G1, D1, data, batch_size=b, loss=loss, seed=3).train(2)
    for x, y in zip(_state(G, D), _state(G1, D1)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


class _GeneratorLosses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, trainer, step):
        if step.phase == "generator":
            self.losses.append(step.losses.clone())


def _train(pair, k, b, analyzer, iterations=3):
    G, D = pair()
    callbacks = [_analyzer(G, D)] if analyzer else []
    recorder = _GeneratorLosses()
    torch.manual_seed(11)  # dropout's masks
    trainer = GANTrainer(G, D, _data(), batch_size=b, micro_batches=k, callbacks=[*callbacks, recorder], seed=3)
    trainer.train(iterations)
    return trainer, G, D, (callbacks or [None])[0], recorder.losses, torch.get_rng_state()


@pytest.mark.parametrize("k, b", [(2, 6), (3, 5)])
def test_an_analyzer_books_micro_batches_exactly_and_leaves_training_as_it_is(k, b):
    """With the analyzer attached, training (parameters, buffers, optimizers, the trainer's and the global
    RNG) is bit for bit what it is without; the generator's ledger closes (residual at rounding, Simpson's
    rule) and books the same contributions as K = 1 to 1e-10, with the same examples in the same groups
    (g_group_counts, d_group_counts); the discriminator's ledger closes too."""
    plain, G0, D0, _, _, rng0 = _train(_pair, k, b, False)
    tracked, G, D, analyzer, _, rng = _train(_pair, k, b, True)
    assert _equal(_state(G, D), _state(G0, D0)) and torch.equal(rng, rng0)
    assert torch.equal(tracked.rng.get_state(), plain.rng.get_state())
    assert _equal(_optimizer_state(tracked.g_optimizer), _optimizer_state(plain.g_optimizer))
    assert _equal(_optimizer_state(tracked.d_optimizer), _optimizer_state(plain.d_optimizer))
    ledger = analyzer.generator_ledger()
    assert float(ledger.delta.abs().max()) > 1e-3  # the probes moved
    assert float(ledger.residual.abs().max()) < 1e-13
    assert float(analyzer.discriminator_ledger.residual.abs().max()) < 1e-12
    _, _, _, whole, _, _ = _train(_pair, 1, b, True)
    torch.testing.assert_close(ledger.contributions, whole.generator_ledger().contributions, rtol=0, atol=1e-10)
    assert analyzer.g_group_counts == whole.g_group_counts and analyzer.d_group_counts == whole.d_group_counts
    assert sum(map(sum, analyzer.d_group_counts)) == 3 * 2 * b


def test_batchnorm_dropout_and_spectral_norm_in_micro_batches_are_read_as_training_runs_them():
    """G with BatchNorm and dropout, D with spectral norm, BatchNorm and dropout: each micro-batch's
    forward normalizes with its own rows, draws its own masks and advances the power iteration. Training
    is bit for bit unchanged by the analyzer, the geometry it reads (ℓ_G of each micro-batch) is the
    generator step's own losses bit for bit, micro-batch after micro-batch, and both ledgers close (Simpson's rule: residuals 5e-11 and 7e-12 of the
change, as K = 1's 8e-11 and 5e-11)."""
    k, b = 2, 8
    _, G0, D0, _, losses0, rng0 = _train(_coupled_pair, k, b, False)
    pushed = []
    G, D = _coupled_pair()
    analyzer = _analyzer(G, D)
    push = analyzer._push

    def recording(latents, x, loss_fn, **kw):
        geo = push(latents, x, loss_fn, **kw)
        if latents.shape[0] == b // k:  # the steps' micro-batches (the probes are 6)
            pushed.append(geo["losses"])
        return geo

    analyzer._push = recording
    recorder = _GeneratorLosses()
    torch.manual_seed(11)
    GANTrainer(G, D, _data(), batch_size=b, micro_batches=k, callbacks=[analyzer, recorder], seed=3).train(3)
    assert _equal(_state(G, D), _state(G0, D0)) and torch.equal(torch.get_rng_state(), rng0)
    assert _equal(recorder.losses, losses0)
    assert _equal([torch.cat(pushed[i:i + k]) for i in range(0, len(pushed), k)], losses0)
    assert analyzer.d_tracker.route.uses_graph()  # each micro-batch's own weight (power iteration)
    for ledger in (analyzer.generator_ledger(), analyzer.discriminator_ledger):  # (K = 1: 8e-11 and 5e-11 of the change)
        assert float(ledger.residual.abs().max()) < 1e-9 * float(ledger.delta.abs().max())


def test_micro_batches_are_refused_beyond_the_batch_and_on_resume_with_another_count(tmp_path):
    data = _data()
    with pytest.raises(ValueError, match=r"micro_batches=5 exceeds the batch size 4 .*pass micro_batches <= the batch size"):
        GANTrainer(*_pair(), data, batch_size=4, micro_batches=5)
    with pytest.raises(ValueError, match="micro_batches must be"):
        GANTrainer(*_pair(), data, batch_size=4, micro_batches=0)
    GANTrainer(*_pair(), data, batch_size=4, micro_batches=2, checkpoint_dir=tmp_path, checkpoint_every=1).train(1)
    with pytest.raises(ValueError, match="micro_batches"):
        GANTrainer(*_pair(), data, batch_size=4, micro_batches=1, checkpoint_dir=tmp_path).train(2, resume=True)
    resumed = GANTrainer(*_pair(), data, batch_size=4, micro_batches=2, checkpoint_dir=tmp_path)
    resumed.train(2, resume=True)
    assert resumed.iteration == 2
    # a checkpoint written before GANTrainer took micro_batches trained with one
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["micro_batches"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="micro_batches"):
        GANTrainer(*_pair(), data, batch_size=4, micro_batches=2, checkpoint_dir=tmp_path).train(3, resume=True)
    GANTrainer(*_pair(), data, batch_size=4, checkpoint_dir=tmp_path).train(3, resume=True)


def test_a_discriminator_tracker_reading_its_own_pass_refuses_spectral_norm_in_micro_batches():
    """An analyzer whose discriminator tracker was built on a per-example route (a spectral-norm D's first
    step in one batch) and is then handed a step in micro-batches would run every example at the last
    micro-batch's power iteration (a LedgerCheckError, gap 1.2e-07): refused before the step, naming the fix."""
    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=8, depth=2).to(F64), MLPDiscriminator(2, hidden=8, depth=2, spectral_norm=True).to(F64)
    analyzer = _analyzer(G, D)
    trainer = GANTrainer(G, D, _data(), batch_size=4, callbacks=[analyzer], seed=3)
    trainer.train(1)
    assert not analyzer.d_tracker.route.uses_graph()
    x = _data()[:4]
    roles = torch.tensor([REAL, REAL, GENERATED, GENERATED])
    step = OptimizerStep(DiscriminatorObjective(D), trainer.d_optimizer, trainer.d_loss,
                         (x, roles), roles, torch.full((4,), 0.5, dtype=F64), micro_batches=2, phase="discriminator",
                         info={"roles": roles})
    before = _state(D)
    with pytest.raises(ValueError, match=r"2 micro-batches with spectral norm in training mode.*Build the analyzer "
                                         r"before the first discriminator step in micro-batches"):
        analyzer.perform(step)
    assert _equal(_state(D), before) and not step.applied
