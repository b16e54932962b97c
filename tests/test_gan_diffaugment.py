"""A GAN loop with differentiable augmentation (DiffAugment: D sees real and generated rows through random,
differentiable translations and brightness shifts, G's loss through them too) observed by the GAN analyzer with
``geometry_loss=GeneratorLoss(D)``: training is bit for bit the unobserved loop's, both ledgers add up, and
without ``geometry_loss`` the refusal names the augmentation and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genkernel.gan import GeneratorLoss
from test_gan_observe import B, CLIP, F64, analyzer_for, assert_identity, batches, nets, optimizers, states


def rand_brightness(x):
    """DiffAugment's (Zhao et al. 2020): one random shift in [-0.5, 0.5) per example."""
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def rand_translation(x, ratio=0.125):
    """DiffAugment's: each example shifted by up to ratio of its size, zero-padded."""
    shift_x, shift_y = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    translation_x = torch.randint(-shift_x, shift_x + 1, size=[x.size(0), 1, 1], device=x.device)
    translation_y = torch.randint(-shift_y, shift_y + 1, size=[x.size(0), 1, 1], device=x.device)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(x.size(2)),
                                                torch.arange(x.size(3)), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def diff_augment(x):
    return rand_translation(rand_brightness(x))


ROLES = torch.cat([torch.ones(B), torch.zeros(B)]).long()


def augmented_loop(G, D, g_opt, d_opt, data, analyzer=None):
    """DiffAugment's training step: D(T(real)), D(T(G(z))) in one forward; G's loss through D(T(G(z)))."""
    torch.manual_seed(5)  # (the augmentations draw from the global RNG)
    for real, z_d, z_g in data:
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([diff_augment(real), diff_augment(fake)])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_discriminator(losses, ROLES, x)  # the rows D saw
        (losses[:B].mean() + losses[B:].mean()).backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy_with_logits(D(diff_augment(fake)), torch.ones(B, dtype=F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_generator(losses, z_g, fake)  # G's samples, before the augmentation
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), CLIP)
        g_opt.step()


def test_an_augmented_loop_is_observed_bit_for_bit_with_exact_ledgers():
    """Coverage (held before the docs said how): bit for bit, identities to 1e-12."""
    data = batches(4)
    G, D = nets(batch_norm=False)
    g_opt, d_opt = optimizers(G, D)
    augmented_loop(G, D, g_opt, d_opt, data)
    G2, D2 = nets(batch_norm=False)
    g_opt2, d_opt2 = optimizers(G2, D2)
    analyzer = analyzer_for(G2, D2, geometry_loss=GeneratorLoss(D2))
    analyzer.bind(g_opt2, d_opt2)
    augmented_loop(G2, D2, g_opt2, d_opt2, data, analyzer)
    for a, b in zip(states(G, D), states(G2, D2)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for ledger in (analyzer.generator_ledger(), analyzer.generator_ledger("control_0"), analyzer.discriminator_ledger):
        assert ledger.steps == 4
        assert_identity(ledger)
    assert analyzer.generator_ledger().relative_residual() < 1e-3  # (midpoint rule on small Adam steps)


def test_without_geometry_loss_the_refusal_names_the_augmentation_and_the_fix():
    G, D = nets(batch_norm=False)
    g_opt, d_opt = optimizers(G, D)
    analyzer = analyzer_for(G, D)
    analyzer.bind(g_opt, d_opt)
    with pytest.raises(ValueError, match=r"random differentiable augmentation .*geometry_loss=GeneratorLoss\(D\)"):
        augmented_loop(G, D, g_opt, d_opt, batches(1), analyzer)
