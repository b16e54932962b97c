"""The shared kernel core, in three layers a reader can tell apart by name.

- :mod:`genkernel.core.engine`: the kernel engine: gradient kernels, tangent features and loss
  gradients (the torch.func reference, layer factors, factored kernels, projections);
- :mod:`genkernel.core.tracking`: the ledger machinery: optimizer steps (performed or observed),
  update splitting per optimizer, group-state routes, quadrature, the tracker and its ledgers;
- :mod:`genkernel.core.grouping`: partitions of the training contributions and what is read
  from a ledger (shares with κ, traffic, coarser views, measured minus control).

:mod:`genkernel.core.adapter` is the one input adapter every layer uses. This package exports
the API; plumbing stays importable from its module.
"""

from .adapter import set_exact_cuda_mode
from .engine import (
    KernelPlan,
    distributed_gradient_kernel,
    expected_relative_error,
    gradient_kernel,
    kernel_plan,
    normalize_kernel,
    sketched_gradient_kernel,
    sketched_tangent_features,
    tangent_features,
)
from .errors import LedgerCheckError, NonFiniteError, SkippedStep
from .grouping import Partitions
from .tracking import (
    GROUP_STATES,
    QUADRATURE_RULES,
    SUPPORTED_OPTIMIZERS,
    NetShares,
    OptimizerStep,
    PathKernelLedger,
    PathKernelTracker,
    StepContributions,
    TrainerCallback,
    perform_step,
)

__all__ = [
    "GROUP_STATES", "KernelPlan", "LedgerCheckError", "NetShares", "NonFiniteError", "OptimizerStep", "Partitions",
    "PathKernelLedger", "PathKernelTracker", "QUADRATURE_RULES", "SUPPORTED_OPTIMIZERS", "SkippedStep", "StepContributions",
    "TrainerCallback", "distributed_gradient_kernel", "expected_relative_error", "gradient_kernel", "kernel_plan",
    "normalize_kernel", "perform_step", "set_exact_cuda_mode", "sketched_gradient_kernel", "sketched_tangent_features",
    "tangent_features",
]
