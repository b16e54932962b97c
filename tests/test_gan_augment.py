"""``GANTrainer(augment=)``: DiffAugment (Zhao et al. 2020) in the trainer's own steps, its random parameters
drawn from the trainer's generator per row and applied by a deterministic function. Checked: ``apply`` against
the official code's formulas fed the same random numbers; the steps against a hand-written float64 loop; the
ledgers add up (to the quadrature's precision, as without augmentation) and training is bit for bit the same
with the analyzer attached (conditional, micro-batches, lazy R1); the probes' geometry is un-augmented D's; a
resume is bit for bit; bad settings are refused naming the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from genkernel.core.adapter import seeded_generator
from genkernel.gan import DiffAugment, GANKernelAnalyzer, GANTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
C, H, W, LATENT, B, K = 3, 6, 5, 3, 4, 2
LR_G, LR_D, GAMMA = 0.05, 0.04, 2.0


# -- the official DiffAugment-pytorch formulas, their random numbers passed in ---------------------------------
def official_brightness(x, r):
    return x + (r.view(-1, 1, 1, 1) - 0.5)


def official_saturation(x, r):
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * (r.view(-1, 1, 1, 1) * 2) + x_mean


def official_contrast(x, r):
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * (r.view(-1, 1, 1, 1) + 0.5) + x_mean


def official_translation(x, translation_x, translation_y):
    translation_x, translation_y = translation_x.view(-1, 1, 1), translation_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(x.size(2)),
                                                torch.arange(x.size(3)), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def official_cutout(x, offset_x, offset_y, ratio=0.5):
    cutout_size = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    offset_x, offset_y = offset_x.view(-1, 1, 1), offset_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(cutout_size[0]),
                                                torch.arange(cutout_size[1]), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def official_draws(batch, height, width, gen, ratio_t=0.125, ratio_c=0.5):
    """The official code's random numbers, in its order (brightness, saturation, contrast, translation x and y,
    cutout x and y), drawn from ``gen``."""
    shift_x, shift_y = int(height * ratio_t + 0.5), int(width * ratio_t + 0.5)
    cut_x, cut_y = int(height * ratio_c + 0.5), int(width * ratio_c + 0.5)
    return [torch.rand(batch, generator=gen, dtype=F64) for _ in range(3)] + [
        torch.randint(-shift_x, shift_x + 1, (batch,), generator=gen),
        torch.randint(-shift_y, shift_y + 1, (batch,), generator=gen),
        torch.randint(0, height + (1 - cut_x % 2), (batch,), generator=gen),
        torch.randint(0, width + (1 - cut_y % 2), (batch,), generator=gen)]


def official_augment(x, draws):
    bright, sat, con, tx, ty, ox, oy = draws
    x = official_contrast(official_saturation(official_brightness(x, bright), sat), con)
    return official_cutout(official_translation(x, tx, ty), ox, oy)


# -- tiny players --------------------------------------------------------------------------------------------
class TinyG(nn.Module):
    def __init__(self, classes=None):
        super().__init__()
        self.latent_dim = LATENT
        self.embed = None if classes is None else nn.Embedding(classes, 2)
        self.linear = nn.Linear(LATENT + (0 if classes is None else 2), C * H * W)

    def forward(self, z, classes=None):
        if self.embed is not None:
            z = torch.cat([z, self.embed(classes)], dim=1)
        return torch.tanh(self.linear(z)).view(-1, C, H, W)


class TinyD(nn.Module):
    """A smooth D (SiLU): the quadrature's residual then tells an inexact ledger apart."""

    def __init__(self, classes=None):
        super().__init__()
        self.conv = nn.Conv2d(C, 2, 3, padding=1)
        self.linear = nn.Linear(2 * H * W, 1)
        self.embed = None if classes is None else nn.Embedding(classes, 2 * H * W)

    def forward(self, x, classes=None):
        features = F.silu(self.conv(x)).flatten(1)
        score = self.linear(features).view(-1)
        if self.embed is not None:
            score = score + (self.embed(classes) * features).sum(1)
        return score


def players(classes=None):
    torch.manual_seed(0)
    return TinyG(classes).to(F64), TinyD(classes).to(F64)


DATA = torch.randn(12, C, H, W, generator=torch.Generator().manual_seed(3), dtype=F64).tanh()
LABELS = torch.arange(12) % K
PROBES = torch.randn(4, LATENT, generator=torch.Generator().manual_seed(5), dtype=F64)


def trainer_for(pair, callbacks=(), **options):
    G, D = pair
    options.setdefault("augment", "color,translation,cutout")
    return GANTrainer(G, D, DATA, batch_size=B, seed=1, callbacks=list(callbacks),
                      g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
                      d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), **options)


def flat(*modules):
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


# -- apply ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3, 6, 5), (4, 2, 7, 8)])
def test_apply_is_the_official_formulas_at_the_same_random_numbers(shape):
    """Odd and even images (cutout squares of odd and even side): values and input gradients equal the official
    code's; one example at a time under vmap too; the identity params give x bit for bit."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    augment = DiffAugment("color,translation,cutout")
    for seed in range(4):
        params = augment.draw(shape[0], shape[1:], torch.Generator().manual_seed(seed))
        draws = official_draws(shape[0], shape[2], shape[3], torch.Generator().manual_seed(seed))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        mine, official = augment.apply(xa, params), official_augment(xb, draws)
        assert torch.equal(mine, official)
        cotangent = torch.randn_like(mine)
        (ga,) = torch.autograd.grad(mine, xa, cotangent)
        (gb,) = torch.autograd.grad(official, xb, cotangent)
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-14)
        one_at_a_time = vmap(lambda xi, pi: augment.apply(xi[None], pi[None])[0])(x, params)
        torch.testing.assert_close(one_at_a_time, mine.detach(), rtol=0, atol=1e-15)
    assert torch.equal(augment.apply(x, augment.identity(shape[0])), x)
    translation = DiffAugment("translation")  # (a policy alone: its own columns)
    params = translation.draw(shape[0], shape[1:], torch.Generator().manual_seed(9))
    assert translation.columns == ("translation_x", "translation_y")
    assert torch.equal(translation.apply(x, params), official_translation(x, params[:, 0].long(), params[:, 1].long()))


# -- the steps against a hand-written loop ---------------------------------------------------------------------
def augmented(x, gen):
    return official_augment(x, official_draws(x.shape[0], H, W, gen))


def _sgd(module, loss, lr):
    grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)  # (R1 does not read D's last bias)
    with torch.no_grad():
        for p, g in zip(module.parameters(), grads):
            if g is not None:
                p -= lr * g


def _r1(D, real, draws, gamma):
    """γ/2 · mean ‖∇_x D(T(x))‖² at the real rows, T at ``draws``: StyleGAN2-ADA's R1 on augmented reals."""
    real = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(official_augment(real, draws)).sum(), real, create_graph=True)
    return gamma / 2 * g.pow(2).flatten(1).sum(1).mean()


def reference_loop(iterations, r1_gamma=0.0, r1_interval=1, conditional=False):
    """The trainer's documented draws: a D step's real rows, latents, the real rows' then the generated rows'
    augmentation; a lazy-R1 step's own augmentation of its real rows; a G step's latents (its classes: those
    of uniformly drawn real rows) then augmentation. ``conditional``: G(z, y), D(x, y), the generated rows at
    the real rows' classes."""
    G, D = players(K if conditional else None)
    gen = seeded_generator(1)
    d_steps, losses = 0, []
    for _ in range(iterations):
        index = torch.randint(0, DATA.shape[0], (B,), generator=gen)
        real, y = DATA[index], (LABELS[index],) if conditional else ()
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        with torch.no_grad():
            fake = G(z, *y)
        real_draws = official_draws(B, H, W, gen)
        loss = (F.softplus(-D(official_augment(real, real_draws), *y)).mean()
                + F.softplus(D(augmented(fake, gen), *y)).mean())
        if r1_gamma and r1_interval == 1:
            loss = loss + _r1(D, real, real_draws, r1_gamma)
        _sgd(D, loss, LR_D)
        losses.append(float(loss.detach()))
        d_steps += 1
        if r1_gamma and r1_interval > 1 and d_steps % r1_interval == 0:
            _sgd(D, _r1(D, real, official_draws(B, H, W, gen), r1_gamma * r1_interval), LR_D)
        z = torch.randn(B, LATENT, generator=gen, dtype=F64)
        y = (LABELS[torch.randint(0, DATA.shape[0], (B,), generator=gen)],) if conditional else ()
        D.requires_grad_(False)
        loss = F.softplus(-D(augmented(G(z, *y), gen), *y)).mean()
        _sgd(G, loss, LR_G)
        D.requires_grad_(True)
        losses.append(float(loss.detach()))
    return G, D, losses


@pytest.mark.parametrize("r1_gamma, r1_interval, conditional", [(0.0, 1, False), (GAMMA, 1, False), (GAMMA, 2, False),
                                                                (0.0, 1, True)])
def test_the_steps_are_a_hand_written_diffaugment_loop(r1_gamma, r1_interval, conditional):
    """Without a penalty, with R1 on the augmented reals in every D step (at the real rows' augmentation), lazy
    R1 (its regularization step with its own draw), and a conditional GAN in 2 micro-batches: losses and weights
    to float64 precision."""
    G0, D0, losses = reference_loop(3, r1_gamma, r1_interval, conditional)
    options = {"num_classes": K, "labels": LABELS, "micro_batches": 2} if conditional else {}
    trainer = trainer_for(players(K if conditional else None), r1_gamma=r1_gamma, r1_interval=r1_interval, **options)
    trainer.train(3)
    mine = [v for pair in zip(trainer.history["d_loss"], trainer.history["g_loss"]) for v in pair]
    # (the trainer's R1 norm carries eps = 1e-12 under its square root: γ/2·1e-12 in the loss)
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(losses), rtol=0, atol=1e-11)
    torch.testing.assert_close(flat(trainer.generator, trainer.discriminator), flat(G0, D0), rtol=0, atol=1e-12)


# -- the analyzer ----------------------------------------------------------------------------------------------
def _identity(ledger, atol=1e-12):
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=atol * max(1.0, float(ledger.delta.abs().max())))


@pytest.mark.parametrize("options", [
    {},
    {"num_classes": K, "labels": LABELS, "micro_batches": 2},
    {"r1_gamma": GAMMA, "r1_interval": 2, "discriminator_batches": "separate"},
])
def test_ledgers_add_up_and_training_is_bit_for_bit_with_the_analyzer(options):
    """Both ledgers' identities to 1e-12, their residuals at Gauss-4's precision (1e-10: a ledger off by an
    augmentation that is not training's would be off by far more), and the weights ``torch.equal`` without
    the analyzer."""
    classes = options.get("num_classes")
    plain = trainer_for(players(classes), **options)
    plain.train(3)
    G, D = players(classes)
    probe_classes = {} if classes is None else {"probe_classes": torch.arange(PROBES.shape[0]) % K, "num_classes": K}
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=2, eval_every=1, quadrature="gauss4",
                                 **probe_classes)
    watched = trainer_for((G, D), callbacks=[analyzer], **options)
    watched.train(3)
    assert torch.equal(flat(plain.generator, plain.discriminator), flat(G, D))
    for ledger in (analyzer.generator_ledger(), analyzer.generator_ledger("control_0"), analyzer.discriminator_ledger):
        _identity(ledger)
        assert float(ledger.relative_residual()) < 1e-10
    assert analyzer.generator_ledger().steps == 3
    assert analyzer.discriminator_ledger.steps == 3 + (options.get("r1_interval", 1) > 1)


def test_the_probes_geometry_is_the_unaugmented_discriminators():
    """One iteration: the generator step reads the probes' w = ∇_x ℓ_G(D(x)) at x = G(z') with G before its step
    and D after its step, without augmentation (and so does ``trainer.input_gradients``); D's probes are read at
    the identity augmentation (D itself)."""
    G, D = players()
    G0 = TinyG().to(F64)
    G0.load_state_dict(G.state_dict())
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=1, eval_every=1)
    trainer = trainer_for((G, D), callbacks=[analyzer])
    trainer.train(1)
    x = G0(PROBES).detach().requires_grad_(True)
    (w,) = torch.autograd.grad(F.softplus(-D(x)).sum(), x)
    torch.testing.assert_close(analyzer._probe_state["w"], w, rtol=0, atol=1e-14)
    x = G(PROBES).detach().requires_grad_(True)  # (the trainer's input_gradients: the same geometry, G after its step)
    (w,) = torch.autograd.grad(F.softplus(-D(x)).sum(), x)
    torch.testing.assert_close(trainer.input_gradients(PROBES)[1], w, rtol=0, atol=1e-14)
    probes, roles, params = analyzer.d_tracker.probes
    assert torch.equal(trainer_for(players()).critic(probes, roles, params).view(-1), players()[1](probes))


def test_a_resumed_run_is_bit_for_bit_the_straight_one(tmp_path):
    """The augmentation's draws come from the trainer's generator, which the checkpoint keeps; a checkpoint of
    another policy (or none) is refused."""
    straight = trainer_for(players())
    straight.train(4)
    first = trainer_for(players(), checkpoint_dir=tmp_path, checkpoint_every=2)
    first.train(2)
    resumed = trainer_for(players(), checkpoint_dir=tmp_path)
    resumed.train(4, resume=True)
    assert torch.equal(flat(resumed.generator, resumed.discriminator), flat(straight.generator, straight.discriminator))
    assert resumed.history == straight.history
    for other in ("color", None):
        with pytest.raises(ValueError, match="augment"):
            trainer_for(players(), checkpoint_dir=tmp_path, augment=other).train(4, resume=True)


def test_bad_settings_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"unknown DiffAugment policy 'flip'.*\('color', 'translation', 'cutout'\)"):
        DiffAugment("color,flip")
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        trainer_for(players(), augment="colour")
    with pytest.raises(ValueError, match="names a policy twice"):
        DiffAugment("color,color")
    with pytest.raises(ValueError, match="empty DiffAugment policy"):
        DiffAugment("")
    with pytest.raises(TypeError, match="augment must be a DiffAugment"):
        trainer_for(players(), augment=0.5)
    with pytest.raises(ValueError, match="loss='wgan-gp' is not implemented.*'nonsaturating' or 'hinge'"):
        trainer_for(players(), loss="wgan-gp")
    points = torch.randn(12, 2, dtype=F64)
    G, D = nn.Linear(LATENT, 2).to(F64), nn.Linear(2, 1).to(F64)
    with pytest.raises(ValueError, match=r"images \[B, C, H, W\].*shaped \(2,\)"):
        GANTrainer(G, D, points, latent_dim=LATENT, batch_size=B, augment="translation")
    with pytest.raises(ValueError, match="translation_ratio must be a number in"):
        DiffAugment("translation", translation_ratio=2)
    augment = DiffAugment("color")
    with pytest.raises(ValueError, match=r"params must be \[B, 3\]"):
        augment.apply(DATA[:2], torch.zeros(2, 8, dtype=F64))


def test_a_replaced_generator_loss_that_does_not_augment_is_refused():
    """A g_loss replaced by a plain GeneratorLoss got the augmentation's parameters as targets and ignored them: G
    trained unaugmented beside an augmented D, without a word."""
    from genkernel.gan import GeneratorLoss

    run = trainer_for(players())
    before = flat(run.generator, run.discriminator)
    run.g_loss = GeneratorLoss(run.discriminator)
    with pytest.raises(ValueError, match="does not apply the trainer's augmentation"):
        run.train(1)
    assert torch.equal(flat(run.generator, run.discriminator), before)  # (refused before D's steps, not after)
