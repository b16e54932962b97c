"""Review of recipes/common.py (claims, seeds, --aggregate), genkernel.diffusion.kernels (state kernels
against per-state autograd Jacobians) and genkernel.analysis.kernel_stats (against hand formulas)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from recipes import common

F64 = torch.float64


# ----------------------------------------------------------------------------- recipes/common.py


def test_a_claim_does_not_hold_on_a_nan_held_or_an_undefined_value():
    """Fails on the old code: claim(held=float("nan")) was written held (bool(NaN) is True), and
    held=True beside a NaN value (e.g. max() over seeds that skipped a NaN seed) was written held."""
    with pytest.raises(TypeError, match="held must be a bool"):
        common.claim("s", float("nan"), 0.3, (0.1, 0.5))
    with pytest.raises(ValueError, match="undefined value"):
        common.claim("s", True, float("nan"))
    with pytest.raises(ValueError, match="undefined value"):
        common.claim("s", True, 0.3, (float("nan"), 0.5))
    # what stays allowed: a held claim without an interval, numpy bools, unmeasured claims with NaN
    assert common.claim("s", np.bool_(True), 0.3)["held"] is True
    assert common.claim("s", False, float("nan"), (float("nan"), float("nan")))["held"] is False
    assert common.claim("s", False, float("nan"), measured=False, why="w")["held"] is None


def test_repeated_seeds_are_refused():
    """Fails on the old code: --seeds 0 0 1 ran seed 0 twice and counted it as two independent
    replicates of the Student-t interval over seeds."""
    args = argparse.Namespace(seeds=[0, 0, 1], seed=0)
    with pytest.raises(ValueError, match="more than once"):
        common.recipe_seeds(args, {"seeds": 3})
    assert common.recipe_seeds(argparse.Namespace(seeds=None, seed=4), {"seeds": 3}) == [4, 5, 6]


def test_a_payload_that_is_not_json_leaves_the_previous_figure_and_json_together(tmp_path):
    """Fails on the old code: finish() saved the new PNG before writing the JSON, so a payload that
    json refuses (here a set) left the previous run's JSON beside this run's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "r.png").write_bytes(b"old")
    (tmp_path / "r.json").write_text("{}")
    args = argparse.Namespace(out_dir=str(tmp_path), mode="smoke", seed=0, device="cpu")
    with pytest.raises(TypeError):
        common.finish("r", args, plt.figure(), {"levels": {1, 2}}, {}, {}, common.Timer())
    assert (tmp_path / "r.png").read_bytes() == b"old" and (tmp_path / "r.json").read_text() == "{}"
    payload = common.finish("r", args, plt.figure(), {"levels": [1, 2]}, {}, {}, common.Timer())
    assert json.loads((tmp_path / "r.json").read_text()) == payload and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def _aggregate(tmp_path, monkeypatch, files: dict[int, dict], *, seeds=None, mode="smoke", settings=None):
    """run_diffusion_recipe(--aggregate) over seed files ``{seed: {"mode", "settings"}}``; returns
    the seeds of the runs it aggregated (write_diffusion_outputs captured)."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for seed, meta in files.items():
        (runs_dir / f"seed_{seed}.json").write_text(json.dumps({"seed": seed, **meta}))
    seen = {}

    def capture(name, args, s, timer, runs, retrieval, data, *, images):
        seen["seeds"] = [r["seed"] for r in runs]
        return {}

    monkeypatch.setattr(common, "write_diffusion_outputs", capture)
    spec = {"load": lambda seed: (torch.zeros(4, 2), torch.zeros(2, 2)), "images": False}
    args = argparse.Namespace(seed=0, seeds=seeds, runs_dir=str(runs_dir), aggregate=True, out_dir=str(tmp_path),
                              estimate_only=False, mode=mode)
    common.run_diffusion_recipe("toy", spec, args, settings or {"seeds": 1, "retrieval_train": 2, "lr": 1e-3})
    return seen["seeds"]


def test_aggregate_refuses_seed_files_of_other_settings_or_mode(tmp_path, monkeypatch):
    """Fails on the old code: --aggregate read every seed_*.json in the runs folder, whatever mode and
    settings wrote it (a file left by a quick run, or one with another learning rate, was aggregated
    into the claims as one of these runs, under this run's settings)."""
    s = {"seeds": 1, "retrieval_train": 2, "lr": 1e-3, "checkpoint_every": 5}
    ok = {"mode": "smoke", "settings": s}
    with pytest.raises(ValueError, match=r"other settings.*'lr'"):
        _aggregate(tmp_path, monkeypatch, {0: ok, 1: {"mode": "smoke", "settings": {**s, "lr": 2e-3}}}, settings=s)
    with pytest.raises(ValueError, match="other settings"):
        _aggregate(tmp_path / "b", monkeypatch, {0: ok, 1: {"mode": "quick", "settings": s}}, settings=s)
    # checkpoint_every does not change a run's numbers
    seeds = _aggregate(tmp_path / "c", monkeypatch, {0: ok, 1: {"mode": "smoke", "settings": {**s, "checkpoint_every": 9}}},
                       settings=s)
    assert seeds == [0, 1]


def test_aggregate_takes_the_named_seeds_in_numeric_order(tmp_path, monkeypatch):
    """Fails on the old code: --aggregate --seeds 2 10 also aggregated a seed_3.json left in the
    folder, and ordered seed 10 before seed 2 (by file name); a named seed without a file is refused."""
    s = {"seeds": 1, "retrieval_train": 2}
    ok = {"mode": "smoke", "settings": s}
    assert _aggregate(tmp_path, monkeypatch, {2: ok, 3: ok, 10: ok}, seeds=[2, 10], settings=s) == [2, 10]
    assert _aggregate(tmp_path, monkeypatch, {}, settings=s) == [2, 3, 10]
    with pytest.raises(FileNotFoundError, match=r"seeds \[4\]"):
        _aggregate(tmp_path, monkeypatch, {}, seeds=[2, 4], settings=s)


def _fake_run(seed: int, traffic: list, *, score=0.1, noise=False) -> dict:
    """The parts of a diffusion_seed_run result that diffusion_claims reads (as saved: NaN as None)."""
    def cell(d):
        return {"difference": d, "interval": [None if d is None else d - 0.1, None if d is None else d + 0.1], "n": 4,
                "measured": True, "control": 0.0}

    rows = [{"level": 10 * i, "bin": i, "traffic": cell(d), "share": cell(d)} for i, d in enumerate(traffic)]
    report = {"config": {"band": 1, "controls": 2, "kernel_sketch": None}, "measured": True, "notes": [],
              "locality": {"per_level": rows, "median_kappa": 1.0},
              "residual": {"median_rest_share": 0.1, "relative_residual": 1e-3}}
    g = np.random.default_rng(seed)
    return {"seed": seed, "report": report, "reference": None,
            "kernel_locality_per_input": {"theta_0": list(g.normal(0, 0.1, 5)), "theta_T": list(g.normal(1, 0.1, 5))},
            "sample_quality": {"score": score, "noise": noise}, "retrieval_entropy": [2.0, 1.0 + 0.1 * seed],
            "retrieval_entropy_theta_0": [2.0, 1.9]}


def test_every_level_claim_over_seeds_leaves_out_a_level_saved_as_null():
    """Fails on the old code: over several seeds, a probe level whose difference was NaN (saved as
    null) in one seed raised TypeError (float(None)); now that seed's value is left out and counted,
    and the level cannot pass the every-level test on the remaining seeds unless its interval does."""
    runs = [_fake_run(0, [0.5, 0.6, None]), _fake_run(1, [0.55, 0.62, 0.4]), _fake_run(2, [0.52, 0.61, 0.41])]
    claims = common.diffusion_claims(runs)
    every = claims["traffic_locality_every_level"]
    assert every["worst_level"] == 20 and every["dropped"] == 1 and every["n"] == 2
    # the claim rests on the other two seeds' interval at that level
    iv = common.over_seeds([0.4, 0.41])
    assert every["interval"] == pytest.approx([iv.low, iv.high]) and every["held"] is (iv.low > 0)


def test_retrieval_claim_with_an_infinite_noise_score_is_not_measured():
    """Fails on the old code: a sample-quality score of +inf (held-out data no nearer the training
    set than the training inputs are to one another), saved as null, crashed the claims with a
    TypeError when formatting the worst score; now the claim is not measured and says why."""
    runs = [_fake_run(0, [0.5, 0.6], score=None, noise=True), _fake_run(1, [0.5, 0.6], score=0.7, noise=True)]
    c = common.diffusion_claims(runs)["retrieval_broad_to_narrow"]
    assert c["measured"] is False and c["held"] is None and "inf" in c["why"]


def test_the_json_holds_the_seed_averaged_matrices_the_figures_draw(tmp_path, monkeypatch):
    """Fails on the old code: over several seeds the noise-matrix and overview figures draw the
    matrices averaged over the seeds and the worst seed's residual, but the JSON held only seed 0's
    report (the other seeds' matrices were nowhere in it); now ``results.averaged_over_seeds``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genkernel.plotting import diffusion as plots

    drawn = {}

    def stub(report=None, *a, **k):
        if isinstance(report, dict) and "matrices" in report:
            drawn.setdefault("matrices", report["matrices"])
        return plt.figure(figsize=(1, 1))

    for name in ("plot_noise_matrices", "plot_locality_over_training", "plot_kernel_decay", "plot_matrix_evolution",
                 "plot_retrieval", "plot_overview"):
        monkeypatch.setattr(plots, name, stub)
    runs = [_fake_run(0, [0.5, 0.6]), _fake_run(1, [0.55, 0.62])]
    for i, run in enumerate(runs):
        run["report"]["config"]["probe_levels"] = [0, 10]
        run["report"]["matrices"] = {"traffic": [[1.0 + i, 2.0], [3.0, 4.0 + 2 * i]]}
        run["report"]["residual"]["relative_residual"] = [1e-3, 5e-3][i]
        run.update(retrieval={"stages": [0, 1]}, final_loss=0.1, timing={})
    args = argparse.Namespace(out_dir=str(tmp_path), mode="smoke", seed=0, device="cpu")
    s = {"warmup_steps": 1, "window_steps": 1, "num_probes": 2, "num_bins": 2, "controls": 2}
    payload = common.write_diffusion_outputs("toy", args, s, common.Timer(), runs, None, torch.zeros(2, 2), images=False)
    averaged = payload["results"]["averaged_over_seeds"]
    assert averaged["matrices"] == drawn["matrices"] == {"traffic": [[1.5, 2.0], [3.0, 5.0]]}
    assert averaged["seeds"] == 2 and averaged["relative_residual_worst"] == 5e-3


# ----------------------------------------------------------------------------- kernel_stats


def test_kernel_distance_of_an_empty_kernel_is_empty():
    """Fails on the old code: a 0×0 kernel raised numpy's "zero-size array to reduction operation"
    (a non-square empty kernel already returned its empty distances)."""
    from genkernel.analysis.kernel_stats import kernel_distance

    assert kernel_distance(np.zeros((0, 0))).shape == (0, 0)
    assert kernel_distance(np.zeros((0, 3))).shape == (0, 3)


def test_kernel_statistics_match_hand_formulas():
    """coverage: centered_alignment against Cortes et al.'s ⟨K_c, L_c⟩_F / (‖K_c‖ ‖L_c‖) with
    L = y yᵀ (vector y) and Y Yᵀ (one-hot), invariant to K + c·11ᵀ and y + c; block_auc and
    within_between_gap against loops over the off-diagonal pairs."""
    from genkernel.analysis.kernel_stats import block_auc, centered_alignment, within_between_gap

    g = np.random.default_rng(0)
    x = g.normal(size=(9, 4))
    k = x @ x.T
    h = np.eye(9) - 1 / 9
    kc = h @ k @ h
    for y in (g.normal(size=9), np.eye(3)[g.integers(0, 3, 9)]):
        yy = y.reshape(9, -1)
        lc = h @ yy @ yy.T @ h
        expected = float((kc * lc).sum() / np.linalg.norm(kc) / np.linalg.norm(lc))
        assert centered_alignment(k, y) == pytest.approx(expected, rel=1e-12)
        assert centered_alignment(k + 3.0, y + 2.0) == pytest.approx(expected, rel=1e-9)
        assert centered_alignment(torch.tensor(k), torch.tensor(y)) == pytest.approx(expected, rel=1e-12)
    kernel = g.normal(size=(8, 8))
    kernel = np.round((kernel + kernel.T) / 4, 1)  # ties, counted ½
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    within, between = [], []
    for i in range(8):
        for j in range(8):
            if i != j:
                (within if labels[i] == labels[j] else between).append(kernel[i, j])
    auc = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in within for b in between])
    assert block_auc(kernel, labels).auc == pytest.approx(auc, rel=1e-12)
    assert within_between_gap(kernel, labels).gap == pytest.approx(np.mean(within) - np.mean(between), rel=1e-12)


# ----------------------------------------------------------------------------- diffusion kernels


class _Conditioned(torch.nn.Module):
    """A denoiser f(z, t, c) [B, 3] with a class embedding (a conditioning input beside (z, t))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(3, 4)
        self.l1 = torch.nn.Linear(2 + 1 + 4, 6)
        self.l2 = torch.nn.Linear(6, 3)

    def forward(self, z, t, c):
        h = torch.cat([z, t[:, None].to(z) / 100, self.emb(c)], 1)
        return self.l2(torch.tanh(self.l1(h)))


def _autograd_kernel(model, states, others):
    """Σ_o ⟨∇θ f_o(state_i), ∇θ f_o(other_j)⟩ by one autograd backward per state and output."""
    params = [p for p in model.parameters() if p.requires_grad]

    def jacobians(batch):
        rows = []
        for i in range(batch[0].shape[0]):
            out = model(*(t[i : i + 1] for t in batch)).reshape(-1)
            rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
                                     for o in out]))
        return torch.stack(rows).to(F64)

    a, b = jacobians(states), jacobians(others)
    return torch.einsum("mdp,ndp->mn", a, b)


def test_conditioned_state_kernel_matches_autograd_and_does_not_depend_on_the_memory_budget():
    """coverage: make_states + state_kernel with a conditioning input and others, exact (raw and
    normalized) against per-state autograd Jacobians, identical under a memory budget of one byte
    (chunks of one); the sketch is the same under both budgets and its mean over seeds tends to the
    exact kernel (unbiased), its normalized form is the raw sketch over its own diagonals."""
    from genkernel.diffusion import make_scheduler, make_states, state_kernel

    scheduler = make_scheduler(100)
    g = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(3, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)
    z, t = make_states(scheduler, clean, noise, torch.tensor([5, 60]))
    c = torch.tensor([0, 1, 2, 2, 1, 0])
    model = _Conditioned().double()
    states, others = (z[:4], t[:4], c[:4]), (z[2:], t[2:], c[2:])
    exact = _autograd_kernel(model, states, others)
    raw = state_kernel(model, states, others, normalize=False)
    torch.testing.assert_close(raw, exact, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state_kernel(model, states, others, normalize=False, memory_budget=1), raw, rtol=1e-13, atol=0)  # 1-ulp: chunked sum order
    d1 = _autograd_kernel(model, states, states).diagonal().sqrt()
    d2 = _autograd_kernel(model, others, others).diagonal().sqrt()
    torch.testing.assert_close(state_kernel(model, states, others), exact / d1[:, None] / d2[None], rtol=1e-12, atol=1e-14)
    sketch = state_kernel(model, states, others, output_sketch=3, seed=5, normalize=False)
    torch.testing.assert_close(state_kernel(model, states, others, output_sketch=3, seed=5, normalize=False, memory_budget=1),
                               sketch, rtol=1e-13, atol=0)
    draws = torch.stack([state_kernel(model, states, others, output_sketch=2, seed=s, normalize=False) for s in range(60)])
    error = draws.std(dim=0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(dim=0) - exact).abs() <= 5 * error + 1e-12).all()
    normalized = state_kernel(model, states, others, output_sketch=3, seed=5)
    s1 = state_kernel(model, states, output_sketch=3, seed=5, normalize=False).diagonal().sqrt()
    s2 = state_kernel(model, others, output_sketch=3, seed=5, normalize=False).diagonal().sqrt()
    torch.testing.assert_close(normalized, sketch / s1[:, None] / s2[None], rtol=1e-12, atol=1e-14)
