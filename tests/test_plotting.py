"""Figures draw the numbers they are given; neighbours, purity, embeddings and retrieval weights agree
with brute-force references, and inputs they cannot answer are refused."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from genkernel.analysis.embedding import embed_2d  # noqa: E402
from genkernel.analysis.neighbors import euclidean_neighbors, kernel_neighbors, label_purity  # noqa: E402

F64 = torch.float64


# -- neighbours -----------------------------------------------------------------------------
def test_neighbors_equal_a_stable_argsort_with_ties():
    """Integer coordinates and similarities: many exact ties, which must go to the lower index."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, n, d = (int(v) for v in rng.integers(1, 6, 3) + np.array([0, 2, 0]))
        anchors = torch.tensor(rng.integers(-2, 3, (a, d)), dtype=F64)
        points = torch.tensor(rng.integers(-2, 3, (n, d)), dtype=F64)
        k = int(rng.integers(1, n + 1))
        squared = ((anchors.numpy()[:, None] - points.numpy()[None]) ** 2).sum(-1)  # exact integers
        reference = np.argsort(squared, axis=1, kind="stable")[:, :k]
        assert np.array_equal(euclidean_neighbors(anchors, points, k).numpy(), reference)
        similarity = torch.tensor(rng.integers(-3, 4, (a, n)), dtype=torch.float32)
        exclude = torch.tensor(rng.integers(-1, n, a))
        keys = -similarity.double().numpy()
        for row, left_out in enumerate(exclude.tolist()):
            if left_out >= 0:
                keys[row, left_out] = np.inf
        k = int(rng.integers(1, n))
        reference = np.argsort(keys, axis=1, kind="stable")[:, :k]
        assert np.array_equal(kernel_neighbors(similarity, k, exclude=exclude).numpy(), reference)
        labels = torch.tensor(rng.integers(0, 3, n))
        purity = label_purity(torch.tensor(reference), labels).numpy()
        assert np.allclose(purity, [np.bincount(labels.numpy()[r]).max() / k for r in reference], rtol=0, atol=1e-15)


def test_label_purity_refuses_nan_labels():
    """NaN equals nothing: the old count returned a purity of 0, outside its [1/k, 1] range."""
    with pytest.raises(ValueError, match="labels contain NaN"):
        label_purity(torch.tensor([[0, 1, 2]]), torch.tensor([math.nan, 1.0, 1.0]))
    assert label_purity(torch.tensor([[0, 1, 2]]), torch.tensor([0.5, 1.0, 1.0])).item() == pytest.approx(2 / 3)


# -- embedding ------------------------------------------------------------------------------
def test_embed_2d_refuses_a_kernel_or_an_asymmetric_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kernel = np.abs(x @ x.T)  # square, finite, non-negative: only the diagonal of 1 tells it from distances
    with pytest.raises(ValueError, match="zero diagonal"):
        embed_2d(kernel, method="tsne")
    distances = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    asymmetric = distances.copy()
    asymmetric[0, 1] += 0.5
    with pytest.raises(ValueError, match="symmetric"):
        embed_2d(asymmetric, method="tsne")
    coords, method = embed_2d(distances, method="tsne")
    assert coords.shape == (6, 2) and np.isfinite(coords).all() and method == "t-SNE"


# -- retrieval weights ------------------------------------------------------------------------
def test_top_weight_share_equals_a_brute_force_sum_and_is_nan_without_weights():
    from genkernel.diffusion.retrieval import RetrievalResult, normalized_entropy, top_weight_share

    torch.manual_seed(0)
    kernel = torch.randn(3, 4, 7, dtype=F64)
    kernel[1, 2] = -kernel[1, 2].abs()  # no positive k̂: no retrieval distribution
    top = kernel.topk(2, dim=-1).indices
    share = top_weight_share(kernel, top)
    for k in range(3):
        for s in range(4):
            weights = [max(v, 0.0) for v in kernel[k, s].tolist()]
            total = sum(weights)
            expected = math.nan if total == 0 else sum(weights[i] for i in top[k, s].tolist()) / total
            assert (math.isnan(expected) and math.isnan(share[k, s])) or share[k, s].item() == pytest.approx(expected)
    result = RetrievalResult(stages=torch.tensor([90, 50, 10]), states=torch.zeros(3, 4, 2), samples=torch.zeros(4, 2),
                             kernel=kernel, entropy=normalized_entropy(kernel), top_indices=top, top_share=share)
    result.top_share[2] = math.nan  # a stage where no sample had positive weights
    import json

    out = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert out["mean_top_share"][2] is None
    assert out["mean_top_share"][1] == pytest.approx(float(np.nanmean(share[1].numpy())))


# -- figures --------------------------------------------------------------------------------
def test_class_kernel_colours_put_white_at_zero():
    """A diverging map on a shared [low, 1] range: 0 must be its centre, whatever the low end."""
    from genkernel.plotting.figures import plot_class_kernels

    rng = np.random.default_rng(0)
    kernel = np.clip(rng.normal(0.4, 0.3, (8, 8)), -0.3, 1.0)
    kernel[0, 0] = -0.3
    fig = plot_class_kernels(kernel, kernel, 4, dataset="toy", gaps={"init": 0.1, "final": 0.2})
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 and images[0].norm.vmin < 0
    assert all(float(im.norm(0.0)) == pytest.approx(0.5) for im in images)
    assert all(float(im.norm(1.0)) == pytest.approx(1.0) for im in images)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_noise_matrices_figure_of_a_run_without_a_residual_ratio():
    """The residual of a run whose output did not change is None in the JSON: drawn as n/a, not a crash."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.diffusion import plot_noise_matrices

    matrices = {"traffic": [[0.7, 0.3], [0.2, 0.8], [None, None]], "share": [[1.2, -0.2], [None, 1.0], [0.5, 0.5]],
                "kappa": [1.0, None, 2.0]}
    report = {"matrices": matrices, "config": {"probe_levels": [3, 40, 90]}, "tracked_steps": 2,
              "residual": {"relative_residual": None}}
    fig = plot_noise_matrices(report)
    assert "residual n/a" in fig._suptitle.get_text()
    image = fig.axes[0].get_images()[0].get_array()
    assert np.allclose(np.ma.filled(image.astype(float), np.nan), [[0.7, 0.3], [0.2, 0.8], [np.nan, np.nan]],
                       equal_nan=True)  # the rows drawn are the report's rows, in order
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["3", "40", "90"]
    plt.close(fig)


def test_averaged_noise_matrices_state_the_worst_seeds_residual():
    """The figure of several seeds' mean matrices titled seed 0's residual as if it were the run's:
    with seed 0 at 1e-6 and seed 1 at 3e-3 it said 1.0e-06 while the recipe's JSON claim (worst seed)
    said 3e-3. The title now gives the largest residual over the seeds, n/a when one has none."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.diffusion import average_reports, plot_noise_matrices

    def report(traffic, residual):
        return {"matrices": {"traffic": traffic, "share": [[1.0, 0.0], [0.0, 1.0]], "kappa": [1.0, 1.0]},
                "config": {"probe_levels": [3, 40]}, "tracked_steps": 2, "residual": {"relative_residual": residual}}

    mean = average_reports([report([[0.6, 0.4], [0.2, 0.8]], 1e-6), report([[0.8, 0.2], [None, 0.6]], 3e-3)])
    assert mean["residual"]["relative_residual"] == 3e-3 and mean["seeds_averaged"] == 2
    fig = plot_noise_matrices(mean)
    assert "largest residual 3.0e-03" in fig._suptitle.get_text() and "mean of 2 seeds" in fig._suptitle.get_text()
    image = np.ma.filled(fig.axes[0].get_images()[0].get_array().astype(float), np.nan)
    assert np.allclose(image, [[0.7, 0.3], [0.2, 0.7]])  # the mean, NaN ignored
    plt.close(fig)
    assert average_reports([report([[1.0, 0.0]] * 2, 1e-6), report([[1.0, 0.0]] * 2, None)])["residual"][
        "relative_residual"] is None
