"""Review of lazy R1 (``GANTrainer(r1_interval=k)``), separate discriminator forwards
(``discriminator_batches="separate"``) and the penalty objective's plain forward for batches without penalty
rows (``DiscriminatorObjective.data_dependent_forward``, left to torch.func by ``make_plan``), in combination:
an error after a regularization step's update, a BatchNorm discriminator, an analyzer attached at an owed
regularization step, micro-batches with clipping and several discriminator steps against a loop written by
hand, a GradScaler's skip of a regularization step, conditional GANs, a DataLoader resumed at an owed step,
and gradient kernels of the penalty objective."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genkernel import TrainerCallback
from genkernel.core.engine.kernels import gradient_kernel
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator
from genkernel.gan.losses import PENALTY, DiscriminatorObjective

from test_gan_r1 import B, F64, GAMMA, LATENT, LR_D, LR_G, _data, _flat, _pair
from test_gan_lazy_r1 import _lazy_reference

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2  # r1_interval


def _sgd_trainer(pair, data, callbacks=(), **kw):
    G, D = pair
    return GANTrainer(G, D, data, batch_size=B, seed=0, callbacks=list(callbacks),
                      g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                      d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), **kw)


def _lazy(callbacks=(), pair=None, data=None, **kw):
    """A hinge GAN with lazy R1 at γ = GAMMA every K discriminator steps, plain SGD, float64."""
    kw = {"loss": "hinge", "r1_gamma": GAMMA, "r1_interval": K, **kw}
    return _sgd_trainer(_pair() if pair is None else pair, _data() if data is None else data, callbacks, **kw)


def _same_run(a, b):
    """Whether two trainers hold the same parameters (bit for bit), counts and histories."""
    return (torch.equal(_flat(a.discriminator), _flat(b.discriminator)) and torch.equal(_flat(a.generator), _flat(b.generator))
            and (a.d_steps_done, a.r1_steps_done, a.g_steps) == (b.d_steps_done, b.r1_steps_done, b.g_steps)
            and a.history == b.history)


def _identity_gap(analyzer):
    """max |Δ - (Σ contributions + rest + residual)| of the discriminator ledger (0 up to rounding)."""
    ledger = analyzer.discriminator_ledger
    return float((ledger.delta - (ledger.contributions.sum(1) + ledger.rest + ledger.residual)).abs().max())


class FailAfterFirstRegularization(TrainerCallback):
    """Raises in ``on_step_end`` of the first regularization step: after its update is in D's parameters."""

    def __init__(self):
        self.failed = False

    def on_step_end(self, trainer, step):
        if step.info.get("regularization") and not self.failed:
            self.failed = True
            raise RuntimeError("the experiment tracker is down")


class InterruptAtRegularization(TrainerCallback):
    """Interrupts the ``n``-th regularization step before its update (as Ctrl-C during its forward)."""

    def __init__(self, n=1):
        self.n, self.seen = n, 0

    def wrap_step(self, trainer, step, perform):
        if step.info.get("regularization"):
            self.seen += 1
            if self.seen == self.n:
                raise KeyboardInterrupt
        return perform()


@pytest.mark.parametrize("where", ["callback", "logger"])
def test_an_error_after_a_regularization_steps_update_leaves_nothing_owed_and_train_again_is_the_straight_run(where):
    """A callback's ``on_step_end`` (or the ``log=`` function) raising after a regularization step's update: the
    update is made and counted, so train() again must not make it a second time. Fault found: the step stayed
    owed (``_r1_batch`` kept), train() again regularized D twice on the same rows (7 D updates and 3
    regularization steps where the straight run makes 6 and 2, D's parameters different)."""
    straight = _lazy()
    straight.train(4)
    if where == "callback":
        trainer, error = _lazy(callbacks=[FailAfterFirstRegularization()]), RuntimeError
    else:
        raised = []

        def log(metrics, step):
            if "loss/r1" in metrics and not raised:
                raised.append(step)
                raise OSError("disk full")

        trainer, error = _lazy(log=log), OSError
    with pytest.raises(error):
        trainer.train(4)
    assert trainer.r1_steps_done == 1 and trainer._r1_batch is None
    trainer.train(4)
    assert _same_run(trainer, straight) and straight.d_steps_done == 6 and straight.r1_steps_done == 2


def _bn_discriminator():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.2), nn.Linear(6, 1)).to(F64).train()


@pytest.mark.parametrize("layout", ["joint", "separate"])
def test_lazy_r1_refuses_a_batchnorm_discriminator_before_its_first_step_moves_anything(layout):
    """R1 needs a D that treats examples independently (BatchNorm in training mode is refused, as for WGAN-GP),
    and every-step R1 refuses it before anything moves. Fault found: with r1_interval=k the k main steps (no
    penalty rows: a plain forward, unchecked) trained D and moved its BatchNorm statistics, and only the first
    regularization step was refused (d_steps_done == 2 at the refusal)."""
    G, _ = _pair()
    D = _bn_discriminator()
    trainer = _lazy(pair=(G, D), discriminator_batches=layout)
    before, stats = _flat(D).clone(), D[1].running_mean.clone()
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        trainer.train(3)
    assert trainer.d_steps_done == 0 and torch.equal(_flat(D), before) and torch.equal(D[1].running_mean, stats)


def test_an_analyzer_attached_at_an_owed_regularization_step_takes_its_real_rows_as_probes():
    """A run interrupted at its regularization step, an analyzer then attached (a resumed run's new analyzer):
    the first discriminator step it sees holds penalty rows only, which are that step's real rows. Its default
    probes are those rows; training is bit for bit the run without it; the ledger's identity closes. Fault
    found: the probes were the step's real and generated rows, none here: 'probes is empty (batch size 0)',
    training stopped."""
    def interrupted():
        trainer = _lazy(callbacks=[InterruptAtRegularization()])
        with pytest.raises(KeyboardInterrupt):
            trainer.train(4)
        trainer.callbacks = []
        return trainer

    plain = interrupted()
    owed = plain._r1_batch["real"].clone()
    plain.train(4)
    trainer = interrupted()
    analyzer = GANKernelAnalyzer(trainer.generator, trainer.discriminator, torch.randn(4, LATENT, dtype=F64),
                                 num_groups=2, window=4, eval_every=1)
    trainer.callbacks = [analyzer]
    trainer.train(4)
    assert _same_run(trainer, plain)
    assert torch.equal(analyzer.discriminator_probes, owed)
    assert analyzer.discriminator_ledger.steps == trainer.d_steps_done - 2 and _identity_gap(analyzer) < 1e-12


def _clipped_sgd(module, loss, lr, max_norm):
    """An SGD step on ``loss`` after global-norm clipping as torch's clip_grad_norm_ (factor max/(norm + 1e-6),
    at most 1); a parameter the loss does not reach (the output bias in ‖∇_x D‖) keeps its value."""
    params = list(module.parameters())
    grads = [torch.zeros_like(p) if g is None else g
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    norm = torch.cat([g.reshape(-1) for g in grads]).norm()
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * factor * g


@pytest.mark.parametrize("layout", ["joint", "separate"])
def test_lazy_r1_in_micro_batches_with_clipping_and_two_d_steps_is_the_loop_written_by_hand(layout):
    """Lazy R1 with micro_batches=2 (5 rows: 3 + 2, per kind of row under "separate"), d_steps=2 and every
    update clipped to norm 0.5 equals the hand-written float64 loop (the regularization step is clipped as an
    update of its own), and the analyzer leaves that training bit for bit. New arguments (fails on 6e59059);
    no fault found in the new code."""
    # (the regularization step clipped as an update of its own)
    G0, D0, penalties = _lazy_reference("hinge", 2, 2, _data(),
                                        update=lambda module, loss, lr: _clipped_sgd(module, loss, lr, 0.5))
    trainer = _lazy(micro_batches=2, d_steps=2, max_grad_norm=0.5, discriminator_batches=layout)
    trainer.train(2)
    torch.testing.assert_close(_flat(trainer.discriminator), _flat(D0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(trainer.generator), _flat(G0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(trainer.history["r1_penalty"]), torch.tensor(penalties), rtol=1e-10, atol=0)
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), num_groups=2, window=2, eval_every=1)
    observed = _lazy(callbacks=[analyzer], pair=(G, D), micro_batches=2, d_steps=2, max_grad_norm=0.5,
                     discriminator_batches=layout)
    observed.train(2)
    assert _same_run(observed, trainer) and analyzer.discriminator_ledger.steps == 6 and _identity_gap(analyzer) < 1e-12


def test_a_gradscaler_skip_of_a_regularization_step_keeps_it_owed_and_retries_the_same_with_the_analyzer():
    """fp16: a regularization step at a loss scale that overflows is skipped (returns None, D unchanged, still
    owed, counted in skipped_steps); train() makes it again at the lowered scale. With the analyzer
    (mixed_precision="observe") the run is bit for bit the one without it, its ledger one step per update and
    its identity exact. New arguments (fails on 6e59059); no fault found in the new code."""
    def run(analyze):
        G, D = (m.float() for m in _pair())
        analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT), num_groups=2, window=4, eval_every=1,
                                     mixed_precision="observe") if analyze else None
        trainer = _lazy(callbacks=[analyzer] if analyze else [], pair=(G, D), data=_data().float(), mixed_precision="fp16")
        trainer.grad_scaler._init_scale = 8.0
        trainer.train(1)
        trainer.discriminator_step()
        assert trainer._r1_batch is not None
        before, skipped = _flat(trainer.discriminator).clone(), trainer.skipped_steps["discriminator"]
        trainer.grad_scaler.update(2.0 ** 30)
        assert trainer.regularization_step() is None
        assert trainer._r1_batch is not None and torch.equal(_flat(trainer.discriminator), before)
        assert trainer.skipped_steps["discriminator"] == skipped + 1 and trainer.r1_steps_done == 0
        trainer.train(3)
        return trainer, analyzer

    plain, _ = run(False)
    trainer, analyzer = run(True)
    assert _same_run(trainer, plain) and trainer.r1_steps_done == 2 and trainer.d_steps_done == 6
    assert analyzer.discriminator_ledger.steps == 6 and _identity_gap(analyzer) == 0.0


class _CondG(nn.Module):
    latent_dim, num_classes = LATENT, 3

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT + 3, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, z, y):
        return self.net(torch.cat([z, torch.eye(3, dtype=z.dtype)[y]], dim=1))


class _CondD(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 3, 8), nn.SiLU(), nn.Linear(8, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x, torch.eye(3, dtype=x.dtype)[y]], dim=1)).squeeze(1)


def _cond_pair():
    torch.manual_seed(0)
    return _CondG().to(F64), _CondD().to(F64)


@pytest.mark.parametrize("options", [
    dict(loss="wgan-gp", micro_batches=2, class_sampling="uniform"),
    dict(loss="nonsaturating", r1_gamma=GAMMA, r1_interval=K, d_steps=2),
], ids=["wgan-gp-micro-batches", "lazy-r1"])
def test_conditional_separate_forwards_train_as_the_joint_forward_and_as_without_the_analyzer(options):
    """A conditional D(x, y) that treats examples independently: "separate" gives the joint update up to
    rounding (each row keeps its class through the micro-batch reordering), and with the analyzer it is bit
    for bit the run without it, its ledger's identity closing. New arguments (fails on 6e59059); no fault found
    in the new code."""
    data, labels = _data(), torch.arange(20) % 3

    def run(layout, analyze=False):
        G, D = _cond_pair()
        analyzer = GANKernelAnalyzer(G, D, torch.randn(4, LATENT, dtype=F64), probe_classes=torch.arange(4) % 3,
                                     num_classes=3, num_groups=2, window=2, eval_every=1) if analyze else None
        trainer = _sgd_trainer((G, D), data, [analyzer] if analyze else [], labels=labels, num_classes=3,
                               discriminator_batches=layout, **options)
        trainer.train(2)
        return trainer, analyzer

    joint, _ = run("joint")
    separate, _ = run("separate")
    observed, analyzer = run("separate", analyze=True)
    torch.testing.assert_close(_flat(separate.discriminator), _flat(joint.discriminator), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_flat(separate.generator), _flat(joint.generator), rtol=1e-12, atol=1e-14)
    assert _same_run(observed, separate) and _identity_gap(analyzer) < 1e-12


def test_a_dataloader_run_resumed_at_an_owed_regularization_step_is_the_straight_run_logs_included(tmp_path):
    """A DataLoader (shuffled, a short last batch), d_steps=2, r1_interval=3: interrupted at its second
    regularization step, checkpointed, resumed by a new trainer: parameters, counts, histories and the logged
    "loss/r1" values are the straight run's. New arguments (fails on 6e59059); no fault found in the new code."""
    def trainer(callbacks=()):
        loader = DataLoader(TensorDataset(_data(23)), batch_size=B, shuffle=True,
                            generator=torch.Generator().manual_seed(1))
        logged = []
        t = _lazy(callbacks=callbacks, data=loader, r1_interval=3, d_steps=2,
                  log=lambda metrics, step: logged.append((step, metrics.get("loss/r1"))))
        return t, logged

    straight, straight_log = trainer()
    straight.train(6)
    stopped, stopped_log = trainer([InterruptAtRegularization(2)])
    with pytest.raises(KeyboardInterrupt):
        stopped.train(6)
    assert stopped._r1_batch is not None and stopped.r1_steps_done == 1
    stopped.save_checkpoint(tmp_path / "owed.pt")
    resumed, resumed_log = trainer()
    resumed.load_checkpoint(tmp_path / "owed.pt")
    resumed.train(6)
    assert _same_run(resumed, straight) and straight.r1_steps_done == 4
    r1_logged = [(s, v) for s, v in stopped_log + resumed_log if v is not None]
    assert r1_logged == [(s, v) for s, v in straight_log if v is not None] and len(r1_logged) == 4


def _kernel_by_hand(D, eps, x, roles):
    """``[N, N]`` J Jᵀ with row n of J the parameter gradient of D(x_n) (roles 0, 1) or of
    sqrt(‖∇_x D(x_n)‖² + eps) (role 2), each example by autograd alone."""
    params, rows = list(D.parameters()), []
    for n in range(x.shape[0]):
        xn = x[n:n + 1].clone().requires_grad_(True)
        out = D(xn).sum()
        if int(roles[n]) == PENALTY:
            (g,) = torch.autograd.grad(out, xn, create_graph=True)
            out = (g.pow(2).sum() + eps).sqrt()
        grads = torch.autograd.grad(out, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    J = torch.stack(rows)
    return J @ J.T


def test_kernels_of_the_penalty_objective_on_batches_with_and_without_penalty_rows_match_autograd():
    """coverage (passes on 6e59059, whose forward had one path): the factored engine remembers its covering
    check per kind of input (shapes, dtypes), which a batch without penalty rows (a plain forward) and one with
    them (the input gradient) share. Its kernel on the first, then on the second, must each be the per-example
    autograd kernel. With make_plan's data_dependent_forward exclusion removed the second was off by 1.7
    (silently: the plain forward's check stood for the gradient path)."""
    torch.manual_seed(0)
    D = MLPDiscriminator(2, hidden=5, depth=2).to(F64)
    critic = DiscriminatorObjective(D, penalty=True)
    x = torch.randn(6, 2, dtype=F64)
    for roles in (torch.tensor([1, 0, 1, 1, 0, 0]), torch.tensor([1, 0, 2, 1, 0, 2])):
        for engine in ("factored", "auto"):
            kernel = gradient_kernel(critic, (x, roles), engine=engine).reshape(6, 6)
            torch.testing.assert_close(kernel, _kernel_by_hand(D, critic.eps, x, roles), rtol=1e-9, atol=1e-12)
