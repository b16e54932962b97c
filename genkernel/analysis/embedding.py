"""Two-dimensional embeddings of tangent features for plots: UMAP when umap-learn is installed
(an optional extra), otherwise t-SNE from scikit-learn. The method used is returned, so the
figure can state it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["embed_2d", "umap_available"]


def umap_available() -> bool:
    """Whether ``umap-learn`` can be imported."""
    try:
        import umap  # noqa: F401
    except Exception:  # ImportError, or a broken numba install
        return False
    return True


def embed_2d(distances, *, method: str = "auto", seed: int = 0, perplexity: float = 30.0) -> tuple[np.ndarray, str]:
    """Embed points in 2-D from a precomputed distance matrix.

    Args:
        distances: ``[N, N]`` symmetric, zero diagonal (e.g. :func:`kernel_distance`); an array-like or a
            torch tensor on any device.
        method: "auto" (UMAP if importable, else t-SNE), "umap" or "tsne".
        seed: random state of the embedding.
        perplexity: t-SNE perplexity, capped at (N − 1) / 3.

    Returns:
        ``(coords [N, 2], method_used)`` with ``method_used`` "umap" or "t-SNE".

    Raises:
        TypeError: complex distances.
        ValueError: not square, fewer than 4 points, NaN, infinite or negative entries, asymmetric
            or with a nonzero diagonal (a kernel passed as distances); an unknown ``method``.
        ImportError: ``method="umap"`` without umap-learn.
    """
    if (distances.is_complex() if isinstance(distances, torch.Tensor) else np.iscomplexobj(distances)):
        # the float64 cast below would drop the imaginary part with only a warning
        raise TypeError("distances must be real; a complex matrix is not a distance matrix (take its absolute value "
                        "or real part explicitly if that is what you mean)")
    if isinstance(distances, torch.Tensor):  # on any device, with or without autograd history
        distances = distances.detach().cpu().to(torch.float64).numpy()
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 4:
        raise ValueError(f"distances must be a square matrix with at least 4 points, got shape {d.shape}")
    if not np.all(np.isfinite(d)) or (d < 0).any():
        raise ValueError("distances must be finite and non-negative")
    # A kernel or similarity matrix passed by mistake is also square and non-negative: its diagonal
    # (a point's similarity to itself) is what tells it apart. Rounding allowance: 1e-12 of the largest.
    tol = 1e-12 * float(d.max())
    diag_max, asym_max = float(np.abs(np.diag(d)).max()), float(np.abs(d - d.T).max())
    if diag_max > tol or asym_max > tol:
        raise ValueError(
            f"distances must be symmetric with a zero diagonal (largest diagonal entry {diag_max:.3g}, largest "
            f"asymmetry {asym_max:.3g}, largest distance {float(d.max()):.3g}). A kernel or similarity: convert a "
            "normalized kernel with genkernel.analysis.kernel_stats.kernel_distance. Euclidean distances from "
            "torch.cdist(x, x), whose default matmul shortcut leaves rounding on the diagonal: compute them with "
            "compute_mode='donot_use_mm_for_euclid_dist'"
        )
    if method not in ("auto", "umap", "tsne"):
        raise ValueError(f"method must be 'auto', 'umap' or 'tsne', got {method!r}")
    if method == "umap" and not umap_available():
        raise ImportError("method='umap' needs umap-learn (pip install 'genkernel[umap]'); use method='auto' or 'tsne'")
    if method in ("auto", "umap") and umap_available():
        import umap

        reducer = umap.UMAP(n_components=2, metric="precomputed", random_state=seed, n_neighbors=min(15, d.shape[0] - 1))
        return np.asarray(reducer.fit_transform(d)), "umap"
    from sklearn.manifold import TSNE

    n = d.shape[0]
    tsne = TSNE(
        n_components=2, metric="precomputed", init="random", random_state=seed,
        perplexity=float(min(perplexity, max(1.0, (n - 1) / 3.0))),
    )
    return np.asarray(tsne.fit_transform(d)), "t-SNE"
