"""Run every experiment (``make figures``: ``--quick``; ``make figures-full``: paper settings).

    python -m recipes [--quick] [--out-dir figures] [--seed 0] [--device cpu] [--only NAME ...]

Each experiment runs in its own subprocess, ``python -m <package>.experiments.NAME``, started from
the folder the package imports from (the repository root), with a timeout; its wall time is
printed and a final table lists every experiment's status, time and claims. An experiment whose
module does not exist is skipped with a notice; one that fails or times out makes this script
exit non-zero, naming it (after the others have run, so one failure does not hide another).

After the runs, the claims table (one row per claim of every ``OUT/NAME.json``: recipe, claim,
statistic, baseline, value, interval, held or not measured) is written between the markers
``<!-- claims:begin -->`` and ``<!-- claims:end -->`` of ``OUT/README.md`` when that file exists
(``figures/README.md`` for ``--out-dir figures``), else into ``OUT/claims_table.md``: the table
is generated from the JSON files, so it cannot disagree with them; a recipe that failed or timed
out in this run is named in its header and its claims left out (its JSON, if any, is an earlier
run's). ``--table-only`` rewrites it
from the JSON files already there, without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from .common import import_root

PACKAGE = f"{__spec__.parent}.experiments"  # recipes.experiments, or genkernel.recipes.experiments
EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
RECIPES = (
    "circle_neighborhoods",
    "regression_kernels",
    "classification_kernels",
    "tangent_svm",
    "tangent_embedding",
    "printed_digits",
    "optimizer_weighting",
    "null_space",
    "diffusion_toy2d",
    "flow_toy2d",
    "diffusion_digits",
    "gan_ring2d",
    "gan_digits",
)


def parse_args(argv):
    """The command line as an ``argparse.Namespace``."""
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.parent}", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run every experiment with --quick")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default="figures", help="folder for the figures and JSON files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per experiment (default: 600 with --quick; none for the full settings, which run "
                             "several seeds for hours: the recipes' --estimate-only says how long)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these experiments (names as in the list)")
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the claims table from the JSON files in --out-dir")
    # the folder of the experiment modules; its package name is PACKAGE's (the tests point it elsewhere)
    parser.add_argument("--experiments-dir", default=str(EXPERIMENTS_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # (--timeout -5 ran nothing and reported every recipe FAILED (timeout -5 s) into the claims table; --timeout 0
    # was taken for no --timeout)
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    return args


def claims_of(out_dir: Path, name: str) -> str:
    """``"held/total held"`` (and how many were not measured) from ``OUT/NAME.json``'s claims, or
    ``"-"`` when it cannot be read."""
    path = out_dir / f"{name}.json"
    try:
        claims = json.loads(path.read_text()).get("claims", {})
    except (OSError, ValueError):
        return "-"
    held = sum(1 for c in claims.values() if c.get("held"))
    unmeasured = sum(1 for c in claims.values() if c.get("measured") is False)
    return f"{held}/{len(claims)} held" + (f", {unmeasured} not measured" if unmeasured else "")


BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def _num(x) -> str:
    """A number for the table: 3 significant digits, "—" for None/NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:.3g}"
    return str(x)


def _interval(iv) -> str:
    if not iv or any(v is None for v in iv):
        return "—"
    return f"[{_num(iv[0])}, {_num(iv[1])}]"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_table(out_dir: Path, names=RECIPES, failed: dict[str, str] | None = None) -> str:
    """The markdown claims table of every ``OUT/NAME.json`` among ``names`` that exists.

    ``failed``: ``{name: status}`` of recipes that failed or timed out in this run; their
    ``OUT/NAME.json``, when one is there, is an earlier run's, so their claims are left out of the
    table and the header names them (a stale file must not read as this run's result)."""
    failed = failed or {}
    rows, runs = [], []
    for name in names:
        if name in failed:
            runs.append(f"`{name}` ({failed[name]} in the latest run: its claims are left out)")
            continue
        path = out_dir / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        runs.append(f"`{name}` ({data.get('mode', '?')}, seed {data.get('seed', '?')}, {_num(data.get('wall_seconds'))} s)")
        for key, c in data.get("claims", {}).items():
            base = c.get("baseline") or {}
            what = base.get("what")
            base_text = "—" if not what or what == "none" else f"{_num(base.get('value'))} ({what})"
            if c.get("measured") is False:
                verdict = f"not measured: {c.get('why', '')}"
            else:
                verdict = "**held**" if c.get("held") else "not held"
            n = c.get("n")
            interval = _interval(c.get("interval")) + (f" n={n}" if n is not None and c.get("interval") else "")
            if c.get("dropped"):  # units left out as non-finite (e.g. a seed whose statistic is NaN)
                interval += f" ({c['dropped']} dropped: non-finite)"
            rows.append("| " + " | ".join(_cell(v) for v in (
                name, f"`{key}`", c.get("statistic") or c.get("statement", ""), base_text, _num(c.get("value")),
                interval, verdict)) + " |")
    head = [
        "Generated by `python -m recipes` (`recipes/run_all.py`) from the JSON files beside the figures; do not edit "
        "by hand. Runs: " + ("; ".join(runs) if runs else "none") + ".",
        "",
        "| recipe | claim | statistic | baseline (which) | value | interval (n units) | held |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def write_claims_table(out_dir: Path, names=RECIPES, failed: dict[str, str] | None = None) -> Path:
    """Writes :func:`claims_table` between the markers of ``OUT/README.md`` (appending the markers
    when the file has none), or into ``OUT/claims_table.md`` when there is no README; returns the path."""
    table = claims_table(out_dir, names, failed)
    readme = out_dir / "README.md"
    if not readme.is_file():
        path = out_dir / "claims_table.md"
        path.write_text(table)
        return path
    text = readme.read_text()
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Claims\n\n" + block + "\n"
    from genkernel.core.tracking.io import atomic_file  # (a table-only run imports no more than it needs)

    with atomic_file(readme, "w") as handle:
        handle.write(text)
    return readme


def main(argv=None) -> int:
    """Runs the experiments, prints the summary table; returns the exit status (0 all ran, 1 one
    failed, 2 an unknown name, ``--only`` without a name, or ``--table-only`` on a missing folder)."""
    args = parse_args(None if argv is None else list(argv))
    experiments_dir = Path(args.experiments_dir).resolve()
    root = import_root(PACKAGE, experiments_dir)
    out_dir = Path(args.out_dir).resolve()  # the children run from `root`
    # Quick runs take 8-180 s on 2 cores (the JSONs' wall_seconds), several times that on a loaded machine; a hang still ends.
    timeout = args.timeout or (600.0 if (args.quick or args.smoke) else None)
    if args.only is not None and not args.only:
        print(f"--only needs at least one recipe name; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    names = RECIPES if args.only is None else tuple(dict.fromkeys(args.only))
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    if args.table_only:
        if not out_dir.is_dir():
            print(f"--table-only: {out_dir} is not a folder (no JSON files to build the table from); "
                  "run the recipes into it first, or name the folder that holds them", file=sys.stderr)
            return 2
        print(f"[run_all] claims table written to {write_claims_table(out_dir)}")
        return 0
    mode = ["--smoke"] if args.smoke else (["--quick"] if args.quick else [])
    rows, failed = [], {}
    start = time.perf_counter()
    for name in names:
        if not (experiments_dir / f"{name}.py").is_file():
            print(f"[run_all] SKIP {name}: {experiments_dir / name}.py does not exist", flush=True)
            rows.append((name, "skipped (no file)", 0.0, "-"))
            continue
        cmd = [sys.executable, "-m", f"{PACKAGE}.{name}", *mode, "--out-dir", str(out_dir),
               "--seed", str(args.seed), "--device", args.device]
        print(f"[run_all] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, timeout=timeout, cwd=root).returncode
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (timeout {timeout:.0f} s)"
        seconds = time.perf_counter() - t0
        print(f"[run_all] {name}: {status} in {seconds:.1f} s", flush=True)
        if status != "ok":
            failed[name] = status
        rows.append((name, status, seconds, claims_of(out_dir, name) if status == "ok" else "-"))
    total = time.perf_counter() - start
    width = max([len(r[0]) for r in rows] + [len("total")])
    print("\nrecipe".ljust(width + 1) + "  status                  seconds  claims")
    for name, status, seconds, claims in rows:
        print(f"{name.ljust(width)}  {status.ljust(22)}  {seconds:7.1f}  {claims}")
    print(f"{'total'.ljust(width)}  {'':22}  {total:7.1f}")
    if out_dir.is_dir():
        print(f"[run_all] claims table written to {write_claims_table(out_dir, failed=failed)}")
    if failed:
        print(f"[run_all] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
