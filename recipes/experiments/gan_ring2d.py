"""GAN on a 2-D Gaussian mixture: the generator's path kernel split by discriminator gradient geometry.

    python -m recipes.experiments.gan_ring2d [--quick] [--out-dir figures] [--device cpu] [--seed 0 | --seeds 0 1 2]
        [--mixture ring|grid] [--loss nonsaturating|hinge|wgan-gp] [--spectral-norm] [--controls K]
        [--null-model | --no-null-model] [--runs-dir DIR] [--aggregate] [--checkpoint-dir DIR] [--estimate-only]

docs/gan.md. Trains MLP G and D (SiLU, Adam, float64) with the
:class:`GANKernelAnalyzer` attached: the generator ledger is split on the same steps by the
pushed-to mode argmax_m cos(−w_i, μ_m − G(z_i)) (the discriminator's geometry), by the mode nearest
to G(z_i) (a spatial grouping of the same size that ignores D), and by K label permutations of each;
the discriminator's ledger is grouped into real (by mode), generated (by nearest mode) and penalty.

Claims (``claims`` in the JSON; each with statistic, baseline, value, interval, held or
``measured: false`` with why):

- ``exact_ledger``, ``formula_matches_each_step``: ``"kind": "tool_check"``: they hold by
  construction of the ledger (a check of the tool, not a finding about GANs);
- ``distribution_guided``: each step's ΔG(z') follows the discriminator's kernel-smoothed field;
- ``kernel_smoothing_matters``: that field predicts the step better than the probe's own push (the
  difference of the two cosines; its baseline is that difference on the null model, the push's own
  cosine is ``local_push``);
- ``own_mode_coupling_traffic`` / ``_net``: a probe's correction comes more from its own geometry
  group than the other probe groups get from that group (the interaction statistic, which removes
  source-group strength), beyond the permutation controls, *and* beyond a spatial grouping of the
  same size (so that coupling from G's smoothness alone is not credited to D). Every window counts
  (pooled, intervals clustered by probe group, the geometry-minus-spatial one by both groupings' groups as the
  analyzer's, on at least 4 probe groups as the analyzer's; over seeds with ``--seeds``). Measured only on a
  converged GAN (at least 6 of 8 modes hit, 19 of 25 on the grid, and half the samples within 3σ of a mode
  at the end: ``settings.convergence_rule``).

A claim that also holds on the null model (``--null-model``: G trained against a fixed random
discriminator, so its corrections do not depend on D, while D trains and supplies the geometry as
usual) is reported not held, and the two step claims must also lie above the null model paired by
seed (``beyond_null``: Student t over seeds of the difference of their mean cosines). A null model
follows D's field by chance in about a third of runs, so three seeds rarely separate the two (the
tiny runs of ``tests/test_gan_claims.py``: 0.55 [−0.67, 1.76]); run more seeds where they do not.
Without the null model (``--no-null-model``) the step claims are not measured: half of their
statement is untested. Quick and full run it.
``tests/test_gan_claims.py`` checks every claim's code on such a null model and on a positive control.

Several seeds are independent runs, claims with intervals over the seeds, figures over every seed:
by default the mode's own count from ``--seed`` on (full and quick 3, smoke 1; one run's
evaluation steps cannot show that the steps follow D, so one seed leaves those claims not held),
or ``--seeds 0 1 2``, which also writes one JSON per seed in ``--runs-dir`` (default ``OUT/gan_ring2d_runs``);
``--aggregate`` redraws from those files. ``--checkpoint-dir DIR`` makes each seed resumable (trainer
and analyzer state, windows included, saved every window in ``DIR/seed_S``; rerun to continue).
``--estimate-only`` times a few steps on ``--device`` and prints the expected wall time.

Full settings: 3000 iterations of 2 D steps and 1 G step, K = 4 controls per grouping, the null model
on. In checks of the bare GAN at these settings (seeds 0-2) the samples sharpened onto the modes by
iteration 1000-1500 in every seed, but modes are dropped and regained as training goes on: at
iteration 3000, 2 of the 3 seeds met the convergence rule (the third had 5 modes). So convergence
is measured per seed at the end, and the coupling claims rest on the seeds that converged (none:
not measured); run 3 or more seeds. Expected wall time per seed, its null model included: about 45 min on 2 CPU cores
(``--estimate-only``: 0.43 s per tracked iteration, 0.02 s bare, float64, one thread); on a GPU
the 2-D MLPs are launch-bound, expect no speed-up: measure with ``--estimate-only --device cuda``.
Quick settings: the full networks and rates (hidden 64, 2 D steps per G step, Adam lr 1e-3, betas (0.5, 0.999)),
batch 64, K = 2 controls; both learning rates × 0.2 from iteration 1500 on (``lr_decay``); iterations 1-1750
untracked (``warmup``: a bare step's cost), 1751-1900 tracked (6 windows of 25 generator steps, evaluations every 5).
Chosen for convergence and cost only, before any coupling number was read: the former quick settings (150
iterations, all tracked, hidden 32, 1 D step, lr 2e-3) met the convergence rule in none of seeds 0-2 (2-4 modes,
3-7% of samples on a mode; hidden 32 with 1 D step stays diffuse, ≤ 21% on a mode, to 2000 iterations); in bare
runs of seeds 0-5 at the full rates the samples sharpen by iteration 1500 and modes are then dropped and regained
(at 2000 5 of 6 seeds met the rule, at 3000 3 of 6), while with the rates × 0.2 from 1500 on 5 of 6 met it at 1700
and all six at 1900 and 2100. Adam's state from the warm-up is the ledgers' rest: with β1 = 0.5 it is booked
within the first ~10 tracked steps (the first window), about 10% of G's and 14% of D's change over the tracked span
(norms, seed 1), and the ledgers stay exact (relative residual ≤ 1e-7). The full settings track
from θ₀ (no warm-up, constant rates). Quick: about 2.5 min on one CPU core (3 seeds, each with its null model).

Writes ``gan_ring2d.png`` (overview), ``gan_ring2d_coupling.png`` (coupling matrices, measured
beside control on one scale, for both groupings, and every window's statistics) and
``gan_ring2d.json``; ``--mixture grid`` writes the same as ``gan_grid2d*``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from genkernel.data import gaussian_grid, gaussian_ring, grid_mode_centers, ring_mode_centers
from genkernel.gan import (
    LOSSES, GANKernelAnalyzer, GANTrainer, GeneratorLoss, MLPDiscriminator, MLPGenerator, frozen, mode_coverage, push_field,
)
from genkernel.gan.metrics import converged, pooled_interval
from genkernel.plotting.arrays import float_array
from genkernel.stats import MIN_PROBE_GROUPS, Interval, few_units, mean_interval, two_way_interval

from .. import common

NAME = "gan_ring2d"
DTYPE = torch.float64
RESIDUAL_LIMIT = 1e-3
FIELD_LIMIT = 0.5  # distribution_guided: mean cosine above this
FORMULA_LIMIT = 0.99
# one run's evaluation steps are not independent replicates of a finding about the steps: D's field and G's kernel
# change slowly, so the steps share one direction, and a generator independent of D follows D's field by chance
# (cos > FIELD_LIMIT in 2 of 6 seeds of the 2-D null model in tests/test_gan_claims.py)
NULL_NOT_RUN_WHY = ("the null model was not run (--null-model): a generator independent of D follows D's field by "
                    "chance in about a third of runs, so only the paired comparison with it can show that D guides the steps")
ONE_RUN_WHY = ("one run: its evaluation steps are not independent (they share D's field), and a generator independent "
               "of D follows that field by chance in about a third of 2-D runs; run several seeds (--seeds)")


def settings_for(mode: str) -> dict:
    """The settings of ``mode`` (full, quick or smoke)."""
    return common.pick(
        mode,
        full=dict(iterations=3000, d_steps=2, hidden=64, depth=3, batch=128, probes=64, window=150, eval_every=15, lr=1e-3,
                  n_data=8192, controls=4, null_model=True, quadrature="midpoint", seeds=3, warmup=0, lr_decay=None),
        # quick: the full networks and rates for 1500 iterations, to where the samples have sharpened onto the modes,
        # then both learning rates × 0.2 (which stops the modes being dropped and regained); the first 1750 iterations
        # untracked (a bare step's cost), the last 150 tracked (6 windows); chosen for convergence and cost only (see
        # the module docstring)
        quick=dict(iterations=1900, d_steps=2, hidden=64, depth=3, batch=64, probes=64, window=25, eval_every=5, lr=1e-3,
                   n_data=4096, controls=2, null_model=True, quadrature="simpson", seeds=3, warmup=1750, lr_decay=(1500, 0.2)),
        smoke=dict(iterations=6, d_steps=1, hidden=8, depth=2, batch=16, probes=8, window=3, eval_every=1, lr=2e-3, n_data=256,
                   controls=1, null_model=False, quadrature="midpoint", seeds=1, warmup=0, lr_decay=None),
    )


MODE_STD = 0.05  # both mixtures' mode standard deviation
EXTENT = 3.0  # plot and discriminator-probe half-width: the ring's radius 2 and the grid's ±2 with room around


def make_data(mixture: str, n: int, seed: int):
    """``(points [n, 2], mode labels [n], mode centres, mode std, plot extent)`` of the ring or grid mixture."""
    if mixture == "ring":
        data, modes = gaussian_ring(n, num_modes=8, radius=2.0, std=MODE_STD, seed=seed)
        return data, modes, ring_mode_centers(8, 2.0), MODE_STD, EXTENT
    data, modes = gaussian_grid(n, side=5, spacing=1.0, std=MODE_STD, seed=seed)
    return data, modes, grid_mode_centers(5, 1.0), MODE_STD, EXTENT


def convergence_rule(num_modes: int) -> str:
    """The convergence rule (:func:`genkernel.gan.metrics.converged`) in words for ``num_modes`` modes:
    the mode count it needs is its own (19 of the grid's 25, 6 of the ring's 8), not a copy of it."""
    quality = converged.__kwdefaults__["quality"]
    need = next(h for h in range(num_modes + 1) if converged({"modes_hit": h, "num_modes": num_modes, "quality_share": 1.0})[0])
    return (f"at least {need} of {num_modes} modes hit and {100 * quality:.0f}% of the samples within 3σ of a mode "
            "at the end")


# =============================================================================================
# The protocol both GAN recipes share (gan_digits imports it): arguments, seeds, null model,
# resumable runs, aggregation, claims.
# =============================================================================================
def add_gan_arguments(parser) -> None:
    """Adds the options the GAN recipes share (defaults: the mode's settings); returns nothing."""
    common.add_seed_arguments(parser)
    parser.add_argument("--controls", type=int, default=None, help="label-permutation controls per grouping (default: the mode's)")
    parser.add_argument("--null-model", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the null model per seed (G against a fixed random D; default: on in quick and full mode)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resumable runs: trainer + analyzer checkpoints every window in DIR/seed_S (rerun to continue)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="time a few bare and tracked iterations on --device and print the expected wall time; train nothing")


def apply_gan_overrides(settings: dict, args) -> dict:
    """Writes the options of :func:`add_gan_arguments` that were given into ``settings``; returns it."""
    if args.controls is not None:
        if args.controls < 1:
            raise SystemExit(f"--controls must be >= 1 (the coupling claims compare with permutation controls), got {args.controls}")
        settings["controls"] = args.controls
    if args.null_model is not None:
        settings["null_model"] = args.null_model
    return settings


def run_protocol(name: str, args, s: dict, spec: dict) -> dict:
    """Runs ``spec["run"](args, s, seed, null, run_dir) -> run`` for every seed (and the null model when
    ``s["null_model"]``), writing ``RUNS/seed_S.json`` (``null_S.json``) when a runs folder is in use,
    or with ``--aggregate`` reads them; then ``spec["write"](name, args, s, timer, runs, nulls)``.
    ``--estimate-only``: ``spec["estimate"](args, s, seeds)``. Returns the JSON payload."""
    timer = common.Timer()
    # Without --seeds, the mode's own number of independent runs from --seed on: the findings about
    # the steps rest on seeds (ONE_RUN_WHY), so the quick figures are made over three.
    seeds = common.recipe_seeds(args, s)
    if args.estimate_only:
        return spec["estimate"](name, args, s, seeds)
    runs_dir = common.runs_folder(name, args)
    runs, nulls = [], []
    if args.aggregate:
        # only files of this mode and these settings, the --seeds named (common.read_seed_runs)
        runs = common.read_seed_runs(runs_dir, args, s)
        nulls = common.read_seed_runs(runs_dir, argparse.Namespace(mode=args.mode, seeds=[r["seed"] for r in runs]), s,
                                      prefix="null", missing_ok=True)
    else:
        for seed in seeds:
            for null in ([False, True] if s["null_model"] else [False]):
                run_dir = None
                if args.checkpoint_dir is not None:
                    run_dir = Path(args.checkpoint_dir) / f"{'null' if null else 'seed'}_{seed}"
                run = spec["run"](args, s, seed, null, run_dir)
                (nulls if null else runs).append(run)
                if runs_dir is not None:
                    Path(runs_dir).mkdir(parents=True, exist_ok=True)
                    path = Path(runs_dir) / f"{'null' if null else 'seed'}_{seed}.json"
                    common.write_json(path, common._clean({**run, "settings": s, "mode": args.mode}))
    return spec["write"](name, args, s, timer, runs, nulls)


def train_resumable(trainer: GANTrainer, iterations: int, run_dir: Path | None) -> tuple[bool, float]:
    """Trains to ``iterations``, resuming from ``run_dir/checkpoint.pt`` when it exists (the trainer saves
    one every window); returns ``(resumed, seconds this process trained)``."""
    resumed = run_dir is not None and (run_dir / "checkpoint.pt").is_file()
    t0 = time.perf_counter()
    trainer.train(iterations, resume=run_dir is not None)
    if run_dir is not None:
        trainer.save_checkpoint(run_dir / "checkpoint.pt")
    return resumed, time.perf_counter() - t0


def report_for_run(report: dict) -> dict:
    """The parts of ``analyzer.report()`` a run keeps (claims and figures read them)."""
    keep = ("generator_steps", "discriminator_steps", "grouping", "comparison", "group_labels", "controls", "loop_steps",
            "windows", "alignment", "coverage", "notes", "discriminator")
    out = {k: report[k] for k in keep if k in report}
    out["generator"] = {k: v for k, v in report["generator"].items() if k != "coupling_whole_run"}
    return out


COUPLING_KEYS = ("traffic_matrix", "traffic_matrix_control", "net_matrix", "net_matrix_control")
WINDOW_PARTITIONS = ("geometry", "spatial", "geometry_minus_spatial")  # the window panels' series


def drawn_numbers(runs: list[dict]) -> dict:
    """The numbers the figures draw from every seed (``OUT/NAME.json`` held seed 0's windows only while the
    coupling matrices and window panels draw every window of every seed): ``{"seeds", "coupling_matrices":
    {partition: {key: [G, G] mean over every window of every seed}}, "window_statistics": [per seed [{"steps",
    kind: {"geometry", "spatial", "geometry_minus_spatial"}}]]}``, kind "traffic" and "net": the geometry and
    spatial partitions' interaction − control and their difference, each with its interval, as the panels draw them.
    Both GAN recipes' coupling figures and window panels (genkernel.plotting.gan) draw these."""
    from genkernel.plotting.gan import average_window_matrices

    def stat(window: dict, partition: str, kind: str):
        stats = window.get("statistics") or {}
        if partition == "geometry_minus_spatial":
            return (stats.get(partition) or {}).get(kind)
        return ((stats.get(partition) or {}).get(kind) or {}).get("interaction_minus_control")

    windows = [r["report"]["windows"] for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "coupling_matrices": {partition: {key: average_window_matrices(windows, partition, key) for key in COUPLING_KEYS}
                              for partition in ("geometry", "spatial")},
        "window_statistics": [[{"steps": w["steps"], **{kind: {p: stat(w, p, kind) for p in WINDOW_PARTITIONS}
                                                         for kind in ("traffic", "net")}} for w in ws] for ws in windows],
    }


def estimate_wall_time(name: str, args, s: dict, seeds: Sequence[int], build: Callable) -> dict:
    """``--estimate-only``: times ``n`` bare and ``n`` tracked iterations of these settings on
    ``--device`` (``build(analyzed) -> trainer``) and prints the expected wall time (tracked rate
    for every tracked iteration, bare rate for the untracked warm-up ``s["warmup"]``, twice with the
    null model; figures and imports not counted)."""
    from ..benchmarks.harness import synced_seconds

    device = args.torch_device
    n = 3 if args.mode == "smoke" else 10
    rates = {}
    for analyzed in (False, True):
        trainer = build(analyzed)
        trainer.train(2)  # (train(k) trains up to iteration k: the n timed iterations are 3..2 + n)
        rates["tracked" if analyzed else "bare"] = synced_seconds(device, lambda: trainer.train(2 + n)) / n
    warmup = int(s.get("warmup", 0))  # untracked iterations before the tracked span: the bare rate
    per_seed = ((s["iterations"] - warmup) * rates["tracked"] + warmup * rates["bare"]) * (2 if s["null_model"] else 1)
    result = {"device": str(device), "bare_iteration_s": rates["bare"], "tracked_iteration_s": rates["tracked"],
              "expected_s_per_seed": per_seed, "expected_s_total": per_seed * len(seeds), "seeds": list(seeds),
              "null_model": s["null_model"], "threads": torch.get_num_threads(),
              "note": "tracked iterations at the tracked rate, the untracked warm-up at the bare rate (x2 with the null "
                      "model); figures and imports not counted"}
    print(f"[{name}] {device}: bare iteration {rates['bare']:.3g} s, tracked {rates['tracked']:.3g} s -> about "
          f"{per_seed / 60:.1f} min per seed, {per_seed * len(seeds) / 60:.1f} min for {len(seeds)} seed(s)")
    return result


# -- claims ------------------------------------------------------------------------------------
def _alignment(runs: Sequence[dict], value: Callable[[dict], float]) -> tuple[Interval, str]:
    """One run: Student t over its evaluation steps (within one run; not independent). Several: over
    the runs' (seeds') means."""
    if len(runs) == 1:
        return mean_interval(_step_values(runs[0], value)), "evaluation steps of one run (not independent: read as descriptive)"
    return common.over_seeds([_run_mean(r, value) for r in runs]), f"{len(runs)} seeds"


def _step_values(run: dict, value: Callable[[dict], float]) -> np.ndarray:
    """``value`` at each of the run's evaluation steps."""
    return float_array([value(row) for row in run["report"]["alignment"]])


def _run_mean(run: dict, value: Callable[[dict], float]) -> float:
    """The run's mean of ``value`` over its evaluation steps (a seed's unit in the intervals over seeds)."""
    return float(np.nanmean(_step_values(run, value)))


def _beyond_null(runs: Sequence[dict], nulls: Sequence[dict], value: Callable[[dict], float]) -> Interval | None:
    """Student t over seeds of (run's mean over its evaluation steps − the null model's of the same
    seed); None with fewer than two seeds paired."""
    null_of = {n["seed"]: n for n in nulls}
    pairs = [(r, null_of[r["seed"]]) for r in runs if r["seed"] in null_of]
    if len(pairs) < 2:
        return None
    return common.over_seeds([_run_mean(run, value) - _run_mean(null, value) for run, null in pairs])


def _window_entry(result: dict | None) -> dict | None:
    if result is None:
        return None
    estimate = result.get("difference", result.get("estimate"))
    interval = result.get("interval", [result.get("low"), result.get("high")])
    return {"value": estimate, "interval": interval, "n": result.get("n"), "held": result.get("held")}


def pooled_two_way_interval(values: Sequence[Sequence[float | None]], clusters: Sequence[Sequence[int]],
                            other_clusters: Sequence[Sequence[int]]) -> Interval:
    """:func:`~genkernel.gan.metrics.pooled_interval` of per-probe values pooled over windows, clustered by two crossed
    groupings at once (:func:`~genkernel.stats.two_way_interval`, as the analyzer's window interval of geometry minus
    spatial: a probe's difference shares its geometry group's source columns and its spatial group's). Each grouping
    is fitted once, so a label means the same region in every window."""
    pooled_interval(values, clusters)  # (its checks: the windows pair up value by label)
    pooled_interval(values, other_clusters)
    flat = np.asarray([np.nan if v is None else float(v) for row in values for v in row], dtype=np.float64)
    first = np.asarray([int(c) for row in clusters for c in row])
    second = np.asarray([int(c) for row in other_clusters for c in row])
    return two_way_interval(flat, first, second)


def coupling_numbers(run: dict, kind: str) -> dict:
    """One run's coupling statistics for ``kind`` ("traffic" or "net"), every full window pooled
    (per-probe values, clustered by probe group: the grouping is fitted once, so a group id means
    the same region in every window; geometry minus spatial by both groupings, as the analyzer's
    window interval), and each window's own numbers."""
    geo_v, geo_c, sp_v, sp_c, diff_v, diff_c, diff_s = [], [], [], [], [], [], []
    per_window = []
    for w in run["report"]["windows"]:
        stats = w.get("statistics") or {}
        geometry = stats["geometry"]
        geo = geometry[kind]
        geo_v.append(geo["per_probe"]["interaction_minus_control"])
        geo_c.append(geometry["probe_groups"])
        entry = {"steps": w["steps"], "collapsed": w["collapsed"], "kappa_median": w.get("kappa_median"),
                 "geometry": _window_entry(geo["interaction_minus_control"])}
        if "spatial" in stats:
            spatial = stats["spatial"]
            sp_v.append(spatial[kind]["per_probe"]["interaction_minus_control"])
            sp_c.append(spatial["probe_groups"])
            diff_v.append(stats["geometry_minus_spatial"][kind]["per_probe"])
            diff_c.append(geometry["probe_groups"])  # this window's clusters: windows without "spatial" add none
            diff_s.append(spatial["probe_groups"])
            entry["spatial"] = _window_entry(spatial[kind]["interaction_minus_control"])
            entry["geometry_minus_spatial"] = _window_entry(stats["geometry_minus_spatial"][kind])
        if "coverage" in w:
            entry["modes_hit"] = w["coverage"]["modes_hit"]
        per_window.append(entry)
    return {
        "geometry": pooled_interval(geo_v, geo_c),
        "spatial": pooled_interval(sp_v, sp_c) if sp_v else None,
        # (two-way clustered as the analyzer's: clustered by geometry group alone, the pooled difference held 11.9 % of
        # null windows at a nominal 2.5 %, genkernel.stats.two_way_interval)
        "difference": pooled_two_way_interval(diff_v, diff_c, diff_s) if diff_v else None,
        "per_window": per_window,
        "kappa_median": float(np.nanmedian(float_array([w.get("kappa_median") for w in run["report"]["windows"]])))
        if run["report"]["windows"] else math.nan,
    }


def _combine(runs_numbers: list[dict], key: str) -> Interval | None:
    """One run: its pooled interval; several: Student t over the runs' pooled estimates."""
    values = [n[key] for n in runs_numbers]
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        return values[0]
    return common.over_seeds([v.estimate for v in values])


def _tool_check_held(interval: Interval, limit: float) -> bool:
    """A tool check's verdict: the interval's lower end above ``limit``, or, where its values are all the same
    (at least two, no spread: :func:`~genkernel.stats.mean_interval` leaves the interval undefined), that value
    above ``limit``. An exact ledger at a small learning rate gives every seed's mean cosine as exactly 1.0,
    which the interval rule alone read as not held."""
    if interval.defined:
        return interval.above(limit)
    return interval.n >= 2 and math.isfinite(interval.estimate) and interval.estimate > limit


def _units_ok(interval: Interval | None, seeds: int) -> bool:
    """A within-run interval needs as many probe groups as the analyzer's window claims
    (:func:`~genkernel.stats.few_units` with ``MIN_PROBE_GROUPS``: over three groups the interaction claim held 4-5 % of
    null runs at a nominal 2.5 %); over seeds, two seeds suffice."""
    if interval is None:
        return False
    return seeds > 1 or bool(few_units({"n": interval.n, "held": True}, minimum=MIN_PROBE_GROUPS)["held"])


def claim_core(runs: Sequence[dict], *, grouping_word: str, require_convergence: bool = True) -> dict:
    """The numbers and verdicts of every claim on ``runs`` (several seeds or one), before baselines:
    ``{key: {"held", "measured", "why", "interval", "value", ...}}``. Used for the runs and, with
    ``require_convergence=False``, for the null model."""
    out: dict[str, dict] = {}
    reports = [r["report"] for r in runs]
    # np.max: a NaN (or null, read back) residual makes the worst NaN, not held; max() skipped a NaN not first
    worst = float(np.max(np.asarray([[rep["generator"]["relative_residual"], rep["discriminator"]["relative_residual"]]
                                     for rep in reports], dtype=np.float64)))
    out["exact_ledger"] = {"held": worst < RESIDUAL_LIMIT, "value": worst, "interval": None}
    formula, units = _alignment(runs, lambda row: row["cos_formula"])
    out["formula_matches_each_step"] = {"held": _tool_check_held(formula, FORMULA_LIMIT), "interval": formula, "units": units}
    if not formula.defined and formula.n >= 2:
        out["formula_matches_each_step"]["no_spread"] = (
            f"every one of the {formula.n} values is {formula.estimate!r} (no spread: the Student-t interval is undefined); "
            "a tool check exact by construction is held when that value is above the limit")
    field, units = _alignment(runs, lambda row: row["cos_kernel_field"])
    several = len(runs) > 1  # the findings about the steps rest on seeds (ONE_RUN_WHY)
    out["distribution_guided"] = {"held": several and field.above(FIELD_LIMIT), "interval": field, "units": units}
    smoothing, units = _alignment(runs, lambda row: row["cos_kernel_field"] - row["cos_local_push"])
    local, _ = _alignment(runs, lambda row: row["cos_local_push"])
    # Only a step that follows D's field at all can follow its smoothed version better than its local push: a
    # generator independent of D shares G's kernel with the field, which alone favours the smoothed field.
    out["kernel_smoothing_matters"] = {"held": several and smoothing.above(0.0) and field.above(FIELD_LIMIT),
                                       "interval": smoothing, "units": units, "local": local}
    if not several:
        for name in ("distribution_guided", "kernel_smoothing_matters"):
            out[name]["why_not_held"] = ONE_RUN_WHY
    conv = [r.get("convergence") or {"converged": False, "why": "no coverage recorded"} for r in runs]
    not_converged = [f"seed {r['seed']}: {c['why']}" for r, c in zip(runs, conv) if not c["converged"]]
    # A claim about a trained GAN rests on the seeds that converged (a rule on coverage, fixed before any
    # coupling number is read); the others are listed. None converged: not measured.
    used = [r for r, c in zip(runs, conv) if c["converged"]] if require_convergence else list(runs)
    coupled = used or list(runs)
    seeds = len(coupled)
    for kind in ("traffic", "net"):
        numbers = [coupling_numbers(r, kind) for r in coupled]
        geo, spatial, diff = (_combine(numbers, k) for k in ("geometry", "spatial", "difference"))
        enough = _units_ok(geo, seeds) and _units_ok(diff, seeds)
        held = bool(enough and geo.above(0.0) and diff is not None and diff.above(0.0))
        entry = {"held": held, "interval": diff, "geometry": geo, "spatial": spatial,
                 "per_window": numbers[0]["per_window"] if seeds == 1 else [n["per_window"] for n in numbers],
                 "kappa_median": float(np.nanmedian([n["kappa_median"] for n in numbers])),
                 "units": (f"{seeds} seeds" if seeds > 1 else
                           f"{grouping_word} groups of one run, every window pooled (clustered by probe group)")}
        if not enough:
            entry["why_not_held"] = (f"fewer than {MIN_PROBE_GROUPS} probe groups carry the statistic (too few independent "
                                     "units)"
                                     if seeds == 1 else "a statistic is missing")
        entry["seeds_used"] = [r["seed"] for r in coupled]
        if require_convergence and not_converged:
            if used:
                entry["seeds_excluded"] = not_converged
            else:
                entry.update(measured=False, why="the GAN has not converged: " + "; ".join(not_converged))
        out[f"coupling_{kind}"] = entry
    return out


def gan_claims(runs: Sequence[dict], nulls: Sequence[dict] = (), *, key: str = "own_mode", grouping_word: str = "pushed-to mode",
               spatial_word: str = "nearest mode", require_convergence: bool = True) -> dict:
    """The claims section from the runs (one per seed) and, when run, the null model's runs: each claim
    with statistic, baseline, value, interval, held (or measured: false and why). A claim whose rule
    also holds on the null model is reported not held (``null_model_also_held``); the two step claims
    must also lie above the null model paired by seed (``beyond_null``)."""
    core = claim_core(runs, grouping_word=grouping_word, require_convergence=require_convergence)
    null = claim_core(nulls, grouping_word=grouping_word, require_convergence=False) if nulls else None
    null_what = "null model: G trained against a fixed random discriminator (independent of D), same seeds and steps"
    not_run = "null model not run at these settings (--null-model); tests/test_gan_claims.py checks this claim's code on one"

    def null_baseline(name: str, value_of: Callable[[dict], Any], interval_of: Callable[[dict], Any]) -> dict:
        if null is None:
            return common.baseline(None, not_run)
        return common.baseline(value_of(null[name]), null_what, interval_of(null[name]), held_on_null=null[name]["held"])

    def verdict(name: str, value: Callable[[dict], float] | None = None) -> tuple[bool, dict]:
        """The claim's rule on the runs; with the null model run, also not held on it and, for the
        step claims (``value``: the per-step statistic), above it paired by seed."""
        held = core[name]["held"]
        extra = {"why_not_held": core[name]["why_not_held"]} if core[name].get("why_not_held") else {}
        if null is None:
            if value is not None and held:  # its second half ("a generator independent of D does not") is untested
                return False, {"measured": False, "why": NULL_NOT_RUN_WHY}
            return held, extra
        if null[name]["held"]:
            return False, {"null_model_also_held": True}
        if value is not None:
            beyond = _beyond_null(runs, nulls, value)
            extra.update(beyond_null=None if beyond is None else beyond.estimate,
                         beyond_null_interval=None if beyond is None else [beyond.low, beyond.high])
            if beyond is None or not beyond.above(0.0):
                held = False
                extra.setdefault("why_not_held", "not above the null model paired by seed" if beyond is not None
                                 else "fewer than 2 seeds paired with the null model: run several seeds (--seeds)")
        return held, extra

    claims = {}
    ledger = core["exact_ledger"]
    claims["exact_ledger"] = common.claim(
        f"the contributions add up to the real change of G and of D (relative residual < {RESIDUAL_LIMIT:g}, worst seed)",
        ledger["held"], ledger["value"], (ledger["value"], ledger["value"]),
        statistic="worst relative residual ‖R‖/‖Δf‖ over the G and D ledgers and seeds",
        baseline=common.baseline(1.0, "no ledger: predicting no change"), kind="tool_check",
        generator=[r["report"]["generator"]["relative_residual"] for r in runs],
        discriminator=[r["report"]["discriminator"]["relative_residual"] for r in runs],
    )
    formula = core["formula_matches_each_step"]
    # every value the same (no spread): the interval is that one value, as exact_ledger's is its worst seed's
    no_spread = {"no_spread": formula["no_spread"], "n": formula["interval"].n, "method": "no spread (every value equal)"} \
        if "no_spread" in formula else {}
    claims["formula_matches_each_step"] = common.claim(
        f"each step's ΔG(z') equals the ledger's kernel machine (optimizer weights): mean cosine > {FORMULA_LIMIT}",
        formula["held"], formula["interval"].estimate,
        (formula["interval"].estimate,) * 2 if no_spread else formula["interval"],
        statistic="mean cosine between each evaluated step's ΔG(z') and the ledger's Σ_g C + rest",
        baseline=common.baseline(None, "holds by construction of the ledger: a check of the tool, not a finding"),
        kind="tool_check", units=formula["units"], **no_spread,
    )
    field = core["distribution_guided"]
    held, extra = verdict("distribution_guided", lambda row: row["cos_kernel_field"])
    claims["distribution_guided"] = common.claim(
        "each generator step follows the discriminator's kernel-smoothed gradient field −Σ_i c_i K_G(z', z_i) w_i "
        f"(mean cosine with ΔG(z') > {FIELD_LIMIT}), and a generator independent of D does not",
        held, field["interval"].estimate, field["interval"],
        statistic="mean over evaluation steps of cos(ΔG(z'), −Σ_i c_i K_G(z', z_i) w_i), w from D",
        baseline=null_baseline("distribution_guided", lambda c: c["interval"].estimate, lambda c: c["interval"]),
        kind="finding", units=field["units"], **extra,
    )
    smooth = core["kernel_smoothing_matters"]
    held, extra = verdict("kernel_smoothing_matters", lambda row: row["cos_kernel_field"] - row["cos_local_push"])
    claims["kernel_smoothing_matters"] = common.claim(
        "the kernel-smoothed field predicts the step's direction better than the probe's own local push −w(z'), in steps "
        f"that follow the field (distribution_guided's cosine > {FIELD_LIMIT})",
        held, smooth["interval"].estimate, smooth["interval"],
        statistic="mean over evaluation steps of cos(ΔG, field) − cos(ΔG, −w(z'))",
        # the baseline is this statistic on the null model (a difference of cosines, as the value): the local
        # push's own cosine, a different statistic, was shown here and read as the bar the value failed to reach
        baseline=null_baseline("kernel_smoothing_matters", lambda c: c["interval"].estimate, lambda c: c["interval"]),
        kind="finding", units=smooth["units"], local_push=smooth["local"].estimate,
        local_push_interval=[smooth["local"].low, smooth["local"].high], **extra,
    )
    for kind, what in (("traffic", "traffic"), ("net", "net share")):
        c = core[f"coupling_{kind}"]
        held, extra = verdict(f"coupling_{kind}")
        diff, geo, spatial = c["interval"], c["geometry"], c["spatial"]
        base = common.baseline(
            None if spatial is None else spatial.estimate,
            f"spatial grouping of the same size ({spatial_word}, ignores D): interaction − control", spatial)
        if null is not None:
            nc = null[f"coupling_{kind}"]
            base["null_model"] = {"value": None if nc["interval"] is None else nc["interval"].estimate,
                                  "interval": None if nc["interval"] is None else [nc["interval"].low, nc["interval"].high],
                                  "held": nc["held"], "what": null_what}
        statement = (f"a probe's correction ({what}) comes more from its own {grouping_word} group than the other probe groups' "
                     "corrections do (interaction statistic), beyond label-permutation controls on the same steps and beyond "
                     f"a {spatial_word} grouping of the same size on the same steps; every window, intervals clustered by "
                     "probe group (the difference by both groupings' probe groups; over seeds with several), on the "
                     "seeds whose GAN converged"
                     + ("; read with κ" if kind == "net" else ""))
        stat = f"{what}: (geometry interaction − control) − (spatial interaction − control), every window pooled"
        kw = dict(statistic=stat, baseline=base, kind="finding", units=c["units"],
                  geometry_minus_control=None if geo is None else geo.estimate,
                  geometry_minus_control_interval=None if geo is None else [geo.low, geo.high],
                  geometry_minus_control_n=None if geo is None else geo.n,
                  per_window=c["per_window"], kappa_median=c["kappa_median"], **extra)
        for extra_key in ("why_not_held", "seeds_used", "seeds_excluded"):
            if c.get(extra_key):
                kw[extra_key] = c[extra_key]
        value = None if diff is None else diff.estimate
        if c.get("measured") is False:
            claims[f"{key}_coupling_{kind}"] = common.claim(statement, False, value, diff, measured=False, why=c["why"], **kw)
        else:
            claims[f"{key}_coupling_{kind}"] = common.claim(statement, held, value, diff, **kw)
    return claims


# =============================================================================================
# The ring / grid experiment
# =============================================================================================
def tracked_steps(s: dict) -> tuple[int, int] | None:
    """The analyzer's ``track_steps``: iterations ``warmup + 1 .. iterations`` (None: every one, ``warmup`` 0).
    The warm-up's iterations run untracked (a bare step's cost); Adam's state from them is the ledgers' rest."""
    warmup = int(s.get("warmup", 0))
    if not 0 <= warmup < s["iterations"]:
        raise ValueError(f"warmup ({warmup}) must lie in [0, iterations = {s['iterations']}): the tracked span would be empty")
    if (s["iterations"] - warmup) % s["window"]:
        raise ValueError(f"iterations − warmup ({s['iterations'] - warmup}) must be a multiple of window ({s['window']}): "
                         "the last window would be partial and left out of the coupling claims")
    return None if warmup == 0 else (warmup + 1, int(s["iterations"]))


def build(args, s: dict, seed: int, *, null: bool, analyzed: bool = True, run_dir: Path | None = None):
    """``(trainer, analyzer or None, context)`` for one run of ``seed``; ``null``: G trains against a
    fixed random discriminator (never trained, independent of D) while D trains as usual and supplies
    the geometry (``geometry_loss``)."""
    device = args.torch_device
    data, modes, centers, std, extent = make_data(args.mixture, s["n_data"], seed)
    batch = max(s["batch"], 2 * centers.shape[0])  # every mode group can be filled (25 on the grid)
    torch.manual_seed(seed)
    G = MLPGenerator(2, 2, hidden=s["hidden"], depth=s["depth"]).to(device, DTYPE)
    D = MLPDiscriminator(2, hidden=s["hidden"], depth=s["depth"], spectral_norm=args.spectral_norm).to(device, DTYPE)
    gen = torch.Generator().manual_seed(seed + 1)
    probes = torch.randn(s["probes"], 2, generator=gen, dtype=DTYPE).to(device)
    axis = torch.linspace(-extent, extent, 8, dtype=DTYPE)
    analyzer = None
    if analyzed:
        analyzer = GANKernelAnalyzer(
            G, D, probes, grouping="mode", comparison="nearest_mode", mode_centers=centers, mode_std=std,
            controls=s["controls"], window=s["window"], eval_every=s["eval_every"],
            field_snapshots="all",  # (2-D probes: a few KiB each; the figure picks the one nearest 40% of the span)
            discriminator_probes=torch.cartesian_prod(axis, axis).to(device), discriminator_groups="role_mode",
            quadrature=s["quadrature"], seed=seed, geometry_loss=GeneratorLoss(D, args.loss) if null else None,
            track_steps=tracked_steps(s),
        )
    trainer = GANTrainer(
        G, D, data.to(device, DTYPE), labels=modes, loss=args.loss, batch_size=batch, lr_g=s["lr"], lr_d=s["lr"], d_steps=s["d_steps"],
        lr_scheduler_g=common.lr_decay_schedule(s), lr_scheduler_d=common.lr_decay_schedule(s, s["d_steps"]),
        callbacks=[analyzer] if analyzer is not None else [], seed=seed, progress=args.mode == "full",
        checkpoint_dir=run_dir, checkpoint_every=s["window"] if run_dir is not None else 0,
    )
    if null:
        torch.manual_seed(seed + 10_000)
        fixed = MLPDiscriminator(2, hidden=s["hidden"], depth=s["depth"]).to(device, DTYPE).requires_grad_(False)
        trainer.g_loss = GeneratorLoss(fixed, args.loss)  # G's steps ignore D
    show = torch.randn(512, 2, generator=gen, dtype=DTYPE).to(device)
    return trainer, analyzer, {"data": data, "centers": centers, "std": std, "extent": extent, "show": show}


def run_seed(args, s: dict, seed: int, null: bool, run_dir: Path | None) -> dict:
    """One independent run (or its null model): the analyzer's report, coverage, convergence, timing and
    what the figures draw, JSON-ready."""
    timer = common.Timer()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer, analyzer, ctx = build(args, s, seed, null=null, run_dir=run_dir)
    centers, std, extent = ctx["centers"], ctx["std"], ctx["extent"]
    start_samples = trainer.sample(ctx["show"]).cpu()
    resumed, train_s = train_resumable(trainer, s["iterations"], run_dir)
    report = analyzer.report()
    end_samples = trainer.sample(ctx["show"]).cpu()
    grid_axis = torch.linspace(-extent, extent, 21, dtype=DTYPE)
    grid = torch.cartesian_prod(grid_axis, grid_axis).to(args.torch_device)
    with frozen(trainer.discriminator):
        push = push_field(GeneratorLoss(trainer.discriminator, args.loss), grid).cpu()
    coverage_end = mode_coverage(end_samples, centers, std)
    ok, why = converged(coverage_end)
    # Fields at the evaluation step nearest 40% of the tracked span (a fixed rule, where samples have spread out).
    target = 0.4 * analyzer.fields[-1]["step"]
    snap = min(analyzer.fields, key=lambda f: abs(f["step"] - target))
    return common._clean({
        "seed": seed, "null": null, "resumed": resumed, "report": report_for_run(report),
        "coverage_start": mode_coverage(start_samples, centers, std), "coverage_end": coverage_end,
        "convergence": {"converged": ok, "why": why},
        "losses": {"d_final": trainer.history["d_loss"][-1], "g_final": trainer.history["g_loss"][-1]},
        "timing": {"train_s": train_s, "total_s": timer.seconds, "seconds_per_iteration": train_s / max(1, s["iterations"])},
        "figure": {"grid": grid.cpu(), "push": push, "real": ctx["data"][:1000], "end_samples": end_samples,
                   "snapshot": {k: snap[k] for k in ("step", "x", "w", "field")}},
    })


def write_outputs(name: str, args, s: dict, timer, runs: list[dict], nulls: list[dict]) -> dict:
    """Claims from the runs, both figures over every seed, and OUT/NAME.json; returns the payload."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import coupling_figure

    _, _, centers, _, extent = make_data(args.mixture, 8, 0)
    claims = gan_claims(runs, nulls)
    labels = runs[0]["report"]["group_labels"]
    spatial_labels = [f"n{m}" for m in range(len(labels))]
    windows = [r["report"]["windows"] for r in runs]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    coupling = coupling_figure(windows, labels, spatial_labels, title=f"{name}: coupling by pushed-to mode and by nearest mode",
                               seeds=[r["seed"] for r in runs])
    coupling.savefig(out / f"{name}_coupling.png", dpi=50 if args.mode == "smoke" else 110)
    plt.close(coupling)
    first = runs[0]
    results = {
        "seeds": [r["seed"] for r in runs],
        "what_ran": (f"{args.mode} settings, {len(runs)} seed(s) {[r['seed'] for r in runs]}, {s['iterations']} iterations"
                     + (f" (the first {s['warmup']} untracked, iterations {s['warmup'] + 1}-{s['iterations']} tracked)"
                        if s.get("warmup") else "")
                     + (f", learning rates × {s['lr_decay'][1]:g} from iteration {s['lr_decay'][0]}" if s.get("lr_decay") else "")
                     + ", "
                     f"windows of {s['window']} generator steps, {s['controls']} permutation controls per grouping, null model "
                     f"{'run' if nulls else 'not run'}"),
        "generator": first["report"]["generator"],
        "discriminator": first["report"]["discriminator"],
        "windows": first["report"]["windows"],
        # what the coupling figure and the overview's window panel draw: every seed, not seed 0's alone
        "drawn_over_seeds": drawn_numbers(runs),
        "alignment": first["report"]["alignment"],
        "coverage": first["report"]["coverage"],
        # what the overview's coverage panel draws: one line per seed (the entry above is seed 0's alone)
        "coverage_per_seed": [{"seed": r["seed"], "coverage": r["report"]["coverage"]} for r in runs],
        # what the overview's top row draws (seed 0): D's push −w on the grid at the end with the real and generated
        # samples scattered over it and the mode centres, and at the snapshot step the probes' samples x with their raw
        # push −w and the kernel-smoothed field (arrows: unit directions; colour: log10 |w|)
        "drawn_fields": {"seed": first["seed"], "grid": first["figure"]["grid"], "push": first["figure"]["push"],
                         "real": first["figure"]["real"], "end_samples": first["figure"]["end_samples"],
                         "centers": centers, "snapshot": first["figure"]["snapshot"]},
        "coverage_start": first["coverage_start"],
        "coverage_end": first["coverage_end"],
        "convergence": [dict(seed=r["seed"], **r["convergence"]) for r in runs],
        "group_labels": labels,
        "losses": first["losses"],
        "runs": [{k: r[k] for k in ("seed", "resumed", "coverage_end", "convergence", "losses", "timing")} for r in runs],
        "null_runs": [{k: r[k] for k in ("seed", "coverage_end", "losses", "timing")} for r in nulls],
        "timing": first["timing"],
    }
    settings = {**s, "mixture": args.mixture, "loss": args.loss, "spectral_norm": args.spectral_norm,
                "grouping": "pushed-to mode", "comparison": "nearest mode (ignores D), same size",
                "control": "label permutations within each batch, same trajectory, one set per grouping",
                "dtype": "float64", "optimizer": "Adam(betas=(0.5, 0.999))", "extra_figures": [f"{name}_coupling.png"],
                "convergence_rule": convergence_rule(int(centers.shape[0]))}
    figure = draw(runs, centers, extent)
    return common.finish(name, args, figure, results, claims, settings, timer)


def draw(runs: list[dict], centers, extent):
    """The overview figure (fields, coverage, alignment, every window's statistics); returns it."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import plot_alignment, plot_discriminator_field, plot_probe_field, plot_window_statistics

    first = runs[0]
    fig_data = first["figure"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.6))
    plot_discriminator_field(axes[0, 0], fig_data["grid"], fig_data["push"], fig_data["real"], fig_data["end_samples"],
                             centers, title=f"seed {first['seed']}, end: discriminator push −w, real and generated")
    snap = fig_data["snapshot"]
    for ax in axes[0, :3]:
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
    plot_probe_field(axes[0, 1], snap["x"], -float_array(snap["w"]), centers,
                     title=f"step {snap['step']}: raw push −w(z') at probes", color="tab:orange")
    plot_probe_field(axes[0, 2], snap["x"], snap["field"], centers,
                     title=f"step {snap['step']}: kernel-smoothed field −Σ c K_G w", color="tab:blue")
    ax = axes[1, 0]
    for i, r in enumerate(runs):
        cov = r["report"]["coverage"]
        steps = [c["step"] for c in cov]  # the tracked step, as the alignment and window panels count them
        ax.plot(steps, [c["modes_hit"] / c["num_modes"] for c in cov], color="tab:green", lw=1,
                label="modes hit (fraction)" if i == 0 else None)
        ax.plot(steps, [c["quality_share"] for c in cov], color="tab:olive", lw=1, ls="--",
                label="samples within 3σ of a mode" if i == 0 else None)
    ax.axhline(0.5, color="0.6", lw=0.6, ls=":")
    ax.set_ylim(-0.02, 1.02)
    first_loop = (first["report"].get("loop_steps") or {}).get("generator") or [1]
    offset = int(first_loop[0]) - 1  # the untracked warm-up's iterations
    ax.set_xlabel("tracked generator step" + (f" (iteration − {offset})" if offset else ""), fontsize=7)
    ax.set_title(f"mode coverage ({len(runs)} seed{'s' if len(runs) != 1 else ''}, one line each)", fontsize=9)
    ax.legend(fontsize=6)
    plot_alignment(axes[1, 1], first["report"]["alignment"], title=f"seed {first['seed']}: alignment of each step's ΔG(z')")
    plot_window_statistics(axes[1, 2], [r["report"]["windows"] for r in runs], kind="traffic", seeds=[r["seed"] for r in runs])
    fig.suptitle("GAN on a 2-D mixture: generator corrections as kernel-smoothed discriminator gradients", fontsize=11)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="ring", choices=["ring", "grid"], help="8 Gaussians on a ring or 25 on a grid")
    parser.add_argument("--loss", default="nonsaturating", choices=list(LOSSES))
    parser.add_argument("--spectral-norm", action="store_true", help="spectral norm in D")
    add_gan_arguments(parser)
    args = common.parse(parser, argv)
    s = apply_gan_overrides(settings_for(args.mode), args)
    name = NAME if args.mixture == "ring" else "gan_grid2d"  # the grid variant keeps its own files

    def estimate(name, args, s, seeds):
        # timed from iteration 1 with every step tracked (no warm-up): the rates, which the estimate weighs by its span
        timed = {**s, "warmup": 0}
        return estimate_wall_time(name, args, s, seeds, lambda analyzed: build(args, timed, seeds[0], null=False, analyzed=analyzed)[0])

    return run_protocol(name, args, s, {"run": run_seed, "write": write_outputs, "estimate": estimate})


if __name__ == "__main__":
    main()
