"""Honesty review of the kernel and scale benchmarks (issue 15): the minimal factored reference
against brute-force per-example gradients and refusing a shared Linear, the speed section's
first calls timed in fresh processes with ratios the right way round and every timed call's
kernel (first, steady, fresh) compared with vmap's, no model copy inside a timed first call,
vmap's Jacobian work as chunked, the command lines refusing what they cannot measure, the scale
benchmark's analysis-only memory with each process's own baseline subtracted, and its tiny-UNet
time claim needing the analyzed step to train as the bare one."""

import copy

import pytest
import torch
from torch import nn

from recipes.benchmarks import kernels as K
from recipes.benchmarks import scale
from recipes.benchmarks.harness import Pacer

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("BENCH_THREADS", "1")  # use_bench_threads in the children run in-process here
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _brute_force(model, x1, x2):
    """Σ_o ⟨∂f_o(x)/∂θ, ∂f_o(x')/∂θ⟩ from one autograd.grad per example and output."""
    params = [p for p in model.parameters()]

    def jac(x):
        rows = []
        for e in range(x.shape[0]):
            y = model(x[e : e + 1]).reshape(-1)
            rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(y[o], params, retain_graph=True)])
                                     for o in range(y.numel())]))
        return torch.stack(rows)  # [B, d, P]

    return torch.einsum("adp,bdp->ab", jac(x1), jac(x2))


# ------------------------------------------------------------------ 1. the minimal factored reference
@pytest.mark.parametrize("outputs", [1, 3])
def test_linear_reference_is_the_brute_force_trace_kernel(outputs):
    """Coverage: against per-example gradients of every output (not genkernel's own engine)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, outputs)).to(F64)
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    torch.testing.assert_close(K.linear_reference_kernel(model, x1, x2), _brute_force(model, x1, x2),
                               rtol=1e-12, atol=1e-12)


def test_linear_reference_refuses_a_linear_applied_twice():
    """A Linear used twice has one gradient summing both uses: the per-application form leaves out
    the cross terms (old code: a kernel 5.7 % off the brute-force one, max |Δ| / max |K|, silently)."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 1)).to(F64)
    x1, x2 = torch.randn(4, 3, dtype=F64), torch.randn(3, 3, dtype=F64)
    with pytest.raises(ValueError, match="applied exactly once"):
        K.linear_reference_kernel(model, x1, x2)


# ------------------------------------------------------------------ 2. vmap's chunked Jacobian work
def test_vmap_jacobian_work_is_what_the_chunked_baseline_computes(monkeypatch):
    """Coverage: with a budget of 3 rows per chunk, 7 rows of x1 take 3 chunks and x2's Jacobians
    are computed 3 times: (7 + 5·3) / (7 + 5); the chunked kernel is still the exact one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x1, x2 = torch.randn(7, 3), torch.randn(5, 3)
    num = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(K, "BASELINE_BUDGET", 3 * 2 * 2 * num * 4)
    work = K.vmap_jacobian_work(model, x1, x2)
    assert work == {"rows_per_chunk": 3, "row_chunks": 3, "jacobians_over_needed": (7 + 5 * 3) / 12}
    pacer = Pacer(float("inf"))
    kernel, done = K.method_vmap(model, x1, x2, pacer)
    assert done == 1.0 and pacer.work_done == 7 + 5 * 3
    torch.testing.assert_close(kernel, K.linear_reference_kernel(model, x1, x2), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ 3. the speed section
def _tiny_build():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
    return model, torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g)


def test_speed_child_checks_the_steady_kernels_and_copies_outside_the_first_call_clock(monkeypatch, tmp_path):
    """An engine right on its first call and 1 % off afterwards is caught (old code compared only
    the first calls' kernels: 4.5e-7, "agree"); the model copies of the first calls are made
    before any timed call (old code: inside it, 35 ms of a 0.45 s UNet first call)."""
    real = K.gradient_kernel
    calls = []

    def drifting(model, x1, x2=None, **kwargs):
        calls.append(kwargs.get("engine"))
        kernel = real(model, x1, x2, **kwargs)
        return kernel * 1.01 if kwargs.get("engine") == "auto" and calls.count("auto") > 1 else kernel

    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: (copies.append(1), real_deepcopy(*a, **k))[1])
    during = []
    real_interleaved = K.interleaved

    def watched(methods, repeats, first=None, seconds=None):
        before = len(copies)
        out = real_interleaved(methods, repeats, first=first, seconds=seconds)
        during.append(len(copies) - before)
        return out

    monkeypatch.setattr(K, "gradient_kernel", drifting)
    monkeypatch.setattr(K, "interleaved", watched)
    monkeypatch.setattr(K, "build", lambda name, n, quick: _tiny_build())
    out = tmp_path / "speed.pt"
    K.speed_child("mlp2d", 6, 2, str(out), False)
    data = torch.load(out, weights_only=False)
    assert during == [0]  # no copy made while methods were being timed
    by_call = data["max_rel_diff_vs_vmap_by_call"]
    assert by_call["auto"]["first"] < 1e-5 and by_call["auto"]["steady"] == pytest.approx(0.01, rel=1e-3)
    assert data["max_rel_diff_vs_vmap"]["auto"] == pytest.approx(0.01, rel=1e-3)
    assert data["max_rel_diff_vs_vmap"]["factored"] < 1e-5 and data["max_rel_diff_vs_vmap"]["linear_ref"] < 1e-5
    model, x1, x2 = _tiny_build()
    torch.testing.assert_close(data["reference_kernel"], K.linear_reference_kernel(model, x1, x2), rtol=1e-4, atol=1e-6)


def _fake_speed(first_kernels: dict, ref: torch.Tensor):
    """run_child stand-in: the speed child's data (in-process first calls 10x cheaper for auto
    than in a fresh process) and fresh first calls with the given kernels."""
    timing = lambda first, steady: {"first_call_s": first, "first_call_load": 1.0, "steady_s": [steady],  # noqa: E731
                                    "steady_load": [1.0], "steady_min_s": steady, "steady_median_s": steady,
                                    "load_mean": 1.0}
    started = []

    def run_child(module, args, timeout):
        started.append(list(args))
        if args[0] == "--speed-child":
            return {"methods": {"vmap": timing(2.0, 0.2), "auto": timing(0.1, 0.1)}, "plan": {"engine": "factored"},
                    "max_rel_diff_vs_vmap": {"vmap": 0.0, "auto": 1e-7},
                    "max_rel_diff_vs_vmap_by_call": {"vmap": {"first": 0.0, "steady": 0.0},
                                                     "auto": {"first": 1e-7, "steady": 1e-7}},
                    "vmap_work": {}, "reference_kernel": ref}
        method = args[2]
        return {"first_call_s": {"vmap": 2.0, "auto": 1.0}[method], "first_call_load": 1.5,
                "kernel": first_kernels[method]}

    return run_child, started


def test_first_calls_come_from_fresh_processes_and_their_kernels_are_checked(monkeypatch):
    """Each method's first call runs in a process of its own (old code: in one process in a fixed
    order, where auto after vmap's warm-up was 0.14 s against 0.68 s run first, convnet at 64
    rows); first-call and steady ratios are baseline / method; a fresh first call that computes
    another kernel makes the target's kernels disagree."""
    ref = torch.eye(3) + 1.0
    run_child, started = _fake_speed({"vmap": ref, "auto": ref.clone()}, ref)
    monkeypatch.setattr(K, "run_child", run_child)
    data = K.run_speed("convnet", 3, 1, True)
    assert [a[:3] for a in started[1:]] == [["--first-child", "convnet", "vmap"], ["--first-child", "convnet", "auto"]]
    auto = data["methods"]["auto"]
    assert auto["first_call_s"] == 1.0 and data["methods"]["vmap"]["first_call_s"] == 2.0  # not the in-process 0.1, 2.0
    assert auto["first_call_speedup_vs_vmap"] == pytest.approx(2.0) and auto["speedup_vs_vmap"] == pytest.approx(2.0)
    assert data["load"]["max"] == 1.5 and "reference_kernel" not in data
    rows = {"auto": {"memory_ratio_vs_vmap": 0.5}}
    monkeypatch.setattr(K, "run_method", lambda *a, **k: (None, {"profile": "p"}))
    assert K.check_target("convnet", data, rows, 3, 1.0, True)["met"] is True
    wrong = ref.clone()
    wrong[0, 0] += 0.5  # the fresh process's first call computed something else
    run_child, _ = _fake_speed({"vmap": ref, "auto": wrong}, ref)
    monkeypatch.setattr(K, "run_child", run_child)
    data = K.run_speed("convnet", 3, 1, True)
    assert data["max_rel_diff_vs_vmap"]["auto"] == pytest.approx(0.25)
    entry = K.check_target("convnet", data, rows, 3, 1.0, True)
    assert entry["kernels_agree"] is False and entry["met"] is False


# ------------------------------------------------------------------ 4. command lines
class Started(Exception):
    pass


@pytest.mark.parametrize("argv", [["--cap", "0"], ["--cap", "nan"], ["--repeats", "0"], ["--models", "mlp2d,cnn"],
                                  ["--methods", "vmap,jax"]])
def test_the_kernel_benchmark_refuses_arguments_before_it_measures(monkeypatch, argv, tmp_path):
    """Old code started measuring (a KeyError on an unknown row after the earlier rows had run,
    every method stopped at a zero cap, an error row for an unknown method)."""
    def started(*a, **k):
        raise Started

    monkeypatch.setattr(K, "matmul_flops", started)
    monkeypatch.setattr(K, "run_speed", started)
    with pytest.raises(SystemExit):
        K.main(argv + ["--out-dir", str(tmp_path)])


def test_the_scale_benchmark_refuses_a_device_it_does_not_measure(monkeypatch, tmp_path):
    """Every part runs on the CPU: old code took --device cuda and wrote CPU numbers."""
    def started(*a, **k):
        raise Started

    monkeypatch.setattr(scale, "memory_comparison", started)
    with pytest.raises(SystemExit):
        scale.main(["--smoke", "--device", "cuda", "--out-dir", str(tmp_path)])
    with pytest.raises(Started):  # the CPU still goes on to measure
        scale.main(["--smoke", "--device", "cpu", "--out-dir", str(tmp_path)])


# ------------------------------------------------------------------ 5. the scale benchmark's numbers
def test_analysis_only_memory_subtracts_each_processs_own_baseline(monkeypatch):
    """tracked peak 10 GB over 1.0 GB before its model, bare peak 2 GB over 0.5 GB: the analysis
    took (10 - 1) - (2 - 0.5) = 7.5 GB (old code: 10 - 2 = 8 GB, the imports' difference counted
    as analysis); total and training are each process's own peak less its own baseline."""
    GB = 10**9
    children = {
        "bare": {"rss_before_model": 0.5 * GB, "peak_rss": 2 * GB, "step_s": [1.0, 1.0], "step_load": [1.0, 1.0]},
        "tracked": {"rss_before_model": 1.0 * GB, "peak_rss": 10 * GB, "step_s": [5.0, 4.0], "step_load": [1.0, 1.0],
                    "estimate": {"memory_bytes": {"training_step": 1.5 * GB}, "total_bytes": 9 * GB, "ratio": 4.0}},
    }
    monkeypatch.setattr(scale, "run_child", lambda module, args, timeout: children[args[1]])
    s = scale.pick("smoke", **scale.SETTINGS)
    out = scale.memory_comparison(dict(s, memory_parallel=False), 0, 1)
    c = out["comparisons"]
    assert c["total"]["measured_bytes"] == 9 * GB and c["training"]["measured_bytes"] == 1.5 * GB
    assert c["analysis_only"]["measured_bytes"] == 7.5 * GB
    assert c["analysis_only"]["predicted_bytes"] == 7.5 * GB and c["analysis_only"]["within_20_percent"] is True
    assert out["seconds_per_step"]["ratio"] == pytest.approx(4.0)  # tracked steps after the first / bare median


def _report(unet_unchanged):
    unet = {"bins": 10, "controls": 1, "probes": 64, "group_state": "dense", "ratio": 2.0, "bare_median_s": 1.0,
            "analyzed_median_s": 2.0, "load_mean": 1.0, "flop_ratio": 2.0, "predicted_ratio": 2.0}
    if unet_unchanged is not None:
        unet["training_unchanged"] = unet_unchanged
    return {"memory": {}, "sgd_factored": [], "sketched": [], "tiny_unet": unet}


def test_the_tiny_unet_time_claim_needs_the_analyzed_step_to_train_as_the_bare_one():
    """As the SGD claim: fast enough but a different training step is not held, nor is one whose
    check is missing (old code: held on the ratio alone)."""
    def claim(report):
        return next(c for c in scale.claims_of(report) if "an analyzed step costs at most" in c["claim"])

    assert claim(_report(True))["held"] is True
    changed = claim(_report(False))
    assert changed["held"] is False and changed["numbers"]["training_unchanged"] is False
    assert claim(_report(None))["held"] is False


def test_the_kernel_benchmarks_tracker_target_needs_unchanged_training(monkeypatch):
    """The tracker-vs-bare-step section: a factored run under 3x whose tracked model trained
    differently from the bare one is not met (old code: met on the ratio alone)."""
    def run(optimizer, group_state, batch, steps, profile=False):
        return {"optimizer": optimizer, "group_state": group_state, "batch": batch, "ratio": 2.0,
                "training_unchanged": batch != 64, "profile": "p"}

    monkeypatch.setattr(K, "_tracker_run", run)
    entry = K.tracker_ratio(quick=False)
    assert entry["met_at_batch"] == {64: False, 256: True, 1024: True}


def test_the_tracker_run_records_that_tracking_left_training_unchanged():
    """Coverage: bare and tracked copies of the 2-D MLP after the same SGD steps are bit-equal."""
    run = K._tracker_run("sgd", "factored", 8, 2)
    assert run["training_unchanged"] is True and run["group_state"] == "factored"
    assert run["ratio"] == pytest.approx(run["tracked_step_s"] / run["bare_step_s"])
