"""First-class conditional GANs, G(z, y) and D(x, y): ``GANTrainer(..., labels=, num_classes=)`` and
``GANKernelAnalyzer(..., probe_classes=, num_classes=)``.

The references are independent of the first-class code: the wrapper route of
tests/test_conditional_gan.py (the class one-hot carried as extra coordinates, shown exact there) on
the same weights, latents and classes, with the label coordinates dropped; explicit float64 SGD
steps replayed by hand from the trainer's seeded draws; explicit per-example autograd for the
geometry w_i = ∇_x ℓ_G(D(x, y_i))."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.gan import (
    DiscriminatorLoss, DiscriminatorObjective, GANKernelAnalyzer, GANTrainer, GeneratorLoss,
)
from genkernel.gan.losses import GENERATED, PENALTY, REAL

from test_conditional_gan import WithClassD, WithClassG

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
NZ, C, B, M = 3, 3, 12, 6
EYE = torch.eye(C, dtype=F64)  # one-hot by indexing (F.one_hot cannot run under vmap(grad))


class CondG(nn.Module):
    """G(z, y): ``[B, NZ]`` latents and ``LongTensor[B]`` classes -> ``[B, 2]`` points."""

    latent_dim = NZ
    num_classes = C

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NZ + C, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, z, y):
        return self.net(torch.cat([z, EYE.to(z)[y]], dim=1))


class CondD(nn.Module):
    """D(x, y): ``[B, 2]`` points and classes -> ``[B]`` logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + C, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x, EYE.to(x)[y]], dim=1)).squeeze(1)


class PlainG(nn.Module):
    latent_dim = NZ

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NZ, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, z):
        return self.net(z)


def with_class(values, classes):
    return torch.cat([values, F.one_hot(classes, C).to(values)], dim=1)


def players(seed=0):
    torch.manual_seed(seed)
    return CondG().to(F64), CondD().to(F64)


def dataset(n=60):
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=F64)
    labels = torch.randint(0, C, (n,), generator=g)
    return centres[labels] + 0.1 * torch.randn(n, 2, generator=g, dtype=F64), labels


def probes():
    return torch.randn(M, NZ, generator=torch.Generator().manual_seed(7), dtype=F64), torch.arange(M) % C


def by_sign(z, x, w, scores):
    """The same groups on both routes: the wrapper's latents start with the first-class ones."""
    return (z[:, 0] > 0).long()


def parameters(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


# -- the owned route against the wrapper route --------------------------------------------------------------------

def _owned_steps(route, g, d, wg, wd, g_opt, d_opt, analyzer, batches, kind):
    """Perform prepared steps through ``analyzer``: ``route`` "native" (G(z, y), D(x, y)) or "wrapper"
    (``wg``, ``wd``: the wrappers of g and d)."""
    critic = DiscriminatorObjective(d if route == "native" else wd, penalty=kind == "wgan-gp")
    for real, real_y, z_d, z_g, y_g, eps in batches:
        with torch.no_grad():
            fake = g(z_d, real_y)
        parts, roles = [real, fake], [torch.full((B,), REAL), torch.full((B,), GENERATED)]
        if kind == "wgan-gp":
            parts.append(eps[:, None] * real + (1 - eps[:, None]) * fake)
            roles.append(torch.full((B,), PENALTY))
        x, roles = torch.cat(parts), torch.cat(roles)
        classes = real_y.repeat(len(parts))
        weights = torch.full((x.shape[0],), 1.0 / B, dtype=F64)
        # (the wrapper's penalty would include the one-hot coordinates' gradient: WGAN-GP is checked by hand below)
        inputs = (x, roles, classes) if route == "native" else (with_class(x, classes), roles)
        analyzer.perform(_d_step(critic, d_opt, kind, inputs, roles, weights))
        if route == "native":
            step = _g_step(g, g_opt, GeneratorLoss(d, kind, conditional=True, num_classes=C), (z_g, y_g), y_g)
        else:
            step = _g_step(wg, g_opt, GeneratorLoss(wd, kind), with_class(z_g, y_g), None)
        analyzer.perform(step)


def _d_step(critic, d_opt, kind, inputs, roles, weights):
    from genkernel.core.tracking.step import OptimizerStep

    return OptimizerStep(critic, d_opt, DiscriminatorLoss(kind), inputs, roles, weights, phase="discriminator",
                         info={"roles": roles})


def _g_step(g, g_opt, loss_fn, inputs, targets):
    from genkernel.core.tracking.step import OptimizerStep

    return OptimizerStep(g, g_opt, loss_fn, inputs, targets, phase="generator")


def _batches(steps, seed=5):
    data, labels = dataset()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        index = torch.randint(0, data.shape[0], (B,), generator=g)
        out.append((data[index], labels[index], torch.randn(B, NZ, generator=g, dtype=F64),
                    torch.randn(B, NZ, generator=g, dtype=F64), torch.randint(0, C, (B,), generator=g),
                    torch.rand(B, generator=g, dtype=F64)))
    return out


def _run_owned(route, kind, steps=3, grouping=by_sign):
    from genkernel.gan import frozen

    g, d = players()
    g_opt, d_opt = torch.optim.Adam(g.parameters(), lr=1e-2), torch.optim.Adam(d.parameters(), lr=1e-2)
    z, y = probes()
    wg, wd = WithClassG(g), WithClassD(d)
    if route == "native":
        analyzer = GANKernelAnalyzer(g, d, z, probe_classes=y, num_classes=C, grouping=grouping,
                                     num_groups=2 if grouping is by_sign else None, controls=1, window=2, eval_every=1)
    else:
        wrapper_grouping = by_sign if grouping is by_sign else (lambda z, x, w, scores: z[:, NZ:].argmax(dim=1))
        analyzer = GANKernelAnalyzer(wg, wd, with_class(z, y), grouping=wrapper_grouping,
                                     num_groups=2 if grouping is by_sign else C, controls=1, window=2, eval_every=1)
    analyzer.rng.manual_seed(1)  # the same permutations on both routes (the coverage latents drew 3 or 6 per row)

    class Frozen:  # the generator's steps run with D frozen, as GANTrainer runs them
        def __init__(self, a):
            self.a = a

        def perform(self, step):
            if step.phase == "generator":
                with frozen(d):
                    return self.a.perform(step)
            return self.a.perform(step)

    _owned_steps(route, g, d, wg, wd, g_opt, d_opt, Frozen(analyzer), _batches(steps), kind)
    return analyzer, g, d


@pytest.mark.parametrize("kind", ["nonsaturating", "wgan-gp"])
def test_owned_steps_give_the_wrapper_routes_ledgers_with_the_label_coordinates_dropped(kind):
    """Prepared steps through the analyzer, Adam on both players. WGAN-GP too: the wrapper's D reads its
    class by argmax, so its penalty ‖∇_x' D‖ has no one-hot part and is the native ‖∇_x D(x, y)‖."""
    native, g1, d1 = _run_owned("native", kind)
    wrapped, g2, d2 = _run_owned("wrapper", kind)
    for a, b in zip(parameters(g1, d1), parameters(g2, d2)):
        assert torch.equal(a, b)  # the same training on both routes
    for name in ("geometry", "control_0"):
        mine, theirs = native.generator_ledger(name), wrapped.generator_ledger(name)
        assert mine.steps == theirs.steps == 3
        for part in ("delta", "contributions", "rest", "residual"):
            torch.testing.assert_close(getattr(mine, part), getattr(theirs, part)[..., :2], rtol=0, atol=1e-12)
        torch.testing.assert_close(mine.traffic, theirs.traffic, rtol=0, atol=1e-12)  # [M, G]: norms over outputs
    # the discriminator's ledger at the same probe points (the wrapper's carry their one-hot) and classes
    mine, theirs = native.discriminator_ledger, wrapped.discriminator_ledger
    torch.testing.assert_close(native.discriminator_probes, wrapped.discriminator_probes[:, :2], rtol=0, atol=0)
    assert torch.equal(native.discriminator_probe_classes, wrapped.discriminator_probes[:, 2:].argmax(dim=1))
    for part in ("delta", "contributions", "rest", "residual"):
        torch.testing.assert_close(getattr(mine, part), getattr(theirs, part), rtol=0, atol=1e-12)
    # the alignment rows read the same change (the wrapper's label coordinates never move)
    for a, b in zip(native.alignment, wrapped.alignment):
        assert a["cos_formula"] == pytest.approx(b["cos_formula"], abs=1e-9)
        assert a["change_norm"] == pytest.approx(b["change_norm"], abs=1e-12)


def test_grouping_by_class_splits_the_generators_ledger_as_the_wrapper_routes_class_grouping():
    """``grouping="class"``: each training latent in its class's group, each probe in its own class's;
    on the wrapper route the same split is a function of the one-hot coordinates (tests/test_conditional_gan.py
    checks that one against a forward-mode brute force)."""
    native, *_ = _run_owned("native", "nonsaturating", grouping="class")
    wrapped, *_ = _run_owned("wrapper", "nonsaturating", grouping="class")
    assert native.num_groups == C and native.grouping.labels() == ["class 0", "class 1", "class 2"]
    for name in ("geometry", "control_0"):
        mine, theirs = native.generator_ledger(name), wrapped.generator_ledger(name)
        for part in ("contributions", "rest", "residual", "traffic"):
            theirs_part = getattr(theirs, part)
            theirs_part = theirs_part if part == "traffic" else theirs_part[..., :2]
            torch.testing.assert_close(getattr(mine, part), theirs_part, rtol=0, atol=1e-12)
    assert native.g_group_counts == wrapped.g_group_counts
    assert native._run_groups.tolist() == probes()[1].tolist()  # each probe in its own class's group
    assert native.report()["windows"][0]["statistics"]["geometry"]["probe_groups"] == probes()[1].tolist()


def test_the_gradient_penalty_rows_contribute_to_the_discriminators_ledger():
    native, *_ = _run_owned("native", "wgan-gp")
    ledger = native.discriminator_ledger
    assert ledger.steps == 3 and ledger.relative_residual() < 1e-3
    assert float(ledger.contributions[:, PENALTY].abs().max()) > 1e-4  # the penalty rows are one group


# -- the trainer: its steps are the conditional GAN's, by hand ----------------------------------------------------

@pytest.mark.parametrize("sampling", ["data", "uniform"])
def test_a_conditional_trainers_steps_are_explicit_sgd_on_the_conditional_objective(sampling):
    """Replay the trainer's seeded draws and make its SGD steps by hand: D on real rows at their labels and
    G(z, y_real) rows at the same classes; then G on (z, y) with y from ``class_sampling``."""
    data, labels = dataset()
    g, d = players()
    lr = 0.05
    trainer = GANTrainer(g, d, data, labels=labels, num_classes=C, class_sampling=sampling, batch_size=B,
                         g_optimizer=torch.optim.SGD(g.parameters(), lr=lr),
                         d_optimizer=torch.optim.SGD(d.parameters(), lr=lr), seed=11)
    g0, d0 = players()
    rng = torch.Generator().manual_seed(11)
    trainer.train(2)
    for _ in range(2):
        index = torch.randint(0, data.shape[0], (B,), generator=rng)
        real, y = data[index], labels[index]
        z = torch.randn(B, NZ, generator=rng, dtype=F64)
        with torch.no_grad():
            fake = g0(z, y)
        loss = (F.softplus(-d0(real, y)).sum() + F.softplus(d0(fake, y)).sum()) / B
        grads = torch.autograd.grad(loss, list(d0.parameters()))
        with torch.no_grad():
            for p, gr in zip(d0.parameters(), grads):
                p -= lr * gr
        z = torch.randn(B, NZ, generator=rng, dtype=F64)
        if sampling == "uniform":
            y = torch.randint(0, C, (B,), generator=rng)
        else:
            y = labels[torch.randint(0, data.shape[0], (B,), generator=rng)]
        loss = F.softplus(-d0(g0(z, y), y)).mean()
        grads = torch.autograd.grad(loss, list(g0.parameters()))
        with torch.no_grad():
            for p, gr in zip(g0.parameters(), grads):
                p -= lr * gr
    for a, b in zip(parameters(g, d), parameters(g0, d0)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_the_gradient_penalty_interpolates_pairs_of_the_same_class():
    """One WGAN-GP discriminator step by hand: x̂_b = ε_b x_b + (1 − ε_b) G(z_b, y_b), penalised at y_b."""
    data, labels = dataset()
    g, d = players()
    lr, lam = 0.01, 10.0
    trainer = GANTrainer(g, d, data, labels=labels, num_classes=C, loss="wgan-gp", gp_weight=lam, batch_size=B,
                         g_optimizer=torch.optim.SGD(g.parameters(), lr=lr),
                         d_optimizer=torch.optim.SGD(d.parameters(), lr=lr), seed=2)
    trainer.discriminator_step()
    g0, d0 = players()
    rng = torch.Generator().manual_seed(2)
    index = torch.randint(0, data.shape[0], (B,), generator=rng)
    real, y = data[index], labels[index]
    z = torch.randn(B, NZ, generator=rng, dtype=F64)
    eps = torch.rand(B, generator=rng, dtype=F64)
    with torch.no_grad():
        fake = g0(z, y)
    mix = (eps[:, None] * real + (1 - eps[:, None]) * fake).requires_grad_(True)
    (gx,) = torch.autograd.grad(d0(mix, y).sum(), mix, create_graph=True)
    penalty = lam * ((gx.pow(2).sum(dim=1) + 1e-12).sqrt() - 1) ** 2
    loss = (-d0(real, y).sum() + d0(fake, y).sum() + penalty.sum()) / B
    grads = torch.autograd.grad(loss, list(d0.parameters()))
    with torch.no_grad():
        for p, gr in zip(d0.parameters(), grads):
            p -= lr * gr
    for a, b in zip(parameters(d), parameters(d0)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def _trainer(callbacks=(), **kw):
    data, labels = dataset()
    g, d = players()
    options = dict(labels=labels, num_classes=C, batch_size=B, loss="wgan-gp", d_steps=2, max_grad_norm=0.5,
                   lr_g=1e-2, lr_d=1e-2, seed=4)
    options.update(kw)
    return GANTrainer(g, d, data, callbacks=callbacks, **options)


def test_training_with_the_analyzer_attached_is_bit_identical():
    bare = _trainer()
    bare.train(3)
    logged = []
    watched = _trainer(log=lambda metrics, step: logged.append((step, dict(metrics))))
    z, y = probes()
    analyzer = GANKernelAnalyzer(watched.generator, watched.discriminator, z, probe_classes=y, grouping="direction",
                                 num_groups=2, window=2, eval_every=1)
    watched.callbacks.append(analyzer)
    watched.train(3)
    for a, b in zip(parameters(bare.generator, bare.discriminator), parameters(watched.generator, watched.discriminator)):
        assert torch.equal(a, b)
    assert bare.history == watched.history
    assert [step for step, _ in logged if "loss/generator" in _] == [1, 2, 3]  # the trainer's logging goes on
    assert analyzer.generator_ledger().steps == 3 and analyzer.discriminator_ledger.steps == 6
    report = analyzer.report()
    assert report["generator_steps"] == 3 and len(report["windows"]) == 1


def test_the_ledger_adds_up_to_the_real_change_over_adam_steps():
    """Several Adam steps: the generator's ledger is G's change at (z'_m, y'_m), computed here directly."""
    trainer = _trainer(loss="nonsaturating", d_steps=1, max_grad_norm=float("inf"), lr_g=2e-3)
    z, y = probes()
    start = CondG().to(F64)
    start.load_state_dict(trainer.generator.state_dict())
    analyzer = GANKernelAnalyzer(trainer.generator, trainer.discriminator, z, probe_classes=y, num_groups=2,
                                 window=2, eval_every=2)
    trainer.callbacks.append(analyzer)
    trainer.train(6)
    ledger = analyzer.generator_ledger()
    with torch.no_grad():
        change = trainer.generator(z, y) - start(z, y)
    torch.testing.assert_close(ledger.delta, change, rtol=0, atol=1e-12)
    total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12)
    assert ledger.relative_residual() < 1e-3
    assert float(change.norm()) > 1e-3  # G moved


def test_the_probes_geometry_uses_each_probes_own_class():
    """w(z'_m) = ∇_x softplus(−D(x, y'_m)) at x = G(z'_m, y'_m), by one autograd call per probe."""
    trainer = _trainer(loss="nonsaturating", d_steps=1, max_grad_norm=float("inf"))
    z, y = probes()
    analyzer = GANKernelAnalyzer(trainer.generator, trainer.discriminator, z, probe_classes=y, num_groups=2,
                                 window=1, eval_every=1)
    g0, d0 = players()
    trainer.callbacks.append(analyzer)
    trainer.discriminator_step()  # D moves first; the generator step's geometry reads the moved D
    d0.load_state_dict(trainer.discriminator.state_dict())
    trainer.generator_step()
    for m in range(M):
        x = g0(z[m:m + 1], y[m:m + 1]).detach().requires_grad_(True)
        (w,) = torch.autograd.grad(F.softplus(-d0(x, y[m:m + 1])).sum(), x)
        torch.testing.assert_close(analyzer.fields[0]["w"][m], w[0], rtol=0, atol=1e-14)
    # and another class gives another push: the class is used, not ignored
    x = g0(z[:1], y[:1]).detach().requires_grad_(True)
    (other,) = torch.autograd.grad(F.softplus(-d0(x, (y[:1] + 1) % C)).sum(), x)
    assert float((other[0] - analyzer.fields[0]["w"][0]).abs().max()) > 1e-6


def test_push_field_reads_each_samples_own_class():
    """push_field(loss, x, classes) = −∇_x softplus(−D(x_n, y_n)), one autograd call per sample."""
    from genkernel.gan.metrics import push_field

    trainer = _trainer(loss="nonsaturating", d_steps=1, max_grad_norm=float("inf"))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = torch.tensor([0, 1, 2, 1, 0])
    field = push_field(trainer.g_loss, x, y)
    for n in range(5):
        point = x[n:n + 1].clone().requires_grad_(True)
        (w,) = torch.autograd.grad(F.softplus(-trainer.discriminator(point, y[n:n + 1])).sum(), point)
        torch.testing.assert_close(field[n], -w[0], rtol=0, atol=1e-14)
    assert float((push_field(trainer.g_loss, x, (y + 1) % C) - field).abs().max()) > 1e-6


def test_resume_from_a_checkpoint_continues_bit_for_bit(tmp_path):
    z, y = probes()

    def build(directory):
        trainer = _trainer(class_sampling="uniform", checkpoint_dir=directory, checkpoint_every=2)
        analyzer = GANKernelAnalyzer(trainer.generator, trainer.discriminator, z, probe_classes=y, num_groups=2,
                                     window=2, eval_every=1)
        trainer.callbacks.append(analyzer)
        return trainer, analyzer

    straight, straight_analyzer = build(tmp_path / "a")
    straight.train(4)
    first, _ = build(tmp_path / "b")
    first.train(2)
    resumed, resumed_analyzer = build(tmp_path / "b")
    resumed.train(4, resume=True)
    for a, b in zip(parameters(straight.generator, straight.discriminator),
                    parameters(resumed.generator, resumed.discriminator)):
        assert torch.equal(a, b)
    assert straight.history == resumed.history
    for part in ("delta", "contributions", "rest", "residual"):
        assert torch.equal(getattr(straight_analyzer.generator_ledger(), part),
                           getattr(resumed_analyzer.generator_ledger(), part))
        assert torch.equal(getattr(straight_analyzer.discriminator_ledger, part),
                           getattr(resumed_analyzer.discriminator_ledger, part))
    # a conditional checkpoint is refused by an unconditional trainer (and the other way round)
    data, labels = dataset()
    plain = GANTrainer(PlainG().to(F64), nn.Sequential(nn.Linear(2, 1)).to(F64), data, labels=labels, batch_size=B,
                       checkpoint_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="num_classes"):
        plain.train(4, resume=True)


# -- the observed loop ---------------------------------------------------------------------------------------------

def _observed(route, batches, d_probes=None):
    """An observed loop on the native or wrapper route; ``d_probes``: ``(points [P, 2], classes [P])`` for D's
    ledger, given at construction (D's tracker is then built at bind), or None (the first batch's rows)."""
    g, d = players()
    g_opt, d_opt = torch.optim.Adam(g.parameters(), lr=1e-2), torch.optim.SGD(d.parameters(), lr=0.05)
    z, y = probes()
    if route == "native":
        given = {} if d_probes is None else {"discriminator_probes": d_probes[0], "discriminator_probe_classes": d_probes[1]}
        analyzer = GANKernelAnalyzer(g, d, z, probe_classes=y, grouping=by_sign, num_groups=2, controls=1, window=2,
                                     eval_every=1, **given)
    else:
        given = {} if d_probes is None else {"discriminator_probes": with_class(*d_probes)}
        analyzer = GANKernelAnalyzer(WithClassG(g), WithClassD(d), with_class(z, y), grouping=by_sign, num_groups=2,
                                     controls=1, window=2, eval_every=1, **given)
    analyzer.rng.manual_seed(1)  # as in _run_owned
    analyzer.bind(g_opt, d_opt)
    _observed_loop(route, g, d, g_opt, d_opt, analyzer, batches)
    return analyzer, g, d


def _native_observer(g, d, d_probes):
    z, y = probes()
    return GANKernelAnalyzer(g, d, z, probe_classes=y, num_groups=2, window=2, eval_every=1,
                             discriminator_probes=d_probes[0], discriminator_probe_classes=d_probes[1])


def _observed_loop(route, g, d, g_opt, d_opt, analyzer, batches):
    ones = torch.ones(B, dtype=F64)
    roles = torch.cat([torch.ones(B), torch.zeros(B)]).long()
    for real, real_y, z_d, z_g, y_g, _ in batches:
        classes = torch.cat([real_y, real_y])
        with torch.no_grad():
            fake = g(z_d, real_y)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        if route == "native":
            losses = F.binary_cross_entropy_with_logits(d(x, classes), roles.to(F64), reduction="none")
            analyzer.observe_discriminator(losses, roles, x, classes=classes)
        else:
            xc = with_class(x, classes)
            losses = F.binary_cross_entropy_with_logits(WithClassD(d)(xc), roles.to(F64), reduction="none")
            analyzer.observe_discriminator(losses, roles, xc)
        losses.mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        if route == "native":
            fake = g(z_g, y_g)
            losses = F.binary_cross_entropy_with_logits(d(fake, y_g), ones, reduction="none")
            analyzer.observe_generator(losses, z_g, fake, classes=y_g)
        else:
            zc = with_class(z_g, y_g)
            fake = WithClassG(g)(zc)
            losses = F.binary_cross_entropy_with_logits(WithClassD(d)(fake), ones, reduction="none")
            analyzer.observe_generator(losses, zc, fake)
        losses.mean().backward()
        g_opt.step()


@pytest.mark.parametrize("given_probes", [False, True])
def test_an_observed_loop_gives_the_wrapper_routes_ledgers(given_probes):
    batches = _batches(3, seed=9)
    d_probes = (torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64), torch.tensor([0, 1, 2, 2, 1])) \
        if given_probes else None
    native, g1, d1 = _observed("native", batches, d_probes)
    wrapped, g2, d2 = _observed("wrapper", batches, d_probes)
    for a, b in zip(parameters(g1, d1), parameters(g2, d2)):
        assert torch.equal(a, b)
    for name in ("geometry", "control_0"):
        mine, theirs = native.generator_ledger(name), wrapped.generator_ledger(name)
        assert mine.steps == 3
        for part in ("delta", "contributions", "rest", "residual"):
            torch.testing.assert_close(getattr(mine, part), getattr(theirs, part)[..., :2], rtol=0, atol=1e-12)
    for part in ("delta", "contributions", "rest", "residual"):
        torch.testing.assert_close(getattr(native.discriminator_ledger, part),
                                   getattr(wrapped.discriminator_ledger, part), rtol=0, atol=1e-12)


def test_a_resumed_observed_conditional_loop_continues_its_ledgers_exactly(tmp_path):
    batches = _batches(4, seed=12)
    d_probes = (torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64), torch.tensor([2, 0, 1, 0]))

    def start():
        g, d = players()
        return g, d, torch.optim.Adam(g.parameters(), lr=1e-2), torch.optim.SGD(d.parameters(), lr=0.05)

    g, d, g_opt, d_opt = start()
    straight = _native_observer(g, d, d_probes)
    straight.bind(g_opt, d_opt)
    _observed_loop("native", g, d, g_opt, d_opt, straight, batches)

    g, d, g_opt, d_opt = start()
    first = _native_observer(g, d, d_probes)
    first.bind(g_opt, d_opt)
    _observed_loop("native", g, d, g_opt, d_opt, first, batches[:2])
    first.save(tmp_path / "gan.pt")
    saved = [m.state_dict() for m in (g, d, g_opt, d_opt)]
    g, d, g_opt, d_opt = start()
    for module, state in zip((g, d, g_opt, d_opt), saved):
        module.load_state_dict(state)
    resumed = _native_observer(g, d, d_probes)
    resumed.load(tmp_path / "gan.pt")
    resumed.bind(g_opt, d_opt, start_step=2)
    _observed_loop("native", g, d, g_opt, d_opt, resumed, batches[2:])
    for part in ("delta", "contributions", "rest", "residual"):
        assert torch.equal(getattr(straight.generator_ledger(), part), getattr(resumed.generator_ledger(), part))
        assert torch.equal(getattr(straight.discriminator_ledger, part), getattr(resumed.discriminator_ledger, part))
    assert resumed.g_loop_steps == [1, 2, 3, 4]
    # the discriminator probes' classes are part of the saved state (as the probes are)
    assert torch.equal(resumed.discriminator_probe_classes, d_probes[1])
    assert torch.equal(resumed.d_tracker.probes[1], d_probes[1])


# -- refusals ------------------------------------------------------------------------------------------------------

def test_a_conditional_trainer_refuses_what_it_cannot_train_exactly():
    data, labels = dataset()
    g, d = players()
    with pytest.raises(ValueError, match="labels="):
        GANTrainer(g, d, data, num_classes=C, batch_size=B)
    with pytest.raises(ValueError, match=r"relabel the classes"):
        GANTrainer(g, d, data, labels=labels + 1, num_classes=C, batch_size=B)
    with pytest.raises(TypeError, match="integer class ids"):
        GANTrainer(g, d, data, labels=labels.double(), num_classes=C, batch_size=B)
    with pytest.raises(ValueError, match="class_sampling"):
        GANTrainer(g, d, data, labels=labels, num_classes=C, class_sampling="balanced", batch_size=B)
    with pytest.raises(TypeError, match="pass num_classes= and labels="):
        GANTrainer(g, d, data, labels=labels, batch_size=B)  # a conditional G without num_classes
    with pytest.raises(ValueError, match="pass num_classes="):
        GANTrainer(PlainG().to(F64), d, data, labels=labels, class_sampling="uniform", batch_size=B)
    with pytest.raises(TypeError, match="drop num_classes"):
        GANTrainer(PlainG().to(F64), d, data, labels=labels, num_classes=C, batch_size=B)
    trainer = GANTrainer(g, d, data, labels=labels, num_classes=C, batch_size=B)
    with pytest.raises(ValueError, match="pass classes="):
        trainer.sample(torch.zeros(2, NZ, dtype=F64))


def test_the_analyzer_refuses_missing_wrong_or_unneeded_classes():
    g, d = players()
    z, y = probes()
    with pytest.raises(ValueError, match="pass probe_classes="):
        GANKernelAnalyzer(g, d, z)
    with pytest.raises(ValueError, match="drop probe_classes"):
        GANKernelAnalyzer(PlainG().to(F64), nn.Sequential(nn.Linear(2, 1)).to(F64), z, probe_classes=y, num_classes=C)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        GANKernelAnalyzer(g, d, z, probe_classes=y + 1)
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        GANKernelAnalyzer(g, d, z, probe_classes=y[:4])
    with pytest.raises(TypeError, match="integer class ids"):
        GANKernelAnalyzer(g, d, z, probe_classes=F.one_hot(y, C).double())

    class Anonymous(CondG):  # no num_classes attribute to fall back on
        num_classes = None

    with pytest.raises(ValueError, match="needs num_classes="):
        GANKernelAnalyzer(Anonymous().to(F64), d, z, probe_classes=y)
    analyzer = GANKernelAnalyzer(g, d, z, probe_classes=y)
    analyzer.bind(torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1))
    zb, yb = torch.randn(B, NZ, dtype=F64), torch.arange(B) % C
    fake = g(zb, yb)
    losses = F.softplus(-d(fake, yb))
    with pytest.raises(ValueError, match="pass the step's classes"):
        analyzer.observe_generator(losses, zb, fake)
    with pytest.raises(ValueError, match=r"relabel the classes"):
        analyzer.observe_generator(losses, zb, fake, classes=yb + 3)
    with pytest.raises(ValueError, match="pass the step's classes"):
        analyzer.observe_discriminator(losses, torch.zeros(B, dtype=torch.long), fake.detach())


def test_an_unconditional_trainers_steps_are_refused_by_a_conditional_analyzer():
    """A conditional analyzer attached to a trainer built without num_classes would read steps without classes."""
    data, labels = dataset()
    g, d = players()
    z, y = probes()
    analyzer = GANKernelAnalyzer(g, d, z, probe_classes=y, num_groups=2, window=1, eval_every=1)
    loss = GeneratorLoss(d, conditional=True, num_classes=C)
    from genkernel.core.tracking.step import OptimizerStep

    zb, yb = torch.randn(B, NZ, dtype=F64), torch.arange(B) % C
    step = OptimizerStep(g, torch.optim.SGD(g.parameters(), lr=0.1), loss, (zb, yb), (yb + 1) % C, phase="generator")
    with pytest.raises(ValueError, match="targets must be its classes"):
        analyzer.perform(step)
    with pytest.raises(ValueError, match="call it as loss"):
        loss(g(zb, yb))


def test_the_conditional_dcgan_config_trains_and_its_ledger_ends_at_the_probes_outputs_and_adds_up():
    """configs.cdcgan64_*: class embedding into G's latents and a class map into D's input channels; BatchNorm in
    training mode in both, D ending in a Sigmoid. The generator's ledger ends at G(z', y') (eval mode, as the
    tracker evaluates probes) and adds up."""
    from genkernel.gan.configs import cdcgan64_discriminator, cdcgan64_generator

    G = cdcgan64_generator(C, nz=4, ngf=2, nc=1, seed=0).to(F64)
    D = cdcgan64_discriminator(C, ndf=2, nc=1, seed=1).to(F64)
    assert G.latent_dim == 4 and G.num_classes == C
    data, labels = torch.rand(8, 1, 64, 64, dtype=F64) * 2 - 1, torch.arange(8) % C
    z, y = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64), torch.arange(3)
    analyzer = GANKernelAnalyzer(G, D, z, probe_classes=y, grouping="class", window=1, eval_every=1)
    trainer = GANTrainer(G, D, data, labels=labels, num_classes=C, output="probability", batch_size=4,
                         callbacks=[analyzer])
    trainer.train(1)
    with torch.no_grad():
        after = G.eval()(z, y).reshape(3, -1)
    G.train()
    ledger = analyzer.generator_ledger()
    # the ledger ends at G's outputs at (z', y'); it starts after the discriminator step's G(z, y) moved G's
    # BatchNorm statistics, so its start is not G before training: the identity ties the two ends
    torch.testing.assert_close(ledger.f_end, after, rtol=0, atol=1e-12)
    total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12)
    assert ledger.relative_residual() < 1e-2
    assert ledger.contributions.shape == (3, C, 64 * 64)


@pytest.mark.parametrize("given_probes", [True, False])
def test_an_observed_loop_with_a_plain_sgd_discriminator_resumes(tmp_path, given_probes):
    """Unconditional too (found while adding resume for conditional loops): an observed loop's discriminator
    tracker switches to the dense route at its first micro-batch, so its saved state is dense; the resumed
    analyzer built a plain-SGD D's tracker factored again and refused its own state ("the saved tracker had
    ... group_state='dense'; this one has ... 'factored'"). Resumed, the ledgers continue bit for bit."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(B, 2, generator=gen, dtype=F64), torch.randn(B, NZ, generator=gen, dtype=F64),
             torch.randn(B, NZ, generator=gen, dtype=F64)) for _ in range(3)]
    roles = torch.cat([torch.ones(B), torch.zeros(B)]).long()
    d_probes = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)

    def start():
        torch.manual_seed(0)
        g, d = PlainG().to(F64), nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1)).to(F64)
        analyzer = GANKernelAnalyzer(g, d, probes()[0], num_groups=2, window=1, eval_every=1,
                                     discriminator_probes=d_probes if given_probes else None)
        return g, d, torch.optim.Adam(g.parameters(), lr=1e-2), torch.optim.SGD(d.parameters(), lr=0.05), analyzer

    def loop(g, d, g_opt, d_opt, analyzer, batches):
        for real, z_d, z_g in batches:
            with torch.no_grad():
                x = torch.cat([real, g(z_d)])
            d_opt.zero_grad()
            losses = F.binary_cross_entropy_with_logits(d(x).squeeze(1), roles.to(F64), reduction="none")
            analyzer.observe_discriminator(losses, roles, x)
            losses.mean().backward()
            d_opt.step()
            g_opt.zero_grad()
            fake = g(z_g)
            losses = F.softplus(-d(fake).squeeze(1))
            analyzer.observe_generator(losses, z_g, fake)
            losses.mean().backward()
            g_opt.step()

    *players_, straight = start()
    straight.bind(*players_[2:])
    loop(*players_, straight, data)
    g, d, g_opt, d_opt, first = start()
    first.bind(g_opt, d_opt)
    loop(g, d, g_opt, d_opt, first, data[:2])
    first.save(tmp_path / "gan.pt")
    saved = [m.state_dict() for m in (g, d, g_opt, d_opt)]
    g, d, g_opt, d_opt, resumed = start()
    for module, state in zip((g, d, g_opt, d_opt), saved):
        module.load_state_dict(state)
    resumed.load(tmp_path / "gan.pt")
    resumed.bind(g_opt, d_opt, start_step=2)
    loop(g, d, g_opt, d_opt, resumed, data[2:])
    for part in ("delta", "contributions", "rest", "residual"):
        assert torch.equal(getattr(straight.discriminator_ledger, part), getattr(resumed.discriminator_ledger, part))
        assert torch.equal(getattr(straight.generator_ledger(), part), getattr(resumed.generator_ledger(), part))
