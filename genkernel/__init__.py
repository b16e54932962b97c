"""genkernel: exact path-kernel (Domingos) ledgers for networks trained by gradient steps."""

from .core import (
    LedgerCheckError,
    NetShares,
    NonFiniteError,
    OptimizerStep,
    PathKernelLedger,
    PathKernelTracker,
    SkippedStep,
    StepContributions,
    TrainerCallback,
    gradient_kernel,
    normalize_kernel,
    perform_step,
    set_exact_cuda_mode,
    tangent_features,
)

__version__ = "0.1.0"
__all__ = [
    "LedgerCheckError", "NetShares", "NonFiniteError", "OptimizerStep", "PathKernelLedger", "PathKernelTracker",
    "SkippedStep", "StepContributions", "TrainerCallback", "gradient_kernel", "normalize_kernel", "perform_step",
    "set_exact_cuda_mode", "tangent_features",
]
