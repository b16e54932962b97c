"""Review of the tangent-kernel SVM (genkernel.supervised.svm), the 2-D embedding
(genkernel.analysis.embedding) against independent references: sklearn's SVC on brute-force
features, sklearn's own gamma="scale" and TSNE on the points; and the tuning arguments refused
with a message that names the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genkernel.analysis.embedding import embed_2d
from genkernel.supervised import mlp
from genkernel.supervised.svm import RBF_GAMMA_FACTORS, fit_rbf_svm, fit_tangent_svm

pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=30, m=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, 2, generator=g), torch.randn(m, 2, generator=g)
    return x, xt


def brute_features(model, x):
    """``[N, P]`` gradient of the single output, one autograd call per example."""
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(())
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, list(model.parameters()))]))
    return torch.stack(rows).double().numpy()


def test_tuning_refuses_folds_that_are_not_an_int_of_at_least_two():
    """folds=1 (or 0, True) was blamed on the class counts ("needs at least 2 examples of every
    class") although every class had 15; folds=2.7 was truncated to 2 folds silently."""
    x, _ = data()
    y = torch.where(x[:, 0] > 0, 1, -1)
    torch.manual_seed(0)
    model = mlp(2, [4], 1)
    fits = (lambda **kw: fit_tangent_svm(model, x, y, tune=True, **kw), lambda **kw: fit_rbf_svm(x, y, tune=True, **kw))
    for fit in fits:
        for folds in (0, 1):
            with pytest.raises(ValueError, match="folds must be >= 2"):
                fit(folds=folds)
        for folds in (2.7, True):
            with pytest.raises(TypeError, match="folds must be an int"):
                fit(folds=folds)


def test_tuning_refuses_grid_values_that_are_not_positive_and_finite():
    """A C (or gamma factor) <= 0 or NaN failed its fits inside GridSearchCV, which only warned,
    chose among the rest and recorded the bad value in ``tuning["grid"]``."""
    x, _ = data()
    y = torch.where(x[:, 0] > 0, 1, -1)
    torch.manual_seed(0)
    model = mlp(2, [4], 1)
    for bad in ((-1.0, 1.0), (0.0, 1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="Cs must hold positive finite numbers"):
            fit_tangent_svm(model, x, y, tune=True, Cs=bad, folds=2)
        with pytest.raises(ValueError, match="Cs must hold positive finite numbers"):
            fit_rbf_svm(x, y, tune=True, Cs=bad, folds=2)
        with pytest.raises(ValueError, match="gamma_factors must hold positive finite numbers"):
            fit_rbf_svm(x, y, tune=True, gamma_factors=bad, folds=2)


def test_tuned_rbf_gamma_grid_is_sklearn_scale_times_the_factors_also_for_constant_inputs():
    """The gamma grid is the factors times the gamma that sklearn's gamma="scale" resolves to on
    the same inputs. For constant inputs sklearn uses 1.0; the tuned SVM divided by Var(x) = 0 and
    SVC refused gamma = inf (InvalidParameterError) while the untuned one fitted."""
    from sklearn.svm import SVC

    x, _ = data()
    y = torch.where(x[:, 0] > 0, 1, -1)
    for inputs in (x * 3.0, torch.full_like(x, 0.25)):
        xs = inputs.double().numpy()
        resolved = SVC(kernel="rbf", gamma="scale").fit(xs, y.numpy())._gamma
        svm = fit_rbf_svm(inputs, y, tune=True, folds=2)
        np.testing.assert_allclose(svm.tuning["grid"]["gamma"], [f * resolved for f in RBF_GAMMA_FACTORS], rtol=1e-12)
        assert svm.tuning["best"]["gamma"] in svm.tuning["grid"]["gamma"]


def test_multiclass_tangent_svm_is_sklearns_linear_svm_on_brute_force_features():
    """Three string classes: the precomputed-kernel SVM (features centred on the training mean,
    divided by their mean training norm) predicts as ``SVC(kernel="linear")`` on brute-force
    gradients, its one-vs-one aggregated scores agree, and accuracy is the share of the given
    split predicted right (coverage: multi-class was only tested through the binary case)."""
    from sklearn.svm import SVC

    x, xt = data(45, 20)
    names = np.array(["a", "b", "c"])
    y, yt = (names[((torch.atan2(v[:, 1], v[:, 0]) + np.pi) / (2 * np.pi) * 3).long().clamp(max=2).numpy()]
             for v in (x, xt))
    torch.manual_seed(0)
    model = mlp(2, [6], 1, act="tanh")
    phi, phit = brute_features(model, x), brute_features(model, xt)
    mean = phi.mean(0)
    scale = np.linalg.norm(phi - mean, axis=1).mean()
    reference = SVC(kernel="linear", C=5.0).fit((phi - mean) / scale, y)
    svm = fit_tangent_svm(model, x, y, C=5.0)
    assert list(svm.svm.classes_) == ["a", "b", "c"]
    np.testing.assert_allclose(svm.decision_function(xt), reference.decision_function((phit - mean) / scale), atol=1e-9)
    predicted = reference.predict((phit - mean) / scale)
    assert (svm.predict(xt) == predicted).all()
    assert svm.accuracy(xt, yt) == pytest.approx(float((predicted == yt).mean()))
    assert 0.0 < svm.accuracy(xt, yt) and svm.accuracy(x, y) == pytest.approx(
        float((reference.predict((phi - mean) / scale) == y).mean()))


def test_embed_2d_tsne_of_euclidean_distances_is_sklearns_tsne_of_the_points():
    """t-SNE's affinities use squared distances; sklearn squares a precomputed matrix itself, so
    embed_2d must pass plain distances: its embedding of exact Euclidean distances equals
    ``TSNE(metric="euclidean")`` on the points with the same seed (coverage)."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 4.0])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    coords, method = embed_2d(torch.from_numpy(d), method="tsne", seed=3, perplexity=5.0)
    reference = TSNE(n_components=2, init="random", random_state=3, perplexity=5.0).fit_transform(x)
    assert method == "t-SNE"
    np.testing.assert_allclose(coords, reference, atol=1e-6)
    squared, _ = embed_2d(d ** 2, method="tsne", seed=3, perplexity=5.0)  # the property is not vacuous
    assert np.abs(squared - reference).max() > 1e-2


def test_a_fit_stopped_at_libsvm_s_iteration_cap_is_refused_and_counted_in_the_search(monkeypatch):
    """sklearn only warned when libsvm stopped at max_iter and kept the unfinished solution (its decision
    values then depend on the cap): the fit is refused now, and the search counts its unfinished fits."""
    from genkernel.supervised import svm as svm_module

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=g)  # random labels: many iterations at large C
    monkeypatch.setattr(svm_module, "MAX_ITER", 3)
    with pytest.raises(RuntimeError, match="did not converge in 3 libsvm iterations"):
        svm_module.fit_rbf_svm(x, y, C=1000.0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    with pytest.raises(RuntimeError, match="did not converge"):
        svm_module.fit_tangent_svm(model, x, y, C=1000.0)
    with pytest.raises(RuntimeError, match="did not converge"):
        svm_module.fit_rbf_svm(x, y, tune=True, Cs=[1000.0], gamma_factors=[1.0], folds=2)
    monkeypatch.setattr(svm_module, "MAX_ITER", 10_000_000)
    fitted = svm_module.fit_rbf_svm(x, y, tune=True, Cs=[1000.0], gamma_factors=[1.0], folds=2)
    assert fitted.tuning["unconverged_fits"] == 0 and (fitted.n_iter_ < 10_000_000).all()


def test_tune_refuses_the_settings_it_would_ignore():
    """tune=True chose C (and gamma) from the grids and silently dropped a C= or gamma= given beside it."""


    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(12) % 2
    with pytest.raises(ValueError, match=r"C=10.0 would be ignored: tune=True chooses C"):
        fit_rbf_svm(x, y, tune=True, C=10.0, folds=2)
    with pytest.raises(ValueError, match=r"gamma=0.5 would be ignored"):
        fit_rbf_svm(x, y, tune=True, gamma=0.5, folds=2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match=r"C=0.1 would be ignored"):
        fit_tangent_svm(model, x, y, tune=True, C=0.1, folds=2)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="C must be a positive finite number"):
            fit_rbf_svm(x, y, C=bad)
    with pytest.raises(ValueError, match="gamma"):
        fit_rbf_svm(x, y, gamma=-2.0)
