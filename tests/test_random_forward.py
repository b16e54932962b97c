"""Forwards of the user's own modules that draw random numbers: an augmentation inside D (DiffAugment's, ADA's)
or noise injection, which no type check can name. Drawn in training mode only, a tracker takes its group
gradients from the training graph (a per-example second pass would draw other numbers); drawn in eval mode,
the probes have no one output and the tracker is refused, whatever the draws happen to give."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from genkernel import PathKernelTracker
from genkernel.core.adapter import random_forward
from genkernel.gan import GANKernelAnalyzer, GANTrainer
from genkernel.supervised import mse_loss

from test_gan_r1 import B, F64, LATENT, LR_D, LR_G, _data, _flat, _pair

pytestmark = pytest.mark.usefixtures("one_thread")


class Jitter(nn.Module):
    """A DiffAugment-like translation: in training mode each row is shifted by its own random offset."""

    def forward(self, x):
        if not self.training:
            return x
        return x + 0.3 * torch.randn(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype)


class BatchFlip(nn.Module):
    """A random flip of the whole batch in any mode (a transform left in the model): one coin per call."""

    def forward(self, x):
        return -x if bool(torch.rand(()) < 0.5) else x


class NoiseInput(nn.Module):
    """StyleGAN's noise input: x + strength · N(0, 1), the strength zero-initialized (no effect until trained)."""

    def __init__(self):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x):
        return x + self.strength * torch.randn(x.shape, dtype=x.dtype)


def _jittered_pair():
    G, D = _pair()
    return G, nn.Sequential(Jitter(), D)


def _trainer(pair, callbacks=()):
    G, D = pair
    return GANTrainer(G, D, _data(), batch_size=B, seed=0, callbacks=list(callbacks), r1_gamma=1.0,
                      g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                      d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D))


def test_an_augmentation_inside_d_is_tracked_from_the_training_graph_exactly():
    """A jitter inside D (training mode only), R1 on: the analyzer was refused at the first step (its per-example
    pass drew other offsets: "the per-example analysis forward does not reproduce the training losses"). Now
    training is bit for bit as without it, and the first step's role columns equal each role's SGD update, its
    losses replayed with the step's own offsets (the RNG state at the step), pushed through the probes'
    Jacobian of eval-mode D at the step's midpoint, by hand (1e-9)."""
    from genkernel import TrainerCallback
    from genkernel.gan.losses import DiscriminatorLoss

    plain = _trainer(_jittered_pair())
    plain.train(2)
    G, D = _jittered_pair()
    probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    latents = torch.randn(4, LATENT, generator=torch.Generator().manual_seed(4), dtype=F64)  # (not the global RNG's
    analyzer = GANKernelAnalyzer(G, D, latents, num_groups=2, window=4, eval_every=1,  # draws, which D's jitter takes)
                                 discriminator_probes=probes)
    first = {}

    class FirstStep(TrainerCallback):
        def wrap_step(self, trainer, step, perform):
            if step.phase == "discriminator" and not first:
                first.update(rng=torch.get_rng_state(), x=step.inputs[0].clone(), roles=step.inputs[1].clone(),
                             theta={n: p.detach().clone() for n, p in D.named_parameters()})
                losses = perform()
                first["after"] = {n: p.detach().clone() for n, p in D.named_parameters()}
                first["columns"] = analyzer.discriminator_ledger.contributions.clone()
                return losses
            return perform()

    trainer = _trainer((G, D), [FirstStep(), analyzer])
    trainer.train(2)
    assert torch.equal(_flat(trainer.discriminator), _flat(plain.discriminator))
    assert torch.equal(_flat(trainer.generator), _flat(plain.generator))
    assert analyzer.d_tracker.random_forward and analyzer.d_tracker.group_state == "dense"

    _, D0 = _jittered_pair()
    D0.load_state_dict(first["theta"])
    critic = trainer.critic.__class__(D0, penalty=True)
    torch.set_rng_state(first["rng"])  # the training forward's offsets
    losses = DiscriminatorLoss(r1_gamma=1.0)(critic(first["x"], first["roles"]).reshape(-1), first["roles"])
    mid = {n: (first["theta"][n] + first["after"][n]) / 2 for n in first["theta"]}
    D0.eval()
    jac = jacrev(lambda params: functional_call(D0, params, (probes,)).reshape(-1))(mid)
    for role in range(3):
        part = (losses * (first["roles"] == role) / B).sum()
        grads = torch.autograd.grad(part, list(D0.parameters()), retain_graph=True, allow_unused=True)
        pushed = sum(jac[n].reshape(probes.shape[0], -1) @ (-LR_D * g).reshape(-1)
                     for n, g in zip(first["theta"], grads) if g is not None)
        assert float(pushed.abs().max()) > 1e-6
        torch.testing.assert_close(first["columns"][:, role].reshape(-1), pushed, rtol=1e-9, atol=1e-12)
    ledger = analyzer.discriminator_ledger
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)


def _noisy_regressor():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), Jitter(), nn.Tanh(), nn.Linear(8, 1)).to(F64).train()


def test_a_tracker_of_a_model_that_draws_goes_to_the_graph_route_and_an_explicit_per_example_route_is_refused():
    """Plain SGD would take the factored route ("auto"); the drawing forward sends it to the dense graph route,
    where its groups' gradients add up to the step's and the ledger's identity closes. Asked for the factored
    route, the tracker refuses naming the forward and the route that works."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    probes = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    model = _noisy_regressor()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4)
    assert tracker.group_state == "dense" and tracker.route.uses_graph()
    for _ in range(3):
        tracker.step(x, y, torch.arange(8) % 4)
    ledger = tracker.ledger
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
    model = _noisy_regressor()
    with pytest.raises(ValueError, match=r"draws random numbers in its forward.*group_state='dense' with "
                                         r"gradient_route='graph'"):
        factored = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes,
                                     num_groups=4, group_state="factored")
        factored.step(x, y, torch.arange(8) % 4)


@pytest.mark.parametrize("seed", range(6))
def test_a_random_flip_in_eval_mode_is_refused_whatever_the_coin_gives(seed):
    """A whole-batch flip gives two equal forwards half of the time: the check of two outputs let the tracker be
    built at some seeds (its probes then had no one output). The draw itself is refused now."""
    torch.manual_seed(seed)
    model = nn.Sequential(BatchFlip(), nn.Linear(2, 1)).to(F64)
    probes = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="not deterministic in eval mode: it draws random numbers"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=2)


def test_noise_scaled_by_a_zero_strength_is_refused_before_training_gives_it_an_effect():
    """StyleGAN's noise inputs start at strength 0: two forwards agree at construction, and once training moves the
    strength the probes' outputs are random. Refused at construction."""
    model = nn.Sequential(nn.Linear(2, 3), NoiseInput(), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    probes = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="draws random numbers"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=2)


def test_the_detection_leaves_training_and_its_random_stream_alone():
    """random_forward runs one forward on a forked RNG with the buffers copied: the global stream and BatchNorm-free
    buffers are as before; a model that draws nothing, or draws only in training mode while in eval mode, is
    not named."""
    model = _noisy_regressor()
    x = torch.randn(4, 2, dtype=F64)
    state = torch.get_rng_state()
    assert random_forward(model, (x,)) == ["Sequential (draws random numbers in its forward)"]
    assert torch.equal(torch.get_rng_state(), state)
    assert random_forward(model.eval(), (x,)) == []
    assert random_forward(nn.Linear(2, 1).to(F64), (x,)) == []


@pytest.mark.parametrize("seed", range(6))
def test_kernels_of_a_model_that_flips_its_batch_in_eval_mode_are_refused_whatever_the_coin_gives(seed):
    """gradient_kernel's two passes on one example agree when the coin comes up the same twice (a quarter of the
    time for two passes of a fair coin with a flip that changes the output): the kernel was then taken at a random
    flip per chunk, silently. The draw is refused."""
    from genkernel import gradient_kernel

    torch.manual_seed(seed)
    model = nn.Sequential(BatchFlip(), nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    x = torch.randn(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="not deterministic in eval mode: two passes on the first example of x1 draw "
                                         "random numbers"):
        gradient_kernel(model, x)


def test_a_run_with_an_augmentation_inside_d_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    """The jitter draws from torch's global generator, which GANTrainer's checkpoints save: a run stopped after
    two iterations and resumed in a fresh trainer (analyzer attached both times) ends with the parameters and
    D's ledger of the uninterrupted run."""
    def run(checkpoints, **kw):
        G, D = _jittered_pair()
        latents = torch.randn(4, LATENT, generator=torch.Generator().manual_seed(4), dtype=F64)
        probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
        analyzer = GANKernelAnalyzer(G, D, latents, num_groups=2, window=4, eval_every=1, discriminator_probes=probes)
        trainer = GANTrainer(G, D, _data(), batch_size=B, seed=0, callbacks=[analyzer], r1_gamma=1.0,
                             g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                             d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), checkpoint_dir=checkpoints, **kw)
        return trainer, analyzer

    straight, straight_analyzer = run(tmp_path / "a")
    straight.train(4)
    first, _ = run(tmp_path / "b", checkpoint_every=2)
    first.train(2)
    torch.manual_seed(123)  # (the resumed run's global stream comes from the checkpoint, not from here)
    resumed, resumed_analyzer = run(tmp_path / "b")
    resumed.train(4, resume=True)
    assert torch.equal(_flat(resumed.discriminator), _flat(straight.discriminator))
    assert torch.equal(_flat(resumed.generator), _flat(straight.generator))
    mine, theirs = resumed_analyzer.discriminator_ledger, straight_analyzer.discriminator_ledger
    assert mine.steps == theirs.steps == 4
    for field in ("contributions", "rest", "residual", "delta"):
        assert torch.equal(getattr(mine, field), getattr(theirs, field)), field


def test_a_draw_of_the_models_own_beside_dropout_is_recorded_and_keeps_the_graph_once_dropout_is_off():
    """The check skipped a model that dropout already marked, so its own jitter went unrecorded: with the
    dropout later set to p = 0, "auto" moved to a per-example route whose second pass draws other offsets. The
    check now runs with the dropout in eval (its mode back afterwards) and records the jitter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.3), Jitter(), nn.Tanh(), nn.Linear(8, 1)).to(F64).train()
    probes = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert random_forward(model, (probes,)) == ["Sequential (draws random numbers in its forward)"]
    assert model[1].training and random_forward(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.3)).to(F64),
                                                (probes,)) == []
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4)
    model[1].p = 0.0
    assert tracker.route.uses_graph()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    tracker.step(x, y, torch.arange(8) % 4)
    ledger = tracker.ledger
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
