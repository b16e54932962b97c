"""Review of the shared adapter (genkernel.core.adapter) and the report's figures and browser helper."""

from __future__ import annotations

import copy
import stat
import time

import numpy as np
import pytest
import torch
from torch import nn

from genkernel.core.adapter import (
    analysis_mode,
    batch_size,
    call_with,
    check_memory_budget,
    evaluated_at,
    functional_model,
    select,
    unwrap,
)
from genkernel.plotting.arrays import colour_limit
from genkernel.report import figures as fg
from genkernel.report.browser import BrowserError, find_chromium, inspect_page


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


# -- adapter -------------------------------------------------------------------------------------

def test_call_with_refuses_names_the_module_does_not_have():
    """A misspelled or wrapper-prefixed name was skipped by torch: the forward silently ran at the
    module's own parameters (old: output equal to model(x), no error)."""
    model = _mlp()
    x = torch.randn(5, 3, dtype=torch.float64)
    values = {name: p.detach() + 1.0 for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no parameter or buffer"):
        call_with(model, {"0.wieght": values["0.weight"]}, (x,))
    ddp_names = {f"module.{name}": v for name, v in values.items()}  # a DDP state_dict's names
    with pytest.raises(ValueError, match="module\\."):
        functional_model(model)(ddp_names, (x,))
    # the module is left as it was, and the right names still evaluate at the given values
    loaded = copy.deepcopy(model)
    loaded.load_state_dict(values)
    assert torch.equal(call_with(model, values, (x,)), loaded(x))
    assert all(not torch.equal(p, values[n]) for n, p in model.named_parameters())


def test_call_with_refuses_a_parameter_of_another_shape():
    """A bias of shape [1] broadcast over the layer's outputs: other numbers, no error (old)."""
    model = _mlp()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="another shape"):
        call_with(model, {"2.bias": torch.zeros(1, dtype=torch.float64)}, (x,))


def test_functional_evaluation_equals_the_loaded_module_tied_and_buffers():
    """coverage: evaluation at given parameters (a tied weight given under one name, a BatchNorm's
    running statistics given as buffers) equals the module with them loaded; nothing is mutated."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.bn = nn.BatchNorm1d(3)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.bn(self.a(x)))

    torch.manual_seed(1)
    model = Tied().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    x_copy = x.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = {"a.weight": torch.randn(3, 3, dtype=torch.float64), "bn.running_mean": torch.randn(3, dtype=torch.float64),
              "bn.running_var": torch.rand(3, dtype=torch.float64) + 0.5}
    kept = {k: v.clone() for k, v in values.items()}
    w = values["a.weight"]
    h = x @ w.T
    normed = (h - values["bn.running_mean"]) / torch.sqrt(values["bn.running_var"] + model.bn.eps)
    expected = (normed * model.bn.weight + model.bn.bias) @ w.T
    with evaluated_at(model, values) as m:
        got = m(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(x, x_copy) and all(torch.equal(values[k], kept[k]) for k in kept)


def test_select_refuses_tensors_of_other_batch_sizes():
    """select cut tensors of 5 and 3 rows with one slice into 4 and 3 rows, silently (old)."""
    batch = (torch.arange(5.0), torch.arange(3.0))
    with pytest.raises(ValueError, match="same batch size"):
        select(batch, slice(0, 4))
    with pytest.raises(ValueError, match="disagree"):
        batch_size(batch)
    same = (torch.arange(5.0), torch.arange(10.0).reshape(5, 2))
    rows = select(same, torch.tensor([4, 0]))
    assert rows[0].tolist() == [4.0, 0.0] and rows[1].tolist() == [[8.0, 9.0], [0.0, 1.0]]


def test_memory_budget_takes_numpy_floats_like_floats():
    """A float32 budget (2.0**20 from a NumPy config) was refused as 'not a number of bytes' (old:
    TypeError) while float64 and Python floats were taken."""
    assert check_memory_budget(np.float32(2.0**20)) == 2**20
    assert check_memory_budget(np.float64(2e9)) == 2_000_000_000
    with pytest.raises(TypeError):
        check_memory_budget("5")
    with pytest.raises(TypeError):
        check_memory_budget(True)
    with pytest.raises(ValueError):
        check_memory_budget(np.float32("nan"))


@pytest.mark.parametrize("budget", [1.5, 8.0, np.float32(0.75 * 2**10)])
def test_a_float_budget_of_a_few_bytes_is_refused_as_another_unit(budget):
    """Fails on the old code: memory_budget=1.5 (meant as GiB) ran on a budget of 1 byte. Ints that small
    are still budgets in bytes (tests force the smallest chunks with them)."""
    with pytest.raises(ValueError, match=r"budgets are in bytes.*\* 2\*\*30"):
        check_memory_budget(budget)
    assert check_memory_budget(1) == 1 and check_memory_budget(np.int64(3)) == 3 and check_memory_budget(2.0**10) == 2**10


def test_analysis_mode_restores_mixed_modes_rng_and_statistics_on_error():
    """coverage: nested modules in mixed modes get their own mode back, also when the block raises;
    BatchNorm's running statistics, its batch counter and the global CPU RNG are as they were."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3)), nn.Linear(3, 1))
    model.train()
    model[1].eval()
    model[1][1].train()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(KeyError):
        with analysis_mode(model):
            assert not any(m.training for m in model.modules())
            model(torch.randn(6, 3))
            torch.rand(10)
            raise KeyError("inside")
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_unwrap_nested_wrappers():
    """coverage: DataParallel around a compiled module around the model unwraps to the model."""
    model = _mlp()
    wrapped = torch.compile(nn.DataParallel(torch.compile(model)))
    assert unwrap(wrapped) is model


# -- figures ---------------------------------------------------------------------------------------

def test_animation_refuses_frames_of_other_shapes():
    """A later frame of another shape was drawn stretched over the first frame's extent (old: a
    GIF, no error)."""
    frames = [{"label": "a", "m": [[1.0, 2.0], [3.0, 4.0]]}, {"label": "b", "m": [[1.0, 2.0, 3.0]] * 3}]
    with pytest.raises(ValueError, match="differ in shape"):
        fg.matrix_animation(frames, keys=[("m", "traffic", False)], xlabel="x", ylabel="y")


def test_animation_colour_scale_is_fixed_over_frames():
    """coverage: the GIF's scales span every frame (the shared colour_limit rule), None drawn as NaN."""
    frames = [{"label": "a", "t": [[0.1, None]], "n": [[-0.2, 0.1]]}, {"label": "b", "t": [[0.7, 0.3]], "n": [[0.5, -3.0]]}]
    assert colour_limit(*[f["t"] for f in frames]) == 0.7
    assert colour_limit(*[f["n"] for f in frames], absolute=True) == 3.0
    gif = fg.matrix_animation(frames, keys=[("t", "traffic", False), ("n", "net", True)], xlabel="x", ylabel="y")
    assert gif[:6] in (b"GIF87a", b"GIF89a")


def test_heatmap_refuses_row_labels_of_another_count():
    """Three level labels beside a two-row matrix named rows wrongly (old: drawn, no error)."""
    summary = {"matrices": {"traffic": [[0.5, 0.5], [0.2, 0.8]], "share": [[1.0, -2.0], [3.0, 4.0]]},
               "settings": {"probe_levels": [0.1, 0.5, 0.9]}}
    with pytest.raises(ValueError, match="3 row labels for a matrix of 2 rows"):
        fg.noise_matrix_figure(summary)


def test_noise_matrix_scales_and_labels_match_the_numbers():
    """Measured and control share one scale per kind (viridis 0..max, coolwarm ±max|.|), rows are
    labelled by their probe level, and a section without traffic draws the rest (old: KeyError
    'traffic' / 'traffic_matrix' although the panels were filtered to those present)."""
    summary = {"matrices": {"traffic": [[0.5, 0.25], [0.2, 0.8]], "traffic_control": [[0.9, None], [0.1, 0.1]],
                            "share": [[1.0, -2.0], [3.0, 4.0]], "share_control": [[-5.0, 0.0], [0.0, 0.0]]},
               "settings": {"probe_levels": [0.1, 0.5]}}
    fig = fg.noise_matrix_figure(summary)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert [im.get_clim() for im in images] == [(0.0, 0.9), (0.0, 0.9), (-5.0, 5.0), (-5.0, 5.0)]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["t=0.1", "t=0.5"]
    control = images[1].get_array()  # None (NaN in the JSON) is drawn as a masked (blank) cell
    assert np.ma.getmaskarray(control).tolist() == [[False, True], [False, False]]
    assert control[0, 0] == 0.9 and control[1].tolist() == [0.1, 0.1]
    only_share = {"matrices": {"share": [[1.0, -2.0]]}, "settings": {"probe_levels": [0.1]}}
    fig = fg.noise_matrix_figure(only_share)  # old: KeyError 'traffic'
    assert [ax.images[0].get_clim() for ax in fig.axes if ax.images] == [(-2.0, 2.0)]
    coupling = fg.coupling_figure({"net_matrix": [[0.5, -1.5]]})  # old: KeyError 'traffic_matrix'
    assert [ax.images[0].get_clim() for ax in coupling.axes if ax.images] == [(-1.5, 1.5)]


def test_level_class_refuses_columns_that_do_not_split_into_bins():
    """Five columns over two bins put the bin lines between other columns (old: drawn)."""
    with pytest.raises(ValueError, match="does not split into 2 bins"):
        fg.level_class_figure({"matrix": [[0.1, 0.2, 0.3, 0.2, 0.2]]}, [0.5], 2)
    fig = fg.level_class_figure({"matrix": [[0.1, 0.2, 0.3, 0.4]]}, [0.5], 2)
    ax = fig.axes[0]
    assert [line.get_xdata()[0] for line in ax.lines] == [1.5]  # between bin 0 (cols 0, 1) and bin 1


def test_kernel_legend_names_the_step():
    """An entry recorded before any step has no global step: the legend read "step None" (old). θ₀ without a
    global step is "tracked step 0" (where tracking began: a loop without a step counter cannot tell it from the
    initialization), as the report's table names it (genkernel.report.figures.checkpoint_label)."""
    summary = {"kernel": [{"tracked_step": 0, "global_step": None, "by_distance": [1.0, 0.5]},
                          {"tracked_step": 3, "global_step": 30, "by_distance": [1.0, None],
                           "by_distance_same_input": [0.9, 0.4]},
                          {"tracked_step": None, "global_step": 0, "by_distance": [1.0, 0.7]}]}  # a recipe's init entry
    fig = fg.kernel_figure(summary)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["tracked step 0", "step 30", "initialization"]
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["step 30"]
    np.testing.assert_array_equal(fig.axes[0].lines[1].get_ydata(), [1.0, np.nan])


# -- browser ---------------------------------------------------------------------------------------

def test_browser_that_fails_to_start_says_why_quickly(tmp_path):
    """A browser that logs 200 kB to stderr and exits: its stderr pipe was never read, so it
    blocked until the timeout and the error hid its reason (old: "did not answer in time" after
    timeout + 10 s). Now the error comes at once with the browser's last words."""
    fake = tmp_path / "fake-chromium"
    fake.write_text("#!/bin/sh\nhead -c 200000 /dev/zero | tr '\\0' 'x' >&2\necho >&2\n"
                    "echo 'error while loading shared libraries: libnss3.so' >&2\nexit 127\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    page = tmp_path / "page.html"
    page.write_text("<html><body>x</body></html>")
    start = time.monotonic()
    with pytest.raises(BrowserError, match="libnss3"):
        inspect_page(page, chromium=str(fake), timeout=3.0)
    assert time.monotonic() - start < 2.5


def test_a_chromium_variable_naming_no_executable_is_refused(tmp_path, monkeypatch):
    """Fails on the old code: CHROMIUM=/missing fell back silently to whatever browser the PATH had (or
    to none, "no Chromium found"), so the page was inspected by another browser than the one asked for."""
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "missing-chrome"))
    with pytest.raises(BrowserError, match=r"CHROMIUM=.*missing-chrome.* is not an executable"):
        find_chromium()
    page = tmp_path / "page.html"
    page.write_text("<html></html>")
    with pytest.raises(BrowserError, match="is not an executable"):
        inspect_page(page, timeout=3.0)


@pytest.mark.skipif(find_chromium() is None, reason="no headless Chromium: apt-get install chromium")
def test_browser_sees_an_embedded_figure(tmp_path):
    """coverage: a page with one embedded PNG of a figure loads with that image at its pixel size."""
    import base64

    fig = fg.ledger_figure({"traffic_shares": [[0.5, 0.5]], "net_shares": [[1.0, 0.0]], "kappa": [1.0],
                            "probe_relative_residual": [1e-9]})
    data = fg.png(fig, dpi=50)
    html = tmp_path / "page.html"
    html.write_text(f'<html><body><img alt="ledger" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                    "</body></html>")
    seen = inspect_page(html, timeout=60.0)
    assert seen["broken"] == [] and seen["errors"] == [] and seen["external"] == []
    assert [(i["alt"], i["width"], i["height"]) for i in seen["images"]] == [("ledger", 550, 160)]
