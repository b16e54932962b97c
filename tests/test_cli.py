"""The genkernel command: summarize (text and strict JSON), report, figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from genkernel import PathKernelTracker, __version__
from genkernel.cli import main
from genkernel.core.tracking.io import atomic_save
from genkernel.core.tracking.ledger import PathKernelLedger

ROOT = Path(__file__).resolve().parents[1]


def _reject_nan(token):
    raise ValueError(f"not strict JSON: {token}")


@pytest.fixture(scope="module")
def tracker_state(tmp_path_factory):
    """A saved tracker of 3 Adam steps, 2 groups, 6 probes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    loss = lambda out, y: ((out - y) ** 2).mean(dim=1)  # noqa: E731
    probes = torch.cat([torch.randn(5, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)])
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), 1e-2), loss, probes, num_groups=2)
    x, y = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for _ in range(3):
        tracker.step(x, y, (x[:, 1] > 0).long())
    path = tmp_path_factory.mktemp("cli") / "tracker.pt"
    tracker.save(path)
    return tracker, path


def test_console_script_is_declared_and_installed():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    with open(ROOT / "pyproject.toml", "rb") as handle:
        assert tomllib.load(handle)["project"]["scripts"] == {"genkernel": "genkernel.cli:main"}
    script = Path(sys.executable).parent / "genkernel"  # written by pip install (-e) into this environment
    assert script.is_file() and "genkernel.cli" in script.read_text()


def test_summarize_prints_text_and_strict_json(tracker_state, capsys):
    tracker, path = tracker_state
    assert main(["summarize", str(path)]) == 0
    text = capsys.readouterr().out
    assert "relative residual" in text and "top groups per probe" in text and "claim [held]" in text
    assert main(["summarize", str(path), "--json", "--top", "1"]) == 0
    summary = json.loads(capsys.readouterr().out, parse_constant=_reject_nan)
    (state,) = summary["states"].values()
    ledger = state["ledgers"]["groups"]
    assert ledger["steps"] == 3 and ledger["relative_residual"] == pytest.approx(tracker.ledger.relative_residual())
    assert all(len(p["top_groups"]) == 1 for p in ledger["top_groups"])
    kappa = tracker.ledger.shares().kappa
    assert ledger["median_kappa"] == pytest.approx(float(kappa[torch.isfinite(kappa)].double().quantile(0.5)))


def test_summarize_json_writes_undefined_numbers_as_null(tmp_path, capsys):
    ledger = PathKernelLedger.empty(torch.zeros(2, 1, dtype=torch.float64), 2)
    step = torch.tensor([[[0.0], [0.0]], [[1.0], [0.5]]], dtype=torch.float64)  # probe 0 never moves
    ledger.record(step, torch.zeros(2, 1, dtype=torch.float64), step.sum(dim=1))
    ledger.save(tmp_path / "ledger.pt")
    assert main(["summarize", str(tmp_path / "ledger.pt"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out, parse_constant=_reject_nan)
    (state,) = summary["states"].values()
    shares = state["ledgers"]["ledger"]["net_shares"]
    assert shares[0] == [None, None] and shares[1] == pytest.approx([2 / 3, 1 / 3])  # NaN in torch, null in JSON


def test_report_command_writes_a_page(tracker_state, tmp_path, capsys):
    _, path = tracker_state
    assert main(["report", str(path), "-o", str(tmp_path / "r.html"), "--title", "my run"]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<title>my run</title>" in page and page.count("data:image/png;base64,") >= 2
    assert "wrote" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["summarize", str(tmp_path / "missing.pt")]) == 1
    assert "no genkernel state" in capsys.readouterr().err
    atomic_save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    assert main(["report", str(tmp_path / "model.pt")]) == 1
    assert "no analyzer, tracker or ledger state" in capsys.readouterr().err


def test_figures_lists_recipes_and_refuses_unknown_names(capsys):
    assert main(["figures", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "null_space" in names and "diffusion_toy2d" in names
    assert main(["figures", "--only", "no_such_recipe", "--smoke"]) == 2
    assert "unknown recipes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["figures", "--quick", "--smoke"])  # exclusive modes
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out


def test_a_file_of_another_kind_or_a_folder_as_output_is_one_line_and_exit_1(tracker_state, tmp_path, capsys):
    """A file holding a list or a bare tensor (torch.save of something else) crashed summarize with an
    AttributeError traceback; a folder given as the report's output with an IsADirectoryError."""
    _, path = tracker_state
    for name, obj in (("list.pt", [1, 2]), ("tensor.pt", torch.zeros(3))):
        torch.save(obj, tmp_path / name)
        assert main(["summarize", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert "holds no ledger, tracker or analyzer state" in err and "not a dict" in err
    assert main(["report", str(path), "-o", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_probes_must_not_be_negative(tracker_state, capsys):
    """--probes -1 listed all probes but the last under the heading "first -1"."""
    _, path = tracker_state
    assert main(["summarize", str(path), "--probes", "2"]) == 0
    assert "first 2:" in capsys.readouterr().out
    assert main(["summarize", str(path), "--probes", "-1"]) == 1
    assert "must be an int >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["summarize", "report"])
def test_a_state_with_the_format_tag_but_not_its_layout_is_one_line_and_exit_1(tracker_state, tmp_path, capsys,
                                                                               command):
    """A hand-made or edited state (the tracker's format tag, its ledgers removed) printed a KeyError traceback."""
    tracker, _ = tracker_state
    state = tracker.state_dict()
    del state["ledgers"]
    atomic_save(state, tmp_path / "edited.pt")
    assert main([command, str(tmp_path / "edited.pt")]) == 1
    err = capsys.readouterr().err
    assert "has no entry 'ledgers' that its format holds" in err and "Traceback" not in err
