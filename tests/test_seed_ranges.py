"""Every seed argument reads the same range, [0, 2**64), through core.adapter.seeded_generator:
torch's manual_seed wraps negative seeds and reads 32 bits of a CPU generator's seed, so seed and
seed + 2**32 drew the same batch order, probe noise, permutations and sketch directions."""

import pytest
import torch

from genkernel.core.adapter import seed_bits, seeded_generator
from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.kernels import state_kernel
from genkernel.diffusion.locality import kernel_locality
from genkernel.supervised import SupervisedTrainer, mse_loss


def _trainer(seed):
    model = torch.nn.Linear(2, 1)
    return SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=4, seed=seed)


def _order(seed):
    return torch.cat(list(_trainer(seed).batches(32, 8)))


def test_supervised_batch_orders_of_seeds_past_32_bits_are_their_own():
    assert torch.equal(_order(7), torch.randperm(32, generator=torch.Generator().manual_seed(7)))  # unchanged
    assert not torch.equal(_order(0), _order(2**32))  # before: the same order
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        _trainer(-1)  # before: torch wrapped it to 2**64 - 1


def _analyzer(seed):
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return NoiseLevelAnalyzer(make_scheduler(num_train_timesteps=100), data, num_bins=2, num_probes=4, controls=1,
                              kernel_points=2, seed=seed)


def test_analyzer_probe_noise_and_permutations_of_seeds_past_32_bits_are_their_own():
    same, other = _analyzer(3), _analyzer(3 + 2**32)
    expected = seeded_generator(3)
    assert not torch.equal(same.probe_noise, other.probe_noise)  # before: equal
    assert not torch.equal(same._perm_generator.get_state(), other._perm_generator.get_state())
    assert torch.equal(same._perm_generator.get_state(), torch.Generator().manual_seed(4).get_state())  # unchanged
    assert seed_bits(3) == expected.initial_seed() == 3
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        _analyzer(-1)


def test_state_kernel_sketch_and_locality_permutations_read_every_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    states = (torch.randn(3, 3, dtype=torch.float64),)
    first = state_kernel(model, states, output_sketch=2, seed=1)
    assert torch.equal(first, state_kernel(model, states, output_sketch=2, seed=1))
    assert not torch.equal(first, state_kernel(model, states, output_sketch=2, seed=1 + 2**32))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        state_kernel(model, states, output_sketch=2, seed=-5)
    k = torch.rand(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = (k + k.T) / 2
    bins = torch.arange(3)
    same, other = (kernel_locality(k, 4, bins, band=0, seed=s)["locality"]["control"] for s in (0, 2**32))
    assert same != other  # before: the same permutations
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        kernel_locality(k, 4, bins, band=0, seed=-1)


def test_gan_analyzer_control_draws_of_seeds_past_32_bits_are_their_own():
    from genkernel.gan import GANKernelAnalyzer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    G, D = MLPGenerator(3, 2, hidden=6).double(), MLPDiscriminator(2, hidden=6).double()
    latents = torch.randn(4, 3, dtype=torch.float64)
    same, other = (GANKernelAnalyzer(G, D, probe_latents=latents, seed=s).rng for s in (5, 5 + 2**32))
    assert not torch.equal(same.get_state(), other.get_state())  # before: the same permutations
    assert same.initial_seed() == 5  # seeds below 2**32 draw what they drew
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        GANKernelAnalyzer(G, D, probe_latents=latents, seed=-1)
