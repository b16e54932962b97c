"""Review of the model configurations (genkernel.diffusion.configs / models, genkernel.gan.configs /
models) and the GAN analysis passes (genkernel.gan.passes): inputs of a size the networks were not
built for are refused instead of cropped or flattened into the batch, sizes and seeds are checked
before anything is built, and the DCGAN and the passes compute what they say (checked by hand)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.diffusion.configs import ddpm_cifar10_unet, mnist_unet
from genkernel.diffusion.models import tiny_unet
from genkernel.gan.configs import cdcgan64_discriminator, dcgan64_discriminator, dcgan64_generator
from genkernel.gan.models import DCDiscriminator
from genkernel.gan.passes import classes_taken, preserved


def test_the_dcgan_discriminator_refuses_images_that_are_not_64x64():
    """Before: a 96×96 batch of 2 gave 18 "probabilities" (a 3×3 map per image, flattened into the
    batch by Flatten(0)) and a 65×65 image ran as a cropped 64×64 one; a 64×64 image and slices of
    the nn.Sequential work as before."""
    D = dcgan64_discriminator(ndf=2, nc=1, seed=0).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert D(x).shape == (2,)
        assert torch.equal(D[2:](D[:2](x)), D(x))  # a slice starts inside the network: no 64×64 check there
        for side in (96, 65):
            with pytest.raises(ValueError, match=rf"64×64 images.*\(2, 1, {side}, {side}\).*resize or crop"):
                D(torch.randn(2, 1, side, side))
    cD = cdcgan64_discriminator(3, ndf=2, nc=1, seed=0).eval()
    with pytest.raises(ValueError, match=r"64×64 images.*\(2, 1, 65, 65\)"):  # before: a RuntimeError from torch.cat
        cD(torch.randn(2, 1, 65, 65), torch.tensor([0, 2]))


def test_the_dcgan_generator_refuses_latent_maps_other_than_1x1():
    """Before: latents [B, nz, 2, 2] made 80×80 images without a word, and [B, nz] failed inside
    conv_transpose2d without saying how to shape them."""
    G = dcgan64_generator(nz=5, ngf=2, nc=1, seed=0).eval()
    with torch.no_grad():
        assert G(torch.randn(2, 5, 1, 1)).shape == (2, 1, 64, 64)
        for shape in ((2, 5, 2, 2), (2, 5)):
            with pytest.raises(ValueError, match=r"latents \[B, nz, 1, 1\].*z\[:, :, None, None\]"):
                G(torch.randn(*shape))
    assert isinstance(G, nn.Sequential) and list(G.state_dict())[:3] == ["0.weight", "1.weight", "1.bias"]


def test_the_16x16_discriminator_refuses_a_17x17_image_it_would_crop():
    """Before: a 17×17 image went through the stride-2 convolutions as 16×16 (last row and column
    dropped) and got a score; a 32×32 one failed with a matrix-shape error that did not say why."""
    D = DCDiscriminator(1, width=4, spectral_norm=False)
    assert D(torch.randn(2, 1, 16, 16)).shape == (2, 1)
    for side in (17, 32):
        with pytest.raises(ValueError, match=rf"16×16 images.*\(2, 1, {side}, {side}\)"):
            D(torch.randn(2, 1, side, side))


@pytest.mark.parametrize("build", [
    lambda seed: dcgan64_generator(nz=2, ngf=1, nc=1, seed=seed),
    lambda seed: dcgan64_discriminator(ndf=1, nc=1, seed=seed),
    lambda seed: cdcgan64_discriminator(2, ndf=1, nc=1, seed=seed),
    lambda seed: mnist_unet(seed=seed),
    lambda seed: ddpm_cifar10_unet(seed=seed),
])
def test_a_float_or_bool_seed_is_refused(build):
    """Before: torch.manual_seed truncated seed=0.9 to 0 (the weights of seed=0) and took True as 1."""
    for seed in (0.9, True):
        with pytest.raises(TypeError, match="seed must be an int"):
            build(seed)


def test_the_diffusion_configs_check_sample_size_and_dropout_before_building():
    """Before: mnist_unet(sample_size=30) built a UNet that fails in its forward at a skip connection
    (15 != 16), and dropout=True was taken by nn.Dropout as p = 1 (every residual branch zeroed)."""
    with pytest.raises(ValueError, match="multiple of 4"):
        mnist_unet(sample_size=30)
    for build in (mnist_unet, ddpm_cifar10_unet):
        for dropout in (True, 1.0, -0.1):
            with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
                build(dropout=dropout)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"in_channels": 0}, ValueError, "in_channels must be a positive int"),  # before: a UNet with no input or output channels
    ({"norm_num_groups": 0}, ValueError, "norm_num_groups must be a positive int"),  # before: ZeroDivisionError
    ({"channels": ()}, TypeError, "non-empty tuple of block widths"),  # before: IndexError
    ({"channels": 32}, TypeError, "non-empty tuple of block widths"),  # before: 'int' object is not iterable
    ({"layers_per_block": 0}, ValueError, "layers_per_block must be a positive int"),  # before: built
    ({"sample_size": 28, "channels": (8, 8, 8, 8)}, ValueError, r"sample_size=28 must be a multiple of 8"),
])
def test_tiny_unet_refuses_sizes_it_cannot_build(kwargs, error, match):
    """Before: each of these built a UNet (or failed with an unrelated Python error); 28×28 with four
    widths built one whose forward fails in a skip connection (28 -> 14 -> 7 -> 4 -> 8 != 7)."""
    with pytest.raises(error, match=match):
        tiny_unet(**kwargs)


def test_the_dcgan_computes_upstreams_network_by_hand():
    """Coverage: passes on the code before. G and D (eval mode) equal PyTorch examples/dcgan's layers
    written out with torch.nn.functional on the same weights: ConvTranspose 4×4 (stride 1 then 2,
    padding 0 then 1), BatchNorm, ReLU, Tanh; Conv 4×4 stride 2, LeakyReLU 0.2, Sigmoid."""
    G = dcgan64_generator(nz=3, ngf=1, nc=2, seed=1).double().eval()
    D = dcgan64_discriminator(ndf=1, nc=2, seed=2).double().eval()
    z = torch.randn(2, 3, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def bn(h, m):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = z
    for i, (conv, norm) in enumerate([(0, 1), (3, 4), (6, 7), (9, 10)]):
        h = F.relu(bn(F.conv_transpose2d(h, G[conv].weight, stride=1 if i == 0 else 2, padding=0 if i == 0 else 1),
                      G[norm]))
    image = torch.tanh(F.conv_transpose2d(h, G[12].weight, stride=2, padding=1))
    h = F.leaky_relu(F.conv2d(image, D[0].weight, stride=2, padding=1), 0.2)
    for conv, norm in [(2, 3), (5, 6), (8, 9)]:
        h = F.leaky_relu(bn(F.conv2d(h, D[conv].weight, stride=2, padding=1), D[norm]), 0.2)
    score = torch.sigmoid(F.conv2d(h, D[11].weight)).reshape(2)
    with torch.no_grad():
        assert image.shape == (2, 2, 64, 64)
        torch.testing.assert_close(G(z), image, rtol=0, atol=1e-14)
        torch.testing.assert_close(D(G(z)), score, rtol=0, atol=1e-14)


def test_preserved_passes_compute_trainings_function_and_leave_no_trace():
    """Coverage: passes on the code before. A training-mode BatchNorm D inside ``preserved`` returns
    what a fresh copy in training mode returns and leaves every buffer and the RNG as they were; a
    spectral-norm D with ``reuse_power_iteration`` returns exactly training's output after training's
    forward (one power iteration on, a plain training-mode pass would differ)."""
    D = dcgan64_discriminator(ndf=1, nc=1, seed=0).double().train()
    x = torch.randn(4, 1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference, before = copy.deepcopy(D), {k: v.clone() for k, v in D.state_dict().items()}
    rng = torch.get_rng_state()
    with preserved(D):
        inside = D(x)
        torch.rand(3)
    assert torch.equal(inside, reference(x)) and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())

    S = DCDiscriminator(1, width=2, spectral_norm=True).double().train()
    xs = torch.randn(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    trained = S(xs)  # training's forward: one power iteration, then the weight it used
    u = [b.clone() for b in S.buffers()]
    with preserved(S, reuse_power_iteration=True):
        assert torch.equal(S(xs), trained)
    with preserved(S):
        assert not torch.equal(S(xs), trained)  # the next iteration's weight
    assert all(torch.equal(a, b) for a, b in zip(u, S.buffers())) and S.training
    assert (classes_taken(D), classes_taken(cdcgan64_discriminator(2, ndf=1, nc=1))) == (False, True)
