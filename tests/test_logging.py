"""genkernel.logging: the writers read back with their own readers, the callback on a real run."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from genkernel import PathKernelTracker
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.logging import (
    CSVWriter,
    Logger,
    LoggingCallback,
    MultiLogger,
    TensorBoardWriter,
    analyzer_metrics,
    image_grid,
    log_figure,
    log_image,
    matrix_image,
)


class Collect:
    """A logger that keeps what it gets (scalars and images)."""

    def __init__(self):
        self.rows, self.images = [], []

    def __call__(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_image(self, name, array, step):
        self.images.append((name, array, step))


def test_tensorboard_event_file_reads_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image = matrix_image(torch.tensor([[0.0, 0.5], [1.0, float("nan")]]), cell=8)
    with TensorBoardWriter(tmp_path / "tb") as writer:
        for step in (1, 2, 3):
            writer({"loss": 1.0 / step, "ledger/relative_residual": 1e-6 * step, "label": "skipped"}, step)
        writer.log_image("matrix/traffic", image, 3)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "ledger/relative_residual"}  # strings are not scalars
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-6)
    assert events.Scalars("ledger/relative_residual")[-1].value == pytest.approx(3e-6, rel=1e-5)
    (event,) = events.Images("matrix/traffic")
    assert (event.step, event.width, event.height) == (3, 16, 16)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, image)  # PNG is lossless: the very pixels written


def test_csv_writer_widens_its_header_and_saves_images(tmp_path):
    writer = CSVWriter(tmp_path / "run" / "metrics.csv")
    writer({"loss": 0.5}, 1)
    writer({"loss": 0.25, "ledger/kappa_median": 2.0, "flag": True}, 2)
    writer({"loss": float("nan")}, 3)
    log_image(writer, "matrix/share", np.eye(2), 2)
    with open(writer.path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "loss", "ledger/kappa_median", "flag"]
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["ledger/kappa_median"] == "" and float(rows[1]["ledger/kappa_median"]) == 2.0
    assert float(rows[1]["flag"]) == 1.0 and math.isnan(float(rows[2]["loss"]))
    assert (tmp_path / "run" / "metrics_images" / "matrix_share_2.png").is_file()


def test_a_resumed_csv_writer_keeps_the_history_before_its_checkpoint(tmp_path):
    """A run resumed from a checkpoint at step 2 rebuilt its CSVWriter and lost every logged row
    (the file was replaced). With purge_step the rows before it are kept, the interrupted run's
    rows from it on (logged after the checkpoint) dropped, and the run's new rows appended."""
    path = tmp_path / "metrics.csv"
    first = CSVWriter(path)
    for step in (1, 2, 3, 4):
        first({"loss": 1.0 / step, **({"kappa": 2.0} if step == 2 else {})}, step)
    resumed = CSVWriter(path, purge_step=3)
    resumed({"loss": 0.3, "residual": 1e-6}, 3)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "loss", "kappa", "residual"]
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [float(r["loss"]) for r in rows] == [1.0, 0.5, 0.3]
    assert rows[0]["kappa"] == "" and float(rows[1]["kappa"]) == 2.0 and float(rows[2]["residual"]) == 1e-6
    assert CSVWriter(tmp_path / "new.csv", purge_step=5).rows == []  # nothing to continue: a new file
    path.write_text("time,loss\n1,2\n")
    with pytest.raises(ValueError, match="not a CSVWriter file"):
        CSVWriter(path, purge_step=1)
    with pytest.raises(ValueError, match="purge_step must be"):
        CSVWriter(path, purge_step=-1)


def test_a_plain_function_is_a_complete_logger():
    seen = []

    def log(metrics, step):
        seen.append((step, metrics))

    assert isinstance(log, Logger)
    assert log_image(log, "x", np.zeros((2, 2)), 1) is False  # no image support: skipped, not an error
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    collect = Collect()
    assert log_figure(collect, "fig", figure, 4) is True  # a writer with images gets the figure rendered
    assert collect.images[0][1].shape[2] == 4 and collect.images[0][2] == 4
    both = MultiLogger(log, collect)
    both({"loss": 1.0}, 5)
    both.log_image("m", np.ones((2, 2)), 5)
    assert seen[-1] == (5, {"loss": 1.0}) and collect.rows[-1] == (5, {"loss": 1.0}) and len(collect.images) == 2


def test_image_helpers_shapes():
    grid = image_grid(torch.rand(5, 1, 4, 6) * 2 - 1, nrow=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert matrix_image(np.array([1.0, 2.0, 3.0]), cell=2).shape == (2, 6, 3)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        image_grid(torch.zeros(2, 5, 4, 4))


def test_logging_callback_streams_a_diffusion_run():
    torch.manual_seed(0)
    angle = torch.rand(128, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=8, snapshot_every=0, kernel_points=2,
                                  progress=False)
    log = Collect()
    callback = LoggingCallback(log, analyzer=analyzer, every=1, analysis_every=3, image_every=3)
    DDPMTrainer(model, scheduler, data, batch_size=16, callbacks=[analyzer, callback], progress=False).train(6)

    steps = [step for step, metrics in log.rows if "loss" in metrics]
    assert steps == [1, 2, 3, 4, 5, 6]
    analysed = {step: metrics for step, metrics in log.rows if "ledger/relative_residual" in metrics}
    assert sorted(analysed) == [3, 6]
    final = analysed[6]
    assert final["ledger/steps"] == 6 and final["ledger/relative_residual"] < 1e-3
    assert final["ledger/relative_residual"] == pytest.approx(analyzer.residual()["relative_residual"])
    locality = analyzer.locality()
    assert final["locality/traffic/measured_minus_control"] == pytest.approx(locality["traffic"]["difference"])
    assert final["ledger/kappa_median"] == pytest.approx(locality["median_kappa"])
    traffic = [final[f"traffic_share/bin_{g}"] for g in range(4)]
    assert sum(traffic) == pytest.approx(1.0)
    names = {(name, step) for name, _, step in log.images}
    assert names == {("matrix/traffic", 3), ("matrix/share", 3), ("matrix/traffic", 6), ("matrix/share", 6)}
    assert all(image.dtype == np.uint8 and image.shape == (4 * 16, 4 * 16, 3) for _, image, _ in log.images)


def test_analyzer_metrics_of_a_tracker_and_its_ledger():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = lambda out, y: ((out - y) ** 2).mean(dim=1)  # noqa: E731
    tracker = PathKernelTracker(model, optimizer, loss, torch.randn(4, 2, dtype=torch.float64), num_groups=2)
    assert analyzer_metrics(tracker) == {}
    x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for _ in range(3):
        tracker.step(x, y, (x[:, 0] > 0).long())
    metrics = analyzer_metrics(tracker)
    assert metrics == analyzer_metrics(tracker.ledger)
    assert metrics["ledger/steps"] == 3 and metrics["ledger/relative_residual"] < 1e-3
    assert metrics["ledger/traffic_share/group_0"] + metrics["ledger/traffic_share/group_1"] == pytest.approx(1.0)
    with pytest.raises(TypeError, match="analyzer, tracker or ledger"):
        analyzer_metrics(object())


def test_trainer_and_analyzer_take_the_logger_themselves():
    """``log=`` on the trainer streams loss and lr; on the analyzer its running numbers every
    ``log_every`` tracked steps (same step numbers) and its matrices at the end."""
    torch.manual_seed(0)
    angle = torch.rand(128, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    log = Collect()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=8, snapshot_every=0, kernel_points=2,
                                  progress=False, log=log, log_every=2)
    DDPMTrainer(model, scheduler, data, batch_size=16, callbacks=[analyzer], progress=False, log=log,
                log_every=1, lr=2e-3).train(4)

    losses = {step: metrics["loss"] for step, metrics in log.rows if "loss" in metrics}
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(metrics.get("lr", 2e-3) == pytest.approx(2e-3) for _, metrics in log.rows)
    analysed = [(step, metrics) for step, metrics in log.rows if "ledger/relative_residual" in metrics]
    assert [step for step, _ in analysed] == [2, 4]  # every 2nd tracked step; the end of training (4) not again
    assert analysed[0][1]["ledger/steps"] == 2 and analysed[-1][1]["ledger/steps"] == 4
    assert analysed[-1][1]["ledger/relative_residual"] == pytest.approx(analyzer.residual()["relative_residual"])
    assert {name for name, _, step in log.images if step == 4} == {"matrix/traffic", "matrix/share"}


def test_an_observed_loop_logs_through_the_analyzer():
    """In a hand-written loop the analyzer is the only thing that knows the analysis: its ``log``
    gets the numbers at the loop's own step count (``bind``'s ``start_step`` onwards)."""
    torch.manual_seed(0)
    data = torch.randn(64, 2, dtype=torch.float64)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=8, depth=2, time_dim=8).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    log = Collect()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=2, num_probes=4, snapshot_every=0, kernel_points=2,
                                  controls=0, progress=False, log=log, image_every=3)
    analyzer.bind(model, optimizer, start_step=10)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x0 = data[torch.randint(0, 64, (8,), generator=generator)]
        t = torch.randint(0, 100, (8,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        losses = ((model(scheduler.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1)
        analyzer.observe(losses, t)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    analyzer.finish()
    steps = [step for step, metrics in log.rows if "ledger/steps" in metrics]
    assert steps == [11, 12, 13]  # finish() at step 13, logged already: not written twice
    assert [metrics["ledger/steps"] for _, metrics in log.rows] == [1, 2, 3]
    # images at step numbers divisible by image_every (12), and at the end (13)
    assert {(name, step) for name, _, step in log.images} == {(name, step) for name in ("matrix/traffic", "matrix/share")
                                                              for step in (12, 13)}


def test_gan_trainer_logs_both_players():
    from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    log = Collect()
    data = torch.randn(64, 2)
    trainer = GANTrainer(MLPGenerator(latent_dim=2, hidden=8, out_dim=2), MLPDiscriminator(in_dim=2, hidden=8), data,
                         batch_size=16, d_steps=2, log=log, log_every=2)
    trainer.train(4)
    logged = {}
    for step, metrics in log.rows:
        for key in metrics:
            logged.setdefault(key, []).append(step)
    assert logged["loss/generator"] == [2, 4]
    assert logged["loss/discriminator"] == [2, 2, 4, 4]  # two D steps per iteration
    assert set(logged) == {"loss/generator", "loss/discriminator", "lr/generator", "lr/discriminator"}


def _gan_run(log=None, **kwargs):
    from genkernel.data import gaussian_ring, ring_mode_centers
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    data, modes = gaussian_ring(128, num_modes=4, radius=2.0, std=0.05, seed=0)
    G = MLPGenerator(2, 2, hidden=8, depth=2).double()
    D = MLPDiscriminator(2, hidden=8, depth=2).double()
    probes = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    analyzer = GANKernelAnalyzer(G, D, probes, grouping="mode", mode_centers=ring_mode_centers(4, 2.0), mode_std=0.05,
                                 window=2, eval_every=1, log=log, **kwargs)
    trainer = GANTrainer(G, D, data.double(), labels=modes, batch_size=16, lr_g=2e-3, lr_d=2e-3, callbacks=[analyzer])
    return analyzer, trainer


def test_gan_coupling_metrics_are_the_clustered_interaction_statistic():
    """The streamed coupling numbers are what the report's claim reads (the analyzer's
    partition_statistics: the interaction statistic minus control, clustered by probe group), not
    the own share minus control that source-group strength confounds."""
    from genkernel.gan.analyzer import partition_statistics

    from genkernel.data.toy2d import gaussian_ring
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    data, _ = gaussian_ring(256, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=16), MLPDiscriminator(2, hidden=16)
    log = Collect()
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(24, 2), num_groups=4, window=3, eval_every=3,
                                 log=log, log_every=1, image_every=100)
    GANTrainer(G, D, data, latent_dim=2, batch_size=32, callbacks=[analyzer]).train(6)
    rows = [metrics for _, metrics in log.rows if "generator/steps" in metrics]
    assert not any("_own/" in key for row in rows for key in row)
    geometry = analyzer.generator_ledgers["geometry"]
    controls = [analyzer.generator_ledgers[c] for c in analyzer.control_names]
    whole = partition_statistics(geometry, controls, geometry.delta.cpu(), analyzer._run_groups, analyzer.num_groups)
    first_window = next(row for row in rows if "coupling_window/traffic_interaction/measured" in row)
    window = analyzer.windows[0]["statistics"]["geometry"]
    for kind in ("traffic", "net"):
        expected = whole[kind]["interaction_minus_control"]
        assert math.isfinite(expected["difference"])  # enough occupied probe groups for a number
        assert rows[-1][f"coupling/{kind}_interaction/measured_minus_control"] == pytest.approx(expected["difference"])
        assert rows[-1][f"coupling/{kind}_interaction/interval_low"] == pytest.approx(expected["interval"][0])
        expected = window[kind]["interaction_minus_control"]
        assert math.isfinite(expected["difference"])
        assert first_window[f"coupling_window/{kind}_interaction/measured_minus_control"] == pytest.approx(
            expected["difference"])


def test_gan_analyzer_logs_its_numbers_at_generator_steps():
    log = Collect()
    analyzer, trainer = _gan_run(log, log_every=1, image_every=2)
    trainer.train(3)
    tracked = [(step, metrics) for step, metrics in log.rows if "generator/steps" in metrics]
    # one row per generator step at the loop's iteration numbers; on_train_end at step 3 adds no second point
    assert [step for step, _ in tracked] == [1, 2, 3]
    assert [metrics["generator/steps"] for _, metrics in tracked] == [1, 2, 3]
    last = tracked[-1][1]
    assert last["generator/relative_residual"] == pytest.approx(analyzer.report()["generator"]["relative_residual"])
    assert last["discriminator/steps"] == 3
    # the window closed at step 2: its statistics appear from step 2 on, not before
    assert not any(k.startswith("coupling_window/") for k in tracked[0][1])
    assert any(k.startswith("coupling_window/") for k in tracked[1][1])
    # coupling matrices as images at step 2 (image_every) and at the end (3); the partial window is closed
    assert {(name, step) for name, _, step in log.images} == {("coupling/traffic", 2), ("coupling/net", 2),
                                                              ("coupling/traffic", 3), ("coupling/net", 3)}
    assert analyzer.partial_window is not None and analyzer.partial_window["partial"]


def test_gan_analyzer_saves_and_loads_its_state(tmp_path):
    analyzer, trainer = _gan_run()
    trainer.train(3)
    path = tmp_path / "gan_state.pt"
    analyzer.save(path)
    fresh, _ = _gan_run()
    fresh.load(path)
    before, after = analyzer.report(), fresh.report()
    assert after["generator"]["steps"] == before["generator"]["steps"] == 3
    assert after["generator"]["relative_residual"] == before["generator"]["relative_residual"]
    assert after["windows"] == before["windows"]
    with pytest.raises(ValueError, match="GANKernelAnalyzer"):
        fresh.load(_save_other(tmp_path))


def _save_other(tmp_path):
    from genkernel.core.tracking.io import atomic_save

    path = tmp_path / "other.pt"
    atomic_save({"format": "something else"}, path)
    return path


# -- review: one CSV row per step --------------------------------------------------------------
def test_one_csv_writer_for_trainer_and_analyzer_writes_one_row_per_step(tmp_path):
    """The documented set-up (usage.md) hands one writer to the trainer (loss, lr) and to the analyzer
    (its numbers, then once more at the end of training): the CSV had two or three rows at a step,
    each with half the columns blank, so a per-step reading counted steps twice. Now every step is
    one row holding both, and the analyzer's numbers there are its own at the end."""
    torch.manual_seed(0)
    angle = torch.rand(128, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    path = tmp_path / "run.csv"
    writer = CSVWriter(path)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=8, snapshot_every=0, kernel_points=2,
                                  progress=False, log=writer, log_every=2)
    DDPMTrainer(model, scheduler, data, batch_size=16, callbacks=[analyzer], progress=False, log=writer,
                log_every=1).train(4)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] != "" for r in rows)
    assert [r["ledger/steps"] for r in rows] == ["", "2.0", "", "4.0"]
    last = rows[-1]
    assert float(last["ledger/relative_residual"]) == analyzer.residual()["relative_residual"]
    assert float(last["locality/traffic/measured_minus_control"]) == analyzer.locality()["traffic"]["difference"]
    assert writer.rows[-1]["step"] == 4 and len(writer.rows) == 4
    # two values of one name at one step (two discriminator steps in an iteration): both kept, in order
    two = CSVWriter(tmp_path / "two.csv")
    for loss in (1.0, 0.5):
        two({"loss/discriminator": loss}, 1)
    two({"loss/generator": 2.0}, 1)
    with open(tmp_path / "two.csv", newline="") as handle:
        assert [(r["step"], r["loss/discriminator"], r["loss/generator"]) for r in csv.DictReader(handle)] == [
            ("1", "1.0", ""), ("1", "0.5", "2.0")]


def test_net_share_images_put_zero_at_the_neutral_colour():
    """Net shares are signed: their image is on a diverging map, which reads only when 0 is its
    neutral middle. With the matrix's own min and max as limits an all-positive matrix drew its
    smallest share in the map's deepest blue, the colour of the most negative value."""
    import matplotlib
    from types import SimpleNamespace

    from genkernel.logging import analyzer_images

    net = [[0.05, 0.9], [0.0, None]]  # as a window stores it (strict JSON: None for NaN)
    window = {"traffic_matrix": [[0.1, 0.9], [0.5, 0.5]], "net_matrix": net}
    image = analyzer_images(SimpleNamespace(windows=[window]))["coupling/net"]
    cmap = matplotlib.colormaps["coolwarm"]
    for (i, j), value in (((0, 0), 0.05), ((0, 1), 0.9), ((1, 0), 0.0)):
        expected = (np.asarray(cmap(0.5 + value / (2 * 0.9))[:3]) * 255).round()
        assert np.array_equal(image[16 * i, 16 * j], expected), (i, j)
    assert np.array_equal(image[16, 16], [128, 128, 128])  # NaN: grey


def test_logging_a_figure_leaves_its_dpi_and_canvas():
    """figure_to_array set the caller's figure to dpi 100 and an Agg canvas for good: a figure logged
    and then saved with savefig (at the figure's dpi) came out at another size."""
    from matplotlib.figure import Figure

    from genkernel.logging import figure_to_array

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.subplots().plot([0, 1], [1, 0])
    canvas = fig.canvas
    assert figure_to_array(fig, dpi=100).shape == (100, 200, 4)
    assert fig.dpi == 50 and fig.canvas is canvas
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    from PIL import Image

    assert Image.open(io.BytesIO(buffer.getvalue())).size == (100, 50)


def test_an_integer_image_other_than_uint8_is_refused():
    """An int64 image of 0-255 values was read as floats in [0, 1] and written all white."""
    log = Collect()
    gray = np.full((2, 3), 128, dtype=np.int64)
    with pytest.raises(ValueError, match="must be uint8"):
        log_image(log, "x", gray, 1)
    assert log_image(log, "x", gray.astype(np.uint8), 1) and log.images[0][1][0, 0] == 128
    assert log_image(log, "mask", np.eye(2, dtype=bool), 1) and log.images[1][1][0, 0] == 255


def test_a_row_cut_short_by_a_killed_run_is_dropped_on_resume_not_read_as_another_number(tmp_path):
    """Rows are appended in place: a run killed mid-write leaves '3,0.33' of '3,0.3333333333333333'.
    Before, a resume kept that row at step 3 with loss 0.33, a number the run never logged."""
    path = tmp_path / "metrics.csv"
    writer = CSVWriter(path)
    for step in (1, 2, 3):
        writer({"loss": 1.0 / step}, step)
    text = path.read_text()
    path.write_text(text[: text.rindex("3333")])  # the last row without its last digits and line end
    with pytest.warns(RuntimeWarning, match="partial row '3,0.33.*dropped"):
        resumed = CSVWriter(path, purge_step=10)
    assert [row["step"] for row in resumed.rows] == [1, 2] and resumed.rows[1]["loss"] == 0.5
    resumed({"loss": 0.25}, 4)
    with open(path, newline="") as handle:
        assert [(r["step"], float(r["loss"])) for r in csv.DictReader(handle)] == [("1", 1.0), ("2", 0.5), ("4", 0.25)]


def test_csv_writer_saves_grey_images_with_their_own_values(tmp_path):
    """matplotlib's imsave drew a 2-D image through a colormap whose limits were the image's own min and max: a
    0..128 ramp was saved as 0..255, a uniform grey or white image as black (errors up to 255 levels, silently)."""
    from PIL import Image

    from genkernel.logging import CSVWriter

    writer = CSVWriter(tmp_path / "metrics.csv")
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    cases = {"ramp": ramp, "dark": (ramp // 2).astype(np.uint8), "white": np.full((4, 4), 1.0),
             "grey": np.full((4, 4, 1), 0.5), "floats": np.linspace(0.2, 0.6, 16).reshape(4, 4)}
    for step, (name, image) in enumerate(cases.items()):
        writer.log_image(name, image, step)
        png = np.asarray(Image.open(writer.image_dir / f"{name}_{step}.png").convert("RGB")).astype(np.int64)
        values = np.asarray(image, dtype=np.float64).reshape(png.shape[:2])
        want = values if np.asarray(image).dtype == np.uint8 else np.round(values * 255)
        assert np.array_equal(png, np.repeat(want[..., None], 3, axis=2).astype(np.int64)), name
