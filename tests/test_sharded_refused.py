"""Parameters sharded by FSDP (``fully_shard``: DTensors) are refused by name with what to do instead, by the
tracker and the kernels alike, before anything runs; before, the tracker's construction failed in its first
pass through a probe with DTensor's "got mixed torch.Tensor and DTensor" and advised replacing a layer."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel


def test_a_fully_sharded_model_is_refused_by_the_tracker_and_the_kernels(one_process_group):
    """Fails on the old code (the tracker refused at construction with "the model cannot be differentiated the way the
    ledger needs ... replace the layer the message names"; the kernel another DTensor error)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    fully_shard(model)
    x = torch.randn(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameters \['0.weight', '0.bias', '2.weight', '2.bias'\] are shards.*"
                                         r"DistributedDataParallel"):
        PathKernelTracker(model, optimizer, lambda out, target: ((out - target) ** 2).sum(1), x[:4], num_groups=2)
    with pytest.raises(ValueError, match="are shards"):
        gradient_kernel(model, x[:2], x[2:])
