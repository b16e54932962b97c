"""The ledger machinery: an optimizer step, observed or performed, split into groups and recorded.

- :mod:`.step` and :mod:`.callbacks`: one optimizer step, and the trainers' callback protocol;
- :mod:`.splitters`: each optimizer's update rule, written once;
- :mod:`.routes` and :mod:`.sketched`: how groups' shares of every update are held (dense,
  factored, sketched);
- :mod:`.quadrature`: the rules for the exact one-step identity;
- :mod:`.tracker`: :class:`PathKernelTracker`, the numbered steps and their checks;
- :mod:`.ledger`: :class:`PathKernelLedger`, what is recorded;
- :mod:`.io`: atomic checkpoints and safe loading; :mod:`.distributed`: DDP support.
"""

from .callbacks import TrainerCallback, perform_step
from .ledger import NetShares, PathKernelLedger
from .quadrature import QUADRATURE_RULES
from .splitters import SUPPORTED_OPTIMIZERS
from .step import OptimizerStep
from .tracker import GROUP_STATES, PathKernelTracker, StepContributions

__all__ = [
    "GROUP_STATES", "NetShares", "OptimizerStep", "PathKernelLedger", "PathKernelTracker", "QUADRATURE_RULES",
    "SUPPORTED_OPTIMIZERS", "StepContributions", "TrainerCallback", "perform_step",
]
