"""The ``genkernel`` command.

    genkernel figures [--only NAME ...] [--quick | --smoke] [--out-dir DIR] [--seed N] [--device D] [--list]
    genkernel summarize STATE.pt [--json] [--top K] [--probes N]
    genkernel report STATE.pt [-o report.html] [--title T] [--no-animation]
    genkernel --version

``figures`` runs the recipes that regenerate the paper figures (the installed ``genkernel.recipes``
package: no repository needed); ``summarize`` prints what a saved ledger, tracker, analyzer or
trainer checkpoint holds (relative residual, rest share, shares with κ, traffic, top groups per
probe, measured minus control, claims; ``--json`` for strict JSON); ``report`` writes one
self-contained HTML page of a saved analyzer state. States are read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _recipes():
    """The recipes package: installed as genkernel.recipes, or the repository's recipes/."""
    try:
        from .recipes import run_all
    except ImportError:  # a source tree used without installing: the top-level recipes package
        from recipes import run_all  # type: ignore[no-redef]
    return run_all


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="genkernel", description="Exact path-kernel ledgers: figures, summaries, reports.")
    parser.add_argument("--version", action="version", version=f"genkernel {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    figures = commands.add_parser("figures", help="regenerate one or all figures (runs the recipes)",
                                  description="Regenerate figures: each recipe writes NAME.png and NAME.json into --out-dir.")
    figures.add_argument("--only", nargs="+", metavar="NAME", help="run only these recipes (see --list)")
    mode = figures.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small settings (about 90 s per recipe on 2 CPU cores)")
    mode.add_argument("--smoke", action="store_true", help="tiny settings that check the plumbing, not the claims")
    figures.add_argument("--out-dir", default="figures", help="folder for the figures and their JSON (default: figures)")
    figures.add_argument("--seed", type=int, default=0)
    figures.add_argument("--device", default="cpu")
    figures.add_argument("--timeout", type=float, default=None, help="seconds per recipe")
    figures.add_argument("--list", action="store_true", help="list the recipes and exit")

    summarize = commands.add_parser("summarize", help="summarize a saved ledger, tracker, analyzer or checkpoint",
                                    description="Residual, shares with κ, traffic and top groups per probe of a saved state.")
    summarize.add_argument("state", help="a .pt file written by genkernel (save / state_dict / a trainer checkpoint)")
    summarize.add_argument("--json", action="store_true", help="print strict JSON (NaN as null)")
    summarize.add_argument("--top", type=int, default=3, help="groups listed per probe (default 3)")
    summarize.add_argument("--probes", type=int, default=8, help="probes listed in the text output (default 8)")

    report = commands.add_parser("report", help="write a self-contained HTML report of a saved analyzer state",
                                 description="One HTML page: figures embedded, the numbers and claims beside them, the settings.")
    report.add_argument("state", help="a .pt file: an analyzer's saved state, or a trainer checkpoint holding one")
    report.add_argument("-o", "--output", default=None, help="the HTML file (default: STATE with .html)")
    report.add_argument("--title", default=None)
    report.add_argument("--top", type=int, default=3, help="groups listed per probe (default 3)")
    report.add_argument("--no-animation", action="store_true", help="leave out the GIF of the matrices over the run")
    return parser


def _figures(args: argparse.Namespace) -> int:
    run_all = _recipes()
    if args.list:
        print("\n".join(run_all.RECIPES))
        return 0
    # The recipes save figures without a display: let their subprocesses use Agg unless the user chose.
    os.environ.setdefault("MPLBACKEND", "Agg")
    argv = ["--out-dir", str(Path(args.out_dir).resolve()), "--seed", str(args.seed), "--device", args.device]
    if args.quick:
        argv.append("--quick")
    if args.smoke:
        argv.append("--smoke")
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    if args.only:
        argv += ["--only", *args.only]
    return int(run_all.main(argv))


def _summarize(args: argparse.Namespace) -> int:
    from .report import format_summary, summarize

    summary = summarize(args.state, top=args.top)
    if args.json:
        print(json.dumps(summary, indent=1, allow_nan=False))
    else:
        print(format_summary(summary, top_probes=args.probes))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    output = Path(args.output) if args.output else Path(args.state).with_suffix(".html")
    if output.exists() and Path(args.state).exists() and os.path.samefile(output, args.state):
        # -o STATE.pt (or a state named .html) would replace the analyzer's saved state by the page
        raise ValueError(f"the output {output} is the state file itself: pass another name with -o")
    path = write_report(args.state, output, title=args.title, top=args.top, animate=not args.no_animation)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB): open it in a browser")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"figures": _figures, "summarize": _summarize, "report": _report}[args.command](args)
    except (OSError, ValueError) as error:  # a missing state, an unwritable output: one line, not a traceback
        print(f"genkernel {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
