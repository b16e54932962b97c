"""Lazy R1 in GANTrainer (``r1_interval`` k > 1, StyleGAN2's lazy regularization): after every k-th
discriminator step a regularization step of its own on that step's real rows, its loss γ·k/2·‖∇_x D(x)‖².
Checked against a hand-written float64 loop, with the analyzer attached (training unchanged, each
regularization step's penalty column pushed by hand), across an interrupted and resumed run, and its
refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from genkernel import TrainerCallback
from genkernel.core.adapter import seeded_generator
from genkernel.gan import GANKernelAnalyzer, GANTrainer
from genkernel.gan.losses import PENALTY, REAL

from test_gan_r1 import B, F64, GAMMA, LATENT, LR_D, LR_G, _data, _data_term, _flat, _pair

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2  # r1_interval


def _lazy(kind, data, callbacks=(), pair=None, **kw):
    G, D = _pair() if pair is None else pair
    return GANTrainer(G, D, data, loss=kind, r1_gamma=GAMMA, r1_interval=K, batch_size=B, seed=0,
                      callbacks=list(callbacks), g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                      d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), **kw)


def _r1_term(D, real, gamma):
    """γ/2 · mean over the rows of ‖∇_x D(x)‖², by autograd (StyleGAN2's regularization loss at weight γ)."""
    real = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
    return gamma / 2 * g.pow(2).sum(1).mean()


def _sgd_step(module, loss, lr):
    """An SGD step on ``loss``; a parameter it does not reach (the output bias in ‖∇_x D‖) keeps its value."""
    grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)
    with torch.no_grad():
        for p, g in zip(module.parameters(), grads):
            if g is not None:
                p -= lr * g


def _lazy_reference(kind, iterations, d_steps, data, update=_sgd_step):
    """StyleGAN2's lazy loop by hand with the trainer's documented draws (per D step its real rows then its
    latents, per G step its latents): after every K-th D step an update on γ·K/2·mean‖∇_x D(real)‖² of that
    step's real rows; every update is ``update(module, loss, lr)``. Returns (G, D, the penalties of the
    regularization steps)."""
    G, D = _pair()
    gen = seeded_generator(0)
    penalties, main_steps = [], 0
    for _ in range(iterations):
        for _ in range(d_steps):
            real = data[torch.randint(0, data.shape[0], (B,), generator=gen)]
            z = torch.randn(B, LATENT, generator=gen, dtype=F64)
            with torch.no_grad():
                fake = G(z)
            update(D, _data_term(kind, D, real, fake), LR_D)
            main_steps += 1
            if main_steps % K == 0:
                term = _r1_term(D, real, GAMMA * K)
                penalties.append(float(term.detach()))
                update(D, term, LR_D)
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        D.requires_grad_(False)
        s = D(G(z)).reshape(-1)
        update(G, F.softplus(-s).mean() if kind == "nonsaturating" else -s.mean(), LR_G)
        D.requires_grad_(True)
    return G, D, penalties


@pytest.mark.parametrize("kind, d_steps", [("nonsaturating", 1), ("hinge", 2)])
def test_lazy_r1_training_equals_stylegan2s_loop_written_by_hand(kind, d_steps):
    data = _data()
    G0, D0, penalties = _lazy_reference(kind, 3, d_steps, data)
    trainer = _lazy(kind, data, d_steps=d_steps)
    trainer.train(3)
    torch.testing.assert_close(_flat(trainer.discriminator), _flat(D0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(trainer.generator), _flat(G0), rtol=1e-10, atol=1e-12)
    main = 3 * d_steps
    assert trainer.r1_steps_done == main // K == len(penalties) and trainer.d_steps_done == main + main // K
    assert len(trainer.history["d_loss"]) == main
    torch.testing.assert_close(torch.tensor(trainer.history["r1_penalty"]), torch.tensor(penalties),
                               rtol=1e-10, atol=0)
    # the regularization moved D: every-step R1 at γ (r1_interval=1) ends elsewhere
    G1, D1 = _pair()
    eager = GANTrainer(G1, D1, data, loss=kind, r1_gamma=GAMMA, batch_size=B, seed=0, d_steps=d_steps,
                       g_optimizer=torch.optim.SGD(G1.parameters(), lr=LR_G),
                       d_optimizer=torch.optim.SGD(D1.parameters(), lr=LR_D))
    eager.train(3)
    assert float((_flat(D1) - _flat(D0)).abs().max()) > 1e-4


class StepRecorder(TrainerCallback):
    """Outermost callback: each discriminator step's rows and D's parameters before and after it, and the
    analyzer's penalty column before and after (the analyzer, inside, has booked the step when perform returns)."""

    def __init__(self, analyzer=None):
        self.analyzer, self.steps = analyzer, []

    def _penalty_column(self):
        if self.analyzer is None or self.analyzer.d_tracker is None:
            return None
        return self.analyzer.discriminator_ledger.contributions[:, PENALTY].clone()

    def wrap_step(self, trainer, step, perform):
        if step.phase != "discriminator":
            return perform()
        before = {n: p.detach().clone() for n, p in trainer.discriminator.named_parameters()}
        column = self._penalty_column()
        losses = perform()
        self.steps.append({"regularization": bool(step.info.get("regularization", False)),
                           "x": step.inputs[0].clone(), "roles": step.inputs[1].clone(), "before": before,
                           "after": {n: p.detach().clone() for n, p in trainer.discriminator.named_parameters()},
                           "column_before": column, "column_after": self._penalty_column()})
        return losses


def test_the_analyzer_books_each_regularization_step_as_penalty_rows_and_leaves_training_as_it_was():
    """Under the analyzer: D and G bit for bit as without it; D's ledger has one step per D update; each
    regularization step's rows are the real rows of the D step before it, all penalty rows; the penalty column
    moves only at regularization steps, each time by the SGD update of γ·K/2·mean‖∇_x D(x)‖² pushed through
    D's probe Jacobian at the step's midpoint (by hand); the identity closes."""
    data = _data()
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    plain = _lazy("nonsaturating", data)
    plain.train(3)
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_groups=2, window=8, eval_every=1,
                                 discriminator_probes=probes)
    recorder = StepRecorder(analyzer)
    trainer = _lazy("nonsaturating", data, callbacks=[recorder, analyzer], pair=(G, D))
    trainer.train(3)
    assert torch.equal(_flat(trainer.discriminator), _flat(plain.discriminator))
    assert torch.equal(_flat(trainer.generator), _flat(plain.generator))
    ledger = analyzer.discriminator_ledger
    assert ledger.steps == trainer.d_steps_done == 4 and [s["regularization"] for s in recorder.steps] == \
        [False, False, True, False]

    D0 = _pair()[1]
    checked = 0
    for i, s in enumerate(recorder.steps):
        if i == 0:
            continue  # (the ledger does not exist before the first step)
        moved = s["column_after"] - s["column_before"]
        if not s["regularization"]:
            assert float(moved.abs().max()) == 0.0 and not bool((s["roles"] == PENALTY).any())
            continue
        previous = recorder.steps[i - 1]
        assert torch.equal(s["x"], previous["x"][previous["roles"] == REAL]) and bool((s["roles"] == PENALTY).all())
        theta0, theta1 = s["before"], s["after"]
        D0.load_state_dict(theta0)
        grads = dict(zip(theta0, torch.autograd.grad(_r1_term(D0, s["x"], GAMMA * K), list(D0.parameters()),
                                                     allow_unused=True)))
        mid = {n: (theta0[n] + theta1[n]) / 2 for n in theta0}
        jac = jacrev(lambda params: functional_call(D0, params, (probes,)).reshape(-1))(mid)
        pushed = sum(jac[n].reshape(probes.shape[0], -1) @ (-LR_D * grads[n]).reshape(-1)
                     for n in grads if grads[n] is not None)
        assert float(pushed.abs().max()) > 1e-6
        torch.testing.assert_close(moved.reshape(-1), pushed, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked == 1
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)


class RefuseFirstRegularization(TrainerCallback):
    """Raises in the first regularization step's wrap_step, before it is performed (an interrupt there)."""

    def __init__(self):
        self.fired = False

    def wrap_step(self, trainer, step, perform):
        if step.info.get("regularization") and not self.fired:
            self.fired = True
            raise KeyboardInterrupt("stopped before the regularization step")
        return perform()


def test_a_run_interrupted_before_its_owed_regularization_step_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    """The owed step's real rows are in the checkpoint: the resumed run makes that regularization step on them,
    then goes on as the uninterrupted run (parameters, histories, counts equal); a checkpoint written at an
    iteration's end resumes bit for bit too."""
    data = _data()
    straight = _lazy("nonsaturating", data, d_steps=1)
    straight.train(5)

    stopped = _lazy("nonsaturating", data, callbacks=[RefuseFirstRegularization()], d_steps=1)
    with pytest.raises(KeyboardInterrupt):
        stopped.train(5)
    assert stopped.d_steps_done == 2 and stopped.r1_steps_done == 0 and stopped.iteration == 1
    stopped.save_checkpoint(tmp_path / "owed.pt")
    resumed = _lazy("nonsaturating", data, d_steps=1)
    resumed.load_checkpoint(tmp_path / "owed.pt")
    resumed.train(5)
    assert torch.equal(_flat(resumed.discriminator), _flat(straight.discriminator))
    assert torch.equal(_flat(resumed.generator), _flat(straight.generator))
    assert resumed.history == straight.history and resumed.r1_steps_done == straight.r1_steps_done == 2

    half = _lazy("nonsaturating", data, d_steps=1, checkpoint_dir=tmp_path / "run", checkpoint_every=3)
    half.train(3)
    again = _lazy("nonsaturating", data, d_steps=1, checkpoint_dir=tmp_path / "run")
    again.train(5, resume=True)
    assert torch.equal(_flat(again.discriminator), _flat(straight.discriminator))
    assert again.history == straight.history and again.d_steps_done == straight.d_steps_done


def test_a_checkpoint_resumes_only_at_its_own_interval_and_forward_layout(tmp_path):
    trainer = _lazy("nonsaturating", _data())
    trainer.train(1)
    trainer.save_checkpoint(tmp_path / "run.pt")
    with pytest.raises(ValueError, match="r1_interval: saved 2, here 1"):
        GANTrainer(*_pair(), _data(), r1_gamma=GAMMA, batch_size=B).load_checkpoint(tmp_path / "run.pt")
    with pytest.raises(ValueError, match="discriminator_batches: saved 'joint', here 'separate'"):
        _lazy("nonsaturating", _data(), discriminator_batches="separate").load_checkpoint(tmp_path / "run.pt")


def test_steps_out_of_order_are_refused_naming_the_fix():
    trainer = _lazy("nonsaturating", _data())
    with pytest.raises(RuntimeError, match="no regularization step is owed"):
        trainer.regularization_step()
    trainer.discriminator_step()
    trainer.discriminator_step()
    with pytest.raises(RuntimeError, match=r"call regularization_step\(\) before the next discriminator step"):
        trainer.discriminator_step()
    with pytest.raises(RuntimeError, match=r"call regularization_step\(\) before the next generator step"):
        trainer.generator_step()
    trainer.regularization_step()
    assert trainer.r1_steps_done == 1 and trainer.d_steps_done == 3
    with pytest.raises(RuntimeError, match="with r1_interval=1 the penalty is in every discriminator step"):
        GANTrainer(*_pair(), _data(), r1_gamma=GAMMA, batch_size=B).regularization_step()


@pytest.mark.parametrize("bad, match", [
    (dict(r1_interval=2, r1_gamma=0.0), "r1_gamma is 0"),
    (dict(r1_interval=0, r1_gamma=GAMMA), "r1_interval must be"),
    (dict(r1_interval=True, r1_gamma=GAMMA), "r1_interval must be"),
    (dict(r1_interval=2.5, r1_gamma=GAMMA), "r1_interval must be"),
    (dict(discriminator_batches="split"), "discriminator_batches must be one of"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        GANTrainer(*_pair(), _data(), batch_size=B, **bad)


def test_the_learning_rate_schedule_counts_discriminator_steps_not_regularization_steps():
    """A StepLR of D halving its rate every discriminator step: after 4 discriminator steps and 2 regularization
    steps the rate is halved 4 times; a regularization step runs at D's current rate (the next D step's)."""
    seen = []

    class Rates(TrainerCallback):
        def wrap_step(self, trainer, step, perform):
            if step.phase == "discriminator":
                seen.append((bool(step.info.get("regularization")), step.optimizer.param_groups[0]["lr"]))
            return perform()

    trainer = _lazy("nonsaturating", _data(), callbacks=[Rates()],
                    lr_scheduler_d=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    trainer.train(4)
    assert trainer.d_optimizer.param_groups[0]["lr"] == LR_D / 2 ** 4
    assert seen == [(False, LR_D), (False, LR_D / 2), (True, LR_D / 4), (False, LR_D / 4), (False, LR_D / 8),
                    (True, LR_D / 16)]


@pytest.mark.parametrize("group_state, gradient_route", [("factored", "auto"), ("dense", "example")])
def test_a_penalized_critics_tracker_takes_the_graph_by_default_and_books_what_the_per_example_routes_book(
        group_state, gradient_route):
    """The critic's forward branches on whether the batch holds penalty rows, so the factored engine leaves its
    layers to torch.func: "auto" now takes the group rows from the training graph (per-example passes formed
    the input gradient of every row, 16–18 % slower on DCGAN-64). Over main steps and regularization steps (plain
    SGD) its ledger equals the per-example routes' to 1e-12 of its scale."""
    from genkernel import OptimizerStep, PathKernelTracker
    from genkernel.gan.losses import DiscriminatorLoss, DiscriminatorObjective

    data = _data()
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    gen = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(2):
        real, fake = data[torch.randint(0, 20, (B,), generator=gen)], torch.randn(B, 2, generator=gen, dtype=F64)
        roles = torch.cat([torch.full((B,), REAL), torch.zeros(B, dtype=torch.long)])
        steps += [(torch.cat([real, fake]), roles), (real, torch.full((B,), PENALTY))]

    def ledger(**routes):
        D = _pair()[1]
        critic = DiscriminatorObjective(D, penalty=True)
        optimizer = torch.optim.SGD(critic.parameters(), lr=LR_D)
        loss = DiscriminatorLoss(r1_gamma=GAMMA * K)
        roles_of_probes = torch.zeros(6, dtype=torch.long)
        tracker = PathKernelTracker(critic, optimizer, loss, (probes, roles_of_probes), num_groups=3, **routes)
        for x, roles in steps:
            tracker.track(OptimizerStep(critic, optimizer, loss, (x, roles), roles,
                                        torch.full((x.shape[0],), 1.0 / B, dtype=F64)), roles)
        return tracker

    auto = ledger()
    assert auto.group_state == "dense" and auto.route.uses_graph()
    other = ledger(group_state=group_state, gradient_route=gradient_route)
    assert not other.route.uses_graph() if group_state == "dense" else other.group_state == "factored"
    mine, theirs = auto.ledger, other.ledger
    scale = float(theirs.contributions.abs().max())
    assert float(theirs.contributions[:, PENALTY].abs().max()) > 1e-3 * scale
    for field in ("contributions", "rest", "residual", "delta"):
        torch.testing.assert_close(getattr(mine, field), getattr(theirs, field), rtol=0, atol=1e-12 * scale, msg=field)
