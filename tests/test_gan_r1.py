"""The R1 penalty in GANTrainer (``r1_gamma``): γ/2 · the mean over a discriminator step's real rows of
‖∇_x D(x)‖², the real rows shown to D again as penalty rows. Checked against a hand-written float64 loop,
with the analyzer attached (training unchanged, each role's contributions pushed by hand), and its
refusals."""


import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from genkernel.core.adapter import seeded_generator
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.gan.losses import PENALTY, REAL, DiscriminatorLoss, discriminator_losses

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LR_G, LR_D, GAMMA, B, LATENT = 0.05, 0.04, 4.0, 5, 3


def _pair(seed=0):
    torch.manual_seed(seed)
    return (MLPGenerator(LATENT, 2, hidden=6, depth=2).to(F64).train(),
            MLPDiscriminator(2, hidden=6, depth=2).to(F64).train())


def _data(n=20):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * 2.0


def _r1(D, real):
    """γ/2 · mean over the rows of ‖∇_x D(x)‖², by autograd (the textbook R1 term)."""
    real = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
    return GAMMA / 2 * g.pow(2).sum(1).mean()


def _data_term(kind, D, real, fake):
    s_real, s_fake = D(real).reshape(-1), D(fake).reshape(-1)
    if kind == "nonsaturating":
        return F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
    return F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()


def _sgd(module, loss, lr):
    grads = torch.autograd.grad(loss, list(module.parameters()))
    with torch.no_grad():
        for p, g in zip(module.parameters(), grads):
            p -= lr * g


def _reference(kind, iterations, d_steps, data):
    """The hand-written loop with the trainer's documented draws (per D step its real rows then its latents,
    R1 drawing nothing; per G step its latents)."""
    G, D = _pair()
    gen = seeded_generator(0)
    for _ in range(iterations):
        for _ in range(d_steps):
            real = data[torch.randint(0, data.shape[0], (B,), generator=gen)]
            z = torch.randn(B, LATENT, generator=gen, dtype=F64)
            with torch.no_grad():
                fake = G(z)
            _sgd(D, _data_term(kind, D, real, fake) + _r1(D, real), LR_D)
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        D.requires_grad_(False)
        s = D(G(z)).reshape(-1)
        _sgd(G, F.softplus(-s).mean() if kind == "nonsaturating" else -s.mean(), LR_G)
        D.requires_grad_(True)
    return G, D


def _trainer(kind, data, callbacks=(), pair=None, **kw):
    G, D = _pair() if pair is None else pair
    return GANTrainer(G, D, data, loss=kind, r1_gamma=GAMMA, batch_size=B, seed=0, callbacks=list(callbacks),
                      g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                      d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), **kw)


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge"])
def test_r1_training_equals_the_hand_written_loop(kind):
    data = _data()
    G0, D0 = _reference(kind, 3, 2, data)
    trainer = _trainer(kind, data, d_steps=2)
    trainer.train(3)
    assert torch.allclose(_flat(trainer.discriminator), _flat(D0), rtol=1e-10, atol=1e-12)
    assert torch.allclose(_flat(trainer.generator), _flat(G0), rtol=1e-10, atol=1e-12)
    # the penalty moved D: without it the same loop ends elsewhere
    G1, D1 = _pair()
    no_r1 = GANTrainer(G1, D1, data, loss=kind, batch_size=B, seed=0, d_steps=2,
                       g_optimizer=torch.optim.SGD(G1.parameters(), lr=LR_G),
                       d_optimizer=torch.optim.SGD(D1.parameters(), lr=LR_D))
    no_r1.train(3)
    assert float((_flat(D1) - _flat(D0)).abs().max()) > 1e-4


def test_the_analyzer_books_the_penalty_as_its_own_role_and_leaves_training_as_it_was():
    """One D step (then one G step) under the analyzer: D and G bit for bit as without it; D's ledger per role
    equals the role's SGD update pushed through D's probe Jacobian at the step's midpoint (by hand), the
    penalty role being the R1 term's gradient; the identity closes."""
    data = _data()
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    plain = _trainer("nonsaturating", data)
    plain.train(1)
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_groups=2, window=1, eval_every=1,
                                 discriminator_probes=probes)
    trainer = _trainer("nonsaturating", data, callbacks=[analyzer], pair=(G, D))
    theta0 = {n: p.detach().clone() for n, p in trainer.discriminator.named_parameters()}
    trainer.train(1)
    assert torch.equal(_flat(trainer.discriminator), _flat(plain.discriminator))
    assert torch.equal(_flat(trainer.generator), _flat(plain.generator))

    # the step's rows, drawn as the trainer documents
    gen = seeded_generator(0)
    real = data[torch.randint(0, data.shape[0], (B,), generator=gen)]
    z = torch.randn(B, LATENT, generator=gen, dtype=F64)
    G0, D0 = _pair()
    with torch.no_grad():
        fake = G0(z)
    s_real, s_fake = D0(real).reshape(-1), D0(fake).reshape(-1)
    terms = {"generated": F.softplus(s_fake).mean(), "real": F.softplus(-s_real).mean(), "penalty": _r1(D0, real)}
    theta1 = {n: p.detach() for n, p in trainer.discriminator.named_parameters()}
    mid = {n: (theta0[n] + theta1[n]) / 2 for n in theta0}
    jac = jacrev(lambda params: functional_call(D0, params, (probes,)).reshape(-1))(mid)
    ledger = analyzer.discriminator_ledger
    assert ledger.steps == 1 and ledger.contributions.shape[1] == 3
    scale = 0.0
    for role, name in enumerate(("generated", "real", "penalty")):
        # (R1 does not depend on D's output bias: its gradient there is zero)
        grads = dict(zip(theta0, torch.autograd.grad(terms[name], list(D0.parameters()), retain_graph=True,
                                                     allow_unused=True)))
        pushed = sum(jac[n].reshape(probes.shape[0], -1) @ (-LR_D * grads[n]).reshape(-1)
                     for n in grads if grads[n] is not None)
        got = ledger.contributions[:, role].reshape(-1)
        scale = max(scale, float(pushed.abs().max()))
        torch.testing.assert_close(got, pushed, rtol=1e-9, atol=1e-12)
    assert float(ledger.contributions[:, PENALTY].abs().max()) > 1e-3 * scale  # the penalty is not a null role
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)


def test_the_penalty_rows_loss_is_gamma_over_two_times_the_squared_norm():
    values, roles = torch.tensor([0.3, -0.2, 1.5, 0.0], dtype=F64), torch.tensor([1, 0, 2, 2])
    losses = DiscriminatorLoss("hinge", r1_gamma=GAMMA)(values, roles)
    torch.testing.assert_close(losses[2:], GAMMA / 2 * values[2:] ** 2)
    torch.testing.assert_close(losses[:2], discriminator_losses("hinge", values, roles)[:2])
    assert roles[0] == REAL


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), True, "4"])
def test_a_bad_gamma_is_refused(bad):
    with pytest.raises(ValueError, match="r1_gamma must be a finite number >= 0"):
        GANTrainer(*_pair(), _data(), batch_size=B, r1_gamma=bad)


def test_r1_beside_wgan_gp_is_refused_naming_both_penalties():
    with pytest.raises(ValueError, match="loss='wgan-gp' has a gradient penalty of its own"):
        GANTrainer(*_pair(), _data(), loss="wgan-gp", batch_size=B, r1_gamma=1.0)
    with pytest.raises(ValueError, match="choose one"):
        DiscriminatorLoss("wgan-gp", r1_gamma=1.0)


def test_a_checkpoint_resumes_only_at_its_own_gamma(tmp_path):
    trainer = _trainer("nonsaturating", _data())
    trainer.train(1)
    trainer.save_checkpoint(tmp_path / "run.pt")
    G, D = _pair()
    other = GANTrainer(G, D, _data(), loss="nonsaturating", r1_gamma=2 * GAMMA, batch_size=B, seed=0,
                       g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                       d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D))
    with pytest.raises(ValueError, match="r1_gamma: saved 4.0, here 8.0"):
        other.load_checkpoint(tmp_path / "run.pt")
    same = _trainer("nonsaturating", _data())
    same.load_checkpoint(tmp_path / "run.pt")
    trainer.train(1)
    same.train(1)
    assert torch.equal(_flat(same.discriminator), _flat(trainer.discriminator))


@pytest.mark.parametrize("options", [
    dict(micro_batches=2, d_steps=2, max_grad_norm=0.5),
    dict(mixed_precision="bf16", dtype=torch.float32),
], ids=["micro-batches", "bf16"])
def test_r1_under_micro_batches_and_mixed_precision_trains_as_without_the_analyzer(options):
    options = dict(options)
    dtype = options.pop("dtype", F64)
    data = _data().to(dtype)

    def run(analyze):
        G, D = (m.to(dtype) for m in _pair())
        analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=dtype), num_groups=2, window=3, eval_every=1,
                                     mixed_precision="observe") if analyze else None
        trainer = _trainer("hinge", data, callbacks=[analyzer] if analyze else [], pair=(G, D), **options)
        trainer.train(3)
        return trainer, analyzer

    plain, _ = run(False)
    trainer, analyzer = run(True)
    assert torch.equal(_flat(trainer.discriminator), _flat(plain.discriminator))
    assert torch.equal(_flat(trainer.generator), _flat(plain.generator))
    ledger = analyzer.discriminator_ledger
    assert ledger.steps == trainer.d_steps_done and ledger.contributions.shape[1] == 3
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
    assert float(ledger.contributions[:, PENALTY].abs().max()) > 0


def test_a_batchnorm_discriminator_is_refused_before_the_first_step_moves_anything():
    G, _ = _pair()
    D = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.BatchNorm1d(6), torch.nn.LeakyReLU(0.2),
                            torch.nn.Linear(6, 1)).to(F64)
    trainer = _trainer("nonsaturating", _data(), pair=(G, D))
    before = _flat(D)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        trainer.train(1)
    assert torch.equal(_flat(D), before) and trainer.d_steps_done == 0


def test_an_observed_loop_with_r1_in_its_real_rows_books_what_the_trainer_splits_into_two_roles():
    """A hand-written loop that adds γ/2·‖∇_x D(x)‖² to each real row's loss (StyleGAN's way) and reports the
    rows to observe_discriminator: its "real" column is the trainer's "real" plus "penalty" columns, its
    "generated" column the trainer's (the same draws, SGD); the groupings add up to one ledger."""
    data = _data()
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)

    def analyzer_for(G, D):
        return GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_groups=2, window=2, eval_every=1,
                                 discriminator_probes=probes)

    G, D = _pair()
    owned = analyzer_for(G, D)
    trainer = _trainer("nonsaturating", data, callbacks=[owned], pair=(G, D))
    trainer.train(2)

    G, D = _pair()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=LR_G), torch.optim.SGD(D.parameters(), lr=LR_D)
    observed = analyzer_for(G, D)
    observed.bind(g_opt, d_opt)
    gen = seeded_generator(0)
    roles = torch.cat([torch.full((B,), REAL), torch.zeros(B, dtype=torch.long)])
    for _ in range(2):
        real = data[torch.randint(0, data.shape[0], (B,), generator=gen)]
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        with torch.no_grad():
            fake = G(z)
        x = torch.cat([real, fake])
        s = D(x).reshape(-1)
        r = real.detach().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(D(r).sum(), r, create_graph=True)
        penalty = GAMMA / 2 * grad_x.pow(2).sum(1)
        losses = torch.cat([F.softplus(-s[:B]) + penalty, F.softplus(s[B:])])
        d_opt.zero_grad()
        observed.observe_discriminator(losses, roles, x, weights=torch.full((2 * B,), 1.0 / B, dtype=F64))
        (losses.sum() / B).backward()
        d_opt.step()
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        D.requires_grad_(False)
        fake = G(z)
        g_losses = F.softplus(-D(fake).reshape(-1))
        g_opt.zero_grad()
        observed.observe_generator(g_losses, z, fake)
        g_losses.mean().backward()
        g_opt.step()
        D.requires_grad_(True)

    assert torch.allclose(_flat(D), _flat(trainer.discriminator), rtol=0, atol=1e-12)
    mine, theirs = observed.discriminator_ledger, owned.discriminator_ledger
    assert mine.steps == theirs.steps == 2
    scale = float(theirs.contributions.abs().max())
    torch.testing.assert_close(mine.contributions[:, REAL], theirs.contributions[:, REAL] + theirs.contributions[:, PENALTY],
                               rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(mine.contributions[:, 0], theirs.contributions[:, 0], rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(mine.delta, theirs.delta, rtol=0, atol=1e-9 * scale)


def test_a_penalty_weight_given_as_a_string_is_refused():
    """A config value read as text ("10") was taken as the number 10 for gp_weight; both weights refuse it now."""
    from genkernel.gan.losses import check_gp_weight

    with pytest.raises(ValueError, match="gp_weight must be a finite number"):
        check_gp_weight("10")
    with pytest.raises(ValueError, match="gp_weight must be a finite number"):
        GANTrainer(*_pair(), _data(), loss="wgan-gp", batch_size=B, gp_weight="10")



def _lazy_r1_loop(G, D, g_opt, d_opt, batches, analyzer=None, *, every=2, start=0):
    """StyleGAN2's lazy regularization written by hand: every iteration a D step on real and generated rows
    (non-saturating), and after every ``every``-th a separate D step on the real rows alone with
    γ·every/2·‖∇_x D(x)‖² each (role "penalty"), then a G step; SGD. ``start``: the first iteration's index.
    The analyzer's observe calls are the only added lines."""
    roles = torch.cat([torch.full((B,), REAL), torch.zeros(B, dtype=torch.long)])
    weights = torch.full((2 * B,), 1.0 / B, dtype=F64)
    for i, (real, z_d, z_g) in enumerate(batches, start=start):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        s = D(x).reshape(-1)
        losses = torch.cat([F.softplus(-s[:B]), F.softplus(s[B:])])
        d_opt.zero_grad()
        if analyzer is not None:
            analyzer.observe_discriminator(losses, roles, x, weights=weights)
        (losses.sum() / B).backward()
        d_opt.step()
        if (i + 1) % every == 0:
            r = real.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(D(r).sum(), r, create_graph=True)
            penalty = GAMMA * every / 2 * grad_x.pow(2).sum(1)
            d_opt.zero_grad()
            if analyzer is not None:
                analyzer.observe_discriminator(penalty, torch.full((B,), PENALTY), real)
            penalty.mean().backward()
            d_opt.step()
        g_opt.zero_grad()
        D.requires_grad_(False)
        fake = G(z_g)
        g_losses = F.softplus(-D(fake).reshape(-1))
        if analyzer is not None:
            analyzer.observe_generator(g_losses, z_g, fake)
        g_losses.mean().backward()
        g_opt.step()
        D.requires_grad_(True)


def _lazy_r1_owned(G, D, g_opt, d_opt, batches, analyzer, *, every=2):
    """The same steps performed by the analyzer: one objective with penalty rows serves both kinds of D step,
    its loss R1 at γ·every."""
    from genkernel import OptimizerStep
    from genkernel.gan import frozen
    from genkernel.gan.losses import DiscriminatorObjective, GeneratorLoss

    critic, g_loss = DiscriminatorObjective(D, penalty=True), GeneratorLoss(D)
    d_loss = DiscriminatorLoss(r1_gamma=GAMMA * every)
    roles = torch.cat([torch.full((B,), REAL), torch.zeros(B, dtype=torch.long)])
    penalty_roles = torch.full((B,), PENALTY)
    for i, (real, z_d, z_g) in enumerate(batches):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        analyzer.perform(OptimizerStep(critic, d_opt, d_loss, (x, roles), roles, torch.full((2 * B,), 1.0 / B, dtype=F64),
                                       phase="discriminator", info={"roles": roles}))
        if (i + 1) % every == 0:
            analyzer.perform(OptimizerStep(critic, d_opt, d_loss, (real, penalty_roles), penalty_roles,
                                           phase="discriminator", info={"roles": penalty_roles}))
        with frozen(D):
            analyzer.perform(OptimizerStep(G, g_opt, g_loss, z_g, phase="generator"))


def test_a_lazily_regularized_loop_you_write_is_booked_as_the_same_steps_performed_by_the_analyzer():
    """Coverage (the observed path books any per-example losses; the owned reference needs r1_gamma).
    Lazy R1 (separate penalty-only D steps after every second iteration), observed: training bit for bit as
    without the analyzer; D's ledger has a step per D update, its penalty column zero until the first
    regularization step, and equals the ledger of the same steps performed by the analyzer (the objective with
    penalty rows, DiscriminatorLoss(r1_gamma=2γ)) to 1e-12 of its scale; the identity closes."""
    data = _data(40)
    g = torch.Generator().manual_seed(11)
    batches = [(data[torch.randint(0, 40, (B,), generator=g)], torch.randn(B, LATENT, generator=g, dtype=F64),
                torch.randn(B, LATENT, generator=g, dtype=F64)) for _ in range(4)]
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)

    def players():
        G, D = _pair()
        return G, D, torch.optim.SGD(G.parameters(), lr=LR_G), torch.optim.SGD(D.parameters(), lr=LR_D)

    def analyzer_for(G, D):
        return GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_groups=2, window=8, eval_every=1,
                                 discriminator_probes=probes)

    G0, D0, g0, d0 = players()
    _lazy_r1_loop(G0, D0, g0, d0, batches)
    G1, D1, g1, d1 = players()
    observed = analyzer_for(G1, D1)
    observed.bind(g1, d1)
    _lazy_r1_loop(G1, D1, g1, d1, batches[:1], observed)
    assert observed.discriminator_ledger.steps == 1
    assert float(observed.discriminator_ledger.contributions[:, PENALTY].abs().max()) == 0.0
    _lazy_r1_loop(G1, D1, g1, d1, batches[1:], observed, start=1)
    assert torch.equal(_flat(D1), _flat(D0)) and torch.equal(_flat(G1), _flat(G0))
    G2, D2, g2, d2 = players()
    owned = analyzer_for(G2, D2)
    _lazy_r1_owned(G2, D2, g2, d2, batches, owned)
    mine, theirs = observed.discriminator_ledger, owned.discriminator_ledger
    assert mine.steps == theirs.steps == 6  # 4 main steps and 2 regularization steps
    scale = float(theirs.contributions.abs().max())
    assert float(theirs.contributions[:, PENALTY].abs().max()) > 1e-3 * scale
    for field in ("contributions", "rest", "residual", "delta"):
        torch.testing.assert_close(getattr(mine, field), getattr(theirs, field), rtol=0, atol=1e-12 * scale, msg=field)
    torch.testing.assert_close(mine.delta, mine.contributions.sum(1) + mine.rest + mine.residual, rtol=0, atol=1e-12)
