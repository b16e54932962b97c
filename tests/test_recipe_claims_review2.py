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
