"""Saved states read back as plain numbers: what ``genkernel summarize`` prints and the HTML report draws.

A state is what genkernel writes with ``save`` / ``state_dict``: a
:class:`~genkernel.core.tracking.ledger.PathKernelLedger`, a
:class:`~genkernel.core.tracking.tracker.PathKernelTracker`, a
:class:`~genkernel.diffusion.NoiseLevelAnalyzer`, a :class:`~genkernel.gan.GANKernelAnalyzer`, or
a trainer checkpoint holding analyzer states among its callbacks. Files are read with
:func:`~genkernel.core.tracking.io.load_state` (``weights_only=True``). Everything here is
computed from the saved ledgers with the same grouping functions the analyzers use
(:mod:`genkernel.core.grouping`), so the numbers equal the analyzer's own ``report()``; no model,
scheduler or data is needed. The quantities are defined in ``docs/summaries.md``.

A state of a format version this module does not read (``VERSIONS``) is refused with a
ValueError that names the versions it reads. :func:`summarize` returns strict-JSON-ready dicts
(NaN as None), :func:`format_summary` the text.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..core import grouping
from ..core.tracking.io import jsonable, load_state
from ..core.tracking.ledger import PathKernelLedger
from ..core.tracking.quadrature import half_precision_note, residual_remedy
from ..core.tracking.sketched import SKETCH_ERROR_LIMIT, SKETCHED_TRAFFIC_NOTE, sketch_error_note, sketch_noise_note
from ..stats import nan_median

__all__ = ["find_states", "format_summary", "kind_of", "ledger_from_state", "read_state", "summarize", "summarize_state"]

KINDS = {
    "genkernel.NoiseLevelAnalyzer/": "diffusion",
    "genkernel.GANKernelAnalyzer/": "gan",
    "genkernel.PathKernelTracker/": "tracker",
    "genkernel.PathKernelLedger/": "ledger",
}
# The format versions whose layout this module reads (older GAN states /2 lack only the group labels
# and the windows' clustered statistics, which are read where present).
VERSIONS = {"diffusion": (2,), "gan": (2, 3), "tracker": (2,), "ledger": (1,)}
RESIDUAL_LIMIT = 1e-3  # the analyzers' own threshold for a residual note
REST_LIMIT = 0.5  # above it the window measured mostly what no tracked example caused


# -- reading ---------------------------------------------------------------------------------
def _check_version(fmt: str, kind: str) -> None:
    """ValueError unless ``fmt`` (``"genkernel.Name/N"``) is a version this module reads: another
    version's layout (a tuple config, ledgers elsewhere) would fail deep inside with a TypeError or
    KeyError, or be read as this one's."""
    name, _, version = fmt.rpartition("/")
    known = VERSIONS[kind]
    if not version.isdigit() or int(version) not in known:
        raise ValueError(
            f"{fmt!r} is a {name} state of a version this genkernel does not read (it reads "
            f"{', '.join(f'{name}/{v}' for v in known)}): summarize it with the genkernel version that wrote it"
        )


def read_state(source: Any) -> tuple[dict[str, Any], str]:
    """``(state, origin)`` from a path (loaded with ``weights_only=True``), a state dict, or an
    object with ``state_dict()`` (an analyzer, tracker or ledger)."""
    if isinstance(source, (str, os.PathLike)):
        return load_state(source), str(Path(source))
    if isinstance(source, Mapping):
        return dict(source), "state dict"
    if hasattr(source, "state_dict"):
        state = source.state_dict()
        if isinstance(source, PathKernelLedger):
            state = {"format": "genkernel.PathKernelLedger/1", **state}
        return state, f"{type(source).__name__} object"
    raise TypeError(f"expected a path, a state dict or a genkernel object, got {type(source).__name__}")


def kind_of(state: Any) -> str | None:
    """``"diffusion"``, ``"gan"``, ``"tracker"``, ``"ledger"`` or None, from a state's ``format``."""
    fmt = state.get("format") if isinstance(state, Mapping) else None
    if not isinstance(fmt, str):
        return None
    for prefix, kind in KINDS.items():
        if fmt.startswith(prefix):
            return kind
    return None


def find_states(state: Any, path: str = "", depth: int = 3) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every state genkernel can summarize inside ``state``: itself, or (a trainer checkpoint) the
    analyzer states among its values, as ``(key path, state)``."""
    if kind_of(state) is not None:
        yield path or "(top level)", state
        return
    if isinstance(state, Mapping) and depth > 0:
        for key, value in state.items():
            yield from find_states(value, f"{path}.{key}" if path else str(key), depth - 1)


def ledger_from_state(state: Mapping[str, Any]) -> PathKernelLedger:
    """A :class:`PathKernelLedger` from its ``state_dict()`` (with or without ``format``)."""
    fields = {k: v for k, v in state.items() if k != "format"}
    return PathKernelLedger.from_state_dict(fields)


# -- shared pieces ---------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


def _level(value: Any) -> int | float:
    """A level as JSON shows it: an int for a DDPM timestep, a float for a real flow-matching or EDM level."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _median(values: torch.Tensor) -> float | None:
    return _num(nan_median(values[torch.isfinite(values)]))


def _claim(statement: str, held: bool | None, value: Any = None, interval: Any = None, **extra: Any) -> dict[str, Any]:
    return {"statement": statement, "held": held, "value": value, "interval": interval, **extra}


def ledger_summary(ledger: PathKernelLedger, *, top: int = 3, group_names: list[str] | None = None,
                   probe_names: list[str] | None = None) -> dict[str, Any]:
    """The ledger identity's numbers, shares with κ, traffic, and the ``top`` groups of every
    probe (by traffic share, with the net share beside it)."""
    summary = ledger.summary()
    shares = ledger.shares()
    traffic = ledger.traffic_shares().cpu()
    net = shares.groups.cpu()
    kappa = shares.kappa.cpu()
    residual = ledger.probe_relative_residual().cpu()
    names = group_names or [f"group {g}" for g in range(ledger.num_groups)]
    per_probe = []
    for m in range(traffic.shape[0]):
        order = torch.argsort(torch.nan_to_num(traffic[m], nan=-1.0), descending=True, stable=True)[:top]
        per_probe.append({
            "probe": m, **({"label": probe_names[m]} if probe_names else {}),
            "kappa": _num(kappa[m]), "relative_residual": _num(residual[m]),
            "rest_share": _num(shares.rest[m]),
            "top_groups": [{"group": int(g), "name": names[int(g)], "traffic_share": _num(traffic[m, g]),
                            "net_share": _num(net[m, g])} for g in order.tolist()],
        })
    return jsonable({
        **summary,
        "median_rest_share": _median(shares.rest.cpu()),
        "median_residual_share": _median(shares.residual.cpu()),
        "max_kappa": _num(kappa[torch.isfinite(kappa)].max()) if torch.isfinite(kappa).any() else None,
        "group_names": names,
        "mean_traffic_shares": traffic.nanmean(dim=0),
        "mean_net_shares": net.nanmean(dim=0),
        "traffic_shares": traffic,
        "net_shares": net,
        "kappa": kappa,
        "probe_relative_residual": residual,
        "top_groups": per_probe,
        "history_steps": [h["step"] for h in ledger.history],
    })


def _ledger_claims(summary: Mapping[str, Any], what: str = "ledger",
                   gradient_scales: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The claims every ledger makes; ``gradient_scales``: its tracker's per-step entries, whose
    half-precision steps put their rounding in the residual (a caveat on the first claim)."""
    residual = summary.get("relative_residual")
    claims = [_claim(
        f"The {what} adds up: Σ contributions + rest + residual equals the measured change, with a relative "
        f"residual below {RESIDUAL_LIMIT:g}", None if residual is None else residual <= RESIDUAL_LIMIT, residual)]
    rounding = half_precision_note(gradient_scales)
    if rounding:
        claims[0]["caveat"] = rounding
    rest = summary.get("median_rest_share")
    if rest is not None:
        claims.append(_claim(
            f"The change is what the tracked examples caused (median rest share below {REST_LIMIT})",
            abs(rest) <= REST_LIMIT, rest))
        null = summary.get("null_parameters")
        if null:  # (tracking.null_params: their moves are the rest's, no example caused them)
            claims[-1]["caveat"] = (
                f"the rest holds the whole moves of {null} ({summary.get('relative_null_moves', float('nan')):.3g} of "
                "the change): parameters whose gradient is zero in exact arithmetic (a bias before a training-mode "
                "BatchNorm), moved by the optimizer's normalization of their rounding noise")
    sketch = summary.get("relative_sketch_error")
    noise = summary.get("relative_sketch_noise")
    if noise:  # a sketched ledger kept since the groups' own noise is: their sum's error cancels where they do
        claim = _claim(
            f"The {what}'s groups, sketched, are each known to within {SKETCH_ERROR_LIMIT:g} of the change "
            "(relative sketch noise: the groups' estimated standard errors)", noise <= SKETCH_ERROR_LIMIT, noise)
        note = sketch_noise_note(noise, f"the {what}'s")
        if note:
            claim["caveat"] = note
        claims.append(claim)
    if sketch:  # a sketched ledger (0 on the other routes; None when nothing moved)
        claim = _claim(
            f"The {what}'s sketched group contributions add up to the examples' exact total (relative sketch error "
            f"below {SKETCH_ERROR_LIMIT:g} of the change)", sketch <= SKETCH_ERROR_LIMIT, sketch)
        note = sketch_error_note(sketch, f"the {what}'s")
        if note:
            claim["caveat"] = note
        claims.append(claim)
    return claims


# -- diffusion -------------------------------------------------------------------------------
def _diffusion(state: Mapping[str, Any], top: int) -> dict[str, Any]:
    if not state.get("bound"):
        return {"kind": "diffusion", "format": state.get("format"), "bound": False,
                "notes": ["the analyzer was saved before it tracked anything"]}
    tracker = state["tracker"]
    ledgers = {name: ledger_from_state(s) for name, s in tracker["ledgers"].items()}
    config = state["config"]
    num_bins = int(config["num_bins"])
    controls = [name for name in ledgers if name.startswith("control_")]
    # flow matching and EDM: real levels and edges (t = σ·T, t = ¼ ln σ); DDPM: integers, exact in float64 too
    real = config.get("noise_process") in ("flow_matching", "edm")
    timesteps = torch.tensor(config["probe_timesteps"], dtype=torch.float64)
    edges = torch.tensor(config["bin_edges"], dtype=torch.float64)
    levels, probe_level = torch.unique(timesteps, return_inverse=True)  # rows: probe levels, ascending
    num_levels = levels.numel()
    probe_bins = (torch.searchsorted(edges, timesteps, right=True) - 1).clamp(0, num_bins - 1)
    level_bins = (torch.searchsorted(edges, levels, right=True) - 1).clamp(0, num_bins - 1)
    history = list(state.get("history") or [])
    band = _band(config, history)
    history, reordered = _history_in_level_order(history, timesteps, levels)
    measured = ledgers["level"]

    def by_level(values: torch.Tensor) -> torch.Tensor:
        return grouping.average_by_probe_group(values, probe_level, num_levels)

    def shares_of(ledger: PathKernelLedger) -> tuple[torch.Tensor, torch.Tensor]:
        contributions = ledger.contributions.cpu()
        return grouping.net_shares(contributions, ledger.delta.cpu()), grouping.cancellation_ratio(contributions, ledger.delta.cpu())

    def numbers(ls: Mapping[str, PathKernelLedger]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The analyzer's matrices() and locality() of one set of ledgers (the model's or the EMA weights')."""
        share, kappa = shares_of(ls["level"])
        traffic = grouping.traffic_shares(ls["level"].traffic.cpu())
        matrices: dict[str, Any] = {
            "traffic": by_level(traffic), "share": by_level(share), "kappa": by_level(kappa[:, None])[:, 0],
            "residual": by_level(ls["level"].probe_relative_residual().cpu()[:, None])[:, 0],
        }
        locality: dict[str, Any] = {"band": band, "median_kappa": _median(kappa)}
        control_traffic = [grouping.traffic_shares(ls[c].traffic.cpu()) for c in controls]
        control_shares = [shares_of(ls[c]) for c in controls]
        if controls:
            matrices["traffic_control"] = torch.stack([by_level(t) for t in control_traffic]).mean(0)
            matrices["share_control"] = torch.stack([by_level(s) for s, _ in control_shares]).mean(0)
            locality["median_kappa_control"] = _median(torch.stack([k for _, k in control_shares]))
        if band is None:
            # The half-width is a setting, not in the ledgers: a guessed band gives another locality than the analyzer's.
            locality["traffic"] = locality["share"] = None
        else:
            locality.update(grouping.band_locality(
                traffic, share, control_traffic, [s for s, _ in control_shares], probe_bins, band, num_bins,
                probe_level, [(_level(levels[i]), int(level_bins[i])) for i in range(num_levels)]))
        return matrices, locality

    matrices, locality = numbers(ledgers)
    if "level_class" in ledgers:  # num_classes: a "level_class" partition of bin·C + class groups
        num_classes = ledgers["level_class"].num_groups // num_bins
        level_class = {"matrix": by_level(grouping.traffic_shares(ledgers["level_class"].traffic.cpu())),
                       "columns": f"training group bin·{num_classes} + class"}
    if real:  # a bin of real levels: [edge, next edge), the last one closed at the last level
        bin_names = [f"bin {g} (t {float(edges[g]):.4g}–{float(edges[g + 1]):.4g})" for g in range(num_bins)]
    else:
        bin_names = [f"bin {g} (t {int(edges[g])}–{int(edges[g + 1]) - 1})" for g in range(num_bins)]
    ledger = ledger_summary(measured, top=top, group_names=bin_names,
                            probe_names=[f"level t={_level(t):g}" for t in timesteps.tolist()])
    top_by_level = []
    for i in range(num_levels):
        row = matrices["traffic"][i]
        order = torch.argsort(torch.nan_to_num(row, nan=-1.0), descending=True, stable=True)[:top]
        top_by_level.append({"level": _level(levels[i]), "bin": int(level_bins[i]), "kappa": _num(matrices["kappa"][i]),
                             "top_groups": [{"group": int(g), "name": bin_names[int(g)],
                                             "traffic_share": _num(row[g]), "net_share": _num(matrices["share"][i, g])}
                                            for g in order.tolist()]})
    claims = _ledger_claims(ledger, gradient_scales=tracker.get("gradient_scales") or ())
    if controls and band is not None:
        for kind, what in (("traffic", "traffic"), ("share", "net share")):
            result = locality[kind]
            claims.append(_claim(
                f"Corrections are noise-localized ({what}): the {what} from training within {band} bin(s) of a probe's "
                "level exceeds the label-permutation control on the same trajectory (measured minus control, "
                f"{int(result['confidence'] * 100)} % interval above 0)",
                bool(result["held"]), result["difference"], result["interval"], method=result["method"], n=result["n"],
                **({"why": result["why"]} if result.get("why") else {})))
        if locality["median_kappa"] is not None and locality["median_kappa"] > 10:
            claims[-1]["caveat"] = (f"median κ is {locality['median_kappa']:.3g}: net shares are ill-conditioned here; "
                                    "read the traffic claim")
    notes = []
    if band is None:
        notes.append("the state records no locality band (config['band'] or a history snapshot): locality is not "
                     "computed; save with snapshot_every > 0, or read the analyzer's own report()")
    if ledger["relative_residual"] is not None and ledger["relative_residual"] > RESIDUAL_LIMIT:
        notes.append(f"the residual is {ledger['relative_residual']:.2g} of the change (quadrature "
                     f"{tracker.get('quadrature')!r}): {residual_remedy(tracker.get('quadrature'), tracker.get('gradient_scales') or ())}")
    if ledger["median_rest_share"] is not None and abs(ledger["median_rest_share"]) > REST_LIMIT:
        notes.append("the window's change is mostly the rest (optimizer state from before tracking began, or weight "
                     "decay): the group shares describe the smaller remainder; track a longer window")
    if not reordered:
        notes.append("the analyzer's probe_levels repeat a level: its history snapshots' matrices have a row per "
                     "listed level, not per distinct level, and are left out (their other numbers are kept)")
    if tracker.get("group_state") == "sketched":
        notes.append(SKETCHED_TRAFFIC_NOTE)
    global_steps = [s for s in state.get("global_steps", []) if s is not None]
    ema = _ema_summary(tracker)
    if ema is not None and set(ema_ledgers := _ema_ledgers(tracker)) >= {"level", *controls}:
        # the analyzer's report()["ema"]: the EMA weights' ledgers read as the model's are
        ema_level = ema_ledgers["level"]
        ema_matrices, ema_locality = numbers(ema_ledgers)
        ema.update(residual={"median_rest_share": _median(ema_level.shares().rest.cpu()),
                             **{k: ema["ledger"][k] for k in ("relative_residual", "max_probe_relative_residual", "rest_norm",
                                                              "mean_change_norm", "steps")}},
                   matrices=ema_matrices, locality=ema_locality)
        start = tracker["ema"].get("start")
        if isinstance(start, torch.Tensor):
            ema["start_share_mean"] = _num(grouping.part_share(start.cpu(), ema_level.delta.cpu()).nanmean())
    return jsonable({
        "kind": "diffusion", "format": state["format"],
        "settings": {
            "num_bins": num_bins, "bin_edges": [_level(e) for e in edges], "controls": len(controls), "band": band,
            "probe_levels": [_level(t) for t in levels], "probe_level_bins": level_bins, "num_probes": int(timesteps.numel()),
            "quadrature": tracker.get("quadrature"), "group_state": tracker.get("group_state"),
            # the loss each tracked step trained with (states saved before it was counted: not recorded)
            "step_losses": dict(state.get("step_losses") or ({"not recorded": measured.steps} if measured.steps else {})),
            **_identity(tracker),
        },
        "tracked_steps": measured.steps,
        "global_steps": [global_steps[0], global_steps[-1]] if global_steps else None,
        "ledger": ledger,
        "matrices": matrices,
        "axes": {"rows": "probe level (timestep s)", "columns": "training-timestep bin (0: least noise)"},
        "locality": locality,
        "top_groups_by_level": top_by_level,
        "locality_over_training": history,
        "kernel": list(state.get("kernel_history") or []),
        "bin_counts_total": torch.tensor(state["bin_counts"]).sum(0) if state.get("bin_counts") else [],
        "ema": ema,
        **({"level_class_traffic": level_class} if "level_class" in ledgers else {}),
        "claims": claims,
        "notes": notes,
    })


def _band(config: Mapping[str, Any], history: list[Mapping[str, Any]]) -> int | None:
    """The analyzer's locality half-width in bins: ``config["band"]`` where the state has it, else
    the last history snapshot's (each records the band it used); None when the state records none."""
    if config.get("band") is not None:
        return int(config["band"])
    if history and history[-1].get("band") is not None:
        return int(history[-1]["band"])
    return None


def _history_in_level_order(history: list[Mapping[str, Any]], timesteps: torch.Tensor,
                            levels: torch.Tensor) -> tuple[list[dict[str, Any]], bool]:
    """History snapshots with their ``traffic_matrix`` / ``share_matrix`` rows in the summary's
    order (distinct probe levels ascending, ``levels [L]``), and whether that was possible.

    The analyzer's matrices have one row per level in the order ``probe_levels`` listed them
    (probe ``m`` has the level of row ``m mod L_a``, ``timesteps [M]``): a list such as
    ``[900, 500, 100]`` would otherwise draw its snapshots upside down beside the summary's own
    matrices. A list that repeats a level splits that level's probes over several rows, which no
    row order undoes: then the snapshots' matrices are dropped (False)."""
    out, ok = [], True
    for row in history:
        row = dict(row)
        for key in ("traffic_matrix", "share_matrix"):
            matrix = row.get(key)
            if matrix is None:
                continue
            listed = timesteps[:min(len(matrix), timesteps.numel())].tolist()  # the analyzer's row levels with probes
            if len(set(listed)) != len(listed):
                row[key], ok = None, False
                continue
            row[key] = [list(matrix[listed.index(level)]) for level in levels.tolist()]
        out.append(row)
    return out, ok


def _identity(tracker: Mapping[str, Any]) -> dict[str, Any]:
    identity = tracker.get("identity") or {}
    parameters = identity.get("parameters") or {}
    return {
        "optimizer": identity.get("optimizer"),
        "parameter_tensors": len(parameters),
        "parameters": int(sum(math.prod(shape) for shape in parameters.values())),
        "probe_shapes": [list(p[0]) for p in identity.get("probes", [])],
    }


def _ema_ledgers(tracker: Mapping[str, Any]) -> dict[str, PathKernelLedger]:
    """The EMA weights' ledgers of a tracker state, per partition (none without an EMA)."""
    ema = tracker.get("ema")
    ledgers = ema.get("ledgers") if isinstance(ema, Mapping) else None
    return {name: ledger_from_state(s) for name, s in ledgers.items()} if isinstance(ledgers, Mapping) else {}


def _ema_summary(tracker: Mapping[str, Any]) -> dict[str, Any] | None:
    ema = tracker.get("ema")
    if not isinstance(ema, Mapping):
        return None
    ledgers = ema.get("ledgers")
    if not isinstance(ledgers, Mapping) or not ledgers:
        return None
    first = next(iter(ledgers.values()))
    return {"ledger": ledger_from_state(first).summary(), "decays": list(ema.get("decays", []))[-5:]}


# -- GAN -------------------------------------------------------------------------------------
def _coupling(ledgers: Mapping[str, PathKernelLedger], probe_groups: torch.Tensor, num_groups: int,
              spatial_groups: torch.Tensor | None, undefined: torch.Tensor | None) -> dict[str, Any]:
    """The analyzer's own :func:`~genkernel.gan.analyzer.partition_statistics` of the geometry
    partition over the whole run: matrices, and per kind the interaction statistic (own share minus
    the other probe groups' share from the same source group) minus control, clustered by probe
    group: what a coupling claim reads; probes without a geometry group (``undefined``: w = 0 when grouped)
    are left out, as the analyzer leaves them. (The plain own share minus control is confounded by
    source-group strength: a model with no coupling at all passed it in 61.5 % of 200 runs whose
    large groups were also the strong ones.)"""
    from ..gan.analyzer import partition_statistics  # the GAN package is only needed for GAN states

    measured = ledgers["geometry"]
    controls = [ledgers[name] for name in ledgers if name.startswith("control_")]
    stats = partition_statistics(measured, controls, measured.delta.cpu(), probe_groups, num_groups, undefined=undefined)
    out: dict[str, Any] = {"kappa_median": _median(measured.cancellation_ratio().cpu()), "controls": len(controls),
                           "probe_zero_gradient": 0 if undefined is None else int(undefined.sum())}
    for kind in ("traffic", "net"):
        entry = stats[kind]
        out[f"{kind}_matrix"] = torch.tensor(entry["matrix"], dtype=torch.float64)
        if controls:
            out[f"{kind}_matrix_control"] = torch.tensor(entry["matrix_control"], dtype=torch.float64)
            out[f"{kind}_interaction_minus_control"] = entry["interaction_minus_control"]
        else:
            out[f"{kind}_own"] = entry["own"]["estimate"]  # a mean_interval dict: estimate, low, high
    if "spatial" in ledgers and spatial_groups is not None:
        # The comparison grouping (GANKernelAnalyzer(comparison=)): its own partition and controls on the same
        # steps, read as the analyzer's statistics["spatial"] and ["geometry_minus_spatial"] are.
        from ..gan.metrics import few_units
        from ..stats import MIN_PROBE_GROUPS, two_way_interval

        spatial_controls = [ledgers[name] for name in ledgers if name.startswith("spatial_control_")]
        spatial = partition_statistics(ledgers["spatial"], spatial_controls, measured.delta.cpu(), spatial_groups, num_groups)
        out["spatial"] = {f"{kind}_{key}": spatial[kind][key] for kind in ("traffic", "net")
                          for key in ("matrix", "matrix_control", "interaction_minus_control") if key in spatial[kind]}
        if controls and spatial_controls:
            out["geometry_minus_spatial"] = {}
            for kind in ("traffic", "net"):
                mine = torch.tensor(_finite_or_nan(stats[kind]["per_probe"]["interaction_minus_control"]), dtype=torch.float64)
                theirs = torch.tensor(_finite_or_nan(spatial[kind]["per_probe"]["interaction_minus_control"]), dtype=torch.float64)
                interval = two_way_interval(mine - theirs, probe_groups, spatial_groups)
                out["geometry_minus_spatial"][kind] = few_units({**interval.as_dict(), "held": interval.above(0.0)},
                                                                minimum=MIN_PROBE_GROUPS)
    return out


def _finite_or_nan(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _gan(state: Mapping[str, Any], top: int) -> dict[str, Any]:
    config = state.get("config", {})
    num_groups = int(config.get("num_groups", 0))
    out: dict[str, Any] = {
        "kind": "gan", "format": state["format"],
        "settings": {"num_groups": num_groups, "controls": config.get("controls"), "grouping": config.get("grouping"),
                     "comparison": config.get("comparison"), "start_step": state.get("start_step"),
                     "track_steps": config.get("track_steps"), "stopped": bool(state.get("stopped", False)),
                     "state_dtype": config.get("state_dtype", "float64")},
        "generator_steps": state.get("g_steps", 0), "discriminator_steps": state.get("d_steps", 0),
        "notes": [n for n in state.get("notes", []) if n],
    }
    claims: list[dict[str, Any]] = []
    g_tracker = state.get("g_tracker")
    if g_tracker:
        ledgers = {name: ledger_from_state(s) for name, s in g_tracker["ledgers"].items()}
        labels = (state.get("group_labels") or {}).get("generator")
        names = list(labels) if labels and len(labels) == num_groups else [f"geometry group {g}" for g in range(num_groups)]
        out["settings"].update(quadrature=g_tracker.get("quadrature"), group_state=g_tracker.get("group_state"),
                               **_identity(g_tracker))
        out["generator"] = ledger_summary(ledgers["geometry"], top=top, group_names=names)
        claims += _ledger_claims(out["generator"], "generator ledger", g_tracker.get("gradient_scales") or ())
        run_groups = state.get("run_groups")
        if run_groups is not None:
            run_spatial, run_zero = state.get("run_spatial"), state.get("run_zero")
            coupling = _coupling(ledgers, torch.as_tensor(run_groups).long().cpu(), num_groups,
                                 None if run_spatial is None else torch.as_tensor(run_spatial).long().cpu(),
                                 None if run_zero is None else torch.as_tensor(run_zero).bool().cpu())
            out["coupling_whole_run"] = coupling
            for kind, what in (("traffic", "traffic"), ("net", "net share")):
                result = coupling.get(f"{kind}_interaction_minus_control")
                if result is not None:
                    claims.append(_claim(
                        f"Coupling follows the discriminator's geometry ({what}): a probe's correction comes more from its own "
                        "geometry group, beyond that group's pull on every probe, than under permuted labels on the same "
                        "steps (own share minus the other probe groups' share from the same source group, measured minus "
                        f"control, clustered by probe group, {int(result['confidence'] * 100)} % interval above 0)",
                        bool(result["held"]), result["difference"], result["interval"], method=result["method"], n=result["n"],
                        **({"why": result["why"]} if result.get("why") else {})))
            # The caveat belongs to the net-share coupling claim, which only a run with controls makes.
            if coupling["kappa_median"] is not None and coupling["kappa_median"] > 10 and \
                    coupling.get("net_interaction_minus_control") is not None:
                claims[-1]["caveat"] = (f"median κ is {coupling['kappa_median']:.3g}: net shares are ill-conditioned here; "
                                        "read the traffic claim")
        out["ema"] = _ema_summary(g_tracker)
    def window_row(w: Mapping[str, Any]) -> dict[str, Any]:
        row = {k: w.get(k) for k in ("steps", "loop_steps", "collapsed", "kappa_median", "traffic_matrix", "net_matrix",
                                     "partial") if k in w}
        geometry = (w.get("statistics") or {}).get("geometry") or {}
        for kind in ("traffic", "net"):  # what a window's coupling claim reads (partition_statistics)
            if (geometry.get(kind) or {}).get("interaction_minus_control") is not None:
                row[f"{kind}_interaction_minus_control"] = geometry[kind]["interaction_minus_control"]
        return row

    windows = [window_row(w) for w in state.get("windows", [])]
    out["windows"] = windows
    if state.get("partial_window"):  # finish()'s window in progress, where the state keeps it
        out["partial_window"] = window_row(state["partial_window"])
    collapsed = [w for w in windows if w.get("collapsed")]
    if collapsed:  # the analyzer's report() note, word for word
        spans = ", ".join(f"{w['loop_steps'][0]}-{w['loop_steps'][1]}" if w.get("loop_steps") else
                          f"{w['steps'][0]}-{w['steps'][1]}" for w in collapsed[:5])
        out["notes"].append(
            f"{len(collapsed)} of {len(windows)} windows are collapsed (steps {spans}): their probes or training "
            "examples fall in fewer than half the geometry groups. The grouping was fitted on the first batch and "
            "is not refitted, so a group keeps its meaning; read those windows' own-group shares with care"
        )
    out["alignment"] = list(state.get("alignment", []))
    out["coverage"] = list(state.get("coverage", []))
    formula = [row.get("cos_formula") for row in out["alignment"] if row.get("cos_formula") is not None]
    if formula:
        mean = sum(formula) / len(formula)
        claims.append(_claim("The one-step formula holds: the ledger's predicted ΔG(z') points along the observed change "
                             "(mean cosine ≥ 0.99 at the evaluation steps)", mean >= 0.99, mean, n=len(formula)))
    d_tracker = state.get("d_tracker")
    if d_tracker:
        ledger = ledger_from_state(next(iter(d_tracker["ledgers"].values())))
        labels = (state.get("group_labels") or {}).get("discriminator")
        if not labels or len(labels) != ledger.num_groups:
            # A state saved before the labels were: three groups are the roles only under discriminator_groups="role"
            # ("role_mode" with one mode centre also has three: real m0, generated m0, penalty), so only say so.
            labels = [f"group {g}" for g in range(ledger.num_groups)]
            out["notes"].append("the state records no discriminator group labels: groups are numbered")
        out["discriminator"] = ledger_summary(ledger, top=top, group_names=labels)
        claims += _ledger_claims(out["discriminator"], "discriminator ledger", d_tracker.get("gradient_scales") or ())
    out["claims"] = claims
    return jsonable(out)


# -- tracker and ledger ----------------------------------------------------------------------
def _tracker(state: Mapping[str, Any], top: int) -> dict[str, Any]:
    ledgers = {name: ledger_summary(ledger_from_state(s), top=top) for name, s in state["ledgers"].items()}
    first = next(iter(ledgers.values()))
    return jsonable({
        "kind": "tracker", "format": state["format"],
        "settings": {"partitions": state.get("partitions"), "quadrature": state.get("quadrature"),
                     "group_state": state.get("group_state"), **_identity(state)},
        "ledgers": ledgers, "claims": _ledger_claims(first, gradient_scales=state.get("gradient_scales") or ()), "ema": _ema_summary(state),
        "notes": [SKETCHED_TRAFFIC_NOTE] if state.get("group_state") == "sketched" else [],
    })


def _ledger(state: Mapping[str, Any], top: int) -> dict[str, Any]:
    summary = ledger_summary(ledger_from_state(state), top=top)
    return jsonable({"kind": "ledger", "format": state.get("format"), "settings": {},
                     "ledgers": {"ledger": summary}, "claims": _ledger_claims(summary), "notes": []})


def summarize_state(state: Mapping[str, Any], *, top: int = 3) -> dict[str, Any]:
    """The summary of one state of a known ``format`` (see :func:`kind_of`)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        # top slices the groups sorted by share: 0 would list none, a negative number all but the smallest
        raise ValueError(f"top (groups listed per probe) must be a positive int, got {top!r}")
    kind = kind_of(state)
    if kind is None:
        raise ValueError(f"not a genkernel state genkernel can summarize (format {state.get('format')!r})")
    _check_version(state["format"], kind)
    try:
        return {"diffusion": _diffusion, "gan": _gan, "tracker": _tracker, "ledger": _ledger}[kind](state, top)
    except KeyError as error:
        # a state with the right format tag but not its layout (built by hand, or edited): one clear line
        raise ValueError(
            f"the {state['format']!r} state has no entry {error.args[0]!r} that its format holds: it was not written "
            "by genkernel's save() / state_dict() (or was edited); summarize what the analyzer, tracker or ledger "
            "saved"
        ) from error


def summarize(source: Any, *, top: int = 3) -> dict[str, Any]:
    """Every summarizable state in ``source`` (a path, a state, or an analyzer/tracker/ledger).

    Returns ``{"source": ..., "states": {key: summary}}``, strict-JSON ready.
    """
    state, origin = read_state(source)
    found = list(find_states(state))
    if not found:
        held = (f"format {state.get('format')!r}, keys {sorted(map(str, state))}" if isinstance(state, Mapping)
                else f"a {type(state).__name__}, not a dict")
        raise ValueError(
            f"{origin} holds no ledger, tracker or analyzer state ({held}); "
            "summarize takes what PathKernelLedger.save, PathKernelTracker.save, NoiseLevelAnalyzer.save, "
            "a GANKernelAnalyzer's state_dict or a trainer checkpoint wrote"
        )
    return {"source": origin, "states": {key: summarize_state(s, top=top) for key, s in found}}


# -- text ------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _claim_number(value: Any) -> str:
    """A claim's number, with digits added (up to 9) where 3 significant digits round it onto a
    rounder number: a mean cosine of 0.98996 shown as "0.99" beside "≥ 0.99 … not held", or a
    residual of 0.0010004 shown as "0.001" beside "below 0.001 … not held", read as the limit itself
    (the text summary and the HTML page show the same digits)."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
        return _fmt(value)
    digits, text = 3, f"{value:.3g}"
    while float(text) != value and digits < 9 and len(text.split("e")[0].replace("-", "").replace(".", "").strip("0")) < 3:
        digits += 1
        text = f"{value:.{digits}g}"
    return text


def _interval(result: Mapping[str, Any] | None) -> str:
    if not result or "difference" not in result:
        return "n/a" if not result else f"measured {_fmt(result.get('measured'))} (no control)"
    low, high = result["interval"]
    return (f"{_fmt(result['difference'])} [{_fmt(low)}, {_fmt(high)}] (measured {_fmt(result['measured'])}, "
            f"control {_fmt(result['control'])})")


def _ledger_lines(name: str, summary: Mapping[str, Any], top_probes: int) -> list[str]:
    lines = [
        f"  {name}: {summary['steps']} steps, {summary['probes']} probes × {summary['groups']} groups",
        f"    relative residual {_fmt(summary['relative_residual'])} (worst probe {_fmt(summary['max_probe_relative_residual'])}), "
        f"median rest share {_fmt(summary['median_rest_share'])}, median κ {_fmt(summary['median_kappa'])}",
        "    mean traffic shares: " + ", ".join(
            f"{n}: {_fmt(v, 2)}" for n, v in zip(summary["group_names"], summary["mean_traffic_shares"])),
        "    mean net shares:     " + ", ".join(
            f"{n}: {_fmt(v, 2)}" for n, v in zip(summary["group_names"], summary["mean_net_shares"])),
        f"    top groups per probe (traffic share / net share; κ), first {min(top_probes, len(summary['top_groups']))}:",
    ]
    for row in summary["top_groups"][:top_probes]:
        groups = "; ".join(f"{g['name']} {_fmt(g['traffic_share'], 2)}/{_fmt(g['net_share'], 2)}" for g in row["top_groups"])
        lines.append(f"      probe {row['probe']}{' (' + row['label'] + ')' if 'label' in row else ''}: {groups}; κ {_fmt(row['kappa'])}")
    return lines


def format_summary(summary: Mapping[str, Any], *, top_probes: int = 8) -> str:
    """:func:`summarize`'s result as readable text (``top_probes``: probes listed per ledger)."""
    if isinstance(top_probes, bool) or not isinstance(top_probes, int) or top_probes < 0:
        # a negative number would slice the probe list from its end: all probes but the last few
        raise ValueError(f"top_probes (probes listed per ledger) must be an int >= 0, got {top_probes!r}")
    lines = [f"genkernel summary of {summary['source']}"]
    for key, s in summary["states"].items():
        lines.append(f"\n[{key}] {s.get('format')}")
        kind = s["kind"]
        settings = s.get("settings") or {}
        if settings:
            lines.append("  settings: " + ", ".join(
                f"{k}={v}" for k, v in settings.items() if not isinstance(v, (list, dict)) or len(str(v)) < 60))
        if kind == "diffusion" and s.get("ledger"):
            lines += _ledger_lines("level ledger", s["ledger"], top_probes)
            loc = s["locality"]
            within = "(no band recorded: not computed)" if loc["band"] is None else f"within {loc['band']} bin(s)"
            lines.append(f"  locality {within}, measured minus control (95 % interval):")
            lines.append(f"    traffic   {_interval(loc.get('traffic'))}")
            lines.append(f"    net share {_interval(loc.get('share'))}")
            lines.append("  top training bins per probe level (traffic share / net share):")
            for row in s["top_groups_by_level"]:
                groups = "; ".join(f"bin {g['group']} {_fmt(g['traffic_share'], 2)}/{_fmt(g['net_share'], 2)}"
                                   for g in row["top_groups"])
                lines.append(f"    t={row['level']} (bin {row['bin']}): {groups}; κ {_fmt(row['kappa'])}")
        elif kind == "gan":
            lines.append(f"  generator steps {s['generator_steps']}, discriminator steps {s['discriminator_steps']}")
            if s.get("generator"):
                lines += _ledger_lines("generator ledger (geometry groups)", s["generator"], top_probes)
            coupling = s.get("coupling_whole_run")
            if coupling and not coupling.get("controls"):  # no control partition: the own share alone
                lines.append(f"  own geometry group's share over the run (no control partition): traffic "
                             f"{_fmt(coupling.get('traffic_own'))}, net share {_fmt(coupling.get('net_own'))}")
            elif coupling:
                lines.append("  own share minus the other probe groups' over the run, measured minus control "
                             "(95 % interval, clustered by probe group):")
                lines.append(f"    traffic   {_interval(coupling.get('traffic_interaction_minus_control'))}")
                lines.append(f"    net share {_interval(coupling.get('net_interaction_minus_control'))}")
            versus = (coupling or {}).get("geometry_minus_spatial")
            if versus:
                lines.append(f"  geometry minus the comparison grouping ({settings.get('comparison')}), each its interaction "
                             "minus control (95 % interval, clustered by probe group):")
                for kind, what in (("traffic", "traffic  "), ("net", "net share")):
                    r = versus[kind]
                    lines.append(f"    {what} {_fmt(r.get('estimate'))} [{_fmt(r.get('low'))}, {_fmt(r.get('high'))}]")
            if s.get("windows"):
                lines.append(f"  {len(s['windows'])} coupling windows; last: traffic "
                             f"{_interval(s['windows'][-1].get('traffic_interaction_minus_control'))}")
            if s.get("partial_window"):
                partial = s["partial_window"]
                span = partial.get("loop_steps") or partial.get("steps")
                lines.append(f"  partial window (steps {span[0]}-{span[1]}, in progress when saved): traffic "
                             f"{_interval(partial.get('traffic_interaction_minus_control'))}")
            if s.get("discriminator"):
                lines += _ledger_lines("discriminator ledger", s["discriminator"], min(top_probes, 4))
        elif s.get("ledgers"):
            for name, ledger in s["ledgers"].items():
                lines += _ledger_lines(f"ledger {name!r}", ledger, top_probes)
        elif kind == "diffusion":
            lines.append("  (not bound: nothing tracked)")
        ema = s.get("ema")
        if ema and ema.get("ledger"):
            lines.append(f"  EMA weights' ledger: {ema['ledger']['steps']} steps, relative residual "
                         f"{_fmt(ema['ledger']['relative_residual'])}, median κ {_fmt(ema['ledger']['median_kappa'])}")
            if (ema.get("locality") or {}).get("band") is not None:
                lines.append(f"    locality traffic  {_interval(ema['locality'].get('traffic'))}")
                lines.append(f"    locality net share {_interval(ema['locality'].get('share'))}")
        for claim in s.get("claims", []):
            mark = {True: "held", False: "not held", None: "n/a"}[claim["held"]]
            lines.append(f"  claim [{mark}] {claim['statement']}: {_claim_number(claim['value'])}"
                         + (f" [{_claim_number(claim['interval'][0])}, {_claim_number(claim['interval'][1])}]"
                            if claim.get("interval") else ""))
            if claim.get("why"):  # held is False whatever the interval: e.g. too few independent units
                lines.append(f"    not held because: {claim['why']}")
            if claim.get("caveat"):
                lines.append(f"    caveat: {claim['caveat']}")
        for note in s.get("notes", []):
            lines.append(f"  note: {note}")
    return "\n".join(lines)
