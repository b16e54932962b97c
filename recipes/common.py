"""What the recipes share: arguments, settings per mode, claims, results files, timing, and the
diffusion recipes' options, claims and outputs.

Every experiment is a module ``recipes/experiments/NAME.py`` with ``main(argv=None)`` and runs
from the repository root as::

    python -m recipes.experiments.NAME [--quick] [--out-dir figures] [--seed 0] [--device cpu]

and writes ``OUT/NAME.png`` and ``OUT/NAME.json``. The JSON holds the numbers behind the figure,
the settings, the wall time and a ``claims`` section: for each claim its ``statistic``, its ``baseline`` (the same
statistic at θ₀ or on a null model), its ``value`` and ``interval``, and whether it ``held`` in this
run, computed from the interval (never written by hand), or ``measured: false`` with ``why`` when
these settings cannot answer it. ``python -m recipes`` writes the claims table of
``figures/README.md`` from these files.

Modes: full (paper-fidelity, default), ``--quick`` (seconds to about three
minutes on 2 idle CPU cores; each JSON records its ``wall_seconds``) and the hidden
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

from genkernel.core.tracking.io import atomic_file
from genkernel.data.torchvision_sets import DATA_ROOT_ENV
from genkernel.stats import Interval, mean_interval

MODES = ("full", "quick", "smoke")
FILE_DATASETS = ("mnist", "cifar10")  # --dataset values read from local files (--data-root)


def make_parser(description: str, *, datasets: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The common command line: --quick, --out-dir, --seed, --device, optional --dataset/--data-root."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small settings (seconds to about 3 minutes on 2 CPU cores; the JSON records wall_seconds)")
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
    dataset = getattr(args, "dataset", None)
    if dataset in FILE_DATASETS and getattr(args, "data_root", None) is None and not os.environ.get(DATA_ROOT_ENV):
        # refused here, in the command line's words: the data module's message names the Python argument data_root=
        parser.error(f"--dataset {dataset} is read from local files: pass --data-root DIR (the folder holding the "
                     f"{dataset} files; see genkernel.data.torchvision_sets for the layout) or set the environment "
                     f"variable {DATA_ROOT_ENV}; nothing is downloaded")
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


def _ends(interval: Sequence[float | None] | None) -> list | None:
    """An interval's two ends for JSON (None where undefined: NaN, or None read back from JSON)."""
    if interval is None:
        return None
    return [_clean(math.nan if v is None else float(v)) for v in interval[:2]]


def baseline(value: Any, what: str, interval: Interval | Sequence[float] | None = None, **extra: Any) -> dict:
    """The ``baseline`` of a claim: the same statistic where the effect should be absent, ``{"value",
    "what", "interval"}``. ``what`` says which: "θ₀" (the same network before training), a null model
    ("time-blind denoiser"), a fixed baseline ("distance to the training set") or a trivial reference
    ("no change predicted")."""
    if isinstance(interval, Interval):
        interval = (interval.low, interval.high)
    return {"value": _clean(value), "what": what,
            "interval": _ends(interval),
            **{k: _clean(v) for k, v in extra.items()}}


def claim(
    statement: str, held: bool, value: float, interval: Interval | Sequence[float] | None = None, *,
    statistic: str | None = None, baseline: dict | None = None, measured: bool = True, why: str | None = None,
    **extra: Any,
) -> dict:
    """One entry of the ``claims`` section, JSON-ready::

        {"statement", "statistic", "baseline": {"value", "what", "interval"}, "value",
         "interval": [low, high] or None, "held", "measured", ("why"), **extra}

    An ``interval`` from :mod:`genkernel.stats` also adds its ``method`` and ``n`` (unless ``extra``
    names them), and ``dropped``, the units it left out as non-finite, when there were any. ``statistic`` says in a few words what ``value`` is; ``baseline`` (see
    :func:`baseline`) is the same statistic where the effect should be absent (θ₀, a null model).

    ``held`` must be computed from the numbers, and where there is an interval, from the interval
    (e.g. ``interval.above(0)``), never from the point estimate alone. A claim these settings
    cannot measure (too few steps, samples that are still noise) passes ``measured=False`` and
    ``why``: its ``held`` is then None ("not measured"), not False.
    """
    if isinstance(interval, Interval):
        # units left out as non-finite (a seed whose statistic is NaN) are said, not dropped silently
        extra = {"method": interval.method, "n": interval.n, **({"dropped": interval.dropped} if interval.dropped else {}),
                 **extra}
        interval = (interval.low, interval.high)
    if not measured and not why:
        raise ValueError("a claim that was not measured needs why=")
    if measured and not (isinstance(held, (bool, np.bool_))
                         or (isinstance(held, torch.Tensor) and held.dtype == torch.bool and held.numel() == 1)):
        # bool(NaN) is True: a held computed as a float (e.g. a NaN statistic) would count as held
        raise TypeError(f"held must be a bool computed from the numbers (e.g. interval.above(0)), got "
                        f"{type(held).__name__} {held!r}")
    if measured and held and (_clean(value) is None or (interval is not None and None in _ends(interval))):
        # a NaN (or missing) statistic or interval end cannot hold: e.g. max() over seeds skipping a NaN seed
        raise ValueError(f"a claim cannot hold on an undefined value or interval (value {value!r}, interval "
                         f"{None if interval is None else tuple(interval)!r}); compute held from finite numbers, "
                         "or pass measured=False with why=")
    entry = {
        "statement": statement,
        "statistic": statistic or statement,
        "baseline": baseline if baseline is not None else {"value": None, "what": "none", "interval": None},
        "value": _clean(value),
        "interval": _ends(interval),
        "held": bool(held) if measured else None,
        "measured": bool(measured),
    }
    if not measured:
        entry["why"] = why
    entry.update({k: _clean(v) for k, v in extra.items()})
    return entry


def over_seeds(values: Sequence[float], *, confidence: float = 0.95) -> Interval:
    """Student-t interval of a per-seed statistic (the seeds are the independent replicates of a
    claim about training); NaN ends with a single seed."""
    return mean_interval(np.asarray(values, dtype=np.float64), confidence=confidence)


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


NULL_SEED_OFFSET = 7919  # a null model's permutation of seed s is drawn from s + this (not the batch order's seed)


def kernel_pair_drawn(run: dict, per_class: int) -> dict:
    """What a figure of the kernels at θ₀ and θ_T draws of one run, for the JSON: ``k_init`` and ``k_final``
    ``[N, N]`` in the figure's order (blocks of ``per_class``), ``per_class``, and ``colour_range``, the ``[vmin,
    vmax]`` both panels share (:func:`~genkernel.plotting.figures.shared_range`). Returns that dict."""
    from genkernel.plotting.figures import shared_range

    return {"k_init": run["k_init"], "k_final": run["k_final"], "per_class": per_class,
            "colour_range": list(shared_range(run["k_init"], run["k_final"]))}


def permuted_labels(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``y`` in a random order drawn from ``seed``: the random-label (or shuffled-target) null
    model's training targets, the same values and class sizes with no relation to the inputs."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + NULL_SEED_OFFSET))
    return y[order.to(y.device)]


def write_json(path: Path, payload: Any, *, indent: int | None = None) -> None:
    """``payload`` as strict JSON (no NaN) at ``path``, atomically: a temporary file beside it, then a
    rename, so an interrupted run leaves the previous file or none, never a truncated one that a
    later aggregation would fail to read."""
    text = json.dumps(payload, indent=indent, allow_nan=False) + "\n"
    with atomic_file(path, "w") as handle:
        handle.write(text)


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
    # refused before the PNG is replaced: a payload that is not JSON would leave the previous run's JSON beside
    # this run's figure
    try:
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError):
        plt.close(figure)
        raise
    figure.savefig(png, dpi=110 if args.mode != "smoke" else 50)
    plt.close(figure)
    payload["wall_seconds"] = round(timer.seconds, 2)
    path = out / f"{name}.json"
    write_json(path, payload, indent=2)
    for key, c in claims.items():
        verdict = "not measured" if c.get("measured") is False else ("held" if c["held"] else "did NOT hold")
        print(f"[{name}] claim {key}: {verdict} (value {_fmt(c['value'])}, interval {c['interval']})")
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
#
# Both diffusion recipes run the same protocol, one independent run per seed:
#
#   1. θ_0: the untrained denoiser is kept (and, with --checkpoint-dir, saved) as the baseline;
#   2. an untracked warm-up, then a tracked window of the NoiseLevelAnalyzer (``track_steps``) with
#      several label-permutation control partitions on the same trajectory;
#   3. the kernel's noise-level locality per clean input at θ_0 and θ_T (paired: the claim is the
#      change), and for the null models: a time-blind denoiser trained the same way (its kernel,
#      and with ``reference="ledger"`` its ledger over the same window); the per-bin-parameter
#      model's traffic locality is 1 by construction (no parameter is shared between bins);
#   4. retrieval along reverse sampling at θ_T, and at θ_0 only when θ_T's samples are not noise; then (same options,
#      same initial noise) on the time-blind denoiser where it was trained.
#
# Claims rest on the runs: with several seeds, one value per seed and a Student-t interval over
# seeds; with one seed, within the run with its own units (probe levels, clean inputs, samples).
# A claim the settings cannot measure (a window whose change is mostly pre-window optimizer state,
# samples that are still noise) says ``measured: false`` and why.

SAMPLE_NOISE_LIMIT = 0.5  # samples count as noise when they sit at least half-way from held-out data's distance to
# the training set to the training inputs' distance to one another (sample_quality)


def recipe_seeds(args: argparse.Namespace, settings: dict) -> list[int]:
    """The independent runs a multi-seed recipe makes: ``--seeds``, else the mode's number of seeds
    (``settings["seeds"]``) from ``--seed`` on (claims about training rest on seeds, not on one
    run's own units)."""
    seeds = list(args.seeds or [args.seed + k for k in range(settings["seeds"])])
    if len(set(seeds)) != len(seeds):
        # a repeated seed is the same run twice: counted as two independent replicates it narrows the interval
        raise ValueError(f"--seeds names a seed more than once ({seeds}): name each independent run once")
    return seeds


def add_seed_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--seeds``, ``--runs-dir`` and ``--aggregate`` (:func:`recipe_seeds`, :func:`runs_folder`);
    returns nothing."""
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="independent runs, one per seed (default: the mode's number of seeds from --seed on); "
                             "claims rest on the seeds")
    parser.add_argument("--runs-dir", default=None,
                        help="folder for one JSON per seed (default OUT/NAME_runs when several --seeds or --aggregate)")
    parser.add_argument("--aggregate", action="store_true",
                        help="run nothing: aggregate the per-seed JSON files in --runs-dir into OUT/NAME.json and the figures")


def runs_folder(name: str, args: argparse.Namespace) -> str | None:
    """Where a multi-seed recipe writes one JSON per seed: ``--runs-dir``, else ``OUT/NAME_runs``
    when several ``--seeds`` are named or for ``--aggregate``; None: no files (the mode's default
    seeds are kept in memory only)."""
    if args.runs_dir or not ((args.seeds and len(args.seeds) > 1) or args.aggregate):
        return args.runs_dir
    return str(Path(args.out_dir) / f"{name}_runs")


IGNORED_SETTINGS = ("checkpoint_every",)  # settings that do not change a run's numbers


def read_seed_runs(runs_dir: str | Path, args: argparse.Namespace, settings: dict, prefix: str = "seed", *,
                   missing_ok: bool = False) -> list[dict]:
    """``--aggregate``: the per-seed JSON files ``RUNS/PREFIX_S.json`` in seed order, refused unless
    each was written in this mode with these settings (a file left by an earlier run with other
    settings, or by another mode, would be aggregated as if it were one of these runs). With
    ``--seeds``, exactly those seeds (a missing one is refused, or with ``missing_ok`` skipped); else
    every file."""
    files = list(Path(runs_dir).glob(f"{prefix}_*.json"))
    if not files and not missing_ok:
        raise FileNotFoundError(f"no {prefix}_*.json in {runs_dir}: run the seeds first (--seeds ... --runs-dir {runs_dir})")
    runs = {}
    for f in files:
        run = json.loads(f.read_text())
        runs[int(run["seed"])] = (f, run)
    wanted = sorted(runs) if not getattr(args, "seeds", None) else list(args.seeds)
    missing = [seed for seed in wanted if seed not in runs]
    if missing_ok:
        wanted = [seed for seed in wanted if seed in runs]
    elif missing:
        raise FileNotFoundError(f"--aggregate: no {prefix}_S.json for seeds {missing} in {runs_dir}: run them first")
    expected = {k: v for k, v in _clean(settings).items() if k not in IGNORED_SETTINGS}
    out = []
    for seed in wanted:
        f, run = runs[seed]
        saved = {k: v for k, v in (run.get("settings") or {}).items() if k not in IGNORED_SETTINGS}
        if run.get("mode") != args.mode or saved != expected:
            differ = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            raise ValueError(
                f"{f} was written by a {run.get('mode')} run with other settings than this {args.mode} aggregation "
                f"(differing: {differ or 'mode'}): aggregate with the options it was run with, or rerun that seed "
                "(or remove the file)")
        out.append(run)
    return out


def add_diffusion_arguments(parser: argparse.ArgumentParser, objective: str = "ddpm") -> None:
    """Adds the options the diffusion recipes share (defaults: the mode's settings); returns nothing.
    ``objective``: "ddpm" (prediction type and beta schedule) or "flow_matching" (the scheduler's shift)."""
    if objective == "flow_matching":
        parser.add_argument("--shift", type=float, default=1.0, help="the flow-matching scheduler's shift (SD3: 3.0)")
    else:
        parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
        parser.add_argument("--beta-schedule", default="linear", choices=["linear", "squaredcos_cap_v2"])
    parser.add_argument("--num-bins", type=int, default=None, help="training-level bins (default: the mode's)")
    parser.add_argument("--band", type=int, default=None, help="locality band w in bins (default: the mode's)")
    parser.add_argument("--controls", type=int, default=None, help="permutation control partitions (default: the mode's)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untracked steps before the window (default: the mode's)")
    parser.add_argument("--window-steps", type=int, default=None, help="tracked steps (default: the mode's)")
    add_seed_arguments(parser)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resumable runs: trainer + analyzer checkpoints per seed in DIR/seed_S (rerun to continue)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: the mode's)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="time a few bare and tracked steps on --device and print the expected wall time; train nothing")


def apply_diffusion_overrides(settings: dict, args: argparse.Namespace) -> dict:
    """Writes the options of :func:`add_diffusion_arguments` that were given into ``settings``;
    returns ``settings``."""
    for key in ("prediction_type", "beta_schedule", "shift"):  # the objective's own (add_diffusion_arguments)
        if hasattr(args, key):
            settings[key] = getattr(args, key)
    for key in ("num_bins", "band", "controls", "warmup_steps", "window_steps", "checkpoint_every"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    return settings


class TimeBlind(torch.nn.Module):
    """A null model: ``inner(x_t, 0)`` whatever t is (the denoiser cannot tell the noise levels
    apart, so any noise-level locality it shows comes from the inputs' similarity alone)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *rest):
        return self.inner(x_t, torch.zeros_like(t.reshape(-1).expand(x_t.shape[0])), *rest)


def sample_quality(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
                   untrained_samples: torch.Tensor | None = None) -> dict[str, Any]:
    """Are generated samples still noise? Mean distance to the nearest training input of the
    samples (d_s) and of held-out data (d_h: what real samples reach), against the training inputs'
    mean distance to one another (d_r: the data's own spread; a sample no nearer the data than that
    has not found it). ``score`` = (d_s − d_h) / (d_r − d_h): 0 for samples as close to the data as
    fresh data, 1 or more for noise spread over the data's region; ``noise`` when above
    :data:`SAMPLE_NOISE_LIMIT`. The untrained denoiser's samples' distance is reported beside it."""
    def flat(x):
        return x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()

    b = flat(train)

    def nearest(x):
        return float(torch.cdist(flat(x), b).min(dim=1).values.mean())

    pairs = torch.cdist(b, b)
    d_r = float(pairs[~torch.eye(b.shape[0], dtype=torch.bool)].mean()) if b.shape[0] > 1 else math.nan
    d_s, d_h = nearest(samples), nearest(held_out)
    score = (d_s - d_h) / (d_r - d_h) if d_r > d_h else math.inf
    out = {"score": score, "limit": SAMPLE_NOISE_LIMIT, "noise": not score <= SAMPLE_NOISE_LIMIT,
           "distance_samples": d_s, "distance_held_out": d_h, "distance_between_training_inputs": d_r}
    if untrained_samples is not None:
        out["distance_untrained_samples"] = nearest(untrained_samples)
    return out


def _kernel_locality_per_input(analyzer, model, scheduler) -> dict[str, np.ndarray]:
    """Per clean input of the analyzer's kernel points, the delete-one-input jackknife pseudo-value
    of k̂ locality minus its permutation control (:func:`~genkernel.diffusion.locality.locality_pseudo_values`)
    for ``model`` at its current θ: the per-input values themselves share kernel entries, and a
    t-interval over them held in 6.5-9 % of null kernels at a nominal 2.5 %; one over the
    pseudo-values is the jackknife interval.

    Returns ``{"raw": [n], "standardized": [n]}``: on the kernel as it is, and with each state's entries to the
    other inputs' states standardized (:func:`~genkernel.diffusion.kernel_locality`'s ``"standardized"``; a kernel
    whose states differ only in scale, k̂ = c·g(s)·g(t), passes the raw difference and not this one)."""
    from genkernel.diffusion import make_states, state_kernel
    from genkernel.diffusion.locality import LOCALITY_ROWS, locality_pseudo_values

    param = next(model.parameters())
    states = make_states(scheduler, analyzer.kernel_clean.to(param), analyzer.kernel_noise.to(param), analyzer.bins.centers)
    kernel = state_kernel(model, states, output_sketch=analyzer.kernel_sketch, seed=analyzer.seed,
                          memory_budget=analyzer.memory_budget).cpu()
    return {rows: locality_pseudo_values(kernel, analyzer.kernel_clean.shape[0], torch.arange(analyzer.num_bins),
                                         analyzer.band, seed=analyzer.seed, rows=rows).numpy()
            for rows in LOCALITY_ROWS}


def _kernel_locality_record(per_model: dict[str, dict[str, np.ndarray]]) -> dict:
    """A run's ``kernel_locality_per_input`` from :func:`_kernel_locality_per_input` of each model
    (``theta_0``, ``theta_T``, ``time_blind`` where it ran): ``{model: raw [n], "standardized": {model: [n]}}``."""
    return {**{name: values["raw"] for name, values in per_model.items()},
            "standardized": {name: values["standardized"] for name, values in per_model.items()}}


def _per_level(report: dict, key: str) -> list[dict]:
    """``[{level, difference, interval, n}]`` of ``report["locality"]["per_level"]`` for ``key``."""
    return [{"level": row["level"], "bin": row["bin"], **{k: row[key][k] for k in ("difference", "interval", "n", "measured", "control")}}
            for row in report["locality"].get("per_level", [])]


def _make_analyzer(scheduler, held_out, s: dict, seed: int, *, controls: int, snapshots: bool, progress: bool):
    from genkernel.diffusion import NoiseLevelAnalyzer

    warmup, window = s["warmup_steps"], s["window_steps"]
    return NoiseLevelAnalyzer(
        scheduler, held_out, num_bins=s["num_bins"], num_probes=s["num_probes"], band=s["band"], controls=controls,
        snapshot_every=s["snapshot_every"] if snapshots else 0, kernel_every=s["kernel_every"] if snapshots else 0,
        kernel_points=s["kernel_points"], kernel_sketch=s.get("kernel_sketch"), seed=seed,
        track_steps=(warmup + 1, warmup + window), progress=progress,
    )


def lr_decay_schedule(s: dict, updates_per_step: int = 1):
    """``settings["lr_decay"]`` = (step, factor): the learning rate × factor from that step on (a
    ``MultiStepLR``, which checkpoints save, stepped after every update: ``updates_per_step`` per step, a
    GAN's D takes ``d_steps``), for a model and its null model alike; None (a constant rate) when absent.
    Refuses a step below 1 or a factor outside (0, 1]."""
    decay = s.get("lr_decay")
    if not decay:
        return None
    if len(decay) != 2:
        raise ValueError(f"lr_decay is (step, factor), got {decay!r}")
    at, factor = int(decay[0]), float(decay[1])
    if at < 1 or not 0 < factor <= 1:
        raise ValueError(f"lr_decay needs a step >= 1 and a factor in (0, 1], got {decay!r}")
    return lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[at * updates_per_step],
                                                                  gamma=factor)


def _train(trainer, warmup: int, total: int) -> tuple[float, float]:
    """Train up to ``warmup`` (untracked) and then to ``total`` steps; returns (warm-up s, window s)
    of this process (a resumed run counts only what it trained)."""
    t0 = time.perf_counter()
    if trainer.global_step < warmup:
        trainer.train(warmup - trainer.global_step)
    t1 = time.perf_counter()
    if trainer.global_step < total:
        trainer.train(total - trainer.global_step)
    return t1 - t0, time.perf_counter() - t1


def diffusion_seed_run(spec: dict, args: argparse.Namespace, s: dict, seed: int) -> tuple[dict, Any]:
    """One independent run of a diffusion recipe (the protocol above) from ``seed``.

    ``spec``: ``load(seed) -> (train data, held-out data)``, ``model() -> denoiser``,
    ``scheduler() -> DDPMScheduler``, ``time_blind() -> denoiser or None`` (the null model),
    ``retrieval`` (keyword arguments of ``retrieval_attribution``), ``images`` (bool).

    Returns ``(run, retrieval_result)``: the run's JSON-ready numbers and the θ_T retrieval (for figures).
    """
    import copy

    from genkernel.diffusion import DDPMTrainer, retrieval_attribution, reverse_sample

    device = args.torch_device
    timer = Timer()
    data, held_out = spec["load"](seed)
    data, held_out = data.to(device), held_out.to(device)
    torch.manual_seed(seed)
    model = spec["model"]().to(device)
    scheduler = spec["scheduler"]()
    theta0 = copy.deepcopy(model)
    run_dir = None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / f"seed_{seed}"
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "theta0.pt").is_file():
            theta0.load_state_dict(torch.load(run_dir / "theta0.pt", map_location=device))
        else:
            torch.save(model.state_dict(), run_dir / "theta0.pt")
    warmup, window = s["warmup_steps"], s["window_steps"]
    total = warmup + window
    progress = args.mode == "full"
    analyzer = _make_analyzer(scheduler, held_out, s, seed, controls=s["controls"], snapshots=True, progress=progress)
    trainer = DDPMTrainer(model, scheduler, data, batch_size=s["batch_size"], lr=s["lr"], seed=seed, callbacks=[analyzer],
                          lr_scheduler=lr_decay_schedule(s), checkpoint_dir=run_dir,
                          checkpoint_every=s["checkpoint_every"] if run_dir else 0, progress=progress)
    resumed = bool(run_dir is not None and trainer.resume())
    warmup_s, window_s = _train(trainer, warmup, total)
    if analyzer.tracker is None:  # resumed after the window had ended: bind to apply the checkpointed ledgers
        analyzer.bind(model, trainer.optimizer, start_step=warmup)
    if run_dir is not None:
        trainer.save_checkpoint()
    report = analyzer.report()
    if warmup:
        report["kernel"].insert(0, {"tracked_step": None, "global_step": 0, **analyzer.kernel_structure(theta0)})
    t0 = Timer()
    locality_of = {"theta_0": _kernel_locality_per_input(analyzer, theta0, scheduler),
                   "theta_T": _kernel_locality_per_input(analyzer, model, scheduler)}
    reference = blind = None
    if s.get("reference") and spec.get("time_blind") is not None:
        torch.manual_seed(seed)
        blind = spec["time_blind"]().to(device)
        ledger = s["reference"] == "ledger"
        blind_analyzer = _make_analyzer(scheduler, held_out, s, seed, controls=s["controls"], snapshots=False,
                                        progress=False) if ledger else None
        blind_trainer = DDPMTrainer(blind, scheduler, data, batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                                    callbacks=[blind_analyzer] if ledger else [], lr_scheduler=lr_decay_schedule(s),
                                    progress=progress)
        _train(blind_trainer, warmup, total)
        locality_of["time_blind"] = _kernel_locality_per_input(analyzer, blind, scheduler)
        reference = {"what": "time-blind denoiser (the same network fed t = 0), trained the same way"}
        if ledger:
            blind_report = blind_analyzer.report()
            reference.update(measured=blind_report["measured"], notes=blind_report["notes"],
                             locality=blind_report["locality"], residual=blind_report["residual"],
                             kernel_by_distance=blind_analyzer.kernel_structure(blind)["by_distance"])
        else:
            reference["kernel_by_distance"] = analyzer.kernel_structure(blind)["by_distance"]
    reference_s = t0.seconds
    # Retrieval along reverse sampling: at θ_T; at θ_0 (paired by sample) only when θ_T's samples are not noise.
    t0 = Timer()
    train_subset = data[: s["retrieval_train"]]
    options = dict(num_samples=s["retrieval_samples"], num_stages=s["retrieval_stages"],
                   num_inference_steps=s["inference_steps"], seed=seed, **spec.get("retrieval", {}))
    retrieval = retrieval_attribution(model, scheduler, train_subset, **options)
    untrained, _ = reverse_sample(theta0, scheduler, tuple(retrieval.samples.shape), num_inference_steps=s["inference_steps"],
                                  seed=seed)
    quality = sample_quality(retrieval.samples, train_subset, held_out, untrained)
    entropy0 = entropy_blind = quality_blind = None
    if not quality["noise"]:
        entropy0 = retrieval_attribution(theta0, scheduler, train_subset, **options).entropy
    retrieval_s = t0.seconds
    # the null model's retrieval (same options, same initial noise): a denoiser that cannot tell the noise levels
    # apart may show the broad-to-narrow fall too, from the samples' distribution alone; only where it was trained
    # (settings reference) and the claim is measured (θ_T's samples are not noise)
    t0 = Timer()
    if blind is not None and not quality["noise"]:
        blind_retrieval = retrieval_attribution(blind, scheduler, train_subset, **options)
        entropy_blind = blind_retrieval.entropy
        quality_blind = sample_quality(blind_retrieval.samples, train_subset, held_out, untrained)
    retrieval_time_blind_s = t0.seconds
    run = _clean({
        "seed": seed, "resumed": resumed, "report": report,
        "kernel_locality_per_input": _kernel_locality_record(locality_of),
        "reference": reference,
        "retrieval": retrieval.to_json(), "retrieval_entropy": retrieval.entropy,
        "retrieval_entropy_theta_0": entropy0, "sample_quality": quality,
        "retrieval_entropy_time_blind": entropy_blind, "sample_quality_time_blind": quality_blind,
        "final_loss": sum(trainer.losses[-20:]) / max(1, len(trainer.losses[-20:])),
        "timing": {"warmup_s": warmup_s, "window_s": window_s, "reference_s": reference_s, "retrieval_s": retrieval_s,
                   "retrieval_time_blind_s": retrieval_time_blind_s,
                   "seconds_per_tracked_step": window_s / max(1, window), "total_s": timer.seconds},
    })
    return run, retrieval


def _within_or_over_seeds(per_run: list[np.ndarray]) -> Interval:
    """One seed: Student t over the run's own units (the entries); several: over the seeds' means."""
    if len(per_run) == 1:
        return mean_interval(np.asarray(per_run[0], dtype=np.float64))
    return over_seeds([float(np.nanmean(np.asarray(v, dtype=np.float64))) for v in per_run])


def _paired_units(*arrays) -> tuple[np.ndarray, ...]:
    """The arrays (one value per unit: clean input, sample) as float64 with a unit left out of all of them (NaN)
    where it is undefined in any: a paired difference and its baseline then rest on the same units, so value −
    baseline is, unit by unit and in the mean over seeds, the difference the claim is judged on."""
    values = [np.asarray(a, dtype=np.float64) for a in arrays]
    if len({v.shape for v in values}) != 1:
        raise ValueError(f"paired statistics need one value per unit in each, got shapes {[v.shape for v in values]}: "
                         "compute them on the same units (clean inputs, samples)")
    bad = np.zeros(values[0].shape, dtype=bool)
    for v in values:
        bad |= ~np.isfinite(v)
    return tuple(np.where(bad, np.nan, v) for v in values)


def _kernel_locality_terms(per_input: list[dict], blind_run: bool) -> tuple[Interval, ...]:
    """The kernel-locality claim's intervals from each run's per-input values (``{"theta_0", "theta_T",
    "time_blind"}``, the raw or the standardized ones), units paired across models (:func:`_paired_units`):
    ``(θ_T − θ₀, θ₀, θ_T, time-blind − θ₀, θ_T − time-blind, time-blind)``, the last three None without the
    time-blind denoiser."""
    terms = [_paired_units(k["theta_T"], k["theta_0"], *([k["time_blind"]] if blind_run else [])) for k in per_input]
    change = _within_or_over_seeds([t[0] - t[1] for t in terms])
    at_0 = _within_or_over_seeds([t[1] for t in terms])
    at_T = _within_or_over_seeds([t[0] for t in terms])
    if not blind_run:
        return change, at_0, at_T, None, None, None
    null = _within_or_over_seeds([t[2] - t[1] for t in terms])  # the time-blind denoiser's θ_T − θ₀
    beyond = _within_or_over_seeds([(t[0] - t[1]) - (t[2] - t[1]) for t in terms])  # value − baseline per unit
    blind = _within_or_over_seeds([t[2] for t in terms])
    return change, at_0, at_T, null, beyond, blind


def _entropy_drop(entropy) -> np.ndarray:
    """Retrieval entropy at the noisiest stage minus at the cleanest, per sample (``entropy``: ``[stages, samples]``,
    or ``[stages]`` of means)."""
    e = np.asarray(entropy, dtype=np.float64)
    return e[0] - e[-1]


def _lowest(lows: list[float]) -> int:
    """Index of the lowest defined interval end; the first level when none is defined (values
    without spread have no interval: the claim then fails on its own ``every`` test)."""
    values = np.asarray(lows, dtype=np.float64)
    return int(np.nanargmin(values)) if np.isfinite(values).any() else 0


KERNEL_NOT_STANDARDIZED_WHY = (
    "the runs hold no standardized kernel locality (saved before it was computed): the raw difference alone is "
    "passed by a kernel whose states differ only in scale (k̂ = c·g(s)·g(t)); rerun the recipe")
KERNEL_NULL_NOT_RUN_WHY = (
    "the time-blind denoiser (the null model, settings reference) was not run: a denoiser that cannot tell the noise "
    "levels apart also gains kernel locality from training (quick toy settings, three seeds: time-blind at θ_T 0.055 "
    "[-0.010, 0.12] under DDPM, 0.072 [-0.006, 0.15] under flow matching, against 0.0024 at θ₀; with the 1500-step "
    "warm-up quick had before, 0.061 and 0.20 [0.043, 0.36]), so the rise from θ₀ alone does not "
    "show that training made k̂ noise-local; run with reference 'kernel' or 'ledger'")


NULL_LEDGER_NOT_RUN = ("none: the null model (a time-blind denoiser tracked over the same window, settings reference "
                       "'ledger') was not run; the statistic subtracts the permutation control (per-bin parameters, the "
                       "positive control, would give 1 − control)")


ONE_RUN_WHY = (
    "one training run (one seed): the claim compares models trained apart (θ_T with θ₀ or with the time-blind null "
    "model), and no unit within one run (probe level, clean input, sample) carries the run-to-run spread of training: "
    "over the 8 samples of one run, two ring denoisers trained alike (true difference 0) differed 'significantly' in "
    "25.8 % of 132 pairs at a nominal 2.5 %, and two initialisations' kernel locality over 8 clean inputs in 24.5 % "
    "of 200; run several seeds (quick and full run three)")


def diffusion_claims(runs: list[dict]) -> dict:
    """The section-3 claims from one or several runs (:func:`diffusion_seed_run`); see the module
    comment above for the units of the intervals."""
    seeds = len(runs)
    units = "seeds" if seeds > 1 else None
    reports = [r["report"] for r in runs]
    band = reports[0]["config"]["band"]
    out: dict[str, dict] = {}
    window_measured = all(rep.get("measured", True) for rep in reports)
    why_window = "; ".join(sorted({n for rep in reports for n in rep.get("notes", []) if "mostly the rest" in n})) or None
    reference = [r.get("reference") for r in runs]
    has_ledger_ref = all(ref is not None and "locality" in ref for ref in reference)
    for key, what in (("traffic", "traffic"), ("share", "net share")):
        per_level = [np.array([row["difference"] for row in _per_level(rep, key)], dtype=np.float64) for rep in reports]
        interval = _within_or_over_seeds(per_level)
        extra: dict[str, Any] = {
            "per_level": _per_level(reports[0], key) if seeds == 1 else [
                {"level": row["level"], "difference_per_seed": [float(v[i]) for v in per_level]}
                for i, row in enumerate(_per_level(reports[0], key))],
            "units": units or "probe levels (one run)", "controls": reports[0]["config"]["controls"],
            "median_kappa": float(np.median([rep["locality"]["median_kappa"] for rep in reports])),
            "median_rest_share": [rep["residual"]["median_rest_share"] for rep in reports],
        }
        base = baseline(None, NULL_LEDGER_NOT_RUN)
        held = interval.above(0)
        if has_ledger_ref:
            ref_levels = [np.array([row[key]["difference"] for row in ref["locality"]["per_level"]], dtype=np.float64)
                          for ref in reference]
            # paired by level: a level undefined in either is left out of both, so value − baseline is beyond_null
            paired = [_paired_units(a, b) for a, b in zip(per_level, ref_levels)]
            interval = _within_or_over_seeds([p[0] for p in paired])
            ref_interval = _within_or_over_seeds([p[1] for p in paired])
            beyond = _within_or_over_seeds([p[0] - p[1] for p in paired])
            base = baseline(ref_interval.estimate, "null model: time-blind denoiser, same window", ref_interval)
            extra.update(beyond_null=beyond.estimate, beyond_null_interval=[beyond.low, beyond.high])
            held = interval.above(0) and beyond.above(0)
        statement = (f"the {what} of a probe's correction from training within ±{band} bins of its own level exceeds the "
                     "label-permutation controls (same trajectory), and exceeds what a time-blind denoiser shows "
                     "(when run); interval over " + (units or "probe levels"))
        stat = f"{what} within ±{band} bins − permutation control, mean over probe levels"
        if not window_measured:
            out[f"{key}_locality"] = claim(statement, False, interval.estimate, interval, statistic=stat, baseline=base,
                                           measured=False, why=why_window, **extra)
        else:
            out[f"{key}_locality"] = claim(statement, held, interval.estimate, interval, statistic=stat, baseline=base, **extra)
    # every level: the average over levels hides a sign flip between them
    rows = _per_level(reports[0], "traffic")
    if rows:
        if seeds == 1:
            lows = [row["interval"][0] for row in rows]
            worst = _lowest([np.nan if v is None else v for v in lows])
            value, interval_w = rows[worst]["difference"], rows[worst]["interval"]
            every = all(v is not None and v > 0 for v in lows)
        else:
            # a level without a difference (NaN, saved as null) in some seed is left out and counted, not a TypeError
            per_level_iv = [over_seeds([math.nan if (v := _per_level(rep, "traffic")[i]["difference"]) is None else float(v)
                                        for rep in reports]) for i in range(len(rows))]
            worst = _lowest([iv.low for iv in per_level_iv])
            value, interval_w = per_level_iv[worst].estimate, per_level_iv[worst]  # with its n and dropped seeds
            every = all(iv.above(0) for iv in per_level_iv)
        statement = (f"traffic locality (±{band} bins, minus control) holds at every probe level, not only on "
                     "average: the level with the lowest interval still lies above 0, and (when a time-blind denoiser "
                     "is tracked beside it) above the time-blind denoiser's at every level")
        stat = "traffic within band − control at the worst probe level"
        base = baseline(None, NULL_LEDGER_NOT_RUN)
        beyond_kw: dict[str, Any] = {}
        if has_ledger_ref:
            # the null model's value of the same statistic at the same level; held only where every level is beyond it
            ref_rows = [[row["traffic"] for row in ref["locality"]["per_level"]] for ref in reference]
            if seeds == 1:
                # one run: the per-probe values are not saved, so the levels' intervals cannot be paired; the
                # conservative test: the run's interval lies above the null's at every level
                ref_w = ref_rows[0][worst]
                base = baseline(ref_w["difference"], "null model: time-blind denoiser, same window, same level",
                                ref_w["interval"])
                beyond_every = all(row["interval"][0] is not None and r["interval"][1] is not None
                                   and row["interval"][0] > r["interval"][1] for row, r in zip(rows, ref_rows[0]))
                beyond_kw["beyond_null_test"] = "interval above the null's interval at every level (one run: unpaired)"
            else:
                def nan(v):
                    return math.nan if v is None else float(v)

                ref_iv = [over_seeds([nan(rr[i]["difference"]) for rr in ref_rows]) for i in range(len(rows))]
                beyond_iv = [over_seeds([nan(_per_level(rep, "traffic")[i]["difference"]) - nan(rr[i]["difference"])
                                         for rep, rr in zip(reports, ref_rows)]) for i in range(len(rows))]
                base = baseline(ref_iv[worst].estimate, "null model: time-blind denoiser, same window, same level",
                                ref_iv[worst])
                beyond_every = all(iv.above(0) for iv in beyond_iv)
                beyond_kw.update(beyond_null=beyond_iv[worst].estimate,
                                 beyond_null_interval=[beyond_iv[worst].low, beyond_iv[worst].high],
                                 levels_beyond_null=[row["level"] for row, iv in zip(rows, beyond_iv) if iv.above(0)])
            every = every and beyond_every
        kw = dict(statistic=stat, baseline=base, worst_level=rows[worst]["level"],
                  levels_above_zero=[row["level"] for row in rows if row["interval"][0] is not None and row["interval"][0] > 0]
                  if seeds == 1 else None, **beyond_kw)
        if not window_measured:
            out["traffic_locality_every_level"] = claim(statement, False, value, interval_w, measured=False, why=why_window, **kw)
        else:
            out["traffic_locality_every_level"] = claim(statement, every, value, interval_w, **kw)
    # kernel locality: the change from θ_0, per clean input, judged against the time-blind denoiser's change (the
    # null model: its θ_T locality minus the same θ₀ term), so value − baseline is θ_T − time-blind per input
    per_input = [r["kernel_locality_per_input"] for r in runs]  # NaN (saved as null) below 3 inputs
    blind_run = all(k.get("time_blind") is not None for k in per_input)
    change, at_0, at_T, null, beyond, blind = _kernel_locality_terms(per_input, blind_run)
    extra = {"at_theta_T": at_T.estimate, "at_theta_T_interval": [at_T.low, at_T.high],
             "theta_0": at_0.estimate, "theta_0_interval": [at_0.low, at_0.high],
             "units": units or "jackknife pseudo-values of the kernel's clean inputs (one run)",
             "sketch": reports[0]["config"].get("kernel_sketch")}
    statement = (f"training makes k̂ noise-local: (mean k̂ within ±{band} bins − outside, minus a level-label permutation) "
                 "rises from θ₀ to θ_T, and (when a time-blind denoiser is trained beside it) exceeds the time-blind "
                 "denoiser's at θ_T, whose locality comes from the inputs' similarity alone; both also with each "
                 "state's kernel entries standardized (a change of the states' scale alone is no locality)")
    stat = "kernel locality (within − outside band, minus permutation), θ_T − θ₀"
    scaled_run = all(isinstance(k.get("standardized"), dict) for k in per_input)
    if not blind_run:
        # the rise from θ₀ alone is passed by the null model: a time-blind denoiser gains kernel locality from
        # training too (its inputs' similarity), so without it the claim's second half is untested
        missing = [r["seed"] for r, k in zip(runs, per_input) if k.get("time_blind") is None]
        out["kernel_locality"] = claim(
            statement, False, change.estimate, change, measured=False, why=KERNEL_NULL_NOT_RUN_WHY, statistic=stat,
            baseline=baseline(None, "null model: time-blind denoiser (not run"
                              + (f" in seeds {missing})" if len(missing) < len(runs) else ")")), **extra)
    else:
        extra.update(time_blind=blind.estimate, time_blind_interval=[blind.low, blind.high],
                     beyond_time_blind=beyond.estimate, beyond_time_blind_interval=[beyond.low, beyond.high])
        null_baseline = baseline(null.estimate, "null model: time-blind denoiser, trained the same way (its θ_T − the "
                                 "same θ₀)", null)
        if not scaled_run:
            out["kernel_locality"] = claim(statement, False, change.estimate, change, measured=False,
                                           why=KERNEL_NOT_STANDARDIZED_WHY, statistic=stat, baseline=null_baseline, **extra)
        else:
            # The raw difference exceeds its control for a kernel whose states differ only in scale (k̂ = c·g(s)·g(t):
            # kernel_locality's docstring), a change a time-conditioned denoiser can make and a time-blind one cannot:
            # the same two tests on standardized rows keep the claim to |Δbin| structure.
            scaled = _kernel_locality_terms([k["standardized"] for k in per_input], True)
            s_change, s_beyond = scaled[0], scaled[4]
            extra["standardized"] = {"change": s_change.estimate, "change_interval": [s_change.low, s_change.high],
                                     "beyond_time_blind": s_beyond.estimate,
                                     "beyond_time_blind_interval": [s_beyond.low, s_beyond.high]}
            raw_held = change.above(0) and beyond.above(0)
            scaled_held = s_change.above(0) and s_beyond.above(0)
            if raw_held and not scaled_held:
                extra["not_held_because"] = (
                    "the rise is the states' scale, not their distance: with each state's entries standardized the "
                    f"change is {s_change.estimate:.3g} [{s_change.low:.3g}, {s_change.high:.3g}] and beyond the "
                    f"time-blind denoiser {s_beyond.estimate:.3g} [{s_beyond.low:.3g}, {s_beyond.high:.3g}], not both "
                    "above 0")
            out["kernel_locality"] = claim(statement, raw_held and scaled_held, change.estimate, change, statistic=stat,
                                           baseline=null_baseline, **extra)
    # retrieval: broad → narrow, against θ_0 and the time-blind denoiser (where it ran and its samples are not noise),
    # only where θ_T's samples are not noise
    quality = [r["sample_quality"] for r in runs]
    noise = any(q["noise"] for q in quality)
    high_low = [_entropy_drop(r["retrieval_entropy"]) for r in runs]
    at_T = _within_or_over_seeds(high_low)
    statement = ("retrieval entropy along reverse sampling falls from the noisiest stage to the cleanest more at θ_T "
                 "than at θ₀ (paired by sample: the same initial noise), and more than at a time-blind denoiser's "
                 "(when it is trained beside it and its samples are not noise)")
    stat = "entropy(noisiest) − entropy(cleanest), θ_T − θ₀"
    if noise:
        # score +inf (d_r <= d_h) is saved as null: the worst of the scores, null counting as +inf
        worst = max(math.inf if q["score"] is None else q["score"] for q in quality)
        out["retrieval_broad_to_narrow"] = claim(
            statement, False, at_T.estimate, at_T, statistic=stat,
            baseline=baseline(None, "θ₀ and the time-blind denoiser (not run: θ_T's samples are noise)"), measured=False,
            why=(f"the samples are still noise: their distance to the training set is {worst:.2f} of the way from "
                 f"held-out data's (0) to the training inputs' distance to one another (1), above "
                 f"{SAMPLE_NOISE_LIMIT:g}; retrieval of noise says nothing about the trained denoiser"),
            at_theta_T=at_T.estimate, sample_quality=quality)
    else:
        blind_entropy = [r.get("retrieval_entropy_time_blind") for r in runs]
        blind_quality = [r.get("sample_quality_time_blind") for r in runs]
        blind_run = all(e is not None for e in blind_entropy)
        blind_noise = blind_run and any(q is None or q["noise"] for q in blind_quality)
        use_blind = blind_run and not blind_noise
        terms = [_paired_units(a, _entropy_drop(r["retrieval_entropy_theta_0"]),
                               *([_entropy_drop(e)] if use_blind else []))
                 for a, r, e in zip(high_low, runs, blind_entropy)]
        did = _within_or_over_seeds([t[0] - t[1] for t in terms])
        base0 = _within_or_over_seeds([t[1] for t in terms])
        extra = {"at_theta_T": at_T.estimate, "at_theta_T_interval": [at_T.low, at_T.high],
                 "theta_0": base0.estimate, "theta_0_interval": [base0.low, base0.high],
                 "sample_quality": quality, "units": units or "samples (one run)"}
        held = did.above(0)
        if use_blind:
            null = _within_or_over_seeds([t[2] - t[1] for t in terms])  # the time-blind denoiser's drop − θ₀'s
            beyond = _within_or_over_seeds([(t[0] - t[1]) - (t[2] - t[1]) for t in terms])  # value − baseline
            base = baseline(null.estimate, "null model: time-blind denoiser, trained the same way, same initial noise "
                            "(its drop − θ₀'s)", null)
            extra.update(beyond_time_blind=beyond.estimate, beyond_time_blind_interval=[beyond.low, beyond.high],
                         sample_quality_time_blind=blind_quality)
            held = held and beyond.above(0)
        elif blind_run:
            scores = [math.inf if q is None or q["score"] is None else q["score"] for q in blind_quality]
            base = baseline(base0.estimate, "θ₀: the untrained denoiser's retrieval (the null used: the time-blind "
                            "denoiser's samples are noise, so its retrieval is not a usable null)", base0)
            extra.update(sample_quality_time_blind=blind_quality,
                         time_blind_null=(f"not used: the time-blind denoiser's samples are noise (score "
                                          f"{max(scores):.2f} in the worst seed, above {SAMPLE_NOISE_LIMIT:g}); judged "
                                          "against θ₀ only"))
        else:
            missing = [r["seed"] for r, e in zip(runs, blind_entropy) if e is None]
            base = baseline(base0.estimate, "θ₀: the untrained denoiser's retrieval (the time-blind null model was not "
                            "run" + (f" in seeds {missing}" if len(missing) < len(runs) else "")
                            + ": judged against θ₀ only)", base0)
        out["retrieval_broad_to_narrow"] = claim(statement, held, did.estimate, did, statistic=stat, baseline=base,
                                                 **extra)
    if seeds == 1:
        # One run: value, interval and baseline stay (descriptive), but a claim that compares models trained apart is
        # not judged on within-run units (ONE_RUN_WHY); the locality claims compare models only against the null model.
        across = ["kernel_locality", "retrieval_broad_to_narrow"]
        if has_ledger_ref:
            across += ["traffic_locality", "share_locality", "traffic_locality_every_level"]
        for key in across:
            if key in out and out[key]["measured"]:
                out[key] = {**out[key], "held": None, "measured": False, "why": ONE_RUN_WHY}
    residuals = [rep["residual"]["relative_residual"] for rep in reports]
    residual = None if any(r is None for r in residuals) else max(residuals)  # a run whose outputs did not move
    out["ledger_adds_up"] = claim(
        "the noise-level ledger adds up: relative residual ‖R‖/‖Δf‖ below 1e-2 (worst run)",
        residual is not None and residual < 1e-2, residual, (residual, residual),
        statistic="relative residual ‖R‖/‖Δf‖ of the ledger (worst seed)",
        baseline=baseline(1.0, "no ledger: predicting no change"),
    )
    return out


def retrieval_drawn(result, train_data: torch.Tensor, *, images: bool, top: int) -> dict:
    """What the retrieval figure (:func:`genkernel.plotting.diffusion.plot_retrieval`, or its samples-are-noise
    form) draws of the θ_T retrieval ``result``, for the JSON: ``stages [K]``, ``states [K, S, ...]`` (the samples
    x_s at each stage), ``samples [S, ...]`` (the final ones), ``top_indices [K, S, top]`` with their k̂,
    ``top_kernel [K, S, top]`` (the image titles), ``entropy [K, S]``, and the training inputs drawn,
    ``training [R, ...]`` with their rows ``training_rows [R]`` in ``train_data``: every row for 2-D points (the grey
    cloud), for images only the rows drawn (the top rows and the first 8, which the samples-are-noise figure shows).
    Images are stored as trained, in [−1, 1]: the figure draws (clamp(x, −1, 1) + 1) / 2. Returns that dict."""
    top_indices = result.top_indices[..., :top]
    rows = (sorted(set(top_indices.reshape(-1).tolist()) | set(range(min(8, len(train_data))))) if images
            else list(range(len(train_data))))
    return {"stages": result.stages, "states": result.states, "samples": result.samples, "top_indices": top_indices,
            "top_kernel": torch.gather(result.kernel, 2, top_indices.long()), "entropy": result.entropy,
            "training_rows": rows, "training": train_data[rows]}


def write_diffusion_outputs(name: str, args: argparse.Namespace, s: dict, timer: Timer, runs: list[dict],
                            retrieval, retrieval_data, *, images: bool) -> dict:
    """Saves a diffusion recipe's per-view figures (``OUT/NAME_<view>.png``), then the overview PNG
    and the JSON (claims from the runs, :func:`diffusion_claims`). Figures aggregate the runs: the
    matrices are averaged over seeds and the per-level locality panel shows every seed; the kernel,
    matrix-evolution and retrieval figures draw the first seed's run alone, and say so in their titles
    (``results.first_seed_figures`` in the JSON names them), as do the locality figure's panels over
    training and the overview's kernel and entropy panels (``results.first_seed_panels``).

    ``retrieval``: seed 0's θ_T retrieval result (None when aggregating saved runs: the retrieval
    figure then shows the entropy only); ``retrieval_data``: the training inputs it retrieved from. What the
    retrieval figure draws is ``results.retrieval_drawn`` (:func:`retrieval_drawn`; None when aggregating: the
    entropy it then draws is ``results.runs[0].retrieval_entropy``).
    Returns the JSON payload (see :func:`finish`).
    """
    from genkernel.plotting import diffusion as plots

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dpi = 50 if args.mode == "smoke" else 110
    claims = diffusion_claims(runs)
    report = plots.average_reports([r["report"] for r in runs])
    references = [r.get("reference") for r in runs]
    quality = runs[0]["sample_quality"]
    first_seed = f"seed {runs[0]['seed']} of {len(runs)}" if len(runs) > 1 else None
    extra = {
        "noise_matrix": plots.plot_noise_matrices(report),
        "locality": plots.plot_locality_over_training(report, runs=runs, claims=claims, run_label=first_seed),
        "kernel_decay": plots.plot_kernel_decay(runs[0]["report"], reference=references[0], run_label=first_seed),
        "matrix_evolution": plots.plot_matrix_evolution(runs[0]["report"], run_label=first_seed),
        "retrieval": plots.plot_retrieval(retrieval, retrieval_data, images=images, quality=quality,
                                          top=min(3, retrieval_data.shape[0]), entropy=runs[0]["retrieval_entropy"],
                                          stages=runs[0]["retrieval"]["stages"], run_label=first_seed),
    }
    for key, fig in extra.items():
        fig.savefig(out / f"{name}_{key}.png", dpi=dpi)
        plots.plt.close(fig)
    first = runs[0]
    results = {
        "seeds": [r["seed"] for r in runs],
        "report": first["report"],
        # what the noise-matrix and overview figures draw over several seeds (the report above is seed 0's alone)
        **({"averaged_over_seeds": {"seeds": report.get("seeds_averaged"), "matrices": report["matrices"],
                                    # a cell missing in some seeds is the mean of those that have it: how many
                                    "seeds_per_cell": report.get("seeds_per_cell"),
                                    "relative_residual_worst": report["residual"]["relative_residual"]}}
           if len(runs) > 1 else {}),
        "retrieval": first["retrieval"],
        "retrieval_drawn": None if retrieval is None else retrieval_drawn(
            retrieval, retrieval_data, images=images, top=min(3, retrieval_data.shape[0])),
        "runs": [{k: v for k, v in r.items() if k not in ("report", "retrieval")} | {
            "residual": r["report"]["residual"], "measured": r["report"].get("measured"), "notes": r["report"].get("notes"),
            "locality": r["report"]["locality"]} for r in runs],
        "figures": [f"{name}_{key}.png" for key in extra],
        # the figures drawn from the first seed's run alone (the others aggregate every seed)
        "first_seed_figures": {"seed": first["seed"], "figures": [f"{name}_{key}.png" for key in
                                                                   ("kernel_decay", "matrix_evolution", "retrieval")]},
        # panels of the aggregate figures drawn from the first seed's run alone (their titles name it over several seeds)
        "first_seed_panels": {f"{name}_locality.png": ["traffic locality", "net-share locality", "kernel locality"],
                              f"{name}.png": ["kernel decay", "retrieval entropy"]},
        "final_loss": first["final_loss"],
        "timing": first["timing"],
        "what_ran": (f"{args.mode} settings, {len(runs)} seed(s) {[r['seed'] for r in runs]}: warm-up "
                     f"{s['warmup_steps']} untracked steps"
                     + (f" (learning rate × {s['lr_decay'][1]:g} from update {s['lr_decay'][0]} on)" if s.get("lr_decay") else "")
                     + f", then a tracked window of {s['window_steps']} steps, "
                     f"{s['num_probes']} probes, {s['num_bins']} log-SNR bins, {s['controls']} permutation controls"),
    }
    overview = plots.plot_overview(report, first["retrieval"], claims=claims, run_label=first_seed)
    return finish(name, args, overview, results, claims, s, timer)


def run_diffusion_recipe(name: str, spec: dict, args: argparse.Namespace, s: dict) -> dict:
    """The whole protocol for the seeds (:func:`recipe_seeds`): run each seed (writing
    ``RUNS/seed_S.json`` when a runs folder is in use), or with ``--aggregate`` read them, then
    write the figures and ``OUT/NAME.json``. Returns the JSON payload."""
    timer = Timer()
    seeds = recipe_seeds(args, s)
    runs_dir = runs_folder(name, args)
    if args.estimate_only:
        return estimate_diffusion_wall_time(name, spec, args, s, seeds)
    runs, retrieval = [], None
    data = None
    if args.aggregate:
        runs = read_seed_runs(runs_dir, args, s)
        data = spec["load"](runs[0]["seed"])[0][: s["retrieval_train"]]
    else:
        for i, seed in enumerate(seeds):
            run, result = diffusion_seed_run(spec, args, s, seed)
            runs.append(run)
            if i == 0:
                retrieval = result
                data = spec["load"](seed)[0][: s["retrieval_train"]]
            if runs_dir is not None:
                Path(runs_dir).mkdir(parents=True, exist_ok=True)
                path = Path(runs_dir) / f"seed_{seed}.json"
                write_json(path, {**run, "settings": _clean(s), "mode": args.mode})
    return write_diffusion_outputs(name, args, s, timer, runs, retrieval, data, images=spec["images"])


def estimate_diffusion_wall_time(name: str, spec: dict, args: argparse.Namespace, s: dict, seeds: list[int]) -> dict:
    """``--estimate-only``: time bare steps, tracked steps and one kernel structure of these settings
    on ``--device`` and print the expected wall time of the whole run: warm-up at the bare rate,
    window at the tracked rate, the kernels (θ₀, the window's checkpoints, the per-input kernels,
    the time-blind one) at the measured kernel time, and the time-blind reference; retrieval and
    imports not counted. Returns the numbers."""
    from genkernel.diffusion import DDPMTrainer

    from .benchmarks.harness import synced_seconds  # (here: the harness imports this module)

    device = args.torch_device
    data, held_out = spec["load"](seeds[0])
    torch.manual_seed(seeds[0])
    model = spec["model"]().to(device)
    scheduler = spec["scheduler"]()
    n = 5 if args.mode == "smoke" or device.type == "cpu" else 20
    trainer = DDPMTrainer(model, scheduler, data.to(device), batch_size=s["batch_size"], lr=s["lr"], seed=seeds[0], progress=False)
    trainer.train(2)
    bare = synced_seconds(device, lambda: trainer.train(n)) / n
    settings = {**s, "warmup_steps": trainer.global_step, "window_steps": n + 1}
    analyzer = _make_analyzer(scheduler, held_out.to(device), settings, seeds[0], controls=s["controls"], snapshots=False,
                              progress=True)
    kernel = synced_seconds(device, lambda: analyzer.kernel_structure(model))
    analyzer.record_kernel = lambda: None  # timed apart, above
    trainer.callbacks.append(analyzer)
    trainer.train(1)  # binds
    tracked = synced_seconds(device, lambda: trainer.train(n)) / n
    kernels = 2 + (s["window_steps"] // s["kernel_every"] if s["kernel_every"] else 0) + 1 + 2
    per_seed = s["warmup_steps"] * bare + s["window_steps"] * tracked + kernels * kernel
    if s.get("reference"):
        per_seed += s["warmup_steps"] * bare + kernel + s["window_steps"] * (tracked if s["reference"] == "ledger" else bare)
    result = {"device": str(device), "bare_step_s": bare, "tracked_step_s": tracked, "kernel_structure_s": kernel,
              "kernels_per_seed": kernels, "expected_s_per_seed": per_seed, "expected_s_total": per_seed * len(seeds),
              "seeds": seeds, "settings": _clean(s),
              "note": "warm-up at the bare rate, window at the tracked rate, kernels at the measured kernel time; "
                      "retrieval and imports not counted"}
    print(f"[{name}] {device}: bare step {bare:.3g} s, tracked step {tracked:.3g} s, kernel structure {kernel:.3g} s "
          f"-> about {per_seed / 3600:.2f} h per seed, {per_seed * len(seeds) / 3600:.2f} h for {len(seeds)} seed(s)")
    return result
