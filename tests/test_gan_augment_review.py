"""A second read of ``GANTrainer(augment=)`` (DiffAugment): what a demanding user hits.

Faults found (each test below fails on commit af04c7b): a ``trainer.critic`` replaced by one that does not apply
the trainer's augmentation trained D unaugmented without a word (a plain DiscriminatorObjective hands the
parameters to D where a conditional D's classes go, and a D with an optional second argument ignores them) or
read another policy order's columns; bfloat16 networks drew the cutout offsets of images over 256 pixels in
bfloat16, which rounds them (281 became 280); the identity augmentation turned −0.0 into +0.0 (x + 0), so
D∘T at the identity was not D bit for bit; ``geometry_loss=trainer.g_loss`` (augmented) was accepted and failed at
the first generator step, after D's update. Coverage: apply against the official formulas at odd, non-square
sizes and ratios 0 and 1 in every policy order; the discriminator tracker's vmapped per-example pass through
the augmentation (Adam, a parameter outside D's layers); a step refused after its draws, then training on."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.gan import DiffAugment, GANKernelAnalyzer, GANTrainer
from genkernel.gan.losses import AugmentedDiscriminatorObjective, DiscriminatorObjective
from test_gan_augment import official_cutout, official_translation

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
C, H, W, LATENT, B = 3, 6, 5, 3, 4
POLICY = "color,translation,cutout"


class TinyG(nn.Module):
    def __init__(self):
        super().__init__()
        self.latent_dim = LATENT
        self.linear = nn.Linear(LATENT, C * H * W)

    def forward(self, z):
        return torch.tanh(self.linear(z)).view(-1, C, H, W)


class TinyD(nn.Module):
    """A smooth D whose forward takes an optional second argument (as a D shared by conditional and unconditional
    code often does): a plain critic's augmentation parameters landed there and were ignored."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, 2, 3, padding=1)
        self.linear = nn.Linear(2 * H * W, 1)

    def forward(self, x, classes=None):
        return self.linear(F.silu(self.conv(x)).flatten(1)).view(-1)


class GainD(TinyD):
    """A free gain outside D's Linear and Conv2d layers: the tracker's training-pass records do not cover it, so its
    per-example gradients come from a vmapped pass of the critic, augmentation included."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x, classes=None):
        return super().forward(x) * self.gain


DATA = torch.randn(12, C, H, W, generator=torch.Generator().manual_seed(3), dtype=F64).tanh()
PROBES = torch.randn(4, LATENT, generator=torch.Generator().manual_seed(5), dtype=F64)


def players(discriminator=TinyD):
    torch.manual_seed(0)
    return TinyG().to(F64), discriminator().to(F64)


def trainer_for(pair, callbacks=(), optimizer=torch.optim.SGD, **options):
    G, D = pair
    options.setdefault("augment", POLICY)
    return GANTrainer(G, D, DATA, batch_size=B, seed=1, callbacks=list(callbacks),
                      g_optimizer=optimizer(G.parameters(), lr=0.01), d_optimizer=optimizer(D.parameters(), lr=0.01),
                      **options)


def flat(*modules):
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


# -- a replaced critic ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("replacement", ["plain", "other_order"])
def test_a_replaced_critic_that_does_not_apply_the_trainers_augmentation_is_refused(replacement):
    """Before: a plain DiscriminatorObjective trained D on un-augmented rows (the parameters reached D as its
    ``classes`` and were ignored) beside an augmented G; a critic of the policy "translation,cutout,color" (the same 8
    columns in another order) read the brightness shift as a translation. Now both are refused before any update,
    by train() and by a discriminator step called alone (its draws given back); the trainer's own augmentation in a
    new critic trains as the trainer's critic does."""
    run = trainer_for(players())
    augment = DiffAugment("translation,cutout,color")
    run.critic = DiscriminatorObjective(run.discriminator) if replacement == "plain" else \
        AugmentedDiscriminatorObjective(run.discriminator, augment)
    before, rng = flat(run.generator, run.discriminator), run.rng.get_state()
    with pytest.raises(ValueError, match="does not apply the trainer's augmentation.*AugmentedDiscriminatorObjective"):
        run.train(1)
    with pytest.raises(ValueError, match="does not apply the trainer's augmentation"):
        run.discriminator_step()
    assert torch.equal(flat(run.generator, run.discriminator), before)
    assert torch.equal(run.rng.get_state(), rng)

    straight = trainer_for(players())
    straight.train(2)
    rebuilt = trainer_for(players())
    rebuilt.critic = AugmentedDiscriminatorObjective(rebuilt.discriminator, rebuilt.augment)
    rebuilt.train(2)
    assert torch.equal(flat(rebuilt.generator, rebuilt.discriminator), flat(straight.generator, straight.discriminator))


# -- bfloat16 networks ---------------------------------------------------------------------------------------------
SIDE = 300  # (> 256: bfloat16 spaces its integers 2 apart from 256 to 512)


class WideG(nn.Module):
    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, SIDE * SIDE)

    def forward(self, z):
        return self.linear(z).view(-1, 1, SIDE, SIDE)


class MeanD(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, x):
        return x.flatten(1).mean(1) * self.gain


class KeepParams(TrainerCallback):
    """Keeps the augmentation parameters a discriminator step hands its critic."""

    def __init__(self):
        self.params = None

    def wrap_step(self, trainer, step, perform):
        self.params = step.inputs[2]
        return perform()


def test_bfloat16_networks_draw_the_same_integer_offsets_as_float32_ones():
    """The draws do not depend on the networks' dtype (latents and uniforms are drawn in float64), so a bfloat16 run
    must augment with the float32 run's cutout offsets. Before: the parameters were cast to the networks' bfloat16,
    which holds integers exactly only up to 256: on 300×300 images offsets 281, 299, 295 became 280, 300, 296.
    ``DiffAugment.draw`` in bfloat16 for such images is refused, naming float32."""
    drawn = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        keep = KeepParams()
        run = GANTrainer(WideG().to(dtype), MeanD().to(dtype), torch.zeros(16, 1, SIDE, SIDE, dtype=dtype),
                         batch_size=16, seed=3, callbacks=[keep], augment="cutout")
        run.discriminator_step()
        drawn[dtype] = keep.params.double()
    assert torch.equal(drawn[torch.bfloat16], drawn[torch.float32])
    with pytest.raises(ValueError, match="draw in float32 or float64"):
        DiffAugment("cutout").draw(4, (1, SIDE, SIDE), torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    colour = DiffAugment("color").draw(4, (1, SIDE, SIDE), torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert colour.dtype == torch.bfloat16  # (no integers to round: colour alone is drawn in any dtype)


# -- the identity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_identity_augmentation_returns_x_bit_for_bit_in_every_policy_order(dtype):
    """The analyzer reads D's probes through D∘T at the identity, documented as D bit for bit. Before: the brightness
    shift x + 0 turned −0.0 into +0.0 (a different bit pattern: signbit, 1/x, atan2 see it)."""
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    x[:, :, ::2, 1::2] = -0.0
    bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    for size in (1, 2, 3):
        for order in itertools.permutations(("color", "translation", "cutout"), size):
            augment = DiffAugment(",".join(order))
            shown = augment.apply(x, augment.identity(x.shape[0], dtype=dtype))
            assert torch.equal(shown.view(bits), x.view(bits)), order


# -- apply against the official formulas -----------------------------------------------------------------------------
def official_geometry(x, order, gen, translation_ratio, cutout_ratio):
    """The official translation and cutout in ``order``, their random integers drawn from ``gen`` as the official
    code draws them (x's then y's)."""
    h, w = x.shape[2:]
    for policy in order:
        if policy == "translation":
            sx, sy = int(h * translation_ratio + 0.5), int(w * translation_ratio + 0.5)
            tx = torch.randint(-sx, sx + 1, (x.shape[0],), generator=gen)
            x = official_translation(x, tx, torch.randint(-sy, sy + 1, (x.shape[0],), generator=gen))
        else:
            cx, cy = int(h * cutout_ratio + 0.5), int(w * cutout_ratio + 0.5)
            ox = torch.randint(0, h + (1 - cx % 2), (x.shape[0],), generator=gen)
            x = official_cutout(x, ox, torch.randint(0, w + (1 - cy % 2), (x.shape[0],), generator=gen), cutout_ratio)
    return x


def test_coverage_translation_and_cutout_are_the_official_code_at_odd_non_square_sizes_and_extreme_ratios():
    """Coverage: 1×1 to 9×4 images, ratios 0 and 1 (no shift / no cut; a shift of the whole image / a cut of all of
    it) and in between, either order, float32: equal to the official code at the same random integers, and one
    example at a time under vmap equal to the batch."""
    for (h, w), (t_ratio, c_ratio), order in itertools.product(
            [(1, 1), (1, 7), (7, 2), (5, 9), (9, 4)], [(0.0, 0.0), (1.0, 1.0), (0.3, 0.7)],
            [("translation", "cutout"), ("cutout", "translation")]):
        x = torch.randn(6, 2, h, w, generator=torch.Generator().manual_seed(h * w))
        augment = DiffAugment(",".join(order), translation_ratio=t_ratio, cutout_ratio=c_ratio)
        params = augment.draw(6, (2, h, w), torch.Generator().manual_seed(7), dtype=torch.float32)
        official = official_geometry(x, order, torch.Generator().manual_seed(7), t_ratio, c_ratio)
        assert torch.equal(augment.apply(x, params), official), (h, w, t_ratio, c_ratio, order)
        one_at_a_time = vmap(lambda xi, pi: augment.apply(xi[None], pi[None])[0])(x, params)
        assert torch.equal(one_at_a_time, official)


# -- the discriminator tracker's vmapped pass --------------------------------------------------------------------------
def test_coverage_the_discriminator_trackers_vmapped_pass_sees_the_augmentation(monkeypatch):
    """Coverage: with Adam (dense group state) and a D parameter outside its layers, the tracker's per-example
    gradients of that parameter come from a vmapped pass of D∘T (counted: calls of apply on functorch-wrapped
    tensors); the ledger adds up to 1e-12, its residual at Gauss-4's precision, training bit for bit."""
    calls = {"wrapped": 0}
    apply = DiffAugment.apply

    def counted(self, x, params):
        calls["wrapped"] += bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
        return apply(self, x, params)

    monkeypatch.setattr(DiffAugment, "apply", counted)
    plain = trainer_for(players(GainD), optimizer=torch.optim.Adam)
    plain.train(2)
    G, D = players(GainD)
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=4, window=2, eval_every=1, quadrature="gauss4")
    trainer_for((G, D), [analyzer], optimizer=torch.optim.Adam).train(2)
    assert calls["wrapped"] > 0
    assert not analyzer.d_tracker.route.uses_graph()
    assert torch.equal(flat(plain.generator, plain.discriminator), flat(G, D))
    for ledger in (analyzer.generator_ledger(), analyzer.discriminator_ledger):
        total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
        torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12 * max(1.0, float(ledger.delta.abs().max())))
        assert float(ledger.relative_residual()) < 1e-10


# -- a step refused after its draws ------------------------------------------------------------------------------------
class RefuseOnce(TrainerCallback):
    """Raises before the ``at``-th step of ``kind`` ("generator", "discriminator" or "regularization") is performed,
    once: as an analyzer refusing a step after the trainer drew its latents and augmentation."""

    def __init__(self, kind, at):
        self.kind, self.at, self.seen, self.fired = kind, at, 0, False

    def wrap_step(self, trainer, step, perform):
        kind = "regularization" if step.info.get("regularization", False) else step.phase
        if kind == self.kind and not self.fired:
            self.seen += 1
            if self.seen == self.at:
                self.fired = True
                raise ValueError("refused")
        return perform()


@pytest.mark.parametrize("kind", ["generator", "discriminator", "regularization"])
def test_coverage_a_step_refused_after_its_draws_then_training_on_is_the_straight_run(kind):
    """Coverage: the refused step's draws (latents, augmentation) are given back, so train() again draws what the
    straight run drew: weights and history bit for bit (lazy R1: its regularization step's own draw too)."""
    options = {"r1_gamma": 2.0, "r1_interval": 2}
    straight = trainer_for(players(), **options)
    straight.train(3)
    refuse = RefuseOnce(kind, 1 if kind == "regularization" else 2)
    run = trainer_for(players(), [refuse], **options)
    with pytest.raises(ValueError, match="refused"):
        run.train(3)
    run.train(3)
    assert refuse.fired
    assert torch.equal(flat(run.generator, run.discriminator), flat(straight.generator, straight.discriminator))
    assert run.history == straight.history


# -- DataLoader batches and BatchNorm in D ---------------------------------------------------------------------------
class BatchNormD(TinyD):
    """DCGAN's D in miniature: BatchNorm in training mode normalizes each forward's rows together."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(2)

    def forward(self, x, classes=None):
        return self.linear(F.silu(self.norm(self.conv(x))).flatten(1)).view(-1)


@pytest.mark.parametrize("discriminator, options", [
    (TinyD, {"micro_batches": 2, "discriminator_batches": "separate"}),
    (BatchNormD, {"discriminator_batches": "separate"}),
], ids=["last_smaller_batch_micro_batches", "batchnorm_separate"])
def test_coverage_a_dataloaders_last_smaller_batch_and_a_batchnorm_discriminator(discriminator, options):
    """Coverage: a DataLoader of 10 rows in batches of 4 (the third discriminator step has 2 real rows, and draws 2
    rows of augmentation for each block), and a D with BatchNorm in training mode (the graph route): training bit
    for bit with the analyzer, both ledgers add up to 1e-12."""
    def run(G, D, callbacks=()):
        loader = torch.utils.data.DataLoader(DATA[:10], batch_size=4)
        trainer = GANTrainer(G, D, loader, seed=1, callbacks=list(callbacks), augment=POLICY,
                             g_optimizer=torch.optim.SGD(G.parameters(), lr=0.01),
                             d_optimizer=torch.optim.SGD(D.parameters(), lr=0.01), **options)
        trainer.train(3)
        return G, D

    plain = run(*players(discriminator))
    G, D = players(discriminator)
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=3, eval_every=1)
    watched = run(G, D, [analyzer])
    assert torch.equal(flat(*plain), flat(*watched))
    assert analyzer.discriminator_ledger.steps == 3
    for ledger in (analyzer.generator_ledger(), analyzer.discriminator_ledger):
        total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
        torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12 * max(1.0, float(ledger.delta.abs().max())))


def test_an_augmented_loss_as_the_analyzers_geometry_loss_is_refused_when_built():
    """``geometry_loss=trainer.g_loss`` (an AugmentedGeneratorLoss) has no value at a probe. Before: accepted, then
    the first generator step raised an error about targets after D's first update was made; now refused at
    construction, naming ``.geometry``, which builds and trains."""
    G, D = players()
    loss = trainer_for(players()).g_loss
    with pytest.raises(ValueError, match=r"geometry_loss is an AugmentedGeneratorLoss.*geometry_loss=loss\.geometry"):
        GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=1, eval_every=1, geometry_loss=loss)
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=1, eval_every=1, geometry_loss=loss.geometry)
    trainer_for((G, D), [analyzer]).train(1)
    assert analyzer.generator_ledger().steps == 1
