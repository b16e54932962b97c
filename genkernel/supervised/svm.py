"""Support vector machines on tangent features and on raw inputs (paper Figure 3).

A linear SVM on tangent features φ(x) = ∇_θ f(x; θ_T) is a kernel machine with the gradient
kernel at θ_T; an RBF SVM on the raw inputs is the fixed-kernel baseline. Both are
``sklearn.svm.SVC`` (hinge loss): the tangent SVM on the precomputed Gram matrix of the scaled
features (the same classifier as a linear SVM on the features, and fast for a few thousand
training points however many parameters the network has). The features are centred on the
training mean first: with the SVM's unpenalized intercept this changes no classifier (w·(φ − μ) + b
is w·φ + b'), but the untrained network's features share one dominant direction, and without it
the quadratic program on their Gram matrix barely converges at large C. A comparison of the two is only fair
when both are tuned the same way: ``tune=True`` chooses C (and the RBF's gamma) by stratified
k-fold cross-validation on the training set, and the chosen values and the cross-validated
accuracy are kept in ``.tuning``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.adapter import analysis_mode, as_tuple, batch_size, checked_forward, select
from ..core.engine.kernels import tangent_features

__all__ = ["TangentSVM", "fit_tangent_svm", "fit_rbf_svm", "TANGENT_CS", "RBF_CS", "RBF_GAMMA_FACTORS"]

TANGENT_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # C grid of the tangent SVM (features scaled to mean norm 1)
RBF_CS = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # C grid of the RBF SVM
RBF_GAMMA_FACTORS = (1.0, 10.0, 100.0, 1000.0)  # gamma grid, as multiples of sklearn's "scale"
MAX_ITER = 10_000_000  # libsvm iterations per fit: a cap against a quadratic program that does not converge
DEFAULT_C = 1.0  # C of an untuned fit


def _quiet_fit(svm, x: np.ndarray, labels: np.ndarray):
    """``svm.fit(x, labels)`` without sklearn's convergence warning: :func:`_converged` refuses instead."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return svm.fit(x, labels)


def _labels(y) -> np.ndarray:
    lab = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return lab.reshape(-1)


def _check_labels(labels: np.ndarray, n: int) -> None:
    """Refuse no examples, labels that are not one per example or name fewer than two classes."""
    if n == 0:  # (np.unique of no labels named none, and the message below read labels[0]: an IndexError)
        raise ValueError("x has no examples: an SVM needs training examples of at least two classes")
    if labels.shape[0] != n:
        raise ValueError(f"y has {labels.shape[0]} labels for {n} examples: pass one label per example")
    if np.unique(labels).size < 2:
        raise ValueError(f"an SVM needs at least two classes, but every label is {labels.tolist()[0]!r}")


def _check_folds(folds) -> int:
    """``folds`` as an int >= 2 (a float was truncated and 0, 1 or True blamed the class counts)."""
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral):
        raise TypeError(f"folds must be an int, got {type(folds).__name__} ({folds!r}); pass e.g. folds=5")
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for cross-validation, got {folds}; pass e.g. folds=5")
    return int(folds)


def _check_grid(values: Sequence[float], name: str) -> list[float]:
    """The grid ``values`` as positive finite floats: a C or gamma <= 0 or NaN failed its fits inside the
    search, which only warned, dropped it and kept it in the recorded grid."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of positive numbers, got {values!r}")
    out = []
    for v in list(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name} must hold positive finite numbers, got {v!r} in {list(values)!r}; drop it")
        out.append(float(v))
    if not out:
        raise ValueError(f"{name} is empty; pass at least one value, e.g. the default grid")
    return out


def _check_positive(value, name: str) -> float:
    """``value`` as a positive finite float (the untuned C, or a numeric gamma)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_untuned(given: dict[str, Any]) -> None:
    """Refuse settings ``tune=True`` would ignore: the search chooses them from its grids."""
    ignored = [name for name, (value, default) in given.items() if not (value is default or value == default)]
    if ignored:
        raise ValueError(
            f"{', '.join(f'{n}={given[n][0]!r}' for n in ignored)} would be ignored: tune=True chooses "
            + " and ".join(ignored) + " by cross-validation from their grids (Cs=, gamma_factors=); pass a grid "
            "holding the value, or tune=False to fit with it"
        )


def _converged(svm, where: str):
    """``svm`` if libsvm solved its quadratic program within :data:`MAX_ITER` iterations, else an error:
    sklearn only warns and keeps the unfinished solution, whose predictions then depend on the cap."""
    iterations = np.asarray(getattr(svm, "n_iter_", [0]))
    if (iterations >= MAX_ITER).any():
        raise RuntimeError(
            f"the {where} did not converge in {MAX_ITER} libsvm iterations: its solution is the cap's, not the "
            "SVM's. Use a smaller C (or a smaller gamma), or scale the inputs"
        )
    return svm


def _search(estimator, grid: dict, x: np.ndarray, y: np.ndarray, folds: int, seed: int):
    """Stratified k-fold grid search; returns (best estimator refit on all of x, tuning record). The
    record counts the cross-validation fits libsvm stopped at its iteration cap (``unconverged_fits``):
    their scores are those of unfinished solutions. The refit best estimator must converge."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    folds = _check_folds(folds)
    counts = np.unique(y, return_counts=True)[1]
    folds = int(min(folds, counts.min()))
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 examples of every class")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        search = GridSearchCV(estimator, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).fit(x, y)
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # the others as they would have been shown
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    best = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in search.best_params_.items()}
    best_estimator = _converged(search.best_estimator_, f"SVM refit with the chosen {best}")
    return best_estimator, {"tuned": True, "best": best, "cv_accuracy": float(search.best_score_),
                            "folds": folds, "grid": {k: [float(v) for v in vs] for k, vs in grid.items()},
                            "unconverged_fits": int(unconverged)}


@dataclass
class TangentSVM:
    """A linear SVM on tangent features of ``model`` at its parameters when fitted.

    Attributes:
        model: the network whose tangent features are used (not modified; its parameters must not
            change between fitting and prediction).
        svm: the fitted ``sklearn.svm.SVC(kernel="precomputed")`` on the Gram matrix of the scaled features.
        scale: centred features are divided by this constant (their mean training norm), so that
            the SVM's C means the same across models.
        mean: ``[P]`` the training features' mean (features are centred on it).
        output_index: which output's gradient is the feature (None: the single output).
        train_features: ``[N, P]`` the scaled training features (the Gram matrix's other side).
        tuning: how C was chosen (``{"tuned": False, "best": {"C": ...}}`` or the search's record).
        state_at_fit: the model's parameters and buffers when fitted; features of a model that
            changed since are refused (they would not match the training features).
    """

    model: nn.Module
    svm: Any
    scale: float
    output_index: int | None
    train_features: np.ndarray
    mean: np.ndarray | float = 0.0
    tuning: dict = field(default_factory=dict)
    state_at_fit: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_features(self) -> int:
        return int(self.train_features.shape[1])

    def features(self, x) -> np.ndarray:
        """``[M, P]`` centred and scaled tangent features of inputs ``x`` (Tensor or tuple of Tensors)."""
        if self.state_at_fit is not None:
            now = _model_state(self.model)
            fitted = self.state_at_fit
            changed = sorted(k for k in now.keys() | fitted.keys()
                             if k not in now or k not in fitted or not torch.equal(now[k], fitted[k]))
            if changed:
                raise RuntimeError(
                    f"the model changed since the tangent SVM was fitted ({changed[:5]}): its features no longer match "
                    "the training features. Predict before training on, or fit a new SVM at the current parameters"
                )
        phi = tangent_features(self.model, x, output_index=0 if self.output_index is None else self.output_index)
        return (phi.detach().cpu().to(torch.float64).numpy() - self.mean) / self.scale

    def _gram(self, x, chunk: int = 2048) -> np.ndarray:
        """``[M, N]`` kernel between inputs ``x`` (a Tensor or a tuple of Tensors, as when fitted)
        and the training inputs."""
        xs = as_tuple(x, name="x")
        m = batch_size(xs, name="x")
        return np.concatenate([self.features(select(xs, slice(i, i + chunk))) @ self.train_features.T
                               for i in range(0, m, chunk)])

    def decision_function(self, x: torch.Tensor) -> np.ndarray:
        """``[M]`` signed distances to the separating hyperplane (> 0: the second of the sorted
        classes, ``svm.classes_[1]``). For C > 2 classes ``[M, C]``: ``SVC``'s one-vs-one machines
        (C(C − 1)/2 of them, as libsvm trains), aggregated per class as votes plus a bounded
        confidence (sklearn's ``decision_function_shape="ovr"``): not the scores of one-vs-rest SVMs."""
        return self.svm.decision_function(self._gram(x))

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """``[M]`` predicted labels."""
        return self.svm.predict(self._gram(x))

    def accuracy(self, x: torch.Tensor, y) -> float:
        """Share of ``x`` whose predicted label equals ``y``."""
        predicted, labels = self.predict(x), _labels(y)
        if labels.shape != predicted.shape:  # numpy would broadcast a single label against every prediction
            raise ValueError(
                f"y has {labels.shape[0]} labels for {predicted.shape[0]} inputs: pass one label per input"
            )
        return float((predicted == labels).mean())


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (with their trainable flag) and buffers: everything the tangent features depend on."""
    state = {f"{name} (trainable={p.requires_grad})": p.detach() for name, p in model.named_parameters()}
    state.update({name: b.detach() for name, b in model.named_buffers()})
    return state


def fit_tangent_svm(model: nn.Module, x: torch.Tensor, y, *, C: float = DEFAULT_C, output_index: int | None = None,
                    tune: bool = False, Cs: Sequence[float] = TANGENT_CS, folds: int = 5, seed: int = 0) -> TangentSVM:
    """Fit a linear SVM on φ(x_n) = ∇_θ f(x_n; θ) (flattened, ``[N, P]``, scaled to mean norm 1).

    Args:
        model: a network with one output (or pick one with ``output_index``; required with several).
        x: ``[N, ...]`` training inputs (or a tuple of Tensors, the model's positional inputs; predict
            with the same layout); y: ``[N]`` labels of two or more classes (ints, strings or whole-valued
            floats: sklearn refuses continuous values such as 0.5).
        C: SVM regularization (larger: fit the training set harder), when not tuned.
        tune: choose C from ``Cs`` by stratified ``folds``-fold cross-validation (seeded by ``seed``);
            a ``C`` other than the default beside it is refused (it would be ignored).

    A fit libsvm stops at its iteration cap (:data:`MAX_ITER`) is refused (sklearn only warns).
    """
    from sklearn.svm import SVC

    if tune:
        _check_untuned({"C": (C, DEFAULT_C)})
    labels = _labels(y)
    xs = as_tuple(x, name="x")
    _check_labels(labels, xs[0].shape[0])
    if output_index is None:
        with torch.no_grad(), analysis_mode(model):
            d = checked_forward(model, tuple(t[:1] for t in xs), name="x").shape[1]
        if d != 1:
            raise ValueError(
                f"the model has {d} outputs: choose the one whose gradient is the feature with output_index"
            )
    phi = tangent_features(model, x, output_index=0 if output_index is None else output_index)
    phi = phi.detach().cpu().to(torch.float64).numpy()
    mean = phi.mean(axis=0)
    phi = phi - mean
    scale = float(np.linalg.norm(phi, axis=1).mean())
    if not scale > 0:
        raise ValueError("the tangent features do not vary over the training inputs: the model's output gradient is the "
                         "same everywhere")
    phi = phi / scale
    gram = phi @ phi.T
    if tune:
        svm, tuning = _search(SVC(kernel="precomputed", max_iter=MAX_ITER), {"C": _check_grid(Cs, "Cs")}, gram, labels,
                              folds, seed)
    else:
        C = _check_positive(C, "C")
        svm = _converged(_quiet_fit(SVC(kernel="precomputed", C=C, max_iter=MAX_ITER), gram, labels), f"SVM with C={C:g}")
        tuning = {"tuned": False, "best": {"C": C}}
    state = {k: v.clone() for k, v in _model_state(model).items()}
    return TangentSVM(model, svm, scale, output_index, phi, mean=mean, tuning=tuning, state_at_fit=state)


def fit_rbf_svm(x: torch.Tensor, y, *, C: float = DEFAULT_C, gamma: str | float = "scale", tune: bool = False,
                Cs: Sequence[float] = RBF_CS, gamma_factors: Sequence[float] = RBF_GAMMA_FACTORS, folds: int = 5,
                seed: int = 0):
    """Fit ``sklearn.svm.SVC(kernel="rbf")`` on the raw inputs ``x [N, D]``; returns the SVC with
    ``.tuning`` (``tune=True``: C from ``Cs`` and gamma from ``gamma_factors`` × sklearn's "scale",
    1 / (D · Var(x)), by stratified ``folds``-fold cross-validation; a ``C`` or ``gamma`` other than the
    default beside it is refused, as it would be ignored). A fit libsvm stops at its iteration cap is refused."""
    from sklearn.svm import SVC

    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"x must be a Tensor [N, ...] of training inputs, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-dim Tensor'}: "
                        "pass torch.as_tensor(x)")
    labels = _labels(y)
    _check_labels(labels, x.shape[0])  # (before the reshape: [0, -1] of no examples is ambiguous, a RuntimeError)
    xs = x.detach().cpu().to(torch.float64).reshape(x.shape[0], -1).numpy()
    if tune:
        _check_untuned({"C": (C, DEFAULT_C), "gamma": (gamma, "scale")})
        # sklearn's gamma="scale", 1 / (D · Var(x)), and as sklearn 1.0 for constant inputs (it was 1 / 0 = inf, which
        # SVC refused with an unrelated "gamma ... Got inf" error)
        var = float(xs.var())
        scale = 1.0 / (xs.shape[1] * var) if var != 0 else 1.0
        grid = {"C": _check_grid(Cs, "Cs"), "gamma": [f * scale for f in _check_grid(gamma_factors, "gamma_factors")]}
        svm, tuning = _search(SVC(kernel="rbf", max_iter=MAX_ITER), grid, xs, labels, folds, seed)
    else:
        C = _check_positive(C, "C")
        if not (isinstance(gamma, str) and gamma in ("scale", "auto")):
            gamma = _check_positive(gamma, "gamma (or 'scale', 'auto')")
        svm = _converged(_quiet_fit(SVC(kernel="rbf", C=C, gamma=gamma, max_iter=MAX_ITER), xs, labels),
                         f"RBF SVM with C={C:g}, gamma={gamma}")
        tuning = {"tuned": False, "best": {"C": C, "gamma": gamma}}
    svm.tuning = tuning
    return svm
