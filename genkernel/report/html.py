"""One self-contained HTML page for a user's own run.

:func:`render_report` takes a saved analyzer state (a path written by ``analyzer.save`` or
``atomic_save(analyzer.state_dict(), path)``, a trainer checkpoint holding one, the state dict
itself, or the analyzer object) and returns the page: figures as embedded PNG and GIF data URIs,
the numbers and claims beside each figure, the settings, the notes and the full summary as JSON.
The page loads nothing from anywhere (a content-security policy forbids it) and runs no script.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.tracking.io import atomic_file
from . import figures as fg
from .summary import _claim_number, find_states, read_state, summarize_state

__all__ = ["render_report", "write_report"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1320px;
       padding: 1.2em 2em; color: #1d2430; background: #fff; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccd; margin-top: 1.6em; }
h3 { font-size: 1.0em; margin: 0.4em 0; }
.meta { color: #556; font-size: 0.9em; }
.row { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; margin: 0.8em 0 1.4em; }
.figure { flex: 3 1 640px; } .figure img { max-width: 100%; border: 1px solid #e3e6ee; }
.numbers { flex: 1 1 320px; font-size: 0.88em; }
table { border-collapse: collapse; margin: 0.3em 0 0.8em; } td, th { border: 1px solid #dde; padding: 2px 6px; text-align: left; }
th { background: #f3f5fa; font-weight: 600; }
.claim { padding: 0.35em 0.6em; margin: 0.3em 0; border-left: 4px solid #aab; background: #f7f8fb; font-size: 0.9em; }
.held { border-color: #2a8a3a; } .notheld { border-color: #c0392b; } .na { border-color: #999; }
.badge { font-weight: 700; margin-right: 0.4em; } .held .badge { color: #2a8a3a; } .notheld .badge { color: #c0392b; }
.caveat { color: #8a5a00; font-size: 0.9em; } .note { color: #6a4a00; background: #fff8e6; padding: 0.3em 0.6em; margin: 0.3em 0; }
pre { background: #f6f7f9; padding: 0.6em; overflow: auto; max-height: 28em; font-size: 0.78em; }
figcaption { font-size: 0.85em; color: #445; margin-top: 0.3em; }
"""


# -- small HTML helpers ----------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)) and len(value) > 12:
        return "[" + ", ".join(_fmt(v, digits) for v in value[:12]) + f", … ({len(value)} values)]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _image(data: bytes, mime: str, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:{mime};base64,{encoded}" alt="{_e(alt)}">'


def _figure(figure: Any, alt: str, caption: str = "") -> str:
    """The figure as an embedded PNG with its caption; where a heat map of it has grey (missing) cells, the caption
    says what grey means (a figure without a caption gets one saying only that)."""
    if figure is None:
        return ""
    grey = fg.no_value_caption(*fg.heat_map_values(figure))
    caption = " ".join(t for t in (caption, grey) if t)
    body = _image(fg.png(figure), "image/png", alt)
    return f'<figure class="figure">{body}<figcaption>{_e(caption)}</figcaption></figure>' if caption else \
        f'<div class="figure">{body}</div>'


def _grey(*matrices: Any) -> str:
    """" " and the caption's sentence on grey cells where some cell of ``matrices`` is missing, else ""."""
    note = fg.no_value_caption(*matrices)
    return f" {note}" if note else ""


def _row(figure_html: str, numbers_html: str) -> str:
    return f'<div class="row">{figure_html}<div class="numbers">{numbers_html}</div></div>'


def _claims(claims: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for claim in claims:
        held = claim.get("held")
        cls, badge = {True: ("held", "held"), False: ("notheld", "not held"), None: ("na", "n/a")}[held]
        interval = claim.get("interval")
        value = _claim_number(claim.get("value"))
        if interval:
            value += f" [{_claim_number(interval[0])}, {_claim_number(interval[1])}]"
        caveat = f'<div class="caveat">{_e(claim["caveat"])}</div>' if claim.get("caveat") else ""
        if claim.get("why"):  # held is False whatever the interval shows (e.g. too few independent units)
            caveat = f'<div class="caveat">not held because: {_e(claim["why"])}</div>' + caveat
        out.append(f'<div class="claim {cls}"><span class="badge">{badge}</span>{_e(claim["statement"])} '
                   f"<b>{_e(value)}</b>{caveat}</div>")
    return "".join(out)


def _held(r: Mapping[str, Any]) -> Any:
    """The "held" cell: yes / no, and why where the statistics refuse the interval (too few units): an interval
    above 0 is then not held (with two probe groups it has zero width), and "above 0: no" beside it contradicted it."""
    return f"no: {r['why']}" if r.get("why") and not r.get("held") else r.get("held")


def _difference_rows(results: Mapping[str, Mapping[str, Any] | None]) -> list[list[Any]]:
    rows = []
    for name, r in results.items():
        if not r:
            continue
        if "difference" in r:
            rows.append([name, r.get("measured"), r.get("control"), r.get("difference"),
                         f"[{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]", r.get("n"), _held(r)])
        else:
            rows.append([name, r.get("measured"), None, None, None, None, None])
    return rows


DIFF_HEADER = ["", "measured", "control", "measured − control", "95 % interval", "n", "held (interval above 0)"]


def _ledger_numbers(ledger: Mapping[str, Any]) -> str:
    return _table([
        ["steps", ledger["steps"]], ["probes × groups", f"{ledger['probes']} × {ledger['groups']}"],
        ["relative residual ‖R‖/‖Δf‖", ledger["relative_residual"]],
        ["worst probe's relative residual", ledger["max_probe_relative_residual"]],
        ["median rest share", ledger["median_rest_share"]], ["median residual share", ledger["median_residual_share"]],
        ["median κ", ledger["median_kappa"]], ["largest κ", ledger["max_kappa"]],
        ["mean ‖Δf‖ per probe", ledger["mean_change_norm"]],
        ["relative sketch error", ledger.get("relative_sketch_error")],
    ])


def _top_groups(ledger: Mapping[str, Any], limit: int = 12) -> str:
    rows = []
    for row in ledger["top_groups"][:limit]:
        groups = "; ".join(f"{g['name']} {_fmt(g['traffic_share'], 2)} / {_fmt(g['net_share'], 2)}" for g in row["top_groups"])
        rows.append([row.get("label", row["probe"]), groups, row["kappa"]])
    more = len(ledger["top_groups"]) - limit
    tail = f"<p>… and {more} more probes (all of them in the JSON below).</p>" if more > 0 else ""
    return _table(rows, ["probe", "top groups: traffic share / net share", "κ"]) + tail


def _settings(settings: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    rows = [[k, v] for k, v in {**settings, **(extra or {})}.items()]
    return _table(rows, ["setting", "value"])


# -- sections per kind -----------------------------------------------------------------------
def _diffusion_section(s: Mapping[str, Any], animate: bool) -> str:
    if s.get("bound") is False:
        return "<p>The analyzer was saved before it tracked anything.</p>"
    parts = [f"<h3>What this run supports</h3>{_claims(s['claims'])}"]
    ledger = s["ledger"]
    levels = s["top_groups_by_level"]
    level_rows = [[f"t={r['level']:g} (bin {r['bin']})",
                   "; ".join(f"bin {g['group']} {_fmt(g['traffic_share'], 2)} / {_fmt(g['net_share'], 2)}" for g in r["top_groups"]),
                   r["kappa"]] for r in levels]
    parts.append("<h2>Noise level × noise level</h2>")
    parts.append(_row(
        _figure(fg.noise_matrix_figure(s), "noise-level matrices",
                "Rows: probe level s (its probes averaged); columns: training-timestep bin. Traffic: who pushed the probe "
                "(Σ_k ‖c_k‖, normalized over bins); net share: what the final change is made of (⟨C, Δf⟩/‖Δf‖²). "
                "Control: the same steps split by permuted bin labels."),
        "<h3>The ledger</h3>" + _ledger_numbers(ledger)
        + "<h3>Top training bins per probe level</h3>" + _table(level_rows, ["probe level", "traffic share / net share", "mean κ"])))
    loc = s["locality"]
    per_level = [[f"t={r['level']:g}", _fmt(r["traffic"].get("difference")),
                  f"[{_fmt(r['traffic']['interval'][0])}, {_fmt(r['traffic']['interval'][1])}]",
                  _fmt(r["share"].get("difference")),
                  f"[{_fmt(r['share']['interval'][0])}, {_fmt(r['share']['interval'][1])}]"]
                 for r in loc.get("per_level") or []]
    parts.append("<h2>Locality</h2>")
    parts.append(_row(
        _figure(fg.locality_figure(s), "locality",
                "The state records no locality band: locality is not computed." if loc["band"] is None else
                f"Share of each probe's traffic (or net change) from training within {loc['band']} bin(s) of its own level, "
                "measured minus the permutation control, with 95 % Student-t intervals over the probe levels (a level's "
                "probes are one cluster); a level's own interval is over the control partitions (none below 3)."),
        _table(_difference_rows({"traffic": loc.get("traffic"), "net share": loc.get("share")}), DIFF_HEADER)
        + _table([["median κ (measured)", loc.get("median_kappa")], ["median κ (control)", loc.get("median_kappa_control")]])
        + (_table(per_level, ["level", "traffic m−c", "interval", "net share m−c", "interval"]) if per_level else "")))
    history = s.get("locality_over_training") or []
    # an analyzer driven without a trainer's global_step records None: name the tracked step, never "step None"
    frames = [{"label": (f"tracked step {h['tracked_step']}" if h.get("global_step") is None else
                         f"training step {h['global_step']} (tracked step {h['tracked_step']})"),
               "traffic": h["traffic_matrix"], "share": h["share_matrix"], "row": h}
              for h in history if h.get("traffic_matrix") is not None and h.get("share_matrix") is not None]
    if animate and len(frames) >= 2:
        # rows labelled by their levels, as in the matrices above (row numbers under "probe level" read as timesteps)
        gif = fg.matrix_animation(frames, keys=[("traffic", "traffic share (cumulative)", False),
                                                ("share", "net share (cumulative)", True)],
                                  xlabel="training bin", ylabel="probe level",
                                  rows=[f"t={t:g}" for t in s["settings"]["probe_levels"]])
        parts.append("<h2>The noise × noise matrix over the run</h2>")
        parts.append(_row(
            f'<figure class="figure">{_image(gif, "image/gif", "noise matrix over training")}'
            f"<figcaption>{len(frames)} snapshots (every snapshot_every tracked steps), ledger totals up to each; "
            "colour scales fixed over the run."
            + _e(_grey(*(f[k] for f in frames for k in ("traffic", "share")))) + "</figcaption></figure>",
            # each frame's own snapshot: history rows without matrices have no frame
            _table([[f["label"].split(" (")[0], f["row"].get("relative_residual"),
                     (f["row"].get("traffic") or {}).get("difference")] for f in frames],
                   ["snapshot", "relative residual", "traffic locality m−c"])))
    kernel = s.get("kernel") or []
    figure = fg.kernel_figure(s)
    if figure is not None:
        rows = [[fg.checkpoint_label(k),  # (the figure's legend names: the table called θ₀ "tracked step 0", the figure
                 # "initialization")
                 (k.get("locality") or {}).get("difference"),
                 "[{}, {}]".format(*(_fmt(v) for v in (k.get("locality") or {}).get("interval", [None, None])))]
                for k in kernel]
        parts.append("<h2>Kernel structure</h2>")
        parts.append(_row(_figure(figure, "kernel structure",
                                  "Mean normalized gradient kernel k̂ between denoiser states at two noise levels, against "
                                  "their distance in bins, at each kernel checkpoint (no loss weights)."),
                          _table(rows, ["checkpoint", "kernel locality m−c", "95 % interval"])))
    parts.append("<h2>Per probe</h2>")
    parts.append(_row(_figure(fg.ledger_figure(ledger), "per-probe ledger"), _top_groups(ledger)))
    level_class = s.get("level_class_traffic")
    if level_class and level_class.get("matrix"):
        parts.append("<h2>Noise level × class</h2>")
        parts.append(_row(
            _figure(fg.level_class_figure(level_class, s["settings"]["probe_levels"], s["settings"]["num_bins"]),
                    "traffic by noise level and class",
                    "Rows: probe level; columns: training examples grouped by timestep bin and class "
                    f"({level_class.get('columns')}); traffic share, each row summing to 1 over the groups."),
            "<p>The level × class partition splits the same steps as the noise-level ledger; its groups sum to "
            "the same total.</p>"))
    ema = s.get("ema")
    if ema:
        parts.append("<h2>The EMA weights</h2>")
        numbers = "<h3>EMA weights' ledger</h3>" + _table([[k, v] for k, v in ema["ledger"].items()])
        if ema.get("start_share_mean") is not None:
            numbers += _table([["mean share of the EMA's start (its lag behind the model)", ema["start_share_mean"]]])
        if ema.get("matrices"):
            ema_view = {"matrices": ema["matrices"], "settings": s["settings"]}
            numbers += _table(_difference_rows({"traffic": (ema.get("locality") or {}).get("traffic"),
                                                "net share": (ema.get("locality") or {}).get("share")}), DIFF_HEADER)
            parts.append(_row(_figure(fg.noise_matrix_figure(ema_view), "EMA noise-level matrices",
                                      "The EMA weights' own ledger (the weights people sample from), split as the model's: "
                                      "rows probe level, columns training-timestep bin."), numbers))
        else:
            parts.append(numbers)
    parts.append("<h2>Settings</h2>" + _settings(s["settings"], {
        "tracked steps": s["tracked_steps"],
        # [first, last] of the trainer's step numbers: not a count, not a list of the steps
        "training steps tracked (first – last)": (None if not s.get("global_steps") else
                                                  f"{s['global_steps'][0]} – {s['global_steps'][-1]}"),
        "examples per bin (all steps)": s.get("bin_counts_total")}))
    return "".join(parts)


def _gan_section(s: Mapping[str, Any], animate: bool) -> str:
    parts = [f"<h3>What this run supports</h3>{_claims(s['claims'])}"]
    ledgers = {name: s[key] for key, name in (("generator", "generator"), ("discriminator", "discriminator")) if s.get(key)}
    if ledgers:
        parts.append("<h2>Ledgers</h2>")
        numbers = "".join(f"<h3>{_e(name)}</h3>{_ledger_numbers(ledger)}" for name, ledger in ledgers.items())
        parts.append(_row(_figure(fg.group_shares_figure(ledgers), "group shares",
                                  "Mean traffic share and net share per group, over the probes. Generator groups: the "
                                  "discriminator's gradient geometry; discriminator groups: the examples' roles."), numbers))
    coupling = s.get("coupling_whole_run")
    if coupling:
        parts.append("<h2>Coupling over the whole run</h2>")
        parts.append(_row(
            _figure(fg.coupling_figure(coupling), "coupling matrices",
                    "Rows: the probe latent's own geometry group; columns: the training examples' group. Control: the same "
                    "steps with permuted group labels."),
            _table(_difference_rows({"traffic: own − others' share": coupling.get("traffic_interaction_minus_control"),
                                     "net: own − others' share": coupling.get("net_interaction_minus_control")}),
                   DIFF_HEADER)
            + (_table([["own group's traffic share (no control partition)", coupling.get("traffic_own")],
                       ["own group's net share (no control partition)", coupling.get("net_own")]])
               if "traffic_own" in coupling else "")
            + _table([["median κ", coupling.get("kappa_median")], ["control partitions", coupling.get("controls")]])))
    spatial = (coupling or {}).get("spatial")
    if spatial and spatial.get("traffic_matrix") is not None:
        versus = (coupling or {}).get("geometry_minus_spatial") or {}
        rows = [[f"{kind}: geometry − comparison", r.get("estimate"), f"[{_fmt(r.get('low'))}, {_fmt(r.get('high'))}]",
                 r.get("n"), _held(r)] for kind, r in versus.items() if r]
        parts.append("<h2>The comparison grouping</h2>")
        parts.append(_row(
            _figure(fg.coupling_figure(spatial, "comparison"), "comparison coupling matrices",
                    f"The same steps split by the discriminator-independent grouping ({s['settings'].get('comparison')}), "
                    "with its own permutation controls."),
            _table(_difference_rows({"traffic: own − others' share": spatial.get("traffic_interaction_minus_control"),
                                     "net: own − others' share": spatial.get("net_interaction_minus_control")}), DIFF_HEADER)
            + (_table(rows, ["interaction m−c", "estimate", "95 % interval", "n", "held (interval above 0)"]) if rows else "")))
    if s.get("ema") and s["ema"].get("ledger"):
        parts.append("<h2>The EMA generator's ledger</h2>" + _table([[k, v] for k, v in s["ema"]["ledger"].items()]))
    windows = s.get("windows") or []
    figure = fg.gan_windows_figure(windows)

    def span(w: Mapping[str, Any]) -> Any:
        steps = w.get("loop_steps") or w.get("steps")
        return f"{steps[0]}–{steps[1]}" if isinstance(steps, (list, tuple)) and len(steps) == 2 else steps

    if figure is not None:
        rows = [[span(w),
                 (w.get("traffic_interaction_minus_control") or {}).get("difference"),
                 (w.get("net_interaction_minus_control") or {}).get("difference"), w.get("kappa_median"), w.get("collapsed")]
                for w in windows]
        parts.append("<h2>Coupling per window</h2>")
        parts.append(_row(_figure(figure, "coupling per window", "Each window's ledger is the difference of the ledgers at "
                                                                   "its end and its start (exact)."),
                          _table(rows, ["steps", "traffic own − others, m−c", "net own − others, m−c", "median κ", "collapsed"])))
    frames = [{"label": f"window ending at generator step {(w.get('loop_steps') or w.get('steps'))[1]}",
               "traffic": w["traffic_matrix"], "net": w["net_matrix"]}
              for w in windows if w.get("traffic_matrix") is not None and w.get("net_matrix") is not None]
    if animate and len(frames) >= 2:
        gif = fg.matrix_animation(frames, keys=[("traffic", "traffic share", False), ("net", "net share", True)],
                                  xlabel="training geometry group", ylabel="probe's group")
        parts.append("<h2>The coupling matrix over the run</h2>")
        parts.append(_row(f'<figure class="figure">{_image(gif, "image/gif", "coupling matrix over training")}'
                          f"<figcaption>{len(frames)} windows; colour scales fixed over the run."
                          + _e(_grey(*(f[k] for f in frames for k in ("traffic", "net")))) + "</figcaption></figure>",
                          "<p>One frame per coupling window (the window's own steps, not cumulative).</p>"))
    figure = fg.alignment_figure(s.get("alignment") or [], s.get("coverage") or [])
    if figure is not None:
        last = s["alignment"][-1]
        parts.append("<h2>Alignment</h2>")
        parts.append(_row(_figure(figure, "alignment", "cos formula: the ledger's one-step prediction against the observed "
                                                       "ΔG; local push: ΔG against −w(z'); kernel field: the kernel-smoothed "
                                                       "discriminator field against ΔG."),
                          _table([[k, v] for k, v in last.items()], ["last evaluation", ""])))
    if s.get("generator"):
        parts.append("<h2>Per probe (generator)</h2>")
        parts.append(_row(_figure(fg.ledger_figure(s["generator"]), "per-probe generator ledger"), _top_groups(s["generator"])))
    parts.append("<h2>Settings</h2>" + _settings(s["settings"], {
        "generator steps": s.get("generator_steps"), "discriminator steps": s.get("discriminator_steps")}))
    return "".join(parts)


def _ledgers_section(s: Mapping[str, Any], animate: bool) -> str:
    parts = [f"<h3>What this run supports</h3>{_claims(s['claims'])}"]
    parts.append(_row(_figure(fg.group_shares_figure(s["ledgers"]), "group shares"), ""))
    for name, ledger in s["ledgers"].items():
        parts.append(f"<h2>Ledger {_e(name)}</h2>")
        parts.append(_row(_figure(fg.ledger_figure(ledger), f"ledger {name}"), _ledger_numbers(ledger) + _top_groups(ledger)))
    parts.append("<h2>Settings</h2>" + _settings(s.get("settings") or {}))
    return "".join(parts)


# default-src covers fetches only: base-uri and form-action do not fall back to it, so they are set too.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

TITLES = {"diffusion": "NoiseLevelAnalyzer (diffusion, noise-level groups)",
          "gan": "GANKernelAnalyzer (generator split by discriminator geometry)",
          "tracker": "PathKernelTracker", "ledger": "PathKernelLedger"}


def render_report(source: Any, *, title: str | None = None, top: int = 3, animate: bool = True) -> str:
    """The report page of ``source`` (a path, a state dict, or an analyzer/tracker/ledger) as HTML text.

    ``top``: groups listed per probe; ``animate``: include the GIF of the matrices over the run
    where history snapshots (diffusion) or windows (GAN) exist.
    """
    from .. import __version__

    state, origin = read_state(source)
    found = list(find_states(state))
    if not found:
        raise ValueError(f"{origin} holds no analyzer, tracker or ledger state genkernel can report on")
    sections, summaries = [], {}
    for key, sub in found:
        summary = summarize_state(sub, top=top)
        summaries[key] = summary
        body = {"diffusion": _diffusion_section, "gan": _gan_section}.get(summary["kind"], _ledgers_section)(summary, animate)
        notes = "".join(f'<div class="note">{_e(n)}</div>' for n in summary.get("notes", []))
        heading = TITLES[summary["kind"]] + ("" if key == "(top level)" else f" — {key}")
        sections.append(f"<section><h2>{_e(heading)}</h2>{notes}{body}</section>")
    raw = json.dumps({"source": origin, "states": summaries}, indent=1, allow_nan=False)
    now = _dt.datetime.now().isoformat(timespec="seconds")
    page_title = title or f"genkernel report: {Path(origin).name if os.sep in origin or origin.endswith('.pt') else origin}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(page_title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{_e(page_title)}</h1>
<p class="meta">From {_e(origin)} · genkernel {_e(__version__)} · made {_e(now)}.
The definitions (ledger, residual, net share and κ, traffic, measured minus control) are in the genkernel
documentation, <code>docs/summaries.md</code>.</p>
{''.join(sections)}
<h2>All numbers (JSON)</h2>
<details><summary>the full summary this page was drawn from</summary><pre>{_e(raw)}</pre></details>
</body>
</html>
"""


def write_report(source: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`render_report`'s page to ``path`` (UTF-8) atomically (a temporary file beside
    it, then a rename: an interrupted write leaves the previous page, never a truncated one);
    returns the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: pass the page's file name, e.g. {path / 'report.html'}")
    page = render_report(source, **kwargs)  # first: a state it cannot read leaves no folder or file behind
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as handle:  # (fsynced: a power loss leaves the previous page or this one)
        handle.write(page)
    return path
