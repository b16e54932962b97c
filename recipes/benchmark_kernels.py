"""Benchmark: gradient kernels by every method, side by side (numbers, not timed tests).

    python recipes/benchmark_kernels.py [--quick] [--out-dir figures] [--cap 60]

For each model (MLP 2→512→512→1 at M = N = 1024, MLP 784→256→256→10 at 512, a convnet on
1×28×28 at 256, a small UNet2DModel on 1×16×16 at 64) and each method

- ``naive``: a loop of ``torch.autograd.grad`` per example and output, then matmul;
- ``vmap``: torch.func ``vmap(jacrev)`` + matmul, chunked (PyTorch's NTK tutorial, method 1);
- ``ntk_vps``: torch.func NTK-vector products (the tutorial's method 2);
- ``captum``: skipped with a note when captum is not installed;
- ``auto`` / ``factored`` / ``functional``: :func:`genkernel.core.gradient_kernel` engines,

one subprocess runs the method once (after a small warm-up), so that its peak memory is its own:
working memory = peak RSS − the process's RSS after setup. Methods that would run past ``--cap``
seconds stop after whole row chunks and report the time extrapolated by the share of rows done
(marked ``extrapolated``). The parent compares every kernel with ``vmap`` (max |Δ| / max |K|),
measures a float32 matmul's FLOP/s in the same run, counts each method's matmul-class FLOPs with
``torch.utils.flop_counter`` on a small slice, and checks the issue's targets; a missed target
comes with a profile of where the time goes. It also measures random-projection kernel error
against the projection dimension k, and the tracker's cost against a bare training step.

Writes ``OUT/benchmark_kernels.json`` and ``OUT/benchmark_kernels.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("naive", "vmap", "ntk_vps", "captum", "auto", "factored", "functional")
FULL = {"mlp2d": 1024, "mlp784": 512, "convnet": 256, "unet": 64}
QUICK = {"mlp2d": 256, "mlp784": 128, "convnet": 64, "unet": 8}
TARGETS = {  # minimum throughput ratio of genkernel "auto" over torch.func vmap, max memory ratio
    "mlp2d": (50.0, 0.1),
    "mlp784": (80.0, 0.1),
    "convnet": (1.5, 1.0),
    "unet": (1.2, 1.0),
}
BASELINE_BUDGET = 2 * 2**30  # bytes of Jacobians the chunked baselines may hold


# ------------------------------------------------------------------------------------ models
def build(name: str, n: int, quick: bool):
    """(model, x1, x2): float32, seeded; x1 and x2 are distinct batches of n inputs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp2d":
        model = nn.Sequential(nn.Linear(2, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, 1))
        return model, torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    if name == "mlp784":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        return model, torch.rand(n, 784, generator=g), torch.rand(n, 784, generator=g)
    if name == "convnet":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )
        return model, torch.rand(n, 1, 28, 28, generator=g), torch.rand(n, 1, 28, 28, generator=g)
    if name == "unet":
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8,
        )
        t1 = torch.randint(0, 1000, (n,), generator=g)
        t2 = torch.randint(0, 1000, (n,), generator=g)
        return model, (torch.randn(n, 1, 16, 16, generator=g), t1), (torch.randn(n, 1, 16, 16, generator=g), t2)
    raise ValueError(name)


def _rows(batch, rows):
    return tuple(t[rows] for t in batch) if isinstance(batch, tuple) else (batch[rows],)


def _n(batch):
    return (batch[0] if isinstance(batch, tuple) else batch).shape[0]


# ----------------------------------------------------------------------------------- methods
def _single_fn(model):
    from torch.func import functional_call

    def single(params, *x):
        out = functional_call(model, params, tuple(t.unsqueeze(0) for t in x))
        out = getattr(out, "sample", out)
        return out.reshape(-1)

    return single


def method_vmap(model, x1, x2, cap):
    """torch.func vmap(jacrev) + matmul, chunked to BASELINE_BUDGET (the NTK tutorial, method 1)."""
    from torch.func import jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    single = _single_fn(model)
    num = sum(p.numel() for p in params.values())
    d = model_outputs(model, x1)
    rows = max(1, BASELINE_BUDGET // (2 * d * num * 4))
    m, n = _n(x1), _n(x2)
    kernel = torch.zeros(m, n)
    jac = vmap(jacrev(single), in_dims=(None,) + (0,) * len(_rows(x1, slice(0, 1))))
    start = time.perf_counter()
    done = 0
    for i in range(0, m, rows):
        r1 = slice(i, min(i + rows, m))
        j1 = jac(params, *_rows(x1, r1))
        for j in range(0, n, rows):
            r2 = slice(j, min(j + rows, n))
            j2 = jac(params, *_rows(x2, r2))
            kernel[r1, r2] = sum(torch.einsum("Naf,Maf->NM", j1[k].flatten(2), j2[k].flatten(2)) for k in params)
        done = r1.stop
        if time.perf_counter() - start > cap:
            break
    return kernel[:done], done / m


def method_naive(model, x1, x2, cap):
    """A loop of torch.autograd.grad per example and output, then matmul (chunked like vmap)."""
    params = [p for p in model.parameters()]
    num = sum(p.numel() for p in params)
    d = model_outputs(model, x1)
    rows = max(1, BASELINE_BUDGET // (2 * d * num * 4))
    m, n = _n(x1), _n(x2)

    def jac(batch):
        b = _n(batch)
        out = torch.zeros(b, d, num)
        for e in range(b):
            y = model(*_rows(batch, slice(e, e + 1)))
            y = getattr(y, "sample", y).reshape(-1)
            for o in range(d):
                grads = torch.autograd.grad(y[o], params, retain_graph=o < d - 1)
                out[e, o] = torch.cat([g.reshape(-1) for g in grads])
        return out

    kernel = torch.zeros(m, n)
    start = time.perf_counter()
    done = 0
    for i in range(0, m, rows):
        r1 = slice(i, min(i + rows, m))
        j1 = jac(_rows(x1, r1))
        for j in range(0, n, rows):
            r2 = slice(j, min(j + rows, n))
            j2 = jac(_rows(x2, r2))
            kernel[r1, r2] = torch.einsum("mdp,ndp->mn", j1, j2)
        done = r1.stop
        if time.perf_counter() - start > cap:
            break
    return kernel[:done], done / m


def method_ntk_vps(model, x1, x2, cap):
    """NTK-vector products (the tutorial's method 2): vjp then jvp for every pair, vmapped."""
    from torch.func import jvp, vjp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    single = _single_fn(model)
    num = sum(p.numel() for p in params.values())
    d = model_outputs(model, x1)
    m, n = _n(x1), _n(x2)
    rows = max(1, BASELINE_BUDGET // (4 * n * d * num * 4))
    basis = torch.eye(d)

    def get_ntk(a, b):
        out, vjp_fn = vjp(lambda p: single(p, *a), params)

        def slice_(vec):
            (v,) = vjp_fn(vec)
            return jvp(lambda p: single(p, *b), (params,), (v,))[1]

        return vmap(slice_)(basis).diagonal().sum()

    nargs = len(_rows(x1, slice(0, 1)))

    def pair(*ab):
        return get_ntk(ab[:nargs], ab[nargs:])

    inner = vmap(pair, in_dims=(None,) * nargs + (0,) * nargs)
    outer = vmap(inner, in_dims=(0,) * nargs + (None,) * nargs)
    kernel = torch.zeros(m, n)
    start = time.perf_counter()
    done = 0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for i in range(0, m, rows):
        r1 = slice(i, min(i + rows, m))
        with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD needs the math attention backend on CPU
            kernel[r1] = outer(*_rows(x1, r1), *_rows(x2, slice(0, n)))
        done = r1.stop
        if time.perf_counter() - start > cap:
            break
    return kernel[:done], done / m


def method_genkernel(engine):
    def run(model, x1, x2, cap):
        from genkernel.core import gradient_kernel

        m = _n(x1)
        # Row blocks so that a slow engine can stop early: whole x2 per block of x1 rows.
        block = m if engine != "functional" else max(1, m // 8)
        kernel = torch.zeros(m, _n(x2))
        start = time.perf_counter()
        done = 0
        for i in range(0, m, block):
            r1 = slice(i, min(i + block, m))
            kernel[r1] = gradient_kernel(model, _rows(x1, r1), x2, engine=engine)
            done = r1.stop
            if time.perf_counter() - start > cap:
                break
        return kernel[:done], done / m

    return run


def model_outputs(model, x):
    with torch.no_grad():
        y = model(*_rows(x, slice(0, 1)))
    return getattr(y, "sample", y).numel()


RUNNERS = {
    "naive": method_naive, "vmap": method_vmap, "ntk_vps": method_ntk_vps,
    "auto": method_genkernel("auto"), "factored": method_genkernel("factored"),
    "functional": method_genkernel("functional"),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Polls the resident set size every 2 ms in a thread; ``peak`` is the maximum seen
    (ru_maxrss cannot be reset, and setup may have peaked higher than the method)."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return False


def child(model_name: str, method: str, n: int, cap: float, out: str, quick: bool, profile: bool) -> None:
    """One method on one model, in its own process: time, working memory, kernel, FLOPs."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, x1, x2 = build(model_name, n, quick)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    runner = RUNNERS[method]
    # Warm-up on 2 rows (first-call allocations and kernel selection), then the baseline RSS.
    runner(model, _rows(x1, slice(0, 2)), _rows(x2, slice(0, 2)), cap)
    baseline = _rss_bytes()
    watcher = PeakRSS()
    start = time.perf_counter()
    with watcher:
        kernel, fraction = runner(model, x1, x2, cap)
    seconds = time.perf_counter() - start
    working = max(watcher.peak - baseline, 0)
    # Matmul-class FLOPs, counted on k×k slices for k = 4 and 8 and fitted as a·k + b·k²
    # (per-example work plus pairwise work), then evaluated at n.
    flops = None
    try:
        if seconds > 30:
            raise TimeoutError("too slow to run twice more under the FLOP counter")
        from torch.utils.flop_counter import FlopCounterMode

        counts = []
        for k in (4, 8):
            with FlopCounterMode(display=False) as counter:
                runner(model, _rows(x1, slice(0, k)), _rows(x2, slice(0, k)), cap)
            counts.append(counter.get_total_flops())
        b = max((counts[1] - 2 * counts[0]) / 32, 0.0)
        a = max((counts[0] - 16 * b) / 4, 0.0)
        flops = a * _n(x1) + b * _n(x1) * _n(x2)
    except Exception:  # noqa: BLE001 - a counter failure must not lose the timing
        flops = None
    result = {
        "seconds_measured": seconds,
        "fraction_done": fraction,
        "seconds": seconds / max(fraction, 1e-9),
        "extrapolated": fraction < 1.0,
        "working_memory_bytes": working,
        "rss_after_setup_bytes": baseline,
        "flops_estimate": flops,
    }
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        k = min(_n(x1), 64)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            runner(model, _rows(x1, slice(0, k)), _rows(x2, slice(0, k)), cap)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    torch.save({"kernel": kernel, "result": result}, out)


def run_child(model_name, method, n, cap, quick, profile=False, timeout=1800):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        cmd = [sys.executable, __file__, "--child", model_name, method, str(n), str(cap), out]
        if quick:
            cmd.append("--quick")
        if profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0 or not os.path.exists(out):
            return None, {"error": (proc.stderr or proc.stdout)[-2000:]}
        data = torch.load(out, weights_only=False)
        return data["kernel"], data["result"]


def matmul_flops() -> float:
    """FLOP/s of a float32 1024² matmul on this machine, now."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * 1024**3 * reps / (time.perf_counter() - start)


# --------------------------------------------------------------------------- extra sections
def projection_errors(quick: bool) -> list[dict]:
    """Relative Frobenius error of sketched kernels against the exact one, per k."""
    try:
        from genkernel.core.projections import sketched_gradient_kernel
    except ImportError:
        return []
    from genkernel.core import gradient_kernel

    model, x1, _ = build("mlp784", 64 if quick else 128, quick)
    exact = gradient_kernel(model, x1)
    rows = []
    for k in (64, 256, 1024, 4096) if quick else (64, 256, 1024, 4096, 16384):
        errs = []
        for seed in range(3):
            approx = sketched_gradient_kernel(model, x1, k=k, seed=seed)
            errs.append(float((approx - exact).norm() / exact.norm()))
        rows.append({"k": k, "relative_frobenius_error_mean": sum(errs) / len(errs), "per_seed": errs})
    return rows


def tracker_ratio(quick: bool) -> dict:
    """Tracker with 64 probes, one group per example, SGD, on the 2-D MLP: seconds per step / bare step."""
    from genkernel.core import PathKernelTracker

    torch.manual_seed(0)
    batch, steps = 64, 3 if quick else 10
    out = {}
    for label, make_opt in (
        ("sgd", lambda p: torch.optim.SGD(p, lr=1e-2)),
        ("sgd_momentum", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)),
        ("adam", lambda p: torch.optim.Adam(p, lr=1e-3)),
    ):
        model, x, _ = build("mlp2d", batch * steps, quick)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        probes = torch.randn(64, 2)

        def loss_fn(o, t):
            return ((o - t) ** 2).mean(dim=1)

        opt = make_opt(model.parameters())
        start = time.perf_counter()
        for s in range(steps):
            rows = slice(s * batch, (s + 1) * batch)
            opt.zero_grad()
            loss_fn(model(x[rows]), y[rows]).mean().backward()
            opt.step()
        bare = (time.perf_counter() - start) / steps
        model, x, _ = build("mlp2d", batch * steps, quick)
        opt = make_opt(model.parameters())
        try:
            tracker = PathKernelTracker(model, opt, loss_fn, probes, num_groups=batch * steps)
            start = time.perf_counter()
            for s in range(steps):
                rows = slice(s * batch, (s + 1) * batch)
                tracker.step(x[rows], y[rows], torch.arange(rows.start, rows.stop))
            tracked = (time.perf_counter() - start) / steps
            out[label] = {"bare_step_s": bare, "tracked_step_s": tracked, "ratio": tracked / bare,
                          "relative_residual": tracker.ledger.relative_residual()}
        except Exception as error:  # noqa: BLE001
            out[label] = {"bare_step_s": bare, "error": repr(error)[:500]}
    return out


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and caps: a smoke test (minutes)")
    parser.add_argument("--out-dir", default=str(ROOT / "figures"))
    parser.add_argument("--cap", type=float, default=None, help="seconds per method before extrapolating")
    parser.add_argument("--models", default=",".join(FULL))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "METHOD", "N", "CAP", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model_name, method, n, cap, out = args.child
        child(model_name, method, int(n), float(cap), out, args.quick, args.profile)
        return {}

    sizes = QUICK if args.quick else FULL
    cap = args.cap if args.cap is not None else (10.0 if args.quick else 60.0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = matmul_flops()
    print(f"float32 matmul on this machine: {peak / 1e9:.1f} GFLOP/s")
    report = {"settings": {"quick": args.quick, "cap_s": cap, "sizes": sizes, "threads": torch.get_num_threads()},
              "matmul_flops_per_s": peak, "models": {}, "targets": {}}
    started = time.perf_counter()
    for model_name in args.models.split(","):
        n = sizes[model_name]
        rows = {}
        kernels = {}
        for method in args.methods.split(","):
            if method == "captum":
                rows[method] = {"skipped": "captum is not installed (pip install genkernel[captum])"}
                try:
                    import captum  # noqa: F401

                    rows[method] = {"skipped": "captum TracInCP computes loss-gradient products, not the "
                                                "output kernel; not wired in this benchmark yet"}
                except ImportError:
                    pass
                continue
            kernel, result = run_child(model_name, method, n, cap, args.quick)
            rows[method] = result
            if kernel is not None:
                kernels[method] = kernel
            print(f"{model_name:8s} {method:10s} " + (
                f"{result['seconds']:9.3f} s{'*' if result['extrapolated'] else ' '} "
                f"{result['working_memory_bytes'] / 2**20:9.1f} MiB" if "seconds" in result else result.get("error", "")[-300:]
            ), flush=True)
        ref = kernels.get("vmap")
        base = rows.get("vmap", {})
        for method, result in rows.items():
            if "seconds" not in result:
                continue
            result["entries_per_s"] = n * n / result["seconds"]
            if result.get("flops_estimate"):
                result["flops_per_s"] = result["flops_estimate"] / result["seconds"]
                result["fraction_of_matmul_peak"] = result["flops_per_s"] / peak
            if "seconds" in base:
                result["speedup_vs_vmap"] = base["seconds"] / result["seconds"]
                result["memory_ratio_vs_vmap"] = result["working_memory_bytes"] / max(base["working_memory_bytes"], 1)
            if ref is not None and method in kernels:
                k = min(len(ref), len(kernels[method]))
                if k:
                    result["max_rel_diff_vs_vmap"] = float(
                        (kernels[method][:k] - ref[:k]).abs().max() / ref[:k].abs().max()
                    )
        report["models"][model_name] = {"n": n, "methods": rows}
        if model_name in TARGETS and "auto" in rows and "speedup_vs_vmap" in rows["auto"]:
            want_speed, want_mem = TARGETS[model_name]
            got = rows["auto"]
            met = got["speedup_vs_vmap"] >= want_speed and got["memory_ratio_vs_vmap"] <= want_mem
            entry = {"speedup_target": want_speed, "memory_ratio_target": want_mem,
                     "speedup": got["speedup_vs_vmap"], "memory_ratio": got["memory_ratio_vs_vmap"], "met": met,
                     "vmap_extrapolated": base.get("extrapolated")}
            if not met:
                _, prof = run_child(model_name, "auto", n, cap, args.quick, profile=True)
                entry["profile_of_auto"] = prof.get("profile", prof.get("error"))
            report["targets"][model_name] = entry
            print(f"{model_name}: auto is {got['speedup_vs_vmap']:.1f}x vmap (target {want_speed}x), memory ratio "
                  f"{got['memory_ratio_vs_vmap']:.3f} (target <= {want_mem}): {'met' if met else 'MISSED'}", flush=True)
    report["projection_error_vs_k"] = projection_errors(args.quick)
    report["tracker_vs_bare_step"] = tracker_ratio(args.quick)
    report["wall_s"] = time.perf_counter() - started
    (out_dir / "benchmark_kernels.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / "benchmark_kernels.png")
    print(json.dumps({"targets": {k: {kk: vv for kk, vv in v.items() if kk != "profile_of_auto"}
                                  for k, v in report["targets"].items()},
                      "projection": report["projection_error_vs_k"],
                      "tracker": report["tracker_vs_bare_step"]}, indent=1))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(report["models"])
    methods = [m for m in METHODS if m != "captum"]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        secs = [report["models"][n]["methods"].get(method, {}).get("seconds", float("nan")) for n in names]
        mem = [report["models"][n]["methods"].get(method, {}).get("working_memory_bytes", float("nan")) / 2**20 for n in names]
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, secs, width, label=method)
        axes[1].bar(xs, mem, width, label=method)
    for ax, label in ((axes[0], "seconds (log; * extrapolated past the cap)"), (axes[1], "working memory, MiB (log)")):
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 for j in range(len(names))], names)
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    proj = report.get("projection_error_vs_k") or []
    if proj:
        axes[2].loglog([r["k"] for r in proj], [r["relative_frobenius_error_mean"] for r in proj], "o-")
        ks = [r["k"] for r in proj]
        axes[2].loglog(ks, [proj[0]["relative_frobenius_error_mean"] * (ks[0] / k) ** 0.5 for k in ks], "k--", label="∝ k^-1/2")
        axes[2].legend()
    axes[2].set_title("sketched kernel: relative Frobenius error vs k")
    axes[2].set_xlabel("projection dimension k")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
