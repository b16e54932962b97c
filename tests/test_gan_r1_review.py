"""Review of GANTrainer(r1_gamma=) beside the trainer's other features: a conditional GAN on a DataLoader
(a short last batch, ragged micro-batches, clipping) against a hand-written float64 loop, a checkpoint
resumed mid-run with its analyzer, D's role_mode groups, r1_gamma=0 as no argument, and two refusals
(R1 on a sigmoid's probability; a gp_weight given beside R1 named as r1_gamma's mistake)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genkernel import TrainerCallback
from genkernel.core.adapter import seeded_generator
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.gan.losses import GENERATED, PENALTY, REAL, DiscriminatorLoss

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LR_G, LR_D, GAMMA, B, LATENT, CLASSES = 0.05, 0.04, 4.0, 5, 3, 3
DATA = torch.randn(20, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * 2.0
LABELS = torch.randint(0, CLASSES, (20,), generator=torch.Generator().manual_seed(8))


class ConditionalG(nn.Module):
    """G(z [B, LATENT], y LongTensor[B]) -> [B, 2]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT + CLASSES, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, z, y):
        return self.net(torch.cat([z, torch.eye(CLASSES, dtype=z.dtype)[y]], 1))


class ConditionalD(nn.Module):
    """D(x [B, 2], y LongTensor[B]) -> [B] logits; the class enters beside x, so ∇_x D(x, y) depends on y."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + CLASSES, 8), nn.SiLU(), nn.Linear(8, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x, 3.0 * torch.eye(CLASSES, dtype=x.dtype)[y]], 1)).squeeze(1)


def _conditional_pair():
    torch.manual_seed(0)
    return ConditionalG().to(F64), ConditionalD().to(F64)


def _pair():
    torch.manual_seed(0)
    return MLPGenerator(LATENT, 2, hidden=6, depth=2).to(F64), MLPDiscriminator(2, hidden=6, depth=2).to(F64)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _clipped_sgd(module, loss, lr, max_norm):
    """SGD on ``loss`` after clipping the global gradient norm at ``max_norm`` (torch's clip_grad_norm_ rule)."""
    grads = torch.autograd.grad(loss, list(module.parameters()))
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    scale = min(1.0, max_norm / (total + 1e-6))
    with torch.no_grad():
        for p, g in zip(module.parameters(), grads):
            p -= lr * scale * g


def _conditional_reference(batches, class_pool, iterations, max_norm):
    """The hand-written float64 loop: each D step on the loader's next batch (real rows, their classes), its
    latents drawn, fakes at the real rows' classes, R1 at (x, y) of each real row; each G step its latents
    then its classes from ``class_pool`` (class_sampling="data")."""
    G, D = _conditional_pair()
    gen = seeded_generator(0)
    batches = iter(batches)
    for _ in range(iterations):
        real, y = next(batches)
        z = torch.randn(real.shape[0], LATENT, generator=gen, dtype=F64)
        with torch.no_grad():
            fake = G(z, y)
        data_term = F.softplus(-D(real, y)).mean() + F.softplus(D(fake, y)).mean()
        x = real.detach().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(D(x, y).sum(), x, create_graph=True)
        _clipped_sgd(D, data_term + GAMMA / 2 * grad_x.pow(2).sum(1).mean(), LR_D, max_norm)
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        classes = class_pool[torch.randint(0, class_pool.shape[0], (B,), generator=gen)]
        D.requires_grad_(False)
        _clipped_sgd(G, F.softplus(-D(G(z, classes), classes)).mean(), LR_G, max_norm)
        D.requires_grad_(True)
    return G, D


def _identity_gap(ledger):
    return float((ledger.delta - ledger.contributions.sum(1) - ledger.rest - ledger.residual).abs().max())


def test_a_conditional_r1_run_on_a_loader_with_a_short_batch_and_ragged_micro_batches_equals_the_hand_written_loop():
    """Coverage. A conditional GAN on a DataLoader of 7 rows (batches of 5, then 2, then the next epoch's 5;
    the 2-row batch runs one example per micro-batch of micro_batches=3), max_grad_norm clipping every step:
    with the analyzer attached, D and G equal the float64 loop whose R1 rows are the real rows at their own
    classes (to 1e-15); D's ledger has the 3 role columns, one step per D step, and closes its identity."""
    n_rows, iterations, max_norm = 7, 3, 0.05
    loader = DataLoader(TensorDataset(DATA[:n_rows], LABELS[:n_rows]), batch_size=B, shuffle=False)
    batches = [(DATA[:B], LABELS[:B]), (DATA[B:n_rows], LABELS[B:n_rows])] * 2
    G_ref, D_ref = _conditional_reference(batches, LABELS[:n_rows], iterations, max_norm)

    G, D = _conditional_pair()
    analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_classes=CLASSES,
                                 probe_classes=torch.arange(4) % CLASSES, num_groups=2, window=2, eval_every=1,
                                 coverage_latents=6)
    trainer = GANTrainer(G, D, loader, loss="nonsaturating", r1_gamma=GAMMA, batch_size=B, seed=0,
                         num_classes=CLASSES, latent_dim=LATENT, micro_batches=3, max_grad_norm=max_norm,
                         callbacks=[analyzer], g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                         d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D))
    trainer.train(iterations)
    torch.testing.assert_close(_flat(D), _flat(D_ref), rtol=0, atol=1e-15)  # measured 5.6e-17
    torch.testing.assert_close(_flat(G), _flat(G_ref), rtol=0, atol=1e-15)
    ledger = analyzer.d_tracker.ledger
    assert ledger.steps == trainer.d_steps_done == iterations and ledger.contributions.shape[1] == 3
    assert _identity_gap(ledger) < 1e-14
    assert float(ledger.contributions[:, PENALTY].abs().max()) > 1e-4  # the penalty is a role that moved D


def _resumable_run(iterations, checkpoint_dir=None, every=0, resume_from=None):
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, generator=torch.Generator().manual_seed(1), dtype=F64),
                                 num_groups=2, window=2, eval_every=1, coverage_latents=6)
    trainer = GANTrainer(G, D, DATA, loss="hinge", r1_gamma=GAMMA, batch_size=B, seed=0, d_steps=2, micro_batches=2,
                         callbacks=[analyzer], checkpoint_dir=checkpoint_dir, checkpoint_every=every,
                         g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                         d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D))
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    trainer.train(iterations)
    return trainer, analyzer


def test_an_r1_run_resumed_mid_run_equals_the_straight_one_bit_for_bit_ledgers_too(tmp_path):
    """Coverage. Hinge + R1, d_steps=2, micro_batches=2, analyzer attached: 2 iterations, a checkpoint, a
    fresh trainer resumed from it for 2 more equals 4 straight iterations in both players' parameters and
    both ledgers, bit for bit."""
    straight, straight_analyzer = _resumable_run(4)
    _resumable_run(2, tmp_path, every=2)
    resumed, resumed_analyzer = _resumable_run(4, resume_from=tmp_path / "checkpoint.pt")
    assert torch.equal(_flat(resumed.discriminator), _flat(straight.discriminator))
    assert torch.equal(_flat(resumed.generator), _flat(straight.generator))
    for tracker in ("d_tracker", "g_tracker"):
        ours, theirs = getattr(resumed_analyzer, tracker).ledger, getattr(straight_analyzer, tracker).ledger
        assert ours.steps == theirs.steps and torch.equal(ours.contributions, theirs.contributions)
        assert torch.equal(ours.delta, theirs.delta) and torch.equal(ours.residual, theirs.residual)


def test_role_mode_groups_keep_the_penalty_whole_and_split_the_real_column_by_mode():
    """Coverage. Unconditional labels (mode ids) and discriminator_groups="role_mode": the penalty column equals
    the "role" grouping's penalty column and the real modes' columns sum to its real column (the same run:
    training bit for bit the same)."""
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)

    def run(**groups):
        G, D = _pair()
        analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, generator=torch.Generator().manual_seed(1), dtype=F64),
                                     num_groups=2, window=2, eval_every=1, coverage_latents=6, mode_centers=centers,
                                     mode_std=0.3, **groups)
        trainer = GANTrainer(G, D, DATA, labels=LABELS, loss="nonsaturating", r1_gamma=GAMMA, batch_size=B, seed=0,
                             callbacks=[analyzer], g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                             d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D))
        trainer.train(2)
        return trainer, analyzer.d_tracker.ledger

    by_role_trainer, by_role = run()
    by_mode_trainer, by_mode = run(discriminator_groups="role_mode")
    assert torch.equal(_flat(by_role_trainer.discriminator), _flat(by_mode_trainer.discriminator))
    k = centers.shape[0]
    assert by_mode.contributions.shape[1] == 2 * k + 1
    scale = float(by_role.contributions.abs().max())
    modes, roles = by_mode.contributions, by_role.contributions
    for mine, theirs in ((modes[:, 2 * k], roles[:, PENALTY]), (modes[:, :k].sum(1), roles[:, REAL]),
                         (modes[:, k:2 * k].sum(1), roles[:, GENERATED])):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12 * scale)


def test_r1_gamma_zero_is_the_trainer_without_it():
    """Coverage. r1_gamma=0 (and 0.0) trains as a trainer built without the argument: the same parameters bit
    for bit, the same generator state after the run (the same draws), and D steps of 2b rows with no
    penalty role."""
    seen = []

    class Rows(TrainerCallback):
        def on_step_end(self, trainer, step):
            if step.phase == "discriminator":
                seen.append((step.inputs[0].shape[0], int(step.inputs[1].max())))

    def run(**gamma):
        G, D = _pair()
        trainer = GANTrainer(G, D, DATA, batch_size=B, seed=0, d_steps=2, callbacks=[Rows()], **gamma)
        trainer.train(2)
        return trainer

    without = run()
    for gamma in (0, 0.0):
        seen.clear()
        trainer = run(r1_gamma=gamma)
        assert torch.equal(_flat(trainer.discriminator), _flat(without.discriminator))
        assert torch.equal(_flat(trainer.generator), _flat(without.generator))
        assert torch.equal(trainer.rng.get_state(), without.rng.get_state())
        assert seen == [(2 * B, 1)] * 4 and not trainer.critic.penalty


class SigmoidD(nn.Module):
    """D ending in a sigmoid: probabilities [B, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 6), nn.SiLU(), nn.Linear(6, 1), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


def test_r1_on_a_discriminator_that_returns_probabilities_is_refused_naming_the_logit():
    """R1 is γ/2·‖∇_x l(x)‖² of D's logit l; with output="probability" the trainer penalized ‖∇_x σ(l)‖² =
    σ'(l)²‖∇_x l‖² instead (σ' <= 1/4: measured 1/19 of R1 at init, 1/95 after 200 steps), silently. Now refused,
    in the trainer and in DiscriminatorLoss, before anything trains. Old code: accepted (no error)."""
    torch.manual_seed(0)
    G, D = MLPGenerator(LATENT, 2, hidden=6, depth=2).to(F64), SigmoidD().to(F64)
    with pytest.raises(ValueError, match=r"r1_gamma=4.0 penalizes .* D's logit .* use output='logit'"):
        GANTrainer(G, D, DATA, output="probability", r1_gamma=GAMMA, batch_size=B)
    with pytest.raises(ValueError, match=r"use output='logit'"):
        DiscriminatorLoss("nonsaturating", output="probability", r1_gamma=GAMMA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = GANTrainer(G, D, DATA, output="probability", r1_gamma=0, batch_size=B)  # no R1: as before
    assert not trainer.critic.penalty


def test_a_gp_weight_beside_r1_warns_that_r1_gamma_is_the_penalty_weight():
    """gp_weight=5 beside r1_gamma (a λ meant for R1) warned "pass loss='wgan-gp'", advice that r1_gamma then
    refuses. The warning now names r1_gamma as the R1 penalty's weight and keeps the wgan-gp advice for runs
    without R1. Old code: the warning said nothing of r1_gamma."""
    with pytest.warns(UserWarning, match=r"the R1 penalty's weight is r1_gamma, here 4.0: leave gp_weight") as record:
        GANTrainer(*_pair(), DATA, r1_gamma=GAMMA, gp_weight=5.0, batch_size=B)
    assert not any("loss='wgan-gp'" in str(w.message) for w in record)
    with pytest.warns(UserWarning, match=r"pass loss='wgan-gp'.*the R1 penalty's weight is r1_gamma"):
        DiscriminatorLoss("hinge", gp_weight=5.0)
