"""Silent wrong numbers in the benchmarks and their committed JSON (bench hunt).

- the kernel benchmark's steady rounds must be steady: a per-model one-time cost (genkernel caches its
  covering check and probed layers per model) belongs to the first call, never to a round;
- the README's and figures/README's performance sentences quote the committed JSON they cite;
- the GAN and diffusion benchmarks' overhead claims hold only when the analyzed runs trained as the
  bare run did and tracked every step (a "fast" analyzed step that computes something else is none);
- the example-overhead clock waits for a step's queued device work (CUDA) before reading the time;
- the kernel benchmark's tracker section: its "median" of pair ratios is a median, and its dense baseline
  runs as many groups as the factored row it is set beside.
"""

import json
import re
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from recipes.benchmarks import kernels as K

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PLANTED_S = 0.25  # a per-model one-time cost, far above a tiny model's kernel (a few ms)


def _tiny_build(name, n, quick):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 1))
    return model, torch.randn(5, 2, generator=g), torch.randn(4, 2, generator=g)


def test_a_per_model_first_call_cost_stays_out_of_every_steady_round(monkeypatch, tmp_path):
    """genkernel's first call on a model does one-time work cached per model (``_COVERED``,
    ``_PROBED``); here it is planted as 0.25 s on each model's first gradient_kernel call. The speed
    child's in-process first calls must carry it and no interleaved round may.

    Fails on the old code: the first calls ran on copies and the rounds on the original model, which
    no call had seen, so auto's round 0 paid it (committed UNet row: auto's round 0 0.361 s against
    0.252-0.259 s in rounds 1-6)."""
    real = K.gradient_kernel
    seen = weakref.WeakSet()

    def planted(model, x1, x2=None, **kwargs):
        if model not in seen:
            seen.add(model)
            time.sleep(PLANTED_S)
        return real(model, x1, x2, **kwargs)

    monkeypatch.setenv("BENCH_THREADS", "1")  # use_bench_threads in the child, run in-process here
    monkeypatch.setattr(K, "gradient_kernel", planted)
    monkeypatch.setattr(K, "build", _tiny_build)
    out = tmp_path / "speed.pt"
    K.speed_child("mlp2d", 5, 2, str(out), False)
    data = torch.load(out, weights_only=False)
    for name in ("auto", "factored"):
        timing = data["methods"][name]
        assert timing["in_process_first_call_s"] >= PLANTED_S  # each method's own first call pays it
        assert len(timing["steady_s"]) == 2 and max(timing["steady_s"]) < PLANTED_S / 2, (name, timing["steady_s"])
    assert max(data["max_rel_diff_vs_vmap"].values()) < 1e-5  # the rounds still compute vmap's kernel


# ------------------------------------------------------------- the READMEs quote the committed JSON
def _json(name):
    return json.loads((ROOT / "figures" / name).read_text())


def _one(pattern, text):
    found = re.findall(pattern, text)
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_the_readme_performance_summary_quotes_the_committed_scale_json():
    """The README's summary of ``figures/benchmark_scale.json``: the memory estimate's errors (total and
    analysis) and the tiny UNet's operation count, recomputed from the JSON's own numbers.

    Fails on the old code: the README said "within 3.1 % (total, −3.1 %) and 4.2 % (analysis)" and "an
    operation count of 35.0×", the run before's; the committed JSON (the commit that claimed to update the
    READMEs from it) has −9.8 %, −11.4 % and 32.4×."""
    scale = _json("benchmark_scale.json")
    readme = (ROOT / "README.md").read_text()
    comparisons = scale["memory"]["comparisons"]
    for part in ("total", "analysis_only"):  # each error from its own bytes, as the claim computes it
        c = comparisons[part]
        assert c["relative_error"] == pytest.approx((c["predicted_bytes"] - c["measured_bytes"]) / c["measured_bytes"])
    total, analysis = (100 * comparisons[k]["relative_error"] for k in ("total", "analysis_only"))
    within, signed, within_analysis = _one(
        r"the cost estimate is within ([\d.]+) % \(total, [−-]([\d.]+) %\) and ([\d.]+) % \(analysis", readme)
    assert float(within) == float(signed) == round(abs(total), 1) and total < 0
    assert float(within_analysis) == round(abs(analysis), 1)
    unet = scale["tiny_unet"]
    assert unet["flop_ratio"] == pytest.approx(unet["analyzed_gflop"] / unet["bare_gflop"])
    count = _one(r"against an operation count of ([\d.]+)× for the whole step", readme)
    assert float(count) == round(unet["flop_ratio"], 1)
    lo, hi = (float(v) for v in _one(r"64 probes costs ([\d.]+)–([\d.]+)× a bare step", readme))
    assert lo <= unet["ratio"] <= hi


def test_the_kernel_figure_notes_quote_auto_against_vmap_from_the_committed_json():
    """figures/README's note on vmap's MLP rows quotes auto's steady speed-up over vmap, which the JSON
    holds as the quotient of the two steady medians.

    Fails on the old code: "its 92× and 752× gap to auto" where the committed run has 81× and 741× (the
    same README's table says 81× and 741×)."""
    kernels = _json("benchmark_kernels.json")
    notes = (ROOT / "figures" / "README.md").read_text()
    gaps = []
    for row in ("mlp2d", "mlp784"):
        methods = kernels["models"][row]["speed"]["methods"]
        gap = methods["vmap"]["steady_median_s"] / methods["auto"]["steady_median_s"]
        assert methods["auto"]["speedup_vs_vmap"] == pytest.approx(gap)
        gaps.append(round(gap))
    quoted = [int(v) for v in _one(r"its ([\d]+)× and ([\d]+)× gap to auto", notes)]
    assert quoted == gaps


# ------------------------------------ an overhead claim needs the analyzed run to train as the bare one
def test_the_gan_overhead_target_needs_the_analyzed_run_to_train_as_the_bare_one(tmp_path, monkeypatch):
    """Every step is timed at one second (so every ratio is 1, inside the 3x target); the "analyzer"
    configuration starts from a generator nudged by 1e-3, standing for an analyzer that changes training,
    the other analyzed configurations are left alone. The target (read on "analyzer") then must not be
    met, and the JSON must say which configurations trained as the bare one and how many steps each tracked.

    Fails on the old code: ``within_target`` read the ratio alone (True here) and the JSON had no
    ``training_unchanged`` nor tracked step count."""
    from recipes.benchmarks import gan

    def one_second(device, call):
        call()
        return 1.0

    made = gan.make_trainer

    def make(kwargs, *, seed, device):
        trainer = made(kwargs, seed=seed, device=device)
        if kwargs == dict(controls=0, window=10**6, eval_every=10**6):  # the "analyzer" configuration
            with torch.no_grad():
                next(trainer.generator.parameters()).add_(1e-3)
        return trainer

    monkeypatch.setattr(gan, "synced_seconds", one_second)
    monkeypatch.setattr(gan, "make_trainer", make)
    payload = gan.main(["--smoke", "--out-dir", str(tmp_path)])
    assert set(payload["ratios"].values()) == {1.0}
    written = json.loads((tmp_path / "benchmark_gan.json").read_text())
    steps = written["generator_steps"]
    assert steps == written["settings"]["steps"] + written["settings"]["warmup"]
    assert written["tracked_generator_steps"] == {name: steps for name in written["ratios"]}
    assert written["training_unchanged"] == {name: name != "analyzer" for name in written["ratios"]}
    assert written["within_target"] is False


def test_the_diffusion_overhead_claims_need_the_analyzed_runs_to_train_as_the_bare_one():
    """As for the GAN benchmark: the diffusion benchmark's ratios compare analyzed with bare steps only if the
    analyzed trainers trained the same steps bit for bit and tracked each. The "one_control" configuration's
    model is nudged by 1e-3 (an analyzer that changes training): ``measure`` must record it and
    ``measured_alike`` refuse the one-control claim while allowing the others.

    Fails on the old code: ``measure`` recorded neither, and ``main``'s claims read the ratios alone."""
    from genkernel.data import gaussian_ring
    from genkernel.diffusion import MLPDenoiser
    from recipes.benchmarks import diffusion

    labels = [label for label, _ in diffusion.CONFIGURATIONS]
    built = []

    def make_model():  # called once per configuration, in CONFIGURATIONS' order
        model = MLPDenoiser(2, hidden=16, depth=2)
        if labels[len(built)] == "one_control":
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
        built.append(model)
        return model

    points = gaussian_ring(256, std=0.05, seed=0)[0]
    out = diffusion.measure(make_model, points, points[:32], batch=16, steps=2, warmup=1, num_bins=3, num_probes=4,
                            kernel_sketch=None, seed=0)
    analyzed = [label for label, controls in diffusion.CONFIGURATIONS if controls is not None]
    assert out["steps_each"] == 3 and out["tracked_steps"] == {label: 3 for label in analyzed}
    assert out["training_unchanged"] == {label: label != "one_control" for label in analyzed}
    assert diffusion.measured_alike(out, "no_control", "five_controls") is True
    assert diffusion.measured_alike(out, "no_control", "one_control") is False


# --------------------------------------------------- the example overhead's step clock on a GPU
def test_the_example_overhead_clock_waits_for_a_steps_queued_device_work(monkeypatch):
    """A stand-in device: each step queues 40 ms of work that only a synchronize waits for (as CUDA kernels
    do); the optimizer's parameters report that device. The step times must include the queued work.

    Fails on the old code: the optimizer-step hook read the clock without synchronizing, so the steps read
    about 0 s (a bare CUDA run that never waits looked cheaper than an analyzed one that does)."""
    from recipes.examples import overhead

    queued = [0.0]

    def synchronize(device=None):
        time.sleep(queued[0])
        queued[0] = 0.0

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(overhead, "step_device", lambda optimizer: torch.device("cuda"), raising=False)

    def train(argv):
        param = nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.SGD([param], lr=0.1)
        for _ in range(6):
            param.grad = torch.ones(3)
            queued[0] += 0.04  # the step's kernels, queued, not run yet
            optimizer.step()

    result = overhead.timed_run(train, [])
    assert result["steps"] == 6
    assert result["seconds_per_step"] >= 0.035



# ----------------------------------------------------------- the kernel benchmark's tracker section
def test_the_tracker_sections_median_pair_ratio_is_the_median_of_its_recorded_pairs(monkeypatch):
    """Two timed pairs (3 steps, the first a warm-up): the median of their ratios is their mean, and the JSON
    holds the step times it comes from.

    Fails on the old code: "median_pair_ratio" was the upper middle of the sorted ratios, for 2 pairs the
    larger one (the committed dense row's 406.8x is such a maximum), and the step times were not written."""
    import statistics

    def small(name, n, quick):  # the 2-D MLP's shape, narrower (the section's logic, not its size)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(1)
        return model, torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)

    monkeypatch.setattr(K, "build", small)
    run = K._tracker_run("sgd", "factored", 8, 3)
    bare, tracked = run["bare_steps_s"], run["tracked_steps_s"]
    assert len(bare) == len(tracked) == 3 and run["training_unchanged"] is True
    pairs = [t / b for t, b in zip(tracked[1:], bare[1:])]
    assert run["median_pair_ratio"] == pytest.approx(statistics.fmean(pairs))
    assert run["ratio"] == pytest.approx(min(tracked[1:]) / min(bare[1:]))


def test_the_dense_tracker_baseline_runs_as_many_groups_as_the_factored_row_beside_it(monkeypatch):
    """The dense route's cost grows with the groups G = B x steps; the table sets its ratio beside the
    factored route's at the first batch, so both must run the same B and steps.

    Fails on the old code: dense ran 3 steps at B = 64 (G = 192) beside factored's 6 (G = 384) in the full
    settings."""
    calls = []

    def fake(optimizer, group_state, batch, steps, profile=False):
        calls.append((optimizer, group_state, batch, steps))
        return {"optimizer": optimizer, "group_state": group_state, "batch": batch, "groups": batch * steps,
                "ratio": 1.0, "training_unchanged": True}

    monkeypatch.setattr(K, "_tracker_run", fake)
    for quick in (False, True):
        calls.clear()
        K.tracker_ratio(quick)
        factored = [c for c in calls if c[1] == "factored"]
        dense = [c for c in calls if c[1] == "dense"]
        assert len(dense) == 1 and dense[0][2:] == factored[0][2:]
