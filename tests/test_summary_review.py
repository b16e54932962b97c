"""genkernel.report.summary (review): the summary's numbers equal the analyzers' own report() on the
newer features (a band covering every bin, EMA ledgers, level × class partitions, collapsed GAN
windows), states of another version are refused with a clear message, and the text labels what it prints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel.core.tracking.io import atomic_save, jsonable
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.report import format_summary, summarize


pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b) -> bool:
    """Equal as strict JSON (NaN as None), bit for bit."""
    return json.dumps(a, sort_keys=True, allow_nan=False) == json.dumps(b, sort_keys=True, allow_nan=False)


def _ring(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def _diffusion(steps: int = 4, trainer: dict | None = None, ema: bool = False, **kwargs) -> NoiseLevelAnalyzer:
    torch.manual_seed(0)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    options = {"num_bins": 4, "num_probes": 8, "snapshot_every": 2, "kernel_points": 2, "progress": False, **kwargs}
    analyzer = NoiseLevelAnalyzer(scheduler, _ring(16, 1), **options)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else None
    DDPMTrainer(model, scheduler, _ring(64), batch_size=16, callbacks=[analyzer], progress=False, ema=average,
                **(trainer or {})).train(steps)
    return analyzer


def _gan(steps: int = 8, **kwargs) -> GANKernelAnalyzer:
    from genkernel.data.toy2d import gaussian_ring

    torch.manual_seed(0)
    data, _ = gaussian_ring(256, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=16), MLPDiscriminator(2, hidden=16)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(12, 2), **{"num_groups": 3, "window": 4, "eval_every": 2,
                                                                             **kwargs})
    GANTrainer(G, D, data, latent_dim=2, batch_size=32, callbacks=[analyzer]).train(steps)
    return analyzer


def _only(source):
    (summary,) = summarize(source)["states"].values()
    json.dumps(summary, allow_nan=False)
    return summary


def test_a_band_covering_every_bin_reads_as_the_analyzers_locality_and_is_never_held():
    """num_bins=2, band=1: measured and control are the whole share alike, so the analyzer's locality()
    holds nothing and says why. The summary computed the bare interval over rounding noise: on this run
    its net-share claim "held" on [4e-19, 1e-16] while the analyzer's report said held False."""
    torch.manual_seed(0)
    angle = torch.rand(64, dtype=torch.float64) * 6.28
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=2, band=1, num_probes=16, kernel_points=2,
                                  progress=False, controls=2, snapshot_every=0)
    DDPMTrainer(model, scheduler, data, batch_size=16, callbacks=[analyzer], progress=False, optimizer="sgd",
                momentum=0.9).train(3)
    report, summary = analyzer.report(), _only(analyzer.state_dict())
    for kind in ("traffic", "share"):
        assert report["locality"][kind]["held"] is False and report["locality"][kind]["why"]
        assert _same(summary["locality"][kind], report["locality"][kind]), kind
    claims = [c for c in summary["claims"] if c["statement"].startswith("Corrections are noise-localized")]
    assert len(claims) == 2 and all(c["held"] is False and "holds all 2 bins" in c["why"] for c in claims)
    assert "not held because: band=1 holds all 2 bins" in format_summary(summarize(analyzer.state_dict()))
    # without controls the measured locality carries the same why
    plain = _diffusion(steps=2, num_bins=2, band=1, controls=0)
    assert _same(_only(plain.state_dict())["locality"]["traffic"], plain.report()["locality"]["traffic"])


def test_ema_ledgers_and_level_class_partition_equal_the_analyzers_report():
    """The EMA weights' residual, matrices, locality and start share, and the level × class traffic
    matrix: the report has them, the summary had only the EMA ledger's residual and no level × class."""
    analyzer = _diffusion(ema=True, num_classes=3, trainer={"labels": torch.arange(64) % 3})
    report, summary = analyzer.report(), _only(analyzer.state_dict())
    for key in ("residual", "matrices", "locality", "start_share_mean"):
        assert _same(summary["ema"][key], report["ema"][key]), key
    assert summary["ema"]["decays"] == report["ema"]["decays"][-5:]
    assert _same(summary["level_class_traffic"], report["level_class_traffic"])
    # and the model's own numbers stay the report's
    for key in ("traffic", "share", "kappa", "residual", "traffic_control", "share_control"):
        assert _same(summary["matrices"][key], report["matrices"][key]), key
    for key in ("traffic", "share", "per_level"):
        assert _same(summary["locality"][key], report["locality"][key]), key
    text = format_summary(summarize(analyzer.state_dict()))
    line = next(l for l in text.splitlines() if l.startswith("  EMA weights' ledger"))
    assert f"{report['ema']['residual']['steps']} steps" in line
    assert f"relative residual {report['ema']['residual']['relative_residual']:.3g}" in line


@pytest.mark.parametrize("fmt", ["genkernel.NoiseLevelAnalyzer/1", "genkernel.NoiseLevelAnalyzer/3",
                                 "genkernel.GANKernelAnalyzer/1", "genkernel.PathKernelTracker/1",
                                 "genkernel.PathKernelLedger/2", "genkernel.NoiseLevelAnalyzer/x"])
def test_a_state_of_another_version_is_refused_with_the_versions_read(fmt, tmp_path):
    """A NoiseLevelAnalyzer/1 state (config a tuple) failed with "tuple indices must be integers";
    a /3 or a GAN /1 state was read as the current layout without a word."""
    state = {"format": fmt, "bound": True, "config": (4, True, [1, 2]), "tracker": {"ledgers": {}}, "ledgers": {}}
    with pytest.raises(ValueError, match=r"of a version this genkernel does not read \(it reads genkernel\.\w+/\d"):
        summarize(state)
    atomic_save({"format": "genkernel.DDPMTrainer/3", "callbacks": {"analyzer": state}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not read"):
        summarize(tmp_path / "checkpoint.pt")


@pytest.fixture(scope="module")
def gan_runs():
    return {"controls": _gan(), "none": _gan(controls=0)}


def test_gan_collapsed_windows_are_noted_as_the_report_notes_them(gan_runs):
    analyzer = gan_runs["controls"]
    report, summary = analyzer.report(), _only(analyzer.state_dict())
    collapsed = [n for n in report["notes"] if "windows are collapsed" in n]
    assert collapsed, "the run should have a collapsed window"
    assert [n for n in summary["notes"] if "windows are collapsed" in n] == collapsed


def test_gan_text_without_controls_prints_the_own_share_not_na(gan_runs):
    """Without a control partition the text printed "measured minus control ... n/a" for both kinds
    though the summary holds the own-group share."""
    analyzer = gan_runs["none"]
    own = analyzer.report()["generator"]["coupling_whole_run"]
    text = format_summary(summarize(analyzer.state_dict()))
    assert (f"own geometry group's share over the run (no control partition): traffic "
            f"{own['traffic_own']['estimate']:.3g}, net share {own['net_own']['estimate']:.3g}") in text
    assert "measured minus control" not in text


def test_unrelated_files_and_degenerate_ledgers_read_clearly(tmp_path):
    """coverage: files without a genkernel state are refused saying what they hold; a trainer's own
    checkpoint is searched; a ledger whose probes never moved is strict JSON with no claim held."""
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, tmp_path / "weights.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name, held in (("weights.pt", r"keys \['model', 'step'\]"), ("tensor.pt", "a Tensor, not a dict")):
        with pytest.raises(ValueError, match=f"holds no ledger, tracker or analyzer state .*{held}"):
            summarize(tmp_path / name)
    analyzer = _diffusion(steps=2, trainer={"checkpoint_dir": tmp_path / "run", "checkpoint_every": 2})
    assert list(summarize(tmp_path / "run" / "checkpoint.pt")["states"]) == ["callbacks.NoiseLevelAnalyzer"]
    state = analyzer.state_dict()
    for ledger in state["tracker"]["ledgers"].values():
        for key, value in ledger.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                ledger[key] = torch.zeros_like(value)
    summary = _only(state)
    assert summary["ledger"]["relative_residual"] is None and summary["claims"][0]["held"] is None
    assert all(c["held"] is not True for c in summary["claims"])


def test_gan_comparison_grouping_equals_the_analyzers_statistics():
    """GANKernelAnalyzer(comparison=): the report's spatial partition statistics and geometry minus
    spatial; the summary read the geometry partition only (the comparison was not read at all)."""
    analyzer = _gan(comparison="latent_kmeans")
    statistics = analyzer.report()["generator"]["coupling_whole_run"]["statistics"]
    coupling = _only(analyzer.state_dict())["coupling_whole_run"]
    for kind in ("traffic", "net"):
        for key in ("matrix", "matrix_control", "interaction_minus_control"):
            assert _same(coupling["spatial"][f"{kind}_{key}"], statistics["spatial"][kind][key]), (kind, key)
        theirs = {k: v for k, v in statistics["geometry_minus_spatial"][kind].items() if k not in ("per_probe", "statistic")}
        assert _same(coupling["geometry_minus_spatial"][kind], theirs), kind
    versus = coupling["geometry_minus_spatial"]["traffic"]
    text = format_summary(summarize(analyzer.state_dict()))
    assert ("geometry minus the comparison grouping (LatentKMeansGroups)" in text
            and f"traffic   {versus['estimate']:.3g} [{versus['low']:.3g}, {versus['high']:.3g}]" in text)


def test_a_saved_partial_window_is_read_as_the_report_reads_it():
    """The analyzer's state keeps finish()'s window in progress (before: dropped, so a saved state's summary and a
    reloaded analyzer's report lost it): the summary and the text read it as a window row."""
    analyzer = _gan(steps=6)
    partial = analyzer.report()["partial_window"]
    state = analyzer.state_dict()
    assert _same(jsonable(state["partial_window"]), partial)  # (the report gives NaN as None)
    summary = _only(state)
    row = summary["partial_window"]
    assert row["partial"] is True and row["steps"] == partial["steps"] == [5, 6]
    for kind in ("traffic", "net"):
        assert _same(row[f"{kind}_interaction_minus_control"],
                     partial["statistics"]["geometry"][kind]["interaction_minus_control"])
    assert f"partial window (steps {row['loop_steps'][0]}-{row['loop_steps'][1]}, in progress when saved)" in \
        format_summary(summarize(state))
