"""What the recipes' claims, the claims table and the benchmarks' verdicts rest on: a claim says
which units it left out, ``python -m recipes`` never passes a failed recipe's stale JSON off as
this run's and refuses command lines it cannot serve with a message, benchmark JSON is strict,
and a benchmark target or claim counts only when the fast path computed what its baseline did."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

from recipes import common
from recipes.benchmarks import kernels, scale
from recipes.benchmarks.harness import write_outputs


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ claims
def test_a_claim_says_how_many_units_its_interval_left_out():
    interval = common.over_seeds([0.2, math.nan, 0.3, 0.25])  # one seed's statistic undefined
    assert interval.n == 3 and interval.dropped == 1
    entry = common.claim("x", interval.above(0), interval.estimate, interval)
    assert entry["n"] == 3 and entry["dropped"] == 1
    assert "dropped" not in common.claim("x", True, 0.2, common.over_seeds([0.2, 0.3]))


# ------------------------------------------------------------------------------ run_all
def _fake_package(tmp_path: Path) -> Path:
    fake = tmp_path / "recipes" / "experiments"
    fake.mkdir(parents=True)
    for package in (fake.parent, fake):
        (package / "__init__.py").write_text("")
    (fake / "regression_kernels.py").write_text(
        "import json, sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out-dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'regression_kernels.json').write_text(json.dumps({'mode': 'smoke', 'seed': 0, 'claims': "
        "{'fresh_claim': {'held': True, 'measured': True, 'value': 1.0, 'interval': [0.5, 1.5], 'statistic': 's'}}}))\n"
    )
    (fake / "null_space.py").write_text("raise SystemExit(3)\n")
    (fake / "circle_neighborhoods.py").write_text("import time\ntime.sleep(60)\n")
    return fake


def test_run_all_leaves_a_failed_recipes_stale_claims_out_of_the_table(tmp_path, capsys):
    run_all = importlib.import_module("recipes.run_all")
    fake = _fake_package(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stale = {"mode": "quick", "seed": 0, "claims": {"stale_claim": {"held": True, "measured": True, "value": 0.1,
                                                                     "interval": [0.05, 0.2], "statistic": "old"}}}
    (out / "null_space.json").write_text(json.dumps(stale))
    (out / "circle_neighborhoods.json").write_text(json.dumps(
        {**stale, "claims": {"stale_timed_out": stale["claims"]["stale_claim"]}}))
    rc = run_all.main(["--smoke", "--timeout", "3", "--experiments-dir", str(fake), "--out-dir", str(out),
                       "--only", "regression_kernels", "null_space", "circle_neighborhoods"])
    captured = capsys.readouterr()
    assert rc == 1 and "FAILED: null_space, circle_neighborhoods" in captured.err
    assert "FAILED (timeout 3 s)" in captured.out
    table = (out / "claims_table.md").read_text()
    assert "fresh_claim" in table  # the recipe that ran is in the table, its output kept
    assert "stale_claim" not in table and "stale_timed_out" not in table  # an earlier run's claims are not this run's
    assert "`null_space` (FAILED (exit 3) in the latest run" in table
    assert (out / "null_space.json").exists()  # the earlier output is kept on disk, only not reported as new
    # --table-only has no run to go by: it reads every JSON there (the failure is in the log above)
    assert run_all.main(["--table-only", "--out-dir", str(out)]) == 0
    assert "stale_claim" in (out / "claims_table.md").read_text()


def test_run_all_refuses_an_empty_only_and_a_missing_table_folder(tmp_path, capsys):
    run_all = importlib.import_module("recipes.run_all")
    assert run_all.main(["--only"]) == 2
    assert "--only needs at least one recipe name" in capsys.readouterr().err
    missing = tmp_path / "no_such_folder"
    assert run_all.main(["--table-only", "--out-dir", str(missing)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not missing.exists()


def test_the_claims_table_says_when_units_were_dropped(tmp_path):
    run_all = importlib.import_module("recipes.run_all")
    claim = common.claim("x", True, 0.25, common.over_seeds([0.2, math.nan, 0.3]))
    (tmp_path / "null_space.json").write_text(json.dumps({"claims": {"c": claim}}))
    assert "n=2 (1 dropped: non-finite)" in run_all.claims_table(tmp_path)


# ------------------------------------------------------------------------------ benchmarks
def test_benchmark_json_is_strict(tmp_path):
    report = {"ratio": math.nan, "speedup": math.inf, "rows": [1.0, -math.inf], "ok": 2.5}
    write_outputs(report, tmp_path / "b.json", tmp_path / "b.png", lambda r, p: Path(p).write_bytes(b"png"))
    data = strict_json((tmp_path / "b.json").read_text())
    assert data == {"ratio": None, "speedup": None, "rows": [1.0, None], "ok": 2.5}


def _speed(auto_diff: float) -> dict:
    timing = {"steady_median_s": 1.0, "first_call_s": 1.0}
    return {"methods": {"vmap": {**timing, "speedup_vs_vmap": 1.0, "first_call_speedup_vs_vmap": 1.0},
                        "auto": {**timing, "steady_median_s": 0.1, "speedup_vs_vmap": 10.0,
                                 "first_call_speedup_vs_vmap": 10.0}},
            "max_rel_diff_vs_vmap": {"vmap": 0.0, "auto": auto_diff},
            "load": {"mean": 1.0, "min": 1.0, "max": 1.0}, "plan": {"engine": "factored"}}


def test_a_kernel_target_is_not_met_by_a_fast_path_that_computes_another_kernel(monkeypatch):
    profiled = []
    monkeypatch.setattr(kernels, "run_method", lambda *a, **k: (profiled.append(a), (None, {"profile": "p"}))[1])
    rows = {"auto": {"memory_ratio_vs_vmap": 0.5}}
    good = kernels.check_target("convnet", _speed(2e-7), rows, 256, 1.0, True)
    assert good["met"] is True and not profiled
    wrong = kernels.check_target("convnet", _speed(0.3), rows, 256, 1.0, True)  # 10x faster, but another kernel
    assert wrong["met"] is False
    assert good["kernels_agree"] is True and wrong["kernels_agree"] is False
    assert wrong["max_rel_diff_vs_vmap"]["auto"] == 0.3
    speed = _speed(2e-7)
    del speed["max_rel_diff_vs_vmap"]["auto"]  # no comparison: not checked, not met
    assert kernels.check_target("convnet", speed, rows, 256, 1.0, True)["met"] is None


def _scale_report(training_unchanged: bool) -> dict:
    run = {"model": "mlp", "batch": 8, "probes": 4, "group_state": "factored", "ratio": 2.0, "bare_median_s": 1.0,
           "tracked_median_s": 2.0, "load_mean": 1.0, "flop_ratio": 2.0, "predicted_ratio": 2.0,
           "training_unchanged": training_unchanged}
    unet = {"bins": 2, "controls": 1, "probes": 4, "group_state": "dense", "ratio": 2.0, "bare_median_s": 1.0,
            "analyzed_median_s": 2.0, "load_mean": 1.0, "flop_ratio": 2.0, "predicted_ratio": 2.0}
    return {"memory": {}, "sgd_factored": [run], "sketched": [], "tiny_unet": unet}


def test_the_sgd_time_claim_needs_the_tracked_step_to_train_as_the_bare_one():
    def sgd_claim(report):
        return next(c for c in scale.claims_of(report) if "costs at most" in c["claim"] and "mlp" in c["claim"])

    assert sgd_claim(_scale_report(True))["held"] is True
    changed = sgd_claim(_scale_report(False))  # fast enough, but not the same training step
    assert changed["held"] is False and changed["numbers"]["training_unchanged"] is False
