"""gp_weight is λ of WGAN-GP's gradient penalty; the other losses have none, so another λ beside
them is a setting that changes nothing: it is named in a warning, not dropped without a word."""

import warnings

import pytest
import torch

from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.gan.losses import DiscriminatorLoss


def _build(**kw):
    torch.manual_seed(0)
    G, D = MLPGenerator(latent_dim=3, hidden=8), MLPDiscriminator(hidden=8)
    return GANTrainer(G, D, torch.randn(20, 2), batch_size=5, **kw)


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
def test_a_gradient_penalty_weight_beside_a_loss_without_one_is_named(loss):
    with pytest.warns(UserWarning, match=rf"gp_weight=5.0 has no effect with loss='{loss}'"):
        _build(loss=loss, gp_weight=5.0)
    with pytest.warns(UserWarning, match="only 'wgan-gp' has a gradient penalty"):
        DiscriminatorLoss(loss, gp_weight=0.0)


def test_the_default_and_wgan_gp_say_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(loss="hinge")
        _build(loss="wgan-gp", gp_weight=5.0)
        DiscriminatorLoss("nonsaturating")
    # λ changes the wgan-gp loss of a penalty example and nothing else
    values, roles = torch.tensor([0.3, -0.2, 1.5]), torch.tensor([1, 0, 2])
    five, ten = DiscriminatorLoss("wgan-gp", 5.0)(values, roles), DiscriminatorLoss("wgan-gp")(values, roles)
    assert torch.equal(five[:2], ten[:2]) and torch.allclose(2 * five[2], ten[2])
