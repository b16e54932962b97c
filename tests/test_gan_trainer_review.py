"""GANTrainer against a hand-written float64 GAN loop with the same draws (review: discriminator rows and
coefficients, d_steps, latents, real batches over epochs, seeds, checkpoints, schedules, bad input)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from genkernel.core.adapter import seeded_generator
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

F64 = torch.float64
LR_G, LR_D, GP = 0.05, 0.04, 3.0


def _pair(seed=0, latent=3):
    torch.manual_seed(seed)
    return (MLPGenerator(latent, 2, hidden=6, depth=2).to(F64).train(),
            MLPDiscriminator(2, hidden=6, depth=2).to(F64).train())


def _data(n=20):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * 2.0


def _d_loss(kind, D, real, fake, eps):
    """The textbook discriminator objective of one step: the means over the real and generated rows (and the
    interpolates' penalty λ E(‖∇_x D(x̂)‖ − 1)²)."""
    s_real, s_fake = D(real).reshape(-1), D(fake).reshape(-1)
    if kind == "nonsaturating":
        loss = F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
    elif kind == "hinge":
        loss = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
    else:
        loss = s_fake.mean() - s_real.mean()
    if kind == "wgan-gp":
        e = eps.view(-1, 1)
        xhat = (e * real + (1 - e) * fake).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(D(xhat).sum(), xhat, create_graph=True)
        loss = loss + GP * ((g.pow(2).sum(1) + 1e-12).sqrt() - 1).pow(2).mean()
    return loss


def _g_loss(kind, D, fake):
    s = D(fake).reshape(-1)
    return F.softplus(-s).mean() if kind == "nonsaturating" else -s.mean()


def _sgd(module, loss, lr):
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


def _reference(G, D, kind, iterations, d_steps, batch_size, seed, real_batches, latent=3,
               lr_g=lambda k: LR_G, lr_d=lambda k: LR_D):
    """The hand-written loop: per discriminator step the real rows (``real_batches(gen)``), then latents, then
    (WGAN-GP) the interpolation factors; per generator step its latents; all from one generator seeded as
    documented."""
    G, D = copy.deepcopy(G), copy.deepcopy(D)
    gen = seeded_generator(seed)
    kd = kg = 0  # updates made: the k-th update of a player is made at its schedule's rate lr(k)
    for _ in range(iterations):
        for _ in range(d_steps):
            real = real_batches(gen)
            b = real.shape[0]
            z = torch.randn(b, latent, generator=gen, dtype=F64)
            with torch.no_grad():
                fake = G(z)
            eps = torch.rand(b, generator=gen, dtype=F64) if kind == "wgan-gp" else None
            _sgd(D, _d_loss(kind, D, real, fake, eps), lr_d(kd))
            kd += 1
        z = torch.randn(batch_size, latent, generator=gen, dtype=F64)
        for p in D.parameters():
            p.requires_grad_(False)
        _sgd(G, _g_loss(kind, D, G(z)), lr_g(kg))
        kg += 1
        for p in D.parameters():
            p.requires_grad_(True)
    return G, D


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _trainer(G, D, data, kind, d_steps, batch_size=None, seed=0, **kw):
    return GANTrainer(
        G, D, data, loss=kind, **({"gp_weight": GP} if kind == "wgan-gp" else {}), batch_size=batch_size, d_steps=d_steps,
        seed=seed,
        g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G), d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D), **kw,
    )


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge", "wgan-gp"])
def test_tensor_data_training_equals_the_hand_written_loop(kind):
    torch.set_num_threads(1)
    data = _data()
    G, D = _pair()
    G0, D0 = _reference(G, D, kind, 3, 2, 5, 0,
                        lambda gen: data[torch.randint(0, data.shape[0], (5,), generator=gen)])
    trainer = _trainer(G, D, data, kind, d_steps=2, batch_size=5)
    trainer.train(3)
    assert trainer.d_steps_done == 6 and trainer.g_steps == 3
    assert torch.allclose(_flat(D), _flat(D0), rtol=1e-10, atol=1e-12), float((_flat(D) - _flat(D0)).abs().max())
    assert torch.allclose(_flat(G), _flat(G0), rtol=1e-10, atol=1e-12), float((_flat(G) - _flat(G0)).abs().max())


def test_a_dataloader_is_read_in_order_over_epochs_with_a_short_last_batch():
    torch.set_num_threads(1)
    data = _data(10)
    loader = DataLoader(TensorDataset(data), batch_size=4, shuffle=False)
    order = [data[0:4], data[4:8], data[8:10]]
    count = [0]

    def next_batch(gen):
        batch = order[count[0] % 3]
        count[0] += 1
        return batch

    G, D = _pair()
    G0, D0 = _reference(G, D, "wgan-gp", 4, 2, 4, 0, next_batch)  # 8 discriminator steps: 2 epochs and a bit
    trainer = _trainer(G, D, loader, "wgan-gp", d_steps=2)
    trainer.train(4)
    assert count[0] == 8 and trainer.d_steps_done == 8
    assert torch.allclose(_flat(D), _flat(D0), rtol=1e-10, atol=1e-12)
    assert torch.allclose(_flat(G), _flat(G0), rtol=1e-10, atol=1e-12)


def test_a_seed_of_2_to_the_32_draws_other_numbers_than_seed_0():
    """torch reads a seed's low 32 bits: seed=2**32 drew seed 0's numbers, so two runs "with different seeds"
    were the same run. The trainer seeds as seeded_generator does (seeds below 2**32 unchanged)."""
    torch.set_num_threads(1)
    data = _data()
    G, D = _pair()
    runs = {}
    for seed in (0, 2**32):
        g, d = copy.deepcopy(G), copy.deepcopy(D)
        _trainer(g, d, data, "wgan-gp", d_steps=1, batch_size=5, seed=seed).train(2)
        runs[seed] = _flat(g)
        G0, _ = _reference(G, D, "wgan-gp", 2, 1, 5, seed,
                           lambda gen: data[torch.randint(0, data.shape[0], (5,), generator=gen)])
        assert torch.allclose(runs[seed], _flat(G0), rtol=1e-10, atol=1e-12), seed
    assert not torch.equal(runs[0], runs[2**32])


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("0", TypeError)])
def test_a_bad_seed_is_refused_naming_it(seed, error):
    G, D = _pair()
    with pytest.raises(error, match="seed"):
        GANTrainer(G, D, _data(), batch_size=5, seed=seed)


@pytest.mark.parametrize("labels,error", [(lambda n: torch.arange(n) % 3 + 0.5, TypeError),
                                          (lambda n: torch.arange(n) % 3 == 0, TypeError),
                                          (lambda n: torch.arange(n) - 1, ValueError)])
def test_unconditional_labels_that_are_not_mode_ids_are_refused(labels, error):
    """info["real_labels"] is a LongTensor with -1 on the generated rows: float labels were truncated into it
    (0.5 -> 0) and a label -1 read as a generated row, silently."""
    G, D = _pair()
    with pytest.raises(error, match="labels"):
        GANTrainer(G, D, _data(), labels=labels(20), batch_size=5)


def test_a_fractional_latent_dim_is_refused_not_truncated():
    G, D = _pair(latent=2)
    with pytest.raises(ValueError, match="latent_dim"):
        GANTrainer(G, D, _data(), latent_dim=2.5, batch_size=5)
    with pytest.raises(ValueError, match="latent_dim"):
        GANTrainer(G, D, _data(), latent_dim=True, batch_size=5)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True])
def test_a_bad_max_grad_norm_is_refused_when_the_trainer_is_built(bad):
    G, D = _pair()
    with pytest.raises(ValueError, match="max_grad_norm"):
        GANTrainer(G, D, _data(), batch_size=5, max_grad_norm=bad)


def test_a_scheduled_wgan_gp_run_resumed_from_a_checkpoint_equals_the_hand_written_loop(tmp_path):
    """Each player's schedule is stepped after each of its updates (D's d_steps times an iteration); a run stopped
    at a checkpoint and resumed by a trainer built with another seed continues bit for bit."""
    torch.set_num_threads(1)
    data = _data()
    G, D = _pair()
    G0, D0 = _reference(G, D, "wgan-gp", 4, 2, 5, 0,
                        lambda gen: data[torch.randint(0, data.shape[0], (5,), generator=gen)],
                        lr_g=lambda k: LR_G * 0.7 ** k, lr_d=lambda k: LR_D * 0.5 ** (k // 3))
    schedules = dict(lr_scheduler_g=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.7),
                     lr_scheduler_d=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5))
    straight_G, straight_D = copy.deepcopy(G), copy.deepcopy(D)
    _trainer(straight_G, straight_D, data, "wgan-gp", 2, 5, **schedules).train(4)
    first_G, first_D = copy.deepcopy(G), copy.deepcopy(D)
    _trainer(first_G, first_D, data, "wgan-gp", 2, 5, checkpoint_dir=tmp_path, checkpoint_every=2, **schedules).train(2)
    resumed_G, resumed_D = _pair(seed=5)  # other initial weights, overwritten by the checkpoint
    trainer = _trainer(resumed_G, resumed_D, data, "wgan-gp", 2, 5, seed=123, checkpoint_dir=tmp_path, **schedules)
    trainer.train(4, resume=True)
    assert torch.equal(_flat(resumed_G), _flat(straight_G)) and torch.equal(_flat(resumed_D), _flat(straight_D))
    assert trainer.d_optimizer.param_groups[0]["lr"] == LR_D * 0.5 ** 2  # 8 updates: halved at 3 and 6
    assert torch.allclose(_flat(straight_D), _flat(D0), rtol=1e-10, atol=1e-12)
    assert torch.allclose(_flat(straight_G), _flat(G0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options,name", [
    (dict(g_optimizer=True, lr_g=1e-4), "lr_g"), (dict(d_optimizer=True, lr_d=1e-4), "lr_d"),
    (dict(g_optimizer=True, d_optimizer=True, betas=(0.0, 0.9)), "betas"),
])
def test_optimizer_settings_that_an_optimizer_given_would_ignore_are_refused(options, name):
    """lr_g=1e-4 with g_optimizer=SGD(lr=0.05) trained at 0.05, silently."""
    G, D = _pair()
    if options.pop("g_optimizer", False):
        options["g_optimizer"] = torch.optim.SGD(G.parameters(), lr=0.05)
    if options.pop("d_optimizer", False):
        options["d_optimizer"] = torch.optim.SGD(D.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=name):
        GANTrainer(G, D, _data(), batch_size=5, **options)


def test_the_default_optimizers_take_lr_and_betas_and_one_given_optimizer_leaves_the_other_default():
    """coverage: the settings still reach the default Adams (betas the one built beside a given optimizer)."""
    G, D = _pair()
    trainer = GANTrainer(G, D, _data(), batch_size=5, lr_g=2e-4, lr_d=3e-4, betas=(0.0, 0.9))
    assert trainer.g_optimizer.param_groups[0]["lr"] == 2e-4 and trainer.d_optimizer.param_groups[0]["lr"] == 3e-4
    assert trainer.g_optimizer.param_groups[0]["betas"] == (0.0, 0.9)
    trainer = GANTrainer(G, D, _data(), batch_size=5, g_optimizer=torch.optim.SGD(G.parameters(), lr=0.05), lr_d=3e-4,
                         betas=(0.0, 0.9))
    assert isinstance(trainer.d_optimizer, torch.optim.Adam) and trainer.d_optimizer.param_groups[0]["betas"] == (0.0, 0.9)
    assert GANTrainer(G, D, _data(), batch_size=5).g_optimizer.param_groups[0]["lr"] == 1e-3


def test_integer_tensor_data_is_refused_as_a_dataloaders_batches_are():
    """uint8 images were cast to floats in [0, 255] and trained on silently (a DataLoader's are refused)."""
    G, D = _pair()
    with pytest.raises(TypeError, match="floating"):
        GANTrainer(G, D, (torch.rand(20, 2) * 255).to(torch.uint8), batch_size=5)
    with pytest.raises(ValueError, match="no real samples"):
        GANTrainer(G, D, torch.zeros(0, 2, dtype=F64), batch_size=5)
