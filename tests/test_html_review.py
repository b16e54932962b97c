"""Review of the HTML report and the ``genkernel report`` command: rows labelled as what they hold
(no "step None", a [first, last] pair not read as a list of steps), the content-security policy,
atomic writes that touch no file of the user's, user-given names escaped everywhere, and the
command's one-line errors (an unwritable output, the state file given as the output)."""

from __future__ import annotations

import copy
import math
import os
import re
from html.parser import HTMLParser

import pytest
import torch

from genkernel import PathKernelTracker
from genkernel.cli import main
from genkernel.core.tracking.io import atomic_save
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.report import render_report, write_report
from genkernel.report.html import _gan_section

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diffusion_state():
    """A NoiseLevelAnalyzer's state after 4 steps of a tiny DDPM (2 history snapshots, 2 kernel checkpoints)."""
    torch.manual_seed(0)
    angle = torch.rand(64, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=8, depth=2, time_dim=4).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=4, num_probes=4, snapshot_every=2, kernel_points=2,
                                  progress=False)
    DDPMTrainer(model, scheduler, data, batch_size=8, callbacks=[analyzer], progress=False).train(4)
    return analyzer.state_dict()


def _tracker(names=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    loss = lambda out, y: ((out - y) ** 2).mean(dim=1)  # noqa: E731
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), 1e-2), loss,
                                torch.randn(3, 2, dtype=torch.float64), num_groups=names)
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    tracker.step(x, y, torch.arange(6) % 2 if isinstance(names, int) else {k: torch.arange(6) % v for k, v in names.items()})
    return tracker


@pytest.fixture(scope="module")
def tracker_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("html_review") / "tracker.pt"
    _tracker().save(path)
    return path


def _cells(page: str) -> list[list[str]]:
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]


# -- rows say what they hold ---------------------------------------------------------------
def test_steps_without_a_global_step_are_named_by_their_tracked_step(diffusion_state):
    """An analyzer driven without a trainer's global_step records None: the snapshot table showed
    "training step None" and the kernel table "step None"."""
    state = copy.deepcopy(diffusion_state)
    for row in state["history"]:
        row["global_step"] = None
    for row in state["kernel_history"]:
        if row.get("tracked_step") is not None:
            row["global_step"] = None
    page = render_report(state)
    assert "None" not in re.sub(r"<pre>.*</pre>", "", page, flags=re.S)
    snapshots = [r[0] for r in _cells(page) if re.fullmatch(r"tracked step \d+", r[0])]
    assert snapshots == [f"tracked step {h['tracked_step']}" for h in state["history"]] + \
        [f"tracked step {k['tracked_step']}" for k in state["kernel_history"] if k.get("tracked_step") is not None]


def test_the_training_step_range_is_labelled_as_a_range(diffusion_state):
    """Settings showed "training steps | [1, 4]": the first and last step numbers, read as a list."""
    page = render_report(diffusion_state, animate=False)
    steps = [s for s in diffusion_state["global_steps"] if s is not None]
    (row,) = [r for r in _cells(page) if r[0].startswith("training steps")]
    assert row == ["training steps tracked (first – last)", f"{steps[0]} – {steps[-1]}"]


def test_gan_window_rows_show_their_span_whichever_key_holds_it():
    """A window with only ``steps`` (no ``loop_steps``) printed its span as a list "[0, 4]"."""
    windows = [{"steps": [4 * i, 4 * i + 4], "kappa_median": 1.0 + i, "collapsed": False,
                "traffic_interaction_minus_control": {"difference": 0.25 * (i + 1), "interval": [0.0, 1.0]},
                "net_interaction_minus_control": {"difference": -0.5 * (i + 1), "interval": [-1.0, 0.0]}} for i in range(2)]
    windows.append({**windows[1], "loop_steps": [100, 108]})
    page = _gan_section({"claims": [], "settings": {}, "windows": windows}, animate=False)
    rows = [r for r in _cells(page) if r and "–" in r[0]]
    assert rows == [["0–4", "0.25", "-0.5", "1", "no"], ["4–8", "0.5", "-1", "2", "no"], ["100–108", "0.5", "-1", "2", "no"]]


# -- the page's safety ---------------------------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.title = [], [], ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def test_content_security_policy_also_closes_what_default_src_does_not_cover(tracker_file):
    """base-uri and form-action do not fall back to default-src: the policy left them open."""
    page = render_report(tracker_file, animate=False)
    (policy,) = re.findall(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
    assert directives["base-uri"] == "'none'" and directives["form-action"] == "'none'"
    assert "script-src" not in directives and "'unsafe-eval'" not in policy


def test_user_given_names_title_and_keys_are_text_never_markup():
    """coverage: partition names, a checkpoint key and the title carrying markup stay text."""
    hostile = '<img src=x onerror="alert(1)">'
    tracker = _tracker({hostile: 2, "b\"'&": 2})
    state = {"callbacks": {f"</h2><script>{hostile}": tracker.state_dict()}}
    page = render_report(state, title=f"</title><script>alert(1)</script>{hostile}", animate=False)
    parsed = _Tags()
    parsed.feed(page)
    allowed = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "code", "section", "div", "span",
               "b", "table", "tr", "td", "th", "figure", "figcaption", "img", "details", "summary", "pre"}
    assert set(parsed.tags) <= allowed and "script" not in parsed.tags
    assert not [a for a in parsed.attrs if a[1].startswith("on")]
    assert all(v.startswith("data:image/") for tag, k, v in parsed.attrs if k == "src")
    assert parsed.title == f"</title><script>alert(1)</script>{hostile}"  # drawn as written, as text


# -- writing the page ----------------------------------------------------------------------
def test_write_report_leaves_the_users_other_files_alone(tracker_file, tmp_path):
    """The temporary file was PATH.tmp: a file of that name was overwritten, then deleted."""
    path = tmp_path / "report.html"
    (tmp_path / "report.html.tmp").write_text("mine", encoding="utf-8")
    write_report(tracker_file, path, animate=False)
    assert (tmp_path / "report.html.tmp").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.html.tmp"]
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as a page written with open() would be


def test_a_state_it_cannot_read_creates_no_folder(tmp_path):
    """The output's folders were created before the state was read: an error left empty folders behind."""
    atomic_save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="no analyzer, tracker or ledger state"):
        write_report(tmp_path / "model.pt", tmp_path / "new" / "deeper" / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# -- the command ---------------------------------------------------------------------------
def test_report_refuses_to_overwrite_its_own_state(tracker_file, tmp_path, capsys):
    """-o STATE.pt replaced the analyzer's saved state by the HTML page and exited 0."""
    state = tmp_path / "state.pt"
    state.write_bytes(tracker_file.read_bytes())
    before = state.read_bytes()
    assert main(["report", str(state), "-o", str(state)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the state file itself" in err
    assert state.read_bytes() == before
    named = tmp_path / "state.html"  # a state named .html: the default output is the same file
    named.write_bytes(before)
    assert main(["report", str(named)]) == 1 and named.read_bytes() == before
    assert "is the state file itself" in capsys.readouterr().err


def test_an_unwritable_output_is_one_line_and_exit_1(tracker_file, tmp_path, capsys):
    """An output below a regular file raised NotADirectoryError/FileExistsError out of main (a traceback)."""
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    assert main(["report", str(tracker_file), "-o", str(tmp_path / "file.txt" / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("genkernel report: ") and err.count("\n") == 1 and "file.txt" in err
    assert (tmp_path / "file.txt").read_text(encoding="utf-8") == "x"


def test_a_claims_number_is_never_rounded_onto_its_limit():
    """3 significant digits showed a mean cosine of 0.98996 as "0.99" beside "≥ 0.99 … not held", and
    residuals either side of 0.001 both as "0.001" under opposite badges. The number shown must
    lie on the same side of the limit as the value, and the badge must say what ``held`` says."""
    from genkernel.report.html import _claims

    cases = [(0.98996, 0.99), (0.990004, 0.99), (0.0010004, 1e-3), (0.00099951, 1e-3), (0.49999, 0.5), (0.5000004, 0.5)]
    claims = [{"statement": f"at or above {limit}", "held": value >= limit, "value": value,
               "interval": [value - 1e-7, value + 1e-7]} for value, limit in cases]
    claims.append({"statement": "undecided", "held": None, "value": None})
    page = _claims(claims)
    shown = re.findall(r'<div class="claim (\w+)"><span class="badge">([^<]*)</span>[^<]*<b>([^<]*)</b>', page)
    assert len(shown) == len(claims)
    for (cls, badge, number), claim in zip(shown, claims):
        assert (cls, badge) == {True: ("held", "held"), False: ("notheld", "not held"), None: ("na", "n/a")}[claim["held"]]
        if claim["value"] is None:
            assert number == "n/a"
            continue
        value, low, high = (float(x) for x in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", number).groups())
        limit = float(claim["statement"].split()[-1])
        assert (value >= limit) == claim["held"] and value == pytest.approx(claim["value"], rel=1e-3)
        assert (low >= limit) == (claim["interval"][0] >= limit) and (high >= limit) == (claim["interval"][1] >= limit)
