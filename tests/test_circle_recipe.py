"""The Figure 1 recipe runs end to end in its smoke setting and writes consistent numbers."""

import importlib
import json
import math


def test_circle_neighborhoods_smoke(tmp_path):
    module = importlib.import_module("recipes.experiments.circle_neighborhoods")
    module.main(["--smoke", "--out-dir", str(tmp_path)])
    assert (tmp_path / "circle_neighborhoods.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "circle_neighborhoods.json").read_text())
    results, claims = data["results"], data["claims"]
    for key, values in results["purity"].items():
        assert len(values) == 3 and all(0.5 <= v <= 1.0 for v in values), key
    rise = results["purity_rise_init_to_end"]
    assert rise["interval"][0] <= rise["mean"] <= rise["interval"][1]
    sharpen = claims["kernel_neighborhoods_sharpen"]  # judged against the random-label null model's rise
    assert sharpen["baseline"]["value"] == results["purity_rise_random_labels"]["mean"]
    assert sharpen["held"] == (rise["interval"][0] > 0 and sharpen["beyond_null_interval"][0] > 0)
    ledger = results["ledger"]
    assert ledger["steps"] == 20 and 0 <= ledger["relative_residual"] < 1e-3
    assert claims["ledger_exact"]["held"] is True
    for shares, kappa in zip(results["anchor_class_shares"], results["anchor_kappa"]):
        assert len(shares) == 2 and all(math.isfinite(s) for s in shares)
        assert sum(abs(s) for s in shares) <= kappa + 1e-9  # Cauchy-Schwarz: |share_g| <= |C_g| / |Δf|
    assert 0.0 <= results["train_accuracy"] <= 1.0
