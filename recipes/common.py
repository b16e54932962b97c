"""What the recipes share: arguments, settings per mode, claims, results files, timing, and the
diffusion recipes' options, claims and outputs.

Every experiment is a module ``recipes/experiments/NAME.py`` with ``main(argv=None)`` and runs
from the repository root as::

    python -m recipes.experiments.NAME [--quick] [--out-dir figures] [--seed 0] [--device cpu]

and writes ``OUT/NAME.png`` and ``OUT/NAME.json``. The JSON holds the numbers behind the figure,
the settings, the wall time and a ``claims`` section: for each claim whether it ``held`` in this
run, computed from the numbers (never written by hand), its ``value`` and ``interval``.

Modes: full (paper-fidelity, default), ``--quick`` (at most 90 s on 2 CPU cores) and the hidden
``--smoke`` (tiny sizes, for the test suite only: its numbers check the plumbing, not the claims).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from genkernel.stats import Interval

MODES = ("full", "quick", "smoke")


def make_parser(description: str, *, datasets: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The common command line: --quick, --out-dir, --seed, --device, optional --dataset/--data-root."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small settings (at most 90 s on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default="figures", help="folder for NAME.png and NAME.json (default: figures)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: these models are small, and extra threads spin on a busy machine)",
    )
    if datasets is not None:
        parser.add_argument("--dataset", default=datasets[0], choices=list(datasets), help=f"data set (default {datasets[0]})")
        parser.add_argument(
            "--data-root", default=None,
            help="folder holding MNIST/CIFAR-10 files (or env GENKERNEL_DATA_ROOT); never downloads",
        )
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and add ``args.mode`` ("smoke", "quick" or "full")."""
    args = parser.parse_args(None if argv is None else list(argv))
    args.mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    try:
        args.torch_device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r} is not a torch device: {error}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    return args


def pick(mode: str, *, full: dict, quick: dict, smoke: dict) -> dict[str, Any]:
    """The settings of ``mode``; every mode must define the same keys."""
    table = {"full": full, "quick": quick, "smoke": smoke}
    if mode not in table:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    keys = {k: set(v) for k, v in table.items()}
    if len({frozenset(k) for k in keys.values()}) != 1:
        raise ValueError(f"settings disagree on their keys: {keys}")
    return dict(table[mode])


def claim(
    statement: str, held: bool, value: float, interval: Interval | Sequence[float] | None = None, **extra: Any
) -> dict:
    """One entry of the ``claims`` section: ``{"statement", "held", "value", "interval": [low, high]
    or None, **extra}``, JSON-ready. An ``interval`` from :mod:`genkernel.stats` also adds its
    ``method`` and ``n`` (unless ``extra`` names them).

    ``held`` must be computed from the numbers, and where there is an interval, from the interval
    (e.g. ``interval.above(0)``), never from the point estimate alone.
    """
    if isinstance(interval, Interval):
        extra = {"method": interval.method, "n": interval.n, **extra}
        interval = (interval.low, interval.high)
    return {
        "statement": statement,
        "held": bool(held),
        "value": _clean(value),
        "interval": None if interval is None else [_clean(float(interval[0])), _clean(float(interval[1]))],
        **{k: _clean(v) for k, v in extra.items()},
    }


def _clean(value: Any) -> Any:
    """JSON-ready: tensors and arrays to lists, numpy scalars to floats, non-finite floats to None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()] if value.ndim else _clean(value.item())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Timer:
    """Wall-clock timer started at construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds since construction."""
        return time.perf_counter() - self.start


def finish(
    name: str,
    args: argparse.Namespace,
    figure,
    results: dict[str, Any],
    claims: dict[str, dict],
    settings: dict[str, Any],
    timer: Timer,
) -> dict[str, Any]:
    """Save ``OUT/NAME.png`` and ``OUT/NAME.json``, print the wall time and the claims; return the JSON."""
    import matplotlib.pyplot as plt

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    figure.savefig(png, dpi=110 if args.mode != "smoke" else 50)
    plt.close(figure)
    payload = {
        "recipe": name,
        "mode": args.mode,
        "seed": args.seed,
        "device": str(args.device),
        "settings": _clean(settings),
        "results": _clean(results),
        "claims": _clean(claims),
        "wall_seconds": round(timer.seconds, 2),
        "figure": png.name,
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    for key, c in claims.items():
        print(f"[{name}] claim {key}: {'held' if c['held'] else 'did NOT hold'} (value {_fmt(c['value'])}, interval {c['interval']})")
    print(f"[{name}] wrote {png} and {path} in {timer.seconds:.1f} s ({args.mode} mode)")
    sys.stdout.flush()
    return payload


def _fmt(x: Any) -> str:
    """``x`` for a log line: floats to 4 significant digits."""
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def import_root(package: str, folder: Path) -> Path:
    """The folder that ``package``, whose files lie in ``folder``, imports from: ``python -m
    package.module`` started there imports these files. Returns ``folder``'s ancestor one level
    up per dot in ``package`` (the repository root for ``recipes.experiments``)."""
    return Path(folder).resolve().parents[package.count(".")]


# ------------------------------------------------------------------------- diffusion recipes
def add_diffusion_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options the diffusion recipes share (defaults: the mode's settings); returns nothing."""
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--beta-schedule", default="linear", choices=["linear", "squaredcos_cap_v2"])
    parser.add_argument("--num-bins", type=int, default=None, help="training-level bins (default: the mode's)")
    parser.add_argument("--band", type=int, default=None, help="locality band w in bins (default: the mode's)")


def apply_diffusion_overrides(settings: dict, args: argparse.Namespace) -> dict:
    """Writes the options of :func:`add_diffusion_arguments` that were given into ``settings``;
    returns ``settings``."""
    settings.update(prediction_type=args.prediction_type, beta_schedule=args.beta_schedule)
    for key in ("num_bins", "band"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def write_diffusion_outputs(name, args, s, timer, trainer, report, retrieval, retrieval_figure, timings) -> dict:
    """Saves a diffusion recipe's per-view figures (``OUT/NAME_<view>.png``), then the overview PNG
    and the JSON (claims from the numbers, :func:`diffusion_claims`).

    ``report``: the NoiseLevelAnalyzer's report; ``retrieval``: the retrieval attribution;
    ``retrieval_figure``: the recipe's retrieval plot; ``timings``: warm-up, window and retrieval
    seconds. Returns the JSON payload (see :func:`finish`).
    """
    from genkernel.plotting import diffusion as plots

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dpi = 50 if args.mode == "smoke" else 110
    retrieval_json = retrieval.to_json()
    extra = {
        "noise_matrix": plots.plot_noise_matrices(report),
        "locality": plots.plot_locality_over_training(report),
        "kernel_decay": plots.plot_kernel_decay(report),
        "matrix_evolution": plots.plot_matrix_evolution(report),
        "retrieval": retrieval_figure,
    }
    for key, fig in extra.items():
        fig.savefig(out / f"{name}_{key}.png", dpi=dpi)
        plots.plt.close(fig)
    claims = diffusion_claims(report, retrieval_json)
    results = {
        "report": report,
        "retrieval": retrieval_json,
        "figures": [f"{name}_{key}.png" for key in extra],
        "final_loss": sum(trainer.losses[-20:]) / max(1, len(trainer.losses[-20:])),
        "timing": {**timings, "seconds_per_tracked_step": timings["window_s"] / max(1, s["window_steps"])},
    }
    return finish(name, args, plots.plot_overview(report, retrieval_json), results, claims, s, timer)


def diffusion_claims(report: dict, retrieval_json: dict) -> dict:
    """The section-3 claims of a diffusion recipe, ``{key: claim}``: the locality ones "held" only
    when the 95 % interval of (measured − control) lies above 0, the retrieval one when the
    interval of (noisiest − cleanest entropy) does; the ledger one when its residual is small."""
    loc = report["locality"]
    kernel = report["kernel"][-1]["locality"]
    band = report["config"]["band"]
    out = {}
    for key, what in (("traffic", "traffic"), ("share", "net share")):
        c = loc[key]
        out[f"{key}_locality"] = claim(
            f"the {what} of a probe's correction from training within ±{band} bins of its own level exceeds the "
            "label-permutation control (same trajectory)", c["held"], c["difference"], c["interval"],
            measured=c["measured"], control=c["control"], median_kappa=loc["median_kappa"], method=c["method"], n=c["n"],
        )
    out["kernel_locality"] = claim(
        f"at θ_T, k̂ between states within ±{band} bins exceeds k̂ outside, beyond a level-label permutation",
        kernel["held"], kernel["difference"], kernel["interval"], measured=kernel["measured"], control=kernel["control"],
        method=kernel["method"], n=kernel["n"],
    )
    e = retrieval_json["entropy_high_minus_low"]
    out["retrieval_broad_to_narrow"] = claim(
        "retrieval entropy along reverse sampling is higher at the noisiest stage than at the cleanest",
        e["held"], e["difference"], e["interval"], method=e["method"], n=e["n"],
    )
    residual = report["residual"]["relative_residual"]
    out["ledger_adds_up"] = claim(
        "the noise-level ledger adds up: relative residual ‖R‖/‖Δf‖ below 1e-2", residual is not None and residual < 1e-2,
        residual, None,
    )
    return out
