"""The shared kernel core: adapters, kernels, per-example gradients, update splitting, ledgers."""

from .adapter import analysis_mode, as_tuple, functional_model, output_tensor, trainable_parameters
from .callbacks import TrainerCallback, fire, perform_step
from .distributed import distributed_gradient_kernel
from .errors import LedgerCheckError, NonFiniteError
from .factored import factored_gradient_kernel, make_plan
from .kernels import gradient_kernel, normalize_kernel, tangent_features
from .ledger import NetShares, PathKernelLedger, atomic_save
from .projections import project_gradients, sketched_gradient_kernel, sketched_tangent_features
from .quadrature import QUADRATURE_RULES, quadrature_rule
from .splitting import SUPPORTED_OPTIMIZERS, make_splitter
from .step import OptimizerStep
from .tracker import PathKernelTracker, StepContributions

__all__ = [
    "LedgerCheckError", "NetShares", "NonFiniteError", "OptimizerStep", "PathKernelLedger", "PathKernelTracker",
    "QUADRATURE_RULES", "SUPPORTED_OPTIMIZERS", "StepContributions", "TrainerCallback", "analysis_mode", "as_tuple",
    "atomic_save", "distributed_gradient_kernel", "fire", "functional_model", "gradient_kernel", "make_splitter", "normalize_kernel",
    "output_tensor", "perform_step", "quadrature_rule", "tangent_features", "trainable_parameters",
    "factored_gradient_kernel", "make_plan", "project_gradients", "sketched_gradient_kernel", "sketched_tangent_features",
]
