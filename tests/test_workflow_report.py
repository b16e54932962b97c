"""What users see of a run (genkernel.report, genkernel.logging), checked against the analyzers'
own numbers in the set-ups a researcher meets: probe levels listed from noisy to clean, an
analyzer loaded from a checkpoint and read before training resumes, a GAN logger asked for
numbers before the first generator step."""

from __future__ import annotations

import math

import pytest
import torch

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.logging import LoggingCallback, analyzer_metrics
from genkernel.report import render_report, summarize


def _ring(n: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    angle = torch.rand(n, dtype=torch.float64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def _diffusion(steps: int = 4, **kwargs) -> NoiseLevelAnalyzer:
    data = _ring()
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=6, snapshot_every=2, kernel_points=2,
                                  progress=False, **kwargs)
    DDPMTrainer(model, scheduler, data, batch_size=8, callbacks=[analyzer], progress=False).train(steps)
    return analyzer


def _rows(matrix) -> torch.Tensor:
    return torch.tensor([[math.nan if v is None else v for v in row] for row in matrix], dtype=torch.float64)


def test_history_snapshots_are_in_the_summarys_level_order_for_levels_listed_noisy_first():
    # probe_levels from noisy to clean: the analyzer's rows are [80, 5, 40], the summary's [5, 40, 80].
    analyzer = _diffusion(probe_levels=[80, 5, 40])
    (summary,) = summarize(analyzer)["states"].values()
    assert summary["settings"]["probe_levels"] == [5, 40, 80]
    last = summary["locality_over_training"][-1]  # the snapshot after the last step: the same ledgers
    assert last["tracked_step"] == 4
    for key, snapshot in (("traffic", "traffic_matrix"), ("share", "share_matrix")):
        # each row is its level's, as in the summary's matrices and the analyzer's own (by level)
        assert torch.allclose(_rows(last[snapshot]), _rows(summary["matrices"][key]), rtol=1e-6, atol=1e-9,
                              equal_nan=True), key
        mine = analyzer.matrices()[key].double()
        for i, level in enumerate([5, 40, 80]):
            j = analyzer.levels.tolist().index(level)
            assert torch.allclose(_rows(last[snapshot])[i], mine[j], rtol=1e-6, atol=1e-9, equal_nan=True)


def test_history_snapshots_of_repeated_probe_levels_are_left_out_with_a_note():
    analyzer = _diffusion(steps=2, probe_levels=[50, 50, 10])
    (summary,) = summarize(analyzer)["states"].values()
    assert summary["settings"]["probe_levels"] == [10, 50]
    assert all(row["traffic_matrix"] is None and row["share_matrix"] is None
               for row in summary["locality_over_training"])
    assert any("repeat a level" in note for note in summary["notes"])


def _saved_and_loaded(tmp_path):
    """``(path, resumed)``: a 4-step analyzer saved to ``path`` and loaded into a fresh one, as a
    trainer's resume() does, before training binds it."""
    analyzer = _diffusion(steps=4)
    path = tmp_path / "analyzer.pt"
    analyzer.save(path)
    resumed = NoiseLevelAnalyzer(analyzer.scheduler, _ring()[:16], num_bins=4, num_probes=6, snapshot_every=2,
                                 kernel_points=2, progress=False)
    resumed.load(path)
    return path, resumed


def test_summary_of_a_loaded_analyzer_before_it_is_bound_is_the_state_it_holds(tmp_path):
    path, resumed = _saved_and_loaded(tmp_path)
    (summary,) = summarize(resumed)["states"].values()
    (saved,) = summarize(path)["states"].values()
    assert summary.get("bound") is not False and summary["tracked_steps"] == 4
    assert summary["ledger"]["relative_residual"] == saved["ledger"]["relative_residual"]
    assert summary["matrices"] == saved["matrices"]


def _gan(**kwargs):
    from genkernel.data.toy2d import gaussian_ring

    torch.manual_seed(0)
    data, _ = gaussian_ring(64, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=8), MLPDiscriminator(2, hidden=8)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(8, 2), num_groups=2, window=2, eval_every=2,
                                 coverage_latents=16)
    return G, D, data, analyzer


def test_gan_analyzer_metrics_before_the_first_generator_step_are_empty_not_an_error():
    G, D, data, analyzer = _gan()
    assert analyzer_metrics(analyzer) == {}
    logged = []
    callback = LoggingCallback(lambda metrics, step: logged.append((step, dict(metrics))), analyzer=analyzer)
    trainer = GANTrainer(G, D, data, latent_dim=2, batch_size=16, callbacks=[analyzer, callback], progress=False)
    trainer.train(0)  # e.g. a resumed run already at its last iteration: on_train_end logs what there is
    assert logged == []
    trainer.train(2)
    steps = [step for step, metrics in logged if "generator/steps" in metrics]
    assert steps[:2] == [1, 2] and logged[-1][1]["generator/steps"] == 2.0


def test_a_coupling_claim_refused_for_too_few_probe_groups_says_why_beside_its_interval():
    # Two geometry groups: two independent units, fewer than a within-run interval needs; the
    # interval printed beside "not held" can lie above 0, so the page and the text say why.
    from genkernel.report import format_summary

    G, D, data, analyzer = _gan()
    GANTrainer(G, D, data, latent_dim=2, batch_size=16, callbacks=[analyzer], progress=False).train(2)
    summary = summarize(analyzer)
    (state,) = summary["states"].values()
    coupling = [c for c in state["claims"] if c["statement"].startswith("Coupling")]
    assert len(coupling) == 2 and all(c["held"] is False and c["n"] == 2 for c in coupling)
    assert all("independent unit" in c["why"] for c in coupling)
    assert format_summary(summary).count("not held because: 2 independent unit(s)") == 2
    assert render_report(analyzer, animate=False).count("not held because: 2 independent unit(s)") == 2


def test_gan_metrics_of_a_loaded_analyzer_are_the_saved_runs_until_the_next_step():
    # A resumed GANTrainer loads the analyzer's state; its trackers are rebuilt at the next step.
    # Metrics logged in between (on_train_end of a run already at its last iteration) are the loaded ledgers'.
    G, D, data, analyzer = _gan()
    GANTrainer(G, D, data, latent_dim=2, batch_size=16, callbacks=[analyzer], progress=False).train(2)
    before = analyzer_metrics(analyzer)
    assert "generator/relative_residual" in before and "coupling/traffic_interaction/measured" in before
    assert "discriminator/relative_residual" in before
    _, _, _, loaded = _gan()
    loaded.load_state_dict(analyzer.state_dict())
    after = analyzer_metrics(loaded)
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key


def test_a_tracked_windows_numbers_are_not_logged_again_at_the_steps_after_it_ended():
    # track_steps=(2, 3) of a 6-step run: the ledgers stop at step 3. The trainer's logging callback
    # logs the loss at every step, the analyzer's numbers only at the steps they describe.
    data = _ring()
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=6, snapshot_every=0, kernel_points=2,
                                  progress=False, track_steps=(2, 3))
    logged = []
    callback = LoggingCallback(lambda metrics, step: logged.append((step, dict(metrics))), analyzer=analyzer)
    trainer = DDPMTrainer(model, scheduler, data, batch_size=8, callbacks=[analyzer, callback], progress=False)
    trainer.train(6)
    assert [step for step, metrics in logged if "loss" in metrics] == [1, 2, 3, 4, 5, 6]
    numbers = [(step, metrics["ledger/steps"]) for step, metrics in logged if "ledger/steps" in metrics]
    assert numbers and all(step == 1 + tracked for step, tracked in numbers)  # tracked step k is loop step k + 1
    assert {step for step, _ in numbers} == {2, 3}


def test_an_analyzer_loaded_but_not_yet_bound_saves_what_it_holds(tmp_path):
    # A trainer resumed and checkpointed again before it trains: old, the second checkpoint held
    # {"bound": False} and the 4 tracked steps were lost.
    path, resumed = _saved_and_loaded(tmp_path)
    again = tmp_path / "again.pt"
    resumed.save(again)
    (first,) = summarize(path)["states"].values()
    (second,) = summarize(again)["states"].values()
    assert second["tracked_steps"] == first["tracked_steps"] == 4
    assert second["ledger"] == first["ledger"] and second["matrices"] == first["matrices"]
