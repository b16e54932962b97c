"""genkernel.report: summaries equal the analyzers' own reports; the HTML page is self-contained
and renders in headless Chromium (images present, no console errors)."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch

from genkernel import PathKernelTracker
from genkernel.core.tracking.io import atomic_save
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.report import format_summary, render_report, summarize, write_report
from genkernel.report.browser import find_chromium, inspect_page


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    """A NoiseLevelAnalyzer after 12 steps of a tiny DDPM (4 history snapshots), and its saved state."""
    torch.manual_seed(0)
    angle = torch.rand(128, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=8, snapshot_every=3, kernel_points=2,
                                  progress=False)
    DDPMTrainer(model, scheduler, data, batch_size=16, callbacks=[analyzer], progress=False).train(12)
    path = tmp_path_factory.mktemp("diffusion") / "analyzer.pt"
    analyzer.save(path)
    return analyzer, path


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A GANKernelAnalyzer after 8 iterations of a tiny 2-D GAN (2 windows), and its saved state."""
    from genkernel.data.toy2d import gaussian_ring

    torch.manual_seed(0)
    data, _ = gaussian_ring(256, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=16), MLPDiscriminator(2, hidden=16)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(12, 2), num_groups=3, window=4, eval_every=2,
                                 coverage_latents=32)
    GANTrainer(G, D, data, latent_dim=2, batch_size=32, callbacks=[analyzer]).train(8)
    path = tmp_path_factory.mktemp("gan") / "analyzer.pt"
    atomic_save(analyzer.state_dict(), path)
    return analyzer, path


def _close(a, b):
    """Nested lists with None for NaN, equal to float64 rounding."""
    ta = torch.tensor([[math.nan if v is None else v for v in row] for row in a], dtype=torch.float64)
    tb = torch.tensor([[math.nan if v is None else v for v in row] for row in b], dtype=torch.float64)
    return torch.allclose(ta, tb, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_diffusion_summary_equals_the_analyzers_report(diffusion_run):
    analyzer, path = diffusion_run
    mine = analyzer.report()
    (summary,) = summarize(path)["states"].values()
    json.dumps(summary, allow_nan=False)  # strict JSON
    for key in ("traffic", "share", "traffic_control", "share_control"):
        assert _close(summary["matrices"][key], mine["matrices"][key]), key
    for kind in ("traffic", "share"):
        assert summary["locality"][kind]["difference"] == pytest.approx(mine["locality"][kind]["difference"], rel=1e-12)
        assert summary["locality"][kind]["interval"] == pytest.approx(mine["locality"][kind]["interval"], rel=1e-12)
    assert summary["ledger"]["relative_residual"] == pytest.approx(mine["residual"]["relative_residual"], rel=1e-12)
    assert summary["tracked_steps"] == 12 and len(summary["locality_over_training"]) == 4
    assert summary["settings"]["probe_levels"] == sorted(mine["config"]["probe_levels"])
    top = summary["top_groups_by_level"][0]["top_groups"]
    assert len(top) == 3 and top[0]["traffic_share"] >= top[1]["traffic_share"] >= top[2]["traffic_share"]
    assert summary["claims"][0]["held"] is True  # the ledger adds up
    text = format_summary(summarize(path))
    assert "relative residual" in text and "locality within 1 bin(s)" in text


def test_gan_summary_equals_the_analyzers_report(gan_run):
    analyzer, path = gan_run
    mine = analyzer.report()
    (summary,) = summarize(path)["states"].values()
    json.dumps(summary, allow_nan=False)
    whole = mine["generator"]["coupling_whole_run"]
    for key in ("traffic_matrix", "net_matrix", "traffic_matrix_control", "net_matrix_control"):
        assert _close(summary["coupling_whole_run"][key], whole[key]), key
    for kind in ("traffic", "net"):  # the claim reads the analyzer's clustered interaction statistic
        ours = summary["coupling_whole_run"][f"{kind}_interaction_minus_control"]
        theirs = whole["statistics"]["geometry"][kind]["interaction_minus_control"]
        assert ours["difference"] == pytest.approx(theirs["difference"], rel=1e-12)
        assert ours["interval"] == pytest.approx(theirs["interval"], rel=1e-12)
        assert ours["method"] == theirs["method"]
    last = mine["windows"][-1]["statistics"]["geometry"]["traffic"]["interaction_minus_control"]
    assert summary["windows"][-1]["traffic_interaction_minus_control"] == last  # as saved (too few groups: no number)
    assert summary["generator"]["relative_residual"] == pytest.approx(mine["generator"]["relative_residual"], rel=1e-12)
    assert summary["discriminator"]["group_names"] == ["generated", "real", "penalty"]
    assert len(summary["windows"]) == 2 and summary["generator_steps"] == 8


def test_ledger_tracker_and_checkpoint_states_are_summarized(tmp_path, diffusion_run):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    loss = lambda out, y: ((out - y) ** 2).mean(dim=1)  # noqa: E731
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), 1e-2), loss,
                                torch.randn(5, 2, dtype=torch.float64), num_groups=3)
    x, y = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    for _ in range(3):
        tracker.step(x, y, torch.arange(12) % 3)
    tracker.save(tmp_path / "tracker.pt")
    tracker.ledger.save(tmp_path / "ledger.pt")
    for name in ("tracker.pt", "ledger.pt"):
        (summary,) = summarize(tmp_path / name, top=2)["states"].values()
        (ledger,) = summary["ledgers"].values()
        assert ledger["steps"] == 3 and len(ledger["top_groups"]) == 5 and len(ledger["top_groups"][0]["top_groups"]) == 2
        assert ledger["relative_residual"] == pytest.approx(tracker.ledger.relative_residual(), rel=1e-12)
    # a trainer checkpoint: analyzer states among the callbacks
    analyzer, _ = diffusion_run
    atomic_save({"format": "genkernel.DDPMTrainer/3", "callbacks": {"NoiseLevelAnalyzer": analyzer.state_dict()}},
                tmp_path / "checkpoint.pt")
    assert list(summarize(tmp_path / "checkpoint.pt")["states"]) == ["callbacks.NoiseLevelAnalyzer"]
    atomic_save({"format": "something else", "weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="holds no ledger, tracker or analyzer state"):
        summarize(tmp_path / "other.pt")


@pytest.fixture(scope="module")
def pages(diffusion_run, gan_run, tmp_path_factory):
    """Each run's report, written once: ``{name: (html path, frames expected in the GIF)}``."""
    folder = tmp_path_factory.mktemp("reports")
    return {name: (write_report(state, folder / f"{name}.html"), frames)
            for name, (_, state), frames in (("diffusion", diffusion_run, 4), ("gan", gan_run, 2))}


def _images(page: str) -> list[tuple[str, bytes]]:
    import base64

    return [(mime, base64.b64decode(data)) for mime, data in re.findall(r'src="data:(image/[a-z]+);base64,([^"]+)"', page)]


def test_report_page_is_self_contained_with_an_animation(pages, diffusion_run):
    from PIL import Image

    for path, frames in pages.values():
        page = path.read_text(encoding="utf-8")
        assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from anywhere
        assert "<script" not in page and "Content-Security-Policy" in page
        images = _images(page)
        assert len(images) >= 4 and all(Image.open(io.BytesIO(data)).size[0] > 100 for _, data in images)
        gifs = [Image.open(io.BytesIO(data)) for mime, data in images if mime == "image/gif"]
        assert len(gifs) == 1 and gifs[0].n_frames == frames  # one frame per snapshot / window
        assert "What this run supports" in page and "Settings" in page
    # from the analyzer object itself, without a file
    assert "NoiseLevelAnalyzer" in render_report(diffusion_run[0], animate=False)


@pytest.mark.skipif(find_chromium() is None, reason="no headless Chromium: apt-get install chromium (.ci/run does)")
def test_report_renders_in_headless_chromium(pages, tmp_path):
    import numpy as np
    from PIL import Image

    for name, (html, _) in pages.items():
        expected = len(_images(html.read_text(encoding="utf-8")))
        page = inspect_page(html, screenshot=tmp_path / f"{name}.png")
        assert page["errors"] == [], page["errors"]
        assert len(page["images"]) == expected >= 4
        assert page["broken"] == [] and all(img["width"] > 100 for img in page["images"])
        assert page["external"] == [] and page["title"].startswith("genkernel report")
        shot = Image.open(tmp_path / f"{name}.png")
        assert shot.size[0] == 1280 and shot.size[1] > 1500  # the whole page, not a blank viewport
        assert np.unique(np.asarray(shot.convert("L").resize((64, 64)))).size > 20  # something was drawn


# -- review: the state's own settings, GAN runs without controls, user-given names ----------
def _state_copy(obj):
    import copy

    return copy.deepcopy(obj.state_dict())


def test_diffusion_locality_uses_the_saved_band_and_refuses_to_guess_it(diffusion_run):
    """The band is a setting: read from the state (config, else a history snapshot), never assumed."""
    analyzer, _ = diffusion_run
    state = _state_copy(analyzer)
    state["history"] = []  # a run whose snapshots never came (fewer tracked steps than snapshot_every)
    state["config"]["band"] = 2
    reference = analyzer.locality(band=2)  # the analyzer's own statistic at that band
    summary = summarize(state)["states"]["(top level)"]
    for kind in ("traffic", "share"):
        assert summary["locality"][kind]["difference"] == pytest.approx(reference[kind]["difference"], rel=1e-12)
        assert summary["locality"][kind]["interval"] == pytest.approx(reference[kind]["interval"], rel=1e-12)
    assert summary["settings"]["band"] == 2
    assert _state_copy(analyzer)["config"]["band"] == analyzer.band  # the analyzer saves its own band
    del state["config"]["band"]  # nothing says which band (a state saved before the band was): no number, no claim
    summary = summarize(state)["states"]["(top level)"]
    assert summary["locality"]["traffic"] is None and summary["locality"]["band"] is None
    assert not any("noise-localized" in c["statement"] for c in summary["claims"])
    assert any("records no locality band" in n for n in summary["notes"])
    assert "no band recorded" in format_summary(summarize(state))
    assert "records no locality band" in render_report(state, animate=False)


def _without_controls(state):
    ledgers = state["g_tracker"]["ledgers"]
    state["g_tracker"]["ledgers"] = {k: v for k, v in ledgers.items() if not k.startswith("control_")}
    state["config"]["controls"] = 0
    return state


def test_gan_summary_without_controls_gives_the_own_share(gan_run):
    analyzer, _ = gan_run
    state = _without_controls(_state_copy(analyzer))
    (summary,) = summarize(state)["states"].values()
    coupling = summary["coupling_whole_run"]
    assert coupling["controls"] == 0 and "traffic_interaction_minus_control" not in coupling
    # reference: each probe's traffic share from its own geometry group, averaged within probe groups, then over them
    ledger = analyzer.generator_ledger()
    shares = ledger.traffic / ledger.traffic.sum(dim=1, keepdim=True)
    groups = torch.as_tensor(state["run_groups"]).long()
    own = shares[torch.arange(groups.numel()), groups].double()
    reference = torch.stack([own[groups == g].mean() for g in groups.unique()]).mean()
    assert coupling["traffic_own"] == pytest.approx(float(reference), rel=1e-12)
    assert "n/a" in format_summary(summarize(state))


def test_gan_kappa_caveat_goes_only_on_the_coupling_claim(gan_run):
    """Without controls there is no coupling claim: the ill-conditioning caveat must not land on another."""
    analyzer, _ = gan_run
    state = _without_controls(_state_copy(analyzer))
    ledger = state["g_tracker"]["ledgers"]["geometry"]
    large = 100 * (ledger["f_end"] - ledger["f_start"]).norm(dim=1, keepdim=True).expand_as(ledger["rest"])
    ledger["contributions"][:, 0] += large  # ± the same: Σ contributions (the identity) unchanged, κ ≈ 200
    ledger["contributions"][:, 1] -= large
    (summary,) = summarize(state)["states"].values()
    assert summary["coupling_whole_run"]["kappa_median"] > 10
    assert [c["statement"] for c in summary["claims"] if c.get("caveat")] == []


def test_user_given_partition_names_are_escaped_and_drawn_as_written():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    loss = lambda out, y: ((out - y) ** 2).mean(dim=1)  # noqa: E731
    names = {"a<b&c": 3, r"cost $\frac$": 2}  # HTML markup; matplotlib mathtext that does not parse
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), 1e-2), loss,
                                torch.randn(5, 2, dtype=torch.float64), num_groups=names)
    x, y = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    tracker.step(x, y, {"a<b&c": torch.arange(12) % 3, r"cost $\frac$": torch.arange(12) % 2})
    page = render_report(tracker, animate=False)
    assert "a&lt;b&amp;c" in page and "a<b&c" not in page
    assert len(_images(page)) == 3  # the group shares and one figure per ledger


def test_top_must_be_a_positive_int(diffusion_run):
    _, path = diffusion_run
    for top in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top .* must be a positive int"):
            summarize(path, top=top)


def test_snapshot_table_rows_are_their_own_frames(diffusion_run):
    """A history row without matrices has no frame; the table beside the animation must not shift."""
    analyzer, _ = diffusion_run
    state = _state_copy(analyzer)
    history = state["history"] = state["history"][:3]  # two frames are enough for the animation
    history[0]["traffic_matrix"] = None
    for i, row in enumerate(history):
        row["relative_residual"] = 0.25 * (i + 1)  # distinct, exactly printed by the 3-digit format
    page = render_report(state)
    rows = re.findall(r"<tr><td>training step (\d+)</td><td>([^<]*)</td>", page)
    expected = [(str(h["global_step"]), f"{h['relative_residual']:.3g}") for h in history[1:]]
    assert rows == expected


def test_gan_summary_names_groups_by_the_analyzers_saved_labels():
    """With discriminator_groups="role_mode" and one mode the discriminator also has three groups
    (real m0, generated m0, penalty): the summary must name them from the state, not guess the roles
    (which swapped "generated" and "real"); the generator's mode groups keep their names too."""
    from genkernel.data.toy2d import gaussian_ring, ring_mode_centers

    torch.manual_seed(0)
    data, modes = gaussian_ring(64, num_modes=1, radius=2.0, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=8), MLPDiscriminator(2, hidden=8)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(6, 2), grouping="mode", mode_centers=ring_mode_centers(1, 2.0),
                                 mode_std=0.05, discriminator_groups="role_mode", window=2, eval_every=2)
    GANTrainer(G, D, data, labels=modes, latent_dim=2, batch_size=16, callbacks=[analyzer]).train(2)
    state = _state_copy(analyzer)
    (summary,) = summarize(state)["states"].values()
    assert summary["discriminator"]["group_names"] == analyzer.discriminator_group_labels() == [
        "real m0", "generated m0", "penalty"]
    assert summary["generator"]["group_names"] == analyzer.grouping.labels() == ["mode 0"]
    del state["group_labels"]  # a state saved before the labels were: numbered, with a note, not guessed
    (summary,) = summarize(state)["states"].values()
    assert summary["discriminator"]["group_names"] == ["group 0", "group 1", "group 2"]
    assert any("no discriminator group labels" in n for n in summary["notes"])


def test_write_report_is_atomic(tmp_path, monkeypatch):
    """A write interrupted half-way (disk full, a kill) left a truncated page in place of the previous
    one; now the previous page stays whole and no temporary file is left behind."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    loss = lambda out, y: ((out - y) ** 2).mean(dim=1)  # noqa: E731
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), 1e-2), loss,
                                torch.randn(3, 2, dtype=torch.float64), num_groups=2)
    tracker.step(torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64), torch.arange(6) % 2)
    path = tmp_path / "report.html"
    path.write_text("the previous page", encoding="utf-8")
    import contextlib

    import genkernel.report.html as html_module

    real = html_module.atomic_file

    @contextlib.contextmanager
    def interrupted(target, *args, **kwargs):  # the page's file fills up after 100 characters
        with real(target, *args, **kwargs) as handle:
            class Full:
                def write(self, data):
                    handle.write(data[:100])
                    raise OSError(28, "No space left on device")
            yield Full()

    monkeypatch.setattr(html_module, "atomic_file", interrupted)
    with pytest.raises(OSError, match="No space left"):
        write_report(tracker, path, animate=False)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "the previous page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
