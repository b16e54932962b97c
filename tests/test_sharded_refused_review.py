"""FSDP's ``FullyShardedDataParallel`` (FSDP1) is refused by name as
``fully_shard`` is. Its ``FlatParameter`` is, since torch 2.1, a plain ``nn.Parameter`` marked ``_is_flat_param``
(``type(p).__name__`` is "Parameter"), so the check by type name never fired: the tracker then crashed the
process (a segmentation fault inside FSDP's unshard in its first JVP pass); with ``use_orig_params=True`` the
parameters are plain tensors, and the tracker advised replacing a layer, the kernel raised ``KeyError: 'weight'``."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.analysis.sharpness import loss_sharpness
from genkernel.core.adapter import trainable_parameters


def _loss(out, target):
    return ((out - target) ** 2).sum(1)


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_a_model_wrapped_in_fully_sharded_data_parallel_is_refused_by_name(one_process_group, use_orig_params):
    """Fails on the old code: ``trainable_parameters`` returned the flat parameter (or the plain views) unrefused."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (FSDP1's deprecation warning)
        model = FullyShardedDataParallel(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)),
                                         device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    shards = r"are shards.*DistributedDataParallel"
    with pytest.raises(ValueError, match=shards):  # first: the old code returned here, before anything crashed
        trainable_parameters(model)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=shards):
        PathKernelTracker(model, optimizer, _loss, x[:4], num_groups=2)
    with pytest.raises(ValueError, match=shards):
        gradient_kernel(model, x[:2], x[2:])
    with pytest.raises(ValueError, match=shards):
        loss_sharpness(model, _loss, x, y)


def test_coverage_ordinary_parameters_are_not_shards():
    """Coverage (passes before): a Parameter subclass, a lazy module's parameters once initialized and a plain
    module are accepted whole."""

    class Marked(nn.Parameter):
        pass

    model = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    model(torch.randn(2, 3))
    model[0].weight = Marked(model[0].weight.detach().clone())
    params = trainable_parameters(model)
    assert list(params) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert type(params["0.weight"]) is Marked
