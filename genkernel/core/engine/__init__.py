"""The kernel engine: gradient kernels, tangent features and loss gradients of a model.

- :mod:`.reference`: the torch.func reference (per-example Jacobians) every fast path is tested against;
- :mod:`.factors`: layer factors captured by hooks, and everything read from them;
- :mod:`.factored`: kernels and Jacobians from factors, chunked under a memory budget;
- :mod:`.kernels`: the entry points (:func:`gradient_kernel`, :func:`tangent_features`) and the
  engine choice (:func:`kernel_plan`);
- :mod:`.gradients`: loss gradients summed into the groups of one or several partitions;
- :mod:`.per_example`: per-example contributions from factors (the tracker's factored route);
- :mod:`.projections`: seeded random-projection sketches;
- :mod:`.distributed`: kernels split across ranks.
"""

from .distributed import distributed_gradient_kernel
from .kernels import KernelPlan, choose_engine, gradient_kernel, kernel_plan, normalize_kernel, tangent_features
from .projections import expected_relative_error, sketched_gradient_kernel, sketched_tangent_features

__all__ = [
    "KernelPlan", "choose_engine", "distributed_gradient_kernel", "expected_relative_error", "gradient_kernel",
    "kernel_plan", "normalize_kernel", "sketched_gradient_kernel", "sketched_tangent_features", "tangent_features",
]
