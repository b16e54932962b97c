"""The GAN recipes' claims can fail (issue 11, items 6, 8, 9): every claim's code reports "not held" on a
null model (a generator independent of D: G trains against a fixed random discriminator while D trains
and supplies the geometry), the coupling claims hold on a positive control (a generator whose groups
have separate parameters), a claim that also holds on the null is not held, an unconverged GAN is
"not measured" with the reason, tool checks are labelled and fail on a broken ledger, and every entry
carries statistic, baseline, value, interval and held.

The runs are tiny (2-D MLPs, 15-20 iterations, seconds each) and built once per module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from genkernel.data import gaussian_ring, ring_mode_centers
from genkernel.gan import FunctionGroups, GANKernelAnalyzer, GANTrainer, GeneratorLoss, MLPDiscriminator, MLPGenerator
from genkernel.gan.metrics import few_units, own_minus_others
from recipes.experiments.gan_ring2d import gan_claims, report_for_run

F64 = torch.float64
CENTERS = ring_mode_centers(8, 2.0)
FINDINGS = ("distribution_guided", "kernel_smoothing_matters", "own_mode_coupling_traffic", "own_mode_coupling_net")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def hashed(z: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """A label of z with no spatial structure: nearby latents get unrelated labels."""
    return torch.floor(1e4 * z[:, 0].abs()).long() % groups


class Gated(nn.Module):
    """Positive control: one small MLP per label of z, so a training latent moves only the outputs of
    latents with its own label (coupling within a label, none across, and none from proximity alone)."""

    latent_dim = 2

    def __init__(self, groups: int = 4):
        super().__init__()
        self.nets = nn.ModuleList(MLPGenerator(2, 2, hidden=8, depth=2) for _ in range(groups))

    def forward(self, z):
        ids = hashed(z, len(self.nets))
        return sum((ids == g).to(z.dtype)[:, None] * net(z) for g, net in enumerate(self.nets))


def tiny_run(kind: str, *, iterations: int = 20, seed: int = 0) -> dict:
    """One run as the recipe stores it: ``{"seed", "report", "convergence"}``.

    kind: "gan" (the GAN), "null" (G trained against a fixed random discriminator; D trains as usual and
    its geometry groups the steps) or "gated" (the positive control, grouped by its own labels)."""
    data, modes = gaussian_ring(512, radius=2.0, std=0.05, seed=seed)
    torch.manual_seed(seed)
    G = Gated().to(F64) if kind == "gated" else MLPGenerator(2, 2, hidden=16, depth=2).to(F64)
    D = MLPDiscriminator(2, hidden=16, depth=2).to(F64)
    probes = torch.randn(32, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    if kind == "gated":
        options = dict(grouping=FunctionGroups(lambda z, x, w, s: hashed(z), 4, name="label"), comparison="latent_kmeans",
                       num_groups=4, eval_every=5)
    else:
        options = dict(grouping="mode", comparison="nearest_mode", mode_centers=CENTERS, mode_std=0.05, eval_every=1)
    if kind == "null":
        options["geometry_loss"] = GeneratorLoss(D)
    analyzer = GANKernelAnalyzer(G, D, probes, controls=2, window=5, seed=seed, **options)
    trainer = GANTrainer(G, D, data.to(F64), labels=modes, batch_size=32, lr_g=2e-3, lr_d=2e-3, callbacks=[analyzer], seed=seed)
    if kind == "null":
        torch.manual_seed(seed + 10_000)
        trainer.g_loss = GeneratorLoss(MLPDiscriminator(2, hidden=16, depth=2).to(F64).requires_grad_(False))
    trainer.train(iterations if kind != "gated" else 15)
    return {"seed": seed, "report": report_for_run(analyzer.report()),
            "convergence": {"converged": True, "why": "(tests: convergence not required)"}}


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def seeded() -> dict[str, list[dict]]:
    """Three seeds of each kind: the findings about the steps rest on seeds, not on one run's steps."""
    return {kind: [tiny_run(kind, seed=seed) for seed in SEEDS] for kind in ("gan", "null", "gated")}


@pytest.fixture(scope="module")
def runs(seeded) -> dict[str, dict]:
    return {kind: seeded[kind][0] for kind in seeded}


def claims_of(run: dict, **options) -> dict:
    return gan_claims([run], **{"require_convergence": False, **options})


# ------------------------------------------------------------------------------------------
# every finding: not held on the null model
# ------------------------------------------------------------------------------------------
def shifted(runs: list[dict], shifts: dict[int, float]) -> list[dict]:
    """Copies of ``runs`` whose every evaluation step's cos(ΔG, field) is lowered by ``shifts[seed]``."""
    return [{**r, "report": {**r["report"], "alignment": [{**row, "cos_kernel_field": row["cos_kernel_field"] - shifts[r["seed"]]}
                                                          for row in r["report"]["alignment"]]}} for r in runs]


APART = {0: 0.60, 1: 0.55, 2: 0.65}  # shifts that put a copy of the GAN's runs well below it in every seed


def test_distribution_guided_follows_the_field_and_needs_the_null_model_to_say_more(seeded):
    gan = gan_claims(seeded["gan"], require_convergence=False)["distribution_guided"]
    null = gan_claims(seeded["null"], require_convergence=False)["distribution_guided"]
    assert gan["units"] == null["units"] == f"{len(SEEDS)} seeds"
    # the GAN's steps follow D's field over the seeds, but "a generator independent of D does not" is the
    # other half of the claim: without the null model run it is not measured (it said held)
    assert gan["interval"][0] > 0.5 and gan["measured"] is False and "null model was not run" in gan["why"]
    assert null["held"] is False and null["interval"][0] < 0.5  # its steps follow the fixed random D's field, not D's
    judged = gan_claims(seeded["gan"], shifted(seeded["gan"], APART), require_convergence=False)["distribution_guided"]
    assert judged["measured"] is True and judged["held"] is True and judged["beyond_null_interval"][0] > 0


def test_kernel_smoothing_is_not_held_on_the_null_model(runs):
    null = claims_of(runs["null"])["kernel_smoothing_matters"]
    # the smoothed field beats the local push on the null model too (both share G's kernel): the claim also
    # requires the steps to follow D's field at all, which the null model's do not
    assert null["held"] is False
    assert null["value"] > 0 and claims_of(runs["null"])["distribution_guided"]["held"] is False
    # (its positive check is the quick ring recipe, where the samples have spread: held there)


@pytest.mark.parametrize("kind", ["traffic", "net"])
def test_coupling_needs_more_than_the_generators_smoothness(runs, kind):
    key = f"own_mode_coupling_{kind}"
    null = claims_of(runs["null"])[key]
    assert null["held"] is False
    assert null["geometry_minus_control"] > 0  # own minus control alone would credit smoothness to D: the confound
    gated = claims_of(runs["gated"])[key]
    assert gated["held"] is True and gated["interval"][0] > 0 and gated["geometry_minus_control_interval"][0] > 0
    assert gated["value"] > gated["baseline"]["value"]  # beyond the spatial grouping of the same size
    assert len(gated["per_window"]) == 3 and all("geometry_minus_spatial" in w for w in gated["per_window"])  # every window


def test_a_claim_that_also_holds_on_the_null_model_is_not_held(runs, seeded):
    # the coupling claims from one run (probe groups are its units), distribution_guided from the seeds
    one = claims_of(runs["gated"])
    several = gan_claims(seeded["gated"], shifted(seeded["gated"], APART), require_convergence=False)
    one_null = claims_of(runs["gated"], nulls=[runs["gated"]])
    several_null = gan_claims(seeded["gated"], seeded["gated"], require_convergence=False)
    for key in ("own_mode_coupling_traffic", "own_mode_coupling_net", "distribution_guided"):
        positive = several if key == "distribution_guided" else one
        as_its_own_null = several_null if key == "distribution_guided" else one_null
        assert positive[key]["held"] is True
        assert as_its_own_null[key]["held"] is False and as_its_own_null[key]["null_model_also_held"] is True
    positive, as_its_own_null = several, several_null
    base = as_its_own_null["distribution_guided"]["baseline"]
    assert base["held_on_null"] is True and base["value"] == pytest.approx(positive["distribution_guided"]["value"])


def test_the_step_claims_must_lie_above_the_null_model_paired_by_seed(seeded):
    """A null model whose own rule fails (its interval reaches below 0.5) but that follows the field
    about as well as the GAN, seed by seed, is no evidence that D guides the steps: the claim is
    judged by the paired difference, not only by the null failing its own threshold."""
    runs = seeded["gan"]
    close = shifted(runs, {0: 0.45, 1: -0.40, 2: 0.02})  # spread seeds, mean shift 0.023: paired difference ~ 0
    null_rule = gan_claims(close, require_convergence=False)["distribution_guided"]
    assert null_rule["held"] is False and null_rule["interval"][0] < 0.5  # the old rule: GAN held, null not: held
    c = gan_claims(runs, close, require_convergence=False)["distribution_guided"]
    assert c["held"] is False and c["beyond_null_interval"][0] < 0 < c["beyond_null_interval"][1]
    assert c["beyond_null"] == pytest.approx(0.0233333, abs=1e-6) and "paired by seed" in c["why_not_held"]
    apart = gan_claims(runs, shifted(runs, APART), require_convergence=False)["distribution_guided"]
    assert apart["held"] is True and apart["beyond_null_interval"][0] > 0.4
    # The real null model at these tiny settings: one of its three seeds follows D's field by chance (as in 2 of
    # 6 earlier), so three seeds cannot tell the GAN from it (0.55 [-0.67, 1.76]): not held, where the old rule
    # (the null's own interval reaches below 0.5) said held.
    real = gan_claims(runs, seeded["null"], require_convergence=False)["distribution_guided"]
    assert real["baseline"]["held_on_null"] is False and real["beyond_null_interval"][0] < 0 and real["held"] is False
    one_pair = gan_claims(runs, seeded["null"][:1], require_convergence=False)["distribution_guided"]
    assert one_pair["held"] is False and one_pair["beyond_null"] is None


# ------------------------------------------------------------------------------------------
# measured: false, tool checks, the entries' fields
# ------------------------------------------------------------------------------------------
def test_an_unconverged_gan_reports_the_coupling_claims_not_measured_with_the_reason(runs):
    run = copy.deepcopy(runs["gated"])
    run["convergence"] = {"converged": False, "why": "2 of 8 modes hit and 3% of samples on a mode at the end"}
    claims = gan_claims([run])
    for kind in ("traffic", "net"):
        c = claims[f"own_mode_coupling_{kind}"]
        assert c["measured"] is False and c["held"] is None
        assert "not converged" in c["why"] and "2 of 8 modes" in c["why"]
        assert c["value"] is not None  # the numbers are still reported
    assert claims["distribution_guided"]["measured"] is True  # a claim about each step, measurable at any stage


def test_tool_checks_are_labelled_and_fail_on_a_broken_ledger(runs):
    claims = claims_of(runs["gan"])
    for key in ("exact_ledger", "formula_matches_each_step"):
        assert claims[key]["kind"] == "tool_check" and claims[key]["held"] is True
    for key in FINDINGS:
        assert claims[key]["kind"] == "finding"
    broken = copy.deepcopy(runs["gan"])
    broken["report"]["generator"]["relative_residual"] = 0.3
    for row in broken["report"]["alignment"]:
        row["cos_formula"] = 0.5
    claims = claims_of(broken)
    assert claims["exact_ledger"]["held"] is False and claims["formula_matches_each_step"]["held"] is False


def test_every_claim_carries_statistic_baseline_value_interval_and_held(runs):
    for run in runs.values():
        for key, c in claims_of(run).items():
            for field in ("statement", "statistic", "baseline", "value", "interval", "held", "measured"):
                assert field in c, (key, field)
            assert {"value", "what", "interval"} <= set(c["baseline"]), key
            assert isinstance(c["held"], bool), key


def test_several_seeds_put_the_interval_over_the_seeds(runs):
    second = copy.deepcopy(runs["gated"])
    second["seed"] = 1
    for window in second["report"]["windows"]:  # a second replicate with other numbers
        for part in ("geometry", "spatial"):
            for kind in ("traffic", "net"):
                values = window["statistics"][part][kind]["per_probe"]["interaction_minus_control"]
                window["statistics"][part][kind]["per_probe"]["interaction_minus_control"] = [
                    None if v is None else 0.9 * v for v in values]
        for kind in ("traffic", "net"):
            entry = window["statistics"]["geometry_minus_spatial"][kind]
            entry["per_probe"] = [None if v is None else 0.8 * v for v in entry["per_probe"]]
    c = gan_claims([runs["gated"], second], require_convergence=False)["own_mode_coupling_traffic"]
    assert c["n"] == 2 and c["units"] == "2 seeds" and len(c["per_window"]) == 2


# ------------------------------------------------------------------------------------------
# the statistics themselves
# ------------------------------------------------------------------------------------------
def test_the_interaction_statistic_removes_source_group_strength():
    # source group 0 pushes every probe hard (its whole column is large): own share minus a uniform control
    # is positive for group-0 probes, but they get no more from group 0 than the other probes do
    shares = torch.tensor([[0.7, 0.1, 0.2], [0.7, 0.2, 0.1], [0.7, 0.15, 0.15]], dtype=F64).repeat_interleave(2, 0)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    interaction = own_minus_others(shares, groups, 3)
    assert interaction[:2].tolist() == pytest.approx([0.0, 0.0])
    torch.testing.assert_close(interaction[2:], torch.tensor([0.2 - 0.125, 0.2 - 0.125, 0.15 - 0.15, 0.15 - 0.15], dtype=F64))
    # a probe whose column has no other occupied probe group: undefined, not zero
    assert torch.isnan(own_minus_others(shares[:2], groups[:2], 3)).all()


def test_two_probe_groups_are_too_few_independent_units():
    result = few_units({"n": 2, "held": True, "interval": [0.3, 0.3]})
    assert result["held"] is False and "needs at least 3" in result["why"]
    assert few_units({"n": 3, "held": True})["held"] is True


def test_one_run_cannot_show_that_the_steps_follow_D(seeded):
    """One run's evaluation steps share D's field: they are not independent replicates. A generator
    independent of D follows D's field by chance in about a third of 2-D runs: here seed 1's null model
    has cos 0.954 (the GAN's: 0.955), and the one-run rule (steps as units, cos > 0.5) called it held."""
    null_seed_1 = seeded["null"][1]
    for key in ("distribution_guided", "kernel_smoothing_matters"):
        c = claims_of(null_seed_1)[key]
        assert c["held"] is False and "one run" in c["why_not_held"], key
    assert claims_of(null_seed_1)["distribution_guided"]["interval"][0] > 0.5  # what the one-run rule read as "held"
    assert claims_of(seeded["gan"][0])["distribution_guided"]["held"] is False  # one GAN run: not evidence either
    # the tool checks are about each step and need no seeds
    assert claims_of(seeded["gan"][0])["formula_matches_each_step"]["held"] is True
