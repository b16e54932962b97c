"""Support vector machines on tangent features and on raw inputs (paper Figure 3).

A linear SVM on tangent features φ(x) = ∇_θ f(x; θ_T) is a kernel machine with the gradient
kernel at θ_T; an RBF SVM on the raw inputs is the fixed-kernel baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.engine.kernels import tangent_features

__all__ = ["TangentSVM", "fit_tangent_svm", "fit_rbf_svm"]


def _labels(y) -> np.ndarray:
    lab = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return lab.reshape(-1)


@dataclass
class TangentSVM:
    """A linear SVM fitted on tangent features of ``model`` at its current parameters.

    Attributes:
        model: the network whose tangent features are used (not modified).
        svm: the fitted ``sklearn.svm.LinearSVC``.
        scale: features are divided by this constant (the mean training feature norm), so that
            the SVM's C means the same across models.
        output_index: which output's gradient is the feature (None: the single output).
    """

    model: nn.Module
    svm: object
    scale: float
    output_index: int | None

    def features(self, x: torch.Tensor) -> np.ndarray:
        """``[M, P]`` scaled tangent features of inputs ``x``."""
        phi = tangent_features(self.model, x, output_index=0 if self.output_index is None else self.output_index)
        return phi.detach().cpu().to(torch.float64).numpy() / self.scale

    def decision_function(self, x: torch.Tensor) -> np.ndarray:
        """``[M]`` signed distances to the separating hyperplane (> 0: the positive class)."""
        return self.svm.decision_function(self.features(x))

    def accuracy(self, x: torch.Tensor, y) -> float:
        """Share of ``x`` whose predicted label equals ``y``."""
        return float((self.svm.predict(self.features(x)) == _labels(y)).mean())


def fit_tangent_svm(model: nn.Module, x: torch.Tensor, y, *, C: float = 1.0, output_index: int | None = None,
                    max_iter: int = 20000) -> TangentSVM:
    """Fit a linear SVM on φ(x_n) = ∇_θ f(x_n; θ) (flattened, ``[N, P]``).

    Args:
        model: a network with one output (or pick one with ``output_index``).
        x: ``[N, ...]`` training inputs; y: ``[N]`` labels (any two or more values).
        C: SVM regularization (larger: fit the training set harder).
    """
    from sklearn.svm import LinearSVC

    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    phi = tangent_features(model, x, output_index=0 if output_index is None else output_index)
    phi = phi.detach().cpu().to(torch.float64).numpy()
    scale = float(np.linalg.norm(phi, axis=1).mean())
    if not scale > 0:
        raise ValueError("the tangent features are all zero: the model's output does not depend on its parameters here")
    svm = LinearSVC(C=C, max_iter=max_iter, dual="auto").fit(phi / scale, _labels(y))
    return TangentSVM(model, svm, scale, output_index)


def fit_rbf_svm(x: torch.Tensor, y, *, C: float = 1.0, gamma: str | float = "scale"):
    """Fit ``sklearn.svm.SVC(kernel="rbf")`` on the raw inputs ``x [N, D]``; returns the SVC."""
    from sklearn.svm import SVC

    xs = x.detach().cpu().to(torch.float64).reshape(x.shape[0], -1).numpy()
    return SVC(kernel="rbf", C=C, gamma=gamma).fit(xs, _labels(y))
