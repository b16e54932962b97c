"""Review of the base experiments' claims (circle neighbourhoods, class kernels, null space,
printed digits, tangent embedding, tangent SVM): the claim functions on small hand-made inputs,
and one smoke run with a NaN seed."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def _svm_run(tangent: float, rbf: float, init: float) -> dict:
    """One seed's run_task result, the keys task_claim reads."""
    return {"tangent_svm_test_accuracy": tangent, "rbf_svm_test_accuracy": rbf, "tangent_svm_init_test_accuracy": init,
            "tangent_minus_rbf": tangent - rbf, "tangent_minus_tangent_init": tangent - init}


def test_tangent_svm_claim_at_the_ceiling_is_not_measured():
    """The committed circle task: every SVM, θ₀'s tangent SVM too, at test accuracy 1 in all three seeds.
    Both intervals are undefined (no spread), which neither shows nor refutes the claim: it was written as
    "did NOT hold" (measured, held False), which reads as the tangent SVM being worse than the RBF SVM."""
    from recipes.experiments import tangent_svm as recipe

    runs = [_svm_run(1.0, 1.0, 1.0) for _ in range(3)]
    c, difference, rise = recipe.task_claim("circle", runs, 3)
    assert not difference.defined and not rise.defined
    assert c["measured"] is False and c["held"] is None
    assert "ceiling" in c["why"] and "3 seeds" in c["why"]
    json.dumps(c, allow_nan=False)


def test_tangent_svm_claim_is_not_held_when_a_defined_half_fails():
    """A half whose interval is there and fails refutes the claim even when the other half has no spread:
    tangent SVM clearly below the RBF SVM, every seed the same rise from θ₀ (coverage)."""
    from recipes.experiments import tangent_svm as recipe

    runs = [_svm_run(t, 0.99, t - 0.1) for t in (0.80, 0.82, 0.81)]  # rise exactly 0.1 in every seed: undefined
    c, difference, rise = recipe.task_claim("ellipse", runs, 3)
    assert difference.defined and difference.high < -recipe.MARGIN and not rise.defined
    assert c["measured"] is True and c["held"] is False
    # and both halves shown: held
    runs = [_svm_run(t, 0.95, i) for t, i in ((0.97, 0.70), (0.98, 0.75), (0.96, 0.72))]
    c, _, _ = recipe.task_claim("ellipse", runs, 3)
    assert c["measured"] is True and c["held"] is True


def test_null_space_results_worst_domingos_error_is_nan_with_a_nan_seed(tmp_path, monkeypatch):
    """results.domingos_relative_error is the worst seed's error, as the claim takes it. A seed whose error is
    NaN (an output that did not move: 0/0) that is not the first was skipped by Python's max(), and the
    results said a finite worst error; np.max makes it NaN (null in the JSON), as the claim's value is."""
    from recipes.experiments import null_space as recipe

    real = recipe.run_seed

    def run_seed(seed, s, device, *, keep):
        out = real(seed, s, device, keep=keep)
        if not keep:  # the second seed
            out["domingos_relative_error"] = math.nan
        return out

    monkeypatch.setattr(recipe, "run_seed", run_seed)
    data = recipe.main(["--smoke", "--out-dir", str(tmp_path)])
    per_seed = data["results"]["domingos_relative_error_per_seed"]
    assert per_seed[0] is not None and per_seed[1] is None
    claim = data["claims"]["checkpoint_path_kernel_reproduces_change"]
    assert claim["value"] is None and claim["held"] is False
    assert data["results"]["domingos_relative_error"] is None


def test_printed_accuracy_interval_counts_digits_and_fonts_not_images():
    """Fails on the old code (a Wilson interval over 100 images taken as independent): a network that reads
    digits 0-4 in every font and 5-9 in none has accuracy 0.5 with Wilson [0.40, 0.60] over 100 images, but
    only 10 digits vary: the digit-clustered Student-t interval is [0.12, 0.88]. The wider of the digit and
    font-variant intervals is taken; a seed whose interval cannot be formed makes the claim not held."""
    import numpy as np
    import torch
    from scipy import stats as scipy_stats

    from recipes.experiments import printed_digits as recipe

    correct = torch.cat([torch.ones(50), torch.zeros(50)]).double()  # ordered by digit, 10 variants each
    digit_means = np.array([1.0] * 5 + [0.0] * 5)
    half = scipy_stats.t.ppf(0.975, 9) * digit_means.std(ddof=1) / math.sqrt(10)
    low, high = recipe.accuracy_interval(correct, 10)
    assert low == pytest.approx(0.5 - half, abs=1e-12) and high == pytest.approx(0.5 + half, abs=1e-12)
    assert low < 0.15  # far wider than Wilson's 0.40
    # an odd font: variant 0 wrong for every digit, the rest right: the variant-clustered interval is the wider
    font = torch.ones(100).double()
    font[::10] = 0.0
    low, high = recipe.accuracy_interval(font, 10)
    variant_means = np.array([0.0] + [1.0] * 9)
    half = scipy_stats.t.ppf(0.975, 9) * variant_means.std(ddof=1) / math.sqrt(10)
    assert low == pytest.approx(0.9 - half, abs=1e-12) and high == 1.0  # 0.9 + 0.23, within an accuracy's [0, 1]

    # every image right: no spread anywhere, Wilson over the 10 digits as units (not over 100 images)
    low, high = recipe.accuracy_interval(torch.ones(100).double(), 10)
    z2 = scipy_stats.norm.ppf(0.975) ** 2
    assert (low, high) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)  # Wilson's low end at p̂ = 1, n = 10

    from types import SimpleNamespace

    def run(values):
        return {"correct_per_image": values, "accuracy": float(values.mean()), "accuracy_init": 0.1,
                "auc_init": SimpleNamespace(auc=0.5), "auc_final": SimpleNamespace(auc=0.6),
                "gap_init": SimpleNamespace(gap=0.0), "gap_final": SimpleNamespace(gap=0.1)}

    good = torch.cat([torch.ones(80), torch.zeros(20)]).double()[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    three_digits = torch.cat([torch.ones(30), torch.zeros(70)]).double()  # 0.3: Wilson over 100 images [0.22, 0.40]
    claim = recipe.claims_from_runs([run(good), run(three_digits)], 100)["printed_recognised_above_chance"]
    assert claim["held"] is False and claim["interval"][0] < 0.1  # three digits read are no evidence above chance
