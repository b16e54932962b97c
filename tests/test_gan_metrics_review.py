"""Review of genkernel.gan.metrics / losses / passes against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.gan.losses import (
    GENERATED,
    PENALTY,
    REAL,
    DiscriminatorLoss,
    DiscriminatorObjective,
    GeneratorLoss,
    discriminator_losses,
    generator_losses,
)
from genkernel.gan.metrics import cosine, image_coverage, mode_coverage, own_minus_others, pooled_interval
from genkernel.gan.passes import classes_taken, preserved, state_snapshot
from genkernel.stats import mean_interval

F64 = torch.float64


# -- probability losses: a saturated sigmoid must not give NaN gradients ----------------------
def test_probability_losses_have_the_clamped_gradient_not_nan_at_p_0_and_1():
    # −log p on real rows, −log(1 − p) on generated rows; where the log is clamped (p = 0 on a real row,
    # p = 1 on a generated one) loss 100 and gradient 0. The branch torch.where discards must not leak
    # NaN either: a real row at p = 1 has −log(1 − p) = −log 0 in the generated branch.
    p = torch.tensor([0.0, 1.0, 0.3, 0.6, 0.0, 1.0], dtype=F64, requires_grad=True)
    roles = torch.tensor([GENERATED, REAL, REAL, GENERATED, REAL, GENERATED])
    losses = discriminator_losses("nonsaturating", p, roles, output="probability")
    torch.testing.assert_close(losses.detach(), torch.tensor([0.0, 0.0, -math.log(0.3), -math.log(0.4), 100.0, 100.0],
                                                             dtype=F64), rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(losses.sum(), p)
    torch.testing.assert_close(grad, torch.tensor([1.0, -1.0, -1 / 0.3, 1 / 0.4, 0.0, 0.0], dtype=F64), rtol=1e-15, atol=0)

    q = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    g_losses = generator_losses("nonsaturating", q, "probability")
    (g_grad,) = torch.autograd.grad(g_losses.sum(), q)
    torch.testing.assert_close(g_losses.detach(), torch.tensor([100.0, math.log(2.0), 0.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(g_grad, torch.tensor([0.0, -2.0, -1.0], dtype=F64), rtol=1e-15, atol=0)


def test_a_confident_float32_sigmoid_discriminator_trains_with_finite_gradients():
    # float32's sigmoid is exactly 1 from a logit of ~17 on: a D sure of its real rows (the aim of training)
    # gave NaN in every parameter's gradient. Reference: float64 BCE on the logits (p = σ(s) not rounded to 1).
    torch.manual_seed(0)
    lin = nn.Linear(2, 1)
    D = nn.Sequential(lin, nn.Sigmoid())
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[10.0, 10.0]]))
        lin.bias.zero_()
    x = torch.tensor([[2.0, 2.0], [-0.1, 0.05], [0.3, -0.2], [-2.0, -2.0]])  # logits 40, −0.5, 1, −40
    roles = torch.tensor([REAL, REAL, GENERATED, GENERATED])
    loss = DiscriminatorLoss(output="probability")(D(x).reshape(-1), roles)
    grads = torch.autograd.grad(loss.mean(), list(lin.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)

    w64, b64 = lin.weight.detach().to(F64).requires_grad_(True), lin.bias.detach().to(F64).requires_grad_(True)
    logits = (x.to(F64) @ w64.T + b64).reshape(-1)
    ref = F.binary_cross_entropy_with_logits(logits, (roles == REAL).to(F64), reduction="none").mean()
    ref_grads = torch.autograd.grad(ref, [w64, b64])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.to(F64), r, rtol=1e-5, atol=1e-6)


# -- softplus exact in float64 ----------------------------------------------------------------
def test_nonsaturating_losses_and_gradients_are_exact_in_float64_beyond_softplus_threshold():
    # F.softplus returns x itself above 20: log(1 + e²¹) = 21 + 7.6e-10 came out as 21.
    s = torch.tensor([-38.0, -30.0, -25.0, -21.0, -20.5, -5.0, 0.0, 5.0, 20.5, 21.0, 30.0, 38.0], dtype=F64,
                     requires_grad=True)
    exact_g = torch.log1p(torch.exp(-s.detach()))
    g = generator_losses("nonsaturating", s)
    torch.testing.assert_close(g.detach(), exact_g, rtol=4e-16, atol=0)
    (dg,) = torch.autograd.grad(g.sum(), s)
    torch.testing.assert_close(dg, -torch.sigmoid(-s.detach()), rtol=4e-16, atol=0)

    roles = torch.tensor([REAL, GENERATED] * 6)
    d = discriminator_losses("nonsaturating", s, roles)
    exact_d = torch.where(roles == REAL, torch.log1p(torch.exp(-s.detach())), torch.log1p(torch.exp(s.detach())))
    torch.testing.assert_close(d.detach(), exact_d, rtol=4e-16, atol=0)
    (dd,) = torch.autograd.grad(d.sum(), s)
    torch.testing.assert_close(dd, torch.where(roles == REAL, -torch.sigmoid(-s.detach()), torch.sigmoid(s.detach())),
                               rtol=4e-16, atol=0)


# -- roles -------------------------------------------------------------------------------------
def test_roles_of_another_shape_or_unknown_ids_are_refused():
    values = torch.tensor([0.5, -0.2, 1.3, 0.9], dtype=F64)
    with pytest.raises(ValueError, match=r"roles must have shape \[4\]"):
        discriminator_losses("hinge", values, torch.tensor([[1], [0], [1], [2]]))  # was a [4, 4] loss
    with pytest.raises(ValueError, match=r"0 \(generated\), 1 \(real\) or 2"):
        discriminator_losses("wgan-gp", values, torch.tensor([1, 0, 3, 2]))  # 3 was a generated row
    with pytest.raises(ValueError, match=r"0 \(generated\), 1 \(real\) or 2"):
        DiscriminatorLoss("hinge")(values, torch.tensor([1, -1, 0, 0]))
    with pytest.raises(TypeError, match="roles must be integer ids"):
        discriminator_losses("hinge", values, torch.tensor([1.0, 0.5, 0.0, 1.0]))  # 0.5 was a generated row
    with pytest.raises(ValueError, match=r"roles must have shape \[4\]"):
        DiscriminatorLoss(output="probability")(torch.rand(4, 1, dtype=F64), torch.tensor([[1], [0], [1], [0]]))
    with pytest.raises(ValueError, match=r"values must be \[B\]"):
        discriminator_losses("hinge", values[:, None], torch.tensor([1, 0, 1, 0]))  # was a [4, 4] loss
    torch.manual_seed(0)
    critic = DiscriminatorObjective(nn.Sequential(nn.Linear(2, 4), nn.SiLU(), nn.Linear(4, 1)).to(F64), penalty=True)
    with pytest.raises(ValueError, match=r"roles must have shape \[3\]"):
        critic(torch.randn(3, 2, dtype=F64), torch.tensor([[1], [0], [2]]))  # was a [3, 1, 3] output
    # the documented roles still work, and give the formulas
    roles = torch.tensor([REAL, GENERATED, PENALTY, REAL])
    want = torch.stack([-values[0], values[1], 10.0 * (values[2] - 1) ** 2, -values[3]])
    torch.testing.assert_close(discriminator_losses("wgan-gp", values, roles), want, rtol=0, atol=0)


def test_generator_loss_refuses_num_classes_without_conditional():
    D = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="conditional=True"):
        GeneratorLoss(D, num_classes=10)  # the class range was never checked: conditional stayed False
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        GeneratorLoss(D, conditional=True, num_classes=0)  # every class id would be refused with a misleading range


# -- cosine ------------------------------------------------------------------------------------
def test_cosine_matches_numpy_and_survives_tiny_and_huge_rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 6))
    ref = [float(np.dot(x.ravel(), y) / (np.linalg.norm(x.ravel()) * np.linalg.norm(y))) for x, y in zip(a, b)]
    got = cosine(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-14, atol=1e-15)
    # scale does not change a cosine: rows of 1e-200 (‖a‖·‖b‖ underflowed to 0) and 1e200 (overflowed to inf)
    unit = cosine(torch.tensor(a[:, :, 0]), torch.tensor(b[:, :3]))
    for scale in (1e-200, 1e-160, 1e160, 1e200):
        torch.testing.assert_close(cosine(torch.tensor(a[:, :, 0]) * scale, torch.tensor(b[:, :3]) * scale), unit,
                                   rtol=1e-14, atol=1e-15)
    # zero rows: NaN (no direction), not 0
    zero = cosine(torch.zeros(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64))
    assert torch.isnan(zero).all()


def test_cosine_refuses_rows_that_would_broadcast():
    with pytest.raises(ValueError, match="rows of equal size"):
        cosine(torch.randn(4, 3), torch.randn(4, 1))  # was |cos| > 1: a broadcast product
    with pytest.raises(ValueError, match="rows of equal size"):
        cosine(torch.randn(4, 3), torch.randn(1, 3))


# -- coverage ----------------------------------------------------------------------------------
def test_image_coverage_distances_are_exact_so_a_held_out_image_is_within_its_own_threshold():
    # cdist's matrix-product expansion put an image's own copy 8.9e-7 from it; the threshold is then not
    # the held-out images' true distance, and a held-out image offered as a sample fell outside it.
    g = torch.Generator().manual_seed(0)
    train = torch.rand(200, 784, generator=g, dtype=F64) * 2 - 1
    labels = torch.arange(200) % 10
    copies = image_coverage(train[:30], train, labels, train[:30], quantile=0.5)
    assert copies["threshold"] == 0.0 and copies["quality_share"] == 1.0
    failed = []
    for trial in range(5):
        held = train[:50] + 0.3 * torch.randn(50, 784, generator=g, dtype=F64)
        samples = torch.cat([held[torch.randperm(50, generator=g)], 10 * torch.randn(7, 784, generator=g, dtype=F64)])
        cov = image_coverage(samples, train, labels, held, quantile=1.0)
        exact = (held[:, None, :] - train[None]).pow(2).sum(-1).sqrt().min(dim=1).values  # brute force
        assert abs(cov["threshold"] - float(exact.max())) <= 1e-12
        if round(cov["quality_share"] * 57) != 50:
            failed.append(trial)
    assert failed == []


def test_image_coverage_refuses_labels_that_do_not_pair_with_the_images():
    train, held = torch.randn(10, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="one label per training image"):
        image_coverage(held, train, torch.arange(12), held)  # two labels belonged to no image
    with pytest.raises(ValueError, match="integer class labels"):
        image_coverage(held, train, torch.arange(10).to(F64) / 10, held)  # 0.1..0.9 all became class 0
    with pytest.raises(ValueError, match="quantile"):
        image_coverage(held, train, torch.arange(10), held, quantile=95)


def test_mode_coverage_refuses_radii_that_count_no_sample_and_centers_of_other_data():
    centers = torch.tensor([[0.0, 0.0], [5.0, 0.0]], dtype=F64)
    samples = torch.tensor([[0.1, 0.0], [5.0, 0.2]], dtype=F64)
    for std in (-0.1, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std must be a finite number > 0"):
            mode_coverage(samples, centers, std)  # -0.1 and nan reported 0 of 2 modes hit
    with pytest.raises(ValueError, match="sigmas must be a finite number > 0"):
        mode_coverage(samples, centers, 0.1, sigmas=-3.0)
    with pytest.raises(ValueError, match=r"centers must be \[K, 2\]"):
        mode_coverage(samples, centers[:, :1], 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        mode_coverage(samples[:0], centers, 0.1)  # a quality share of NaN
    # a list of centres is the tensor's
    assert mode_coverage(samples, centers.tolist(), 0.1) == mode_coverage(samples, centers, 0.1)


# -- coupling statistics -----------------------------------------------------------------------
def test_own_minus_others_matches_a_loop_over_probes_with_nan_entries():  # coverage
    rng = np.random.default_rng(1)
    for _ in range(60):
        G, M = int(rng.integers(2, 5)), int(rng.integers(2, 12))
        S = rng.normal(size=(M, G))
        S[rng.random((M, G)) < 0.15] = np.nan
        g = rng.integers(0, G, size=M)
        ref = np.full(M, np.nan)
        for m in range(M):
            a = g[m]
            others = [np.mean(col) for b in range(G) if b != a
                      for col in [[S[k, a] for k in range(M) if g[k] == b and not np.isnan(S[k, a])]] if col]
            if others:
                ref[m] = S[m, a] - np.mean(others)
        got = own_minus_others(torch.tensor(S), torch.tensor(g), G).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14)


def test_pooled_interval_is_the_clustered_interval_and_refuses_windows_that_do_not_pair():
    values = [[0.1, 0.3, None, 0.2], [0.5, 0.4, 0.0, 0.6]]
    clusters = [[0, 0, 1, 2], [0, 1, 1, 2]]
    got = pooled_interval(values, clusters)
    units = [np.mean([0.1, 0.3, 0.5]), np.mean([0.4, 0.0]), np.mean([0.2, 0.6])]  # None dropped, by group over windows
    ref = mean_interval(units)
    assert got.n == 3 and got.estimate == pytest.approx(ref.estimate, abs=1e-15)
    assert (got.low, got.high) == pytest.approx((ref.low, ref.high), abs=1e-14)
    with pytest.raises(ValueError, match="pair up window by window"):
        pooled_interval([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]], [[0, 1, 2, 0], [1, 2, 0]])  # was read shifted


# -- passes ------------------------------------------------------------------------------------
def test_preserved_leaves_batchnorm_spectral_norm_and_the_rng_as_they_were():  # coverage
    from torch.nn.utils import spectral_norm as legacy_spectral_norm
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    D = nn.Sequential(spectral_norm(nn.Linear(3, 6)), nn.BatchNorm1d(6), nn.Dropout(0.3),
                      legacy_spectral_norm(nn.Linear(6, 4)), nn.SiLU(), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    out = D(x)  # training's forward; its graph saved BatchNorm's buffers
    before, rng = state_snapshot(D), torch.get_rng_state()
    versions = {n: b._version for n, b in D.named_buffers()}
    with preserved(D):
        D(torch.randn(8, 3)).sum().backward()
    after = state_snapshot(D)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert versions == {n: b._version for n, b in D.named_buffers()}
    out.sum().backward()  # training's graph still backpropagates


def test_classes_taken_reads_the_forward_signature():  # coverage
    class Two(nn.Module):
        def forward(self, x, y):
            return x

    class Optional(nn.Module):
        def forward(self, x, y=None):
            return x

    class Star(nn.Module):
        def forward(self, *args):
            return args[0]

    assert classes_taken(Two()) is True and classes_taken(nn.Linear(2, 1)) is False
    assert classes_taken(Optional()) is None and classes_taken(Star()) is None
    assert classes_taken(nn.DataParallel(Two())) is True


def test_an_unconditional_generator_loss_refuses_classes_a_conditional_d_would_take():
    class CondD(nn.Module):  # D(x, y=None): unconditional when the classes are left out
        def __init__(self):
            super().__init__()
            self.lin, self.emb = nn.Linear(2, 1).to(F64), nn.Embedding(3, 1).to(F64)

        def forward(self, x, y=None):
            out = self.lin(x)
            return out if y is None else out + self.emb(y)

    torch.manual_seed(0)
    D, x, y = CondD(), torch.randn(4, 2, dtype=F64), torch.tensor([0, 2, 1, 2])
    with pytest.raises(ValueError, match="conditional=True"):
        GeneratorLoss(D)(x, y)  # was softplus(−D(x)): the classes silently dropped
    torch.testing.assert_close(GeneratorLoss(D, conditional=True, num_classes=3)(x, y), F.softplus(-D(x, y).reshape(-1)))
    plain = nn.Linear(2, 1).to(F64)  # D(x) alone: targets it cannot take are ignored, as before
    torch.testing.assert_close(GeneratorLoss(plain)(x, y), F.softplus(-plain(x).reshape(-1)))
