"""A claim about a change θ_T − θ₀ shows as its baseline the same statistic where the effect is absent:
the null model's change (a network trained on randomly permuted labels or shuffled targets, paired by
seed), not θ₀'s level, and it is judged against it: value − baseline is the excess over the null that
decides the verdict, and a null model that rises as much leaves the claim not held. θ₀'s level is
kept as the field ``theta_0``. The recipes' own claim functions, fed hand-built per-seed numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recipes.common import over_seeds


def _check_judged_against_null(claim: dict, rises: list[float], null_rises: list[float], theta_0: float) -> None:
    """The baseline is the null's rise with its interval; value − baseline is beyond_null; θ₀ is a field."""
    null = over_seeds(null_rises)
    assert claim["value"] == pytest.approx(np.mean(rises))
    assert claim["baseline"]["value"] == pytest.approx(null.estimate)
    assert claim["baseline"]["interval"] == pytest.approx([null.low, null.high])
    assert "null model" in claim["baseline"]["what"]
    beyond = over_seeds(np.subtract(rises, null_rises))
    assert claim["value"] - claim["baseline"]["value"] == pytest.approx(claim["beyond_null"])
    assert claim["beyond_null_interval"] == pytest.approx([beyond.low, beyond.high])
    assert claim["theta_0"] == pytest.approx(theta_0)


# per seed: the run's rise is 0.05–0.07; a weak null rises 0.00–0.01, a strong one exactly as much as the run
RISES = [0.05, 0.07, 0.06]
WEAK_NULL = [0.0, 0.01, 0.005]


# ------------------------------------------------------------------------------------- circle_neighborhoods
def _circle(seed, init, end):
    return {"seed": seed, "kernel_init": init, "kernel_end": end, "euclidean": 0.6}


def test_circle_sharpen_claim_baseline_is_the_random_label_rise():
    """Fails on the old code: claims_from_runs took no null model (the baseline was θ₀'s mean purity,
    0.70 here, beside a rise of 0.06; a network trained on random labels that rose as much was held)."""
    from recipes.experiments import circle_neighborhoods as recipe

    inits = [0.70, 0.69, 0.71]
    runs = [_circle(s, i, i + d) for s, i, d in zip((0, 1, 2), inits, RISES)]
    weak = [_circle(s, i, i + d) for s, i, d in zip((0, 1, 2), inits, WEAK_NULL)]
    c = recipe.claims_from_runs(runs, 0.0, weak)[0]["kernel_neighborhoods_sharpen"]
    _check_judged_against_null(c, RISES, WEAK_NULL, np.mean(inits))
    assert c["held"] is True and c["at_theta_T"] == pytest.approx(np.mean(inits) + np.mean(RISES))
    # a null model that rises exactly as much: the rise alone lies above 0, but the claim is not held
    same = recipe.claims_from_runs(runs, 0.0, [dict(r) for r in runs])[0]["kernel_neighborhoods_sharpen"]
    assert same["interval"][0] > 0 and same["held"] is False and same["beyond_null"] == 0.0
    # without the null model: not measured, no baseline value (θ₀'s level is not the statistic)
    alone = recipe.claims_from_runs(runs, 0.0)[0]["kernel_neighborhoods_sharpen"]
    assert alone["measured"] is False and alone["held"] is None and alone["baseline"]["value"] is None
    assert "null model" in alone["why"]
    with pytest.raises(ValueError, match="same seeds"):
        recipe.claims_from_runs(runs, 0.0, weak[::-1])


# ------------------------------------------------------------------------------------- regression_kernels
def _regression(seed, a0, a1, *, null=False):
    return {"seed": seed, "random_targets": null, "r2": 0.97, "r2_init": 0.0, "alignment": {"init": a0, "final": a1}}


def test_regression_alignment_claim_baseline_is_the_shuffled_target_rise():
    """Fails on the old code: claims_for took no null model and the baseline was θ₀'s alignment level
    (0.45 here) beside a gain θ_T − θ₀; a null model that gains as much now leaves it not held."""
    from recipes.experiments import regression_kernels as recipe

    inits = [0.40, 0.45, 0.50]
    runs = [_regression(s, a, a + d) for s, a, d in zip((0, 1, 2), inits, RISES)]
    weak = [_regression(s, a, a + d, null=True) for s, a, d in zip((0, 1, 2), inits, WEAK_NULL)]
    c = recipe.claims_for("sin", runs, weak)["sin_kernel_aligns_with_target"]
    _check_judged_against_null(c, RISES, WEAK_NULL, np.mean(inits))
    assert c["held"] is True and "shuffled targets" in c["baseline"]["what"]
    same = [_regression(s, a, a + d, null=True) for s, a, d in zip((0, 1, 2), inits, RISES)]
    tied = recipe.claims_for("sin", runs, same)["sin_kernel_aligns_with_target"]
    assert tied["interval"][0] > 0 and tied["held"] is False
    alone = recipe.claims_for("sin", runs)["sin_kernel_aligns_with_target"]
    assert alone["measured"] is False and alone["baseline"]["value"] is None
    # the fit claim's baseline is already the same statistic at θ₀ (R²): unchanged
    assert recipe.claims_for("sin", runs, weak)["sin_fitted"]["baseline"]["value"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same seeds"):
        recipe.claims_for("sin", runs, runs)  # the true-target runs passed as the null model


# ------------------------------------------------------------------------------------- tangent_embedding
def _embedding(seed, seen0, unseen0, seen1, unseen1, *, null=False):
    # per-image silhouettes whose means are the given values
    sil = {(w, g): np.array([v - 0.01, v + 0.01]) for (w, g), v in
           {("init", "seen"): seen0, ("init", "unseen"): unseen0, ("final", "seen"): seen1,
            ("final", "unseen"): unseen1}.items()}
    return {"seed": seed, "random_labels": null, "sil": sil}


def test_embedding_claims_baselines_are_the_random_label_changes():
    """Fails on the old code: claims_from_runs took no null model; the baselines were θ₀'s seen
    silhouette and θ₀'s seen − unseen gap (levels) beside changes from θ₀. Each claim's baseline is
    now the random-label network's value of the same change, and a null that changes as much is not held."""
    from recipes.experiments import tangent_embedding as recipe

    seeds = (0, 1, 2)
    seen0, unseen0 = [0.10, 0.12, 0.11], [0.05, 0.06, 0.04]
    # the run: seen rises by RISES, unseen by a third of that; the null: seen rises by WEAK_NULL, unseen by half
    runs = [_embedding(s, a, b, a + d, b + d / 3) for s, a, b, d in zip(seeds, seen0, unseen0, RISES)]
    nulls = [_embedding(s, a, b, a + d, b + d / 2, null=True) for s, a, b, d in zip(seeds, seen0, unseen0, WEAK_NULL)]
    claims = recipe.claims_from_runs(runs, nulls)
    seen = claims["seen_digits_cluster_after_training"]
    _check_judged_against_null(seen, RISES, WEAK_NULL, np.mean(seen0))
    did = [d - d / 3 for d in RISES]
    gap = claims["unseen_digits_cluster_less"]
    _check_judged_against_null(gap, did, [d - d / 2 for d in WEAK_NULL], np.mean(np.subtract(seen0, unseen0)))
    assert seen["held"] is True and gap["held"] is True
    # the null model separates seen from unseen digits as much as the run: not held, though the change is > 0
    alike = [_embedding(s, a, b, a + d, b + d / 3, null=True) for s, a, b, d in zip(seeds, seen0, unseen0, RISES)]
    for key, c in recipe.claims_from_runs(runs, alike).items():
        assert c["interval"][0] > 0 and c["held"] is False, key
    for c in recipe.claims_from_runs(runs).values():
        assert c["measured"] is False and c["baseline"]["value"] is None
    with pytest.raises(ValueError, match="same seeds"):
        recipe.claims_from_runs(runs, nulls[:2])


# ------------------------------------------------------------------------------------- block AUC claims
def _blocks(seed, a0, a1, *, null=False, per_digit=2):
    return {"seed": seed, "random_labels": null, "auc_init": SimpleNamespace(auc=a0), "auc_final": SimpleNamespace(auc=a1),
            "gap_init": SimpleNamespace(gap=0.01), "gap_final": SimpleNamespace(gap=0.02),
            "correct_per_image": torch.ones(10 * per_digit, dtype=torch.float64), "accuracy": 1.0, "accuracy_init": 0.1}


def test_block_claims_baseline_is_the_random_label_rise_not_theta0s_level():
    """Fails on the old code: classification_kernels and printed_digits showed θ₀'s block AUC (0.87 here)
    as the baseline of a rise θ_T − θ₀, the random-label null's rise, which the verdict already used,
    only as a field. Now the baseline is that rise with its interval, and value − baseline = beyond_null."""
    from recipes.experiments import classification_kernels as classification
    from recipes.experiments import printed_digits as printed

    inits = [0.87, 0.86, 0.88]
    runs = [_blocks(s, a, a + d) for s, a, d in zip((0, 1, 2), inits, RISES)]
    nulls = [_blocks(s, a, a + d, null=True) for s, a, d in zip((0, 1, 2), inits, WEAK_NULL)]
    tied = [_blocks(s, a, a + d, null=True) for s, a, d in zip((0, 1, 2), inits, RISES)]
    for claims_of, key in ((lambda n: classification.claims_from_runs(runs, n), "training_sharpens_class_blocks"),
                           (lambda n: printed.claims_from_runs(runs, 20, n), "cross_domain_digit_blocks_sharpen")):
        c = claims_of(nulls)[key]
        _check_judged_against_null(c, RISES, WEAK_NULL, np.mean(inits))
        assert c["held"] is True and c["null_rise"] == c["baseline"]["value"]
        assert claims_of(tied)[key]["held"] is False
        alone = claims_of(None)[key]
        assert alone["measured"] is False and alone["baseline"]["value"] is None


def test_circle_purer_than_euclidean_needs_training_on_the_labels_beyond_the_null():
    """'training made them so' took the plain rise from θ₀, which a network trained on random labels that
    rose as much passed (held); it is the sharpening rule now: beyond the random-label null's rise."""
    from recipes.experiments import circle_neighborhoods as recipe

    inits = [0.70, 0.69, 0.71]  # Euclidean 0.6: purer than Euclidean at θ_T in every seed
    runs = [_circle(s, i, i + d) for s, i, d in zip((0, 1, 2), inits, RISES)]
    weak = [_circle(s, i, i + d) for s, i, d in zip((0, 1, 2), inits, WEAK_NULL)]
    held = recipe.claims_from_runs(runs, 0.0, weak)[0]["kernel_purer_than_euclidean"]
    assert held["held"] is True and held["interval"][0] > 0
    tied = recipe.claims_from_runs(runs, 0.0, [dict(r) for r in runs])[0]["kernel_purer_than_euclidean"]
    assert tied["interval"][0] > 0 and tied["held"] is False and tied["beyond_null"] == 0.0
    alone = recipe.claims_from_runs(runs, 0.0)[0]["kernel_purer_than_euclidean"]
    assert alone["measured"] is False and alone["held"] is None and "null model" in alone["why"]
