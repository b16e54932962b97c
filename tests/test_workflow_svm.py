"""Review of the GAN coverage metrics against hand computations on samples placed exactly.

The tangent SVM agreed with ``sklearn.svm.SVC(kernel="precomputed")`` on a Gram of per-example
gradients computed by explicit autograd loops (labels {0, 1}, {-1, 1}, {3, 7}, three classes,
imbalance, multi-output models, float32, conv + BatchNorm in eval mode): no change there but its
multiclass docstring.
"""

import math

import torch

from genkernel.gan.metrics import converged, image_coverage, mode_coverage


def test_mode_coverage_counts_a_sample_at_exactly_the_threshold():
    # Two modes, std 0.1: samples at distance 0.3 = 3·std (or just past it) around each. With 25 rows or
    # more cdist expands |x|² + |μ|² − 2x·μ, whose rounding put (10, −0.3) outside the mode at (10, 0).
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    samples = torch.tensor([[0.3, 0.0], [0.0, 0.3], [10.3, 0.0], [10.0, -0.3]] * 10, dtype=torch.float64)
    std, sigmas = 0.1, 3.0
    near = [[math.dist(s, c) <= sigmas * std for c in centers.tolist()] for s in samples.tolist()]  # by hand
    counts = [sum(row[k] for row in near) for k in range(2)]
    assert counts == [20, 10]  # (10.3, 0) is 0.3000000000000007 from its mode: past the threshold
    cov = mode_coverage(samples, centers, std, sigmas)
    assert cov["mode_counts"] == counts
    assert cov["modes_hit"] == 2
    assert cov["quality_share"] == sum(any(row) for row in near) / len(near) == 0.75


def test_image_coverage_counts_classes_by_their_labels():
    # A GAN on two digit classes labelled 3 and 7: two classes, both hit, not 8 with 6 "missed".
    g = torch.Generator().manual_seed(0)
    train = torch.randn(20, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, 7] * 10)
    held_out = train[:6] + 1e-3  # nearest-training distances 0.002: the threshold
    samples = torch.cat([train[:3], train[10:11], torch.full((2, 4), 50.0, dtype=torch.float64)])  # 3×3, 7, noise ×2
    cov = image_coverage(samples, train, labels, held_out)
    assert cov["num_modes"] == 2 and cov["classes"] == [3, 7]
    assert cov["mode_counts"] == [3, 1] and cov["modes_hit"] == 2
    assert cov["quality_share"] == 4 / 6
    assert converged(cov, quality=0.5)[0]


def test_converged_needs_the_exact_number_of_modes():
    # 0.28 of 25 modes is 7 (0.28 * 25 is 7.000000000000001 in floats: ceil made it 8)
    ok, why = converged({"modes_hit": 7, "num_modes": 25, "quality_share": 0.9}, modes_fraction=0.28)
    assert ok and "at least 7 modes" in why
    assert not converged({"modes_hit": 6, "num_modes": 25, "quality_share": 0.9}, modes_fraction=0.28)[0]
    assert converged({"modes_hit": 6, "num_modes": 8, "quality_share": 0.9})[0]  # the default 3/4 of 8
    assert not converged({"modes_hit": 5, "num_modes": 8, "quality_share": 0.9})[0]
