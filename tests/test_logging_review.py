"""Review of genkernel.logging: step numbers, rows and images that must match the analyzer's own state."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.logging import CSVWriter, LoggingCallback, TensorBoardWriter


from test_logging import Collect  # noqa: E402  (images kept as (name, array, step))


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _diffusion(log=None, trainer_log=None, callbacks=(), checkpoint_dir=None, checkpoint_every=0, **kwargs):
    torch.manual_seed(0)
    data = torch.randn(64, 2, dtype=torch.float64)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=8, depth=2, time_dim=8).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=2, num_probes=4, snapshot_every=0, kernel_points=2,
                                  progress=False, log=log, **kwargs)
    trainer = DDPMTrainer(model, scheduler, data, batch_size=16, callbacks=[analyzer, *callbacks], progress=False,
                          log=trainer_log, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    return analyzer, trainer


def test_csv_a_row_at_an_earlier_step_joins_that_steps_row_in_order(tmp_path):
    """A call at a step before the latest row's (an analyzer's final numbers at its window's last
    step, sent when training ends) went to a second row for that step, appended after later steps."""
    writer = CSVWriter(tmp_path / "m.csv")
    for step in (1, 2, 4, 5):
        writer({"loss": float(step)}, step)
    writer({"kappa": 7.0}, 2)          # joins step 2's row
    writer({"kappa": 9.0}, 3)          # a new row, between 2 and 4
    writer({"loss": 0.5}, 2)           # another value of a name there: kept, in a row of its own after step 2's
    rows = _rows(writer.path)
    assert [(r["step"], r["loss"], r["kappa"]) for r in rows] == [
        ("1", "1.0", ""), ("2", "2.0", "7.0"), ("2", "0.5", ""), ("3", "", "9.0"), ("4", "4.0", ""), ("5", "5.0", "")]
    writer({"loss": 6.0}, 6)           # the latest row still appends (and the file is still one header)
    assert [r["step"] for r in _rows(writer.path)] == ["1", "2", "2", "3", "4", "5", "6"]


def test_one_csv_writer_and_a_tracked_window_keep_one_row_per_step(tmp_path):
    """track_steps=(1, 3), log_every=2: the analyzer's numbers at its window's last step (3) came at
    the end of training as a second row "3" after row 5; now they are in row 3, equal to the analyzer's."""
    path = tmp_path / "run.csv"
    writer = CSVWriter(path)
    analyzer, trainer = _diffusion(log=writer, trainer_log=writer, log_every=2, track_steps=(1, 3))
    trainer.train(5)
    rows = _rows(path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["ledger/steps"] for r in rows] == ["", "2.0", "3.0", "", ""]
    assert all(r["loss"] != "" for r in rows)
    assert float(rows[2]["ledger/relative_residual"]) == analyzer.residual()["relative_residual"]


def test_a_resumed_csv_writer_joins_the_same_numbers_at_a_kept_step(tmp_path):
    """The kept rows were read back as text, so the same numbers logged again at the last kept step
    (a resumed run's end of training with no new step) compared unequal and made a second row."""
    path = tmp_path / "m.csv"
    writer = CSVWriter(path)
    writer({"loss": 0.1}, 1)
    writer({"loss": 0.3, "ledger/steps": 2.0, "ledger/relative_residual": 1 / 3}, 2)
    writer({"loss": 0.2}, 3)
    resumed = CSVWriter(path, purge_step=3)
    resumed({"ledger/steps": 2.0, "ledger/relative_residual": 1 / 3}, 2)
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["1", "2"]
    assert float(rows[1]["ledger/relative_residual"]) == 1 / 3 and rows[1]["loss"] == "0.3"


def test_a_resumed_run_logs_the_loaded_numbers_at_the_checkpoints_step(tmp_path):
    """Right after a resume, before any new step, the end of training logged the analyzer's loaded
    numbers (3 tracked steps) at step 0 (its callback had seen no step), as if before training."""
    log = Collect()
    analyzer, trainer = _diffusion(log=log, checkpoint_dir=tmp_path)
    trainer.train(3)
    trainer.save_checkpoint()
    log = Collect()
    analyzer, trainer = _diffusion(log=log, checkpoint_dir=tmp_path)
    assert trainer.resume()
    trainer.train(0)
    assert [(step, metrics["ledger/steps"]) for step, metrics in log.rows] == [(3, 3.0)]
    assert log.rows[0][1]["ledger/relative_residual"] == analyzer.residual()["relative_residual"]
    assert {step for _, _, step in log.images} == {3}
    trainer.train(1)  # then on at the loop's numbers; the end of training at 4 adds no second point
    assert [(step, metrics["ledger/steps"]) for step, metrics in log.rows] == [(3, 3.0), (4, 4.0)]


def test_a_resumed_gan_analyzer_logs_at_the_checkpoints_iteration(tmp_path):
    from genkernel.data import gaussian_ring, ring_mode_centers
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    def run(log):
        torch.manual_seed(0)
        data, modes = gaussian_ring(64, num_modes=4, radius=2.0, std=0.05, seed=0)
        G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
        probes = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        analyzer = GANKernelAnalyzer(G, D, probes, grouping="mode", mode_centers=ring_mode_centers(4, 2.0),
                                     mode_std=0.05, window=2, eval_every=1, log=log)
        return analyzer, GANTrainer(G, D, data.double(), labels=modes, batch_size=16, callbacks=[analyzer],
                                    d_steps=2, checkpoint_dir=tmp_path)

    analyzer, trainer = run(Collect())
    trainer.train(3)
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    log = Collect()
    analyzer, trainer = run(log)
    trainer.train(3, resume=True)
    assert [(step, m["generator/steps"], m["discriminator/steps"]) for step, m in log.rows] == [(3, 3.0, 6.0)]
    assert log.rows[0][1]["generator/relative_residual"] == analyzer.report()["generator"]["relative_residual"]


def test_numbers_a_raising_logger_lost_are_logged_when_training_ends():
    """A logger that raised at an analysis step (its numbers not written) was recorded as having
    logged them, so the end of training (train(0) after the error) skipped them for good. The update
    of that step is counted all the same."""

    class Flaky(Collect):
        fail = True

        def __call__(self, metrics, step):
            if step == 2 and self.fail:
                self.fail = False
                raise OSError("disk full")
            super().__call__(metrics, step)

    log = Flaky()
    analyzer, trainer = _diffusion(log=log)
    with pytest.raises(OSError, match="disk full"):
        trainer.train(2)
    assert trainer.global_step == 2 and analyzer.tracker.ledger.steps == 2
    trainer.train(0)
    assert [(step, metrics["ledger/steps"]) for step, metrics in log.rows] == [(1, 1.0), (2, 2.0)]


def test_matrices_of_an_ended_window_are_logged_at_its_last_step():
    """After track_steps' window ended, the frozen window matrices were logged at every later image
    step (4, 6) as if after more training, and never at the window's last step (3), where its numbers are."""
    log = Collect()
    torch.manual_seed(0)
    data = torch.randn(64, 2, dtype=torch.float64)
    scheduler = make_scheduler(100)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=2, num_probes=4, snapshot_every=0, kernel_points=2,
                                  progress=False, track_steps=(1, 3))
    callback = LoggingCallback(log, analyzer=analyzer, every=1, analysis_every=2, image_every=2)
    DDPMTrainer(MLPDenoiser(hidden=8, depth=2, time_dim=8).double(), scheduler, data, batch_size=16,
                callbacks=[analyzer, callback], progress=False).train(6)
    assert [step for step, metrics in log.rows if "ledger/steps" in metrics] == [2, 3]
    assert sorted((name, step) for name, _, step in log.images) == [("matrix/share", 2), ("matrix/share", 3), ("matrix/traffic", 2),
                                  ("matrix/traffic", 3)]


@pytest.mark.parametrize("value", [-2, 2.5, True, "10"])
def test_analysis_every_must_be_a_count(value):
    """analysis_every was taken as given: 2.5 logged at steps 5, 10, ...; -2 as 2; True as 1."""
    with pytest.raises(ValueError, match="analysis_every must be an int >= 0"):
        LoggingCallback(lambda metrics, step: None, analysis_every=value)
    assert LoggingCallback(lambda metrics, step: None, analysis_every=0).analysis_every == 0  # at the end only


def test_tensorboard_writer_without_tensorboard_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'genkernel\[tensorboard\]'"):
        TensorBoardWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_a_sample_grid_scaled_to_its_own_range_survives_one_nan_sample():
    """value_range=None (sample_range=None) took the grid's min and max: one NaN pixel made them NaN and
    every sample black; one inf pixel squashed the others to black. Now the finite values set the range."""
    from genkernel.logging import image_grid

    torch.manual_seed(0)
    samples = torch.rand(4, 1, 3, 3) * 0.5 + 0.25
    samples[0, 0, 0, 0] = 0.5  # (neither the min nor the max: the clean grid's range is the broken one's finite range)
    clean = image_grid(samples, value_range=None)
    for bad in (float("nan"), float("inf")):
        broken = samples.clone()
        broken[0, 0, 0, 0] = bad
        grid = image_grid(broken, value_range=None)
        differs = (grid != clean).any(axis=-1)
        assert differs.sum() == 1 and differs[2, 2]  # only the bad pixel (padding 2): drawn black (NaN) or white (inf)
        assert grid[2, 2, 0] == (0 if bad != bad else 255)


def test_a_trainers_log_every_error_names_log_every():
    with pytest.raises(ValueError, match=r"every \(a trainer's or analyzer's log_every\) must be an int >= 1, got 0"):
        _diffusion(log=lambda metrics, step: None, log_every=0)


def test_numpy_scalars_are_logged_not_dropped(tmp_path):
    """0-d (or one-element) numpy arrays and numpy booleans were silently left out of the row."""
    import numpy as np

    writer = CSVWriter(tmp_path / "m.csv")
    writer({"mean": np.array(1.5), "flag": np.bool_(True), "one": np.array([2.0]), "many": np.zeros(2),
            "label": "text"}, 1)
    (row,) = _rows(writer.path)
    assert row == {"step": "1", "mean": "1.5", "flag": "1.0", "one": "2.0"}


def test_a_loop_counting_from_zero_gets_the_analysis_of_its_step_zero():
    """log_step from a 0-based loop: step 0 matched the callback's initial "last step" (0), so the
    analyzer's numbers after the first tracked step were silently skipped."""
    from genkernel import PathKernelTracker

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, optimizer, lambda out, y: ((out - y) ** 2).mean(dim=1),
                                torch.randn(4, 2, dtype=torch.float64), num_groups=2)
    log = Collect()
    callback = LoggingCallback(log, analyzer=tracker)
    x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for step in range(2):
        tracker.step(x, y, (x[:, 0] > 0).long())
        callback.log_step(step, loss=float(step))
    assert [(step, metrics["loss"], metrics["ledger/steps"]) for step, metrics in log.rows] == [(0, 0.0, 1.0), (1, 1.0, 2.0)]


def test_a_resumed_run_writes_the_straight_runs_csv_byte_for_byte(tmp_path):
    """Coverage: checkpoint at step 2, the run goes on to 3 and stops; resumed with purge_step=3 and
    trained on to 5, one writer for trainer and analyzer: the file is the uninterrupted run's, byte for byte."""
    def run(path, checkpoints, purge_step=None):
        writer = CSVWriter(path, purge_step=purge_step)
        analyzer, trainer = _diffusion(log=writer, trainer_log=writer, log_every=2, checkpoint_dir=checkpoints,
                                       checkpoint_every=2)
        return trainer

    run(tmp_path / "straight.csv", tmp_path / "a").train(5)
    run(tmp_path / "resumed.csv", tmp_path / "b").train(3)
    trainer = run(tmp_path / "resumed.csv", tmp_path / "b", purge_step=3)
    assert trainer.resume() and trainer.global_step == 2
    trainer.train(3)
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "straight.csv").read_text()
    assert [r["step"] for r in _rows(tmp_path / "resumed.csv")] == ["1", "2", "3", "4", "5"]


# -- the GAN trainer's own log= reads the learning rate that trained the step ---------------------------------


def test_gan_trainer_logs_the_learning_rate_that_trained_the_step():
    """GANTrainer(log=) stepped each player's schedule before logging, so lr/... was the next step's rate
    (the first step, trained at 1e-2, logged 5e-3); DDPMTrainer and a LoggingCallback in callbacks log the
    rate used. With d_steps=2 and rates halving every update, D's k-th update trains at 1e-2 / 2^(k-1)."""
    from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
    from genkernel.logging import LoggingCallback

    halve = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 ** k)  # noqa: E731
    own, callback = [], []
    torch.manual_seed(0)
    trainer = GANTrainer(MLPGenerator(latent_dim=2, hidden=8, out_dim=2), MLPDiscriminator(in_dim=2, hidden=8),
                         torch.randn(64, 2), batch_size=16, d_steps=2, lr_g=1e-2, lr_d=1e-2,
                         lr_scheduler_g=halve, lr_scheduler_d=halve, log=lambda m, s: own.append((s, dict(m))),
                         callbacks=[LoggingCallback(lambda m, s: callback.append((s, dict(m))))])
    trainer.train(2)
    d_rates = [m["lr/discriminator"] for _, m in own if "lr/discriminator" in m]
    g_rates = [m["lr/generator"] for _, m in own if "lr/generator" in m]
    assert d_rates == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])
    assert g_rates == pytest.approx([1e-2, 5e-3])
    assert own == callback  # the trainer's own log= and a LoggingCallback in callbacks agree
    assert trainer.g_optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)  # the schedule still stepped twice


def test_a_raising_gan_logger_leaves_the_update_counted_and_its_schedule_stepped():
    from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

    halve = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 ** k)  # noqa: E731

    def log(metrics, step):
        if "loss/generator" in metrics:
            raise OSError("disk full")

    torch.manual_seed(0)
    trainer = GANTrainer(MLPGenerator(latent_dim=2, hidden=8, out_dim=2), MLPDiscriminator(in_dim=2, hidden=8),
                         torch.randn(64, 2), batch_size=16, lr_g=1e-2, lr_d=1e-2, lr_scheduler_g=halve,
                         lr_scheduler_d=halve, log=log)
    with pytest.raises(OSError, match="disk full"):
        trainer.train(1)
    assert (trainer.iteration, trainer.g_steps, trainer.d_steps_done) == (1, 1, 1)
    assert trainer.g_optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)  # the counted update's schedule step
