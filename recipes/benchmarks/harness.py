"""What any benchmark here can reuse: a time cap that paces work, interleaved repeated timing with
the machine's load beside each time, peak working memory of one measured call, a fresh child
process per measurement, FLOP counting, the machine's matmul FLOP/s, and outputs printed side by
side and written atomically.

A measurement runs in its own process so that its peak memory is its own: the benchmark module
calls :func:`run_child` with its own ``__spec__.name`` and the arguments of its hidden child mode;
the child (the same module, started as ``python -m <module> ... --child-out PATH`` from the
repository root) measures with :class:`Pacer`, :func:`peak_working_memory` and :func:`timing`, and
saves a dict to PATH with ``torch.save``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import torch

from ..common import import_root

REPO_ROOT = import_root(__package__, Path(__file__).parent)  # where `python -m <package>.<module>` runs
CHILD_OUT_FLAG = "--child-out"  # the child's argument naming the file it saves its dict to


def use_bench_threads() -> int:
    """Sets torch's intra-op threads to ``$BENCH_THREADS`` (default 2, the cores the committed
    figures were measured on); returns that number."""
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------ pacing
class Pacer:
    """The cap of one timed run: seconds since it started, whether the cap is spent, work done,
    and row blocks sized so that one block takes about ``share`` of the cap.

    ``warm_s`` is the warm-up call's seconds (on 2 × 2 rows, ``None`` when there was none); a
    warm-up within ``share`` of the cap marks the method fast, and fast methods take whole
    batches in one block (splitting a batch repeats its fixed costs, such as x2's Jacobians).
    ``work_total`` / ``work_done`` count a method's own units (output gradients, per-example
    Jacobians, pairs).
    """

    def __init__(self, cap: float, warm_s: float | None = None, share: float = 0.25):
        self.cap, self.warm_s, self.share = cap, warm_s, share
        self.work_total, self.work_done = None, 0
        self.size = None  # the block size learned so far, carried from one blocks() loop to the next
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        """Whether the cap has run out."""
        return self.elapsed() > self.cap

    def fast(self) -> bool:
        """Whether the warm-up took at most ``share`` of the cap."""
        return self.warm_s is not None and self.warm_s <= self.share * self.cap

    def add_work(self, units: int) -> None:
        """Counts ``units`` more of the method's work units as done; returns nothing."""
        self.work_done += units

    def work_fraction(self, fraction: float) -> float:
        """Share of the method's units done; ``fraction`` (of rows) when it counts none."""
        return fraction if not self.work_total else min(self.work_done / self.work_total, 1.0)

    def blocks(self, total: int, first: int, unit: int = 1) -> Iterator[slice]:
        """Slices over range(total) in order, until the cap is spent or what is left of it is
        shorter than one unit took (checked before each block; the first block always runs).

        The first block has ``first`` rows (or the size an earlier loop learned); each later one
        has as many whole ``unit``s as the last block's seconds per unit say fit in ``share`` of
        the cap (or in what is left of it), and at least one unit.
        """
        start = 0
        while start < total:
            stop = min(start + (self.size or max(1, first)), total)
            began = time.perf_counter()
            yield slice(start, stop)
            per_unit = (time.perf_counter() - began) * unit / (stop - start)
            start, left = stop, self.cap - self.elapsed()
            if left < per_unit:
                return
            self.size = unit * max(1, int(min(self.share * self.cap, left) / max(per_unit, 1e-9)))


def timing(seconds: float, fraction: float, work: float) -> dict:
    """Measured and full-run seconds: seconds = measured / fraction of rows done.

    With no whole row done within the cap, seconds = measured / fraction of the method's own
    work units done (``extrapolated_from: "work"``), or None when not even one unit finished.

    Returns ``{"seconds_measured", "fraction_done", "work_fraction_done", "extrapolated",
    "extrapolated_from" (None, "rows" or "work"), "seconds" (None when nothing finished)}``.
    """
    result = {"seconds_measured": seconds, "fraction_done": fraction, "work_fraction_done": work,
              "extrapolated": fraction < 1.0, "extrapolated_from": None, "seconds": None}
    if fraction > 0:
        result["seconds"] = seconds / fraction
        result["extrapolated_from"] = "rows" if fraction < 1.0 else None
    elif work > 0:
        result["seconds"] = seconds / work
        result["extrapolated_from"] = "work"
    return result


ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def allocator_settings() -> dict[str, str]:
    """The environment variables set now that change what fresh large arrays cost (the README's
    "CPU allocator"): recorded beside timings, which they move by a third on forward-mode pushes."""
    return {name: os.environ[name] for name in ALLOCATOR_VARIABLES if name in os.environ}


def synced_seconds(device: torch.device | str, call: Callable[[], object]) -> float:
    """Seconds of ``call()``; on CUDA the device is synchronized before the clock starts and before it
    is read (kernels still queued would otherwise land in another method's time)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def load_average() -> float:
    """The machine's 1-minute load average now (``os.getloadavg``): what else was running while
    a time was taken; on 2 cores a load above 2 means the cores were shared."""
    return os.getloadavg()[0]


def interleaved(methods: dict[str, Callable[[], object]], repeats: int,
                first: dict[str, Callable[[], object]] | None = None, seconds: float | None = None) -> dict[str, dict]:
    """Times every method in one process, interleaved, so that a change in machine load hits all
    of them alike.

    ``first``: per method, the call that measures its first-call time (by default the method
    itself); each runs once, in order, before any repeat. Then ``repeats`` rounds call every
    method once, the order rotated each round (no method always first after another); with
    ``seconds``, a method whose first call took longer than ``seconds / repeats`` takes part in
    only as many rounds as fit in ``seconds`` (at least one). Each call records its seconds and
    the 1-minute load average after it.

    Returns ``{method: {"first_call_s", "first_call_load", "steady_s" (list), "steady_load" (list),
    "steady_min_s", "steady_median_s", "load_mean"}}``: the steady numbers come from the rounds
    only (the first call is never one of them); the median of an even count is the mean of the
    middle two.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (the steady state is timed in the rounds), got {repeats!r}")
    first = first or {}
    out: dict[str, dict] = {}
    for name, fn in methods.items():
        began = time.perf_counter()
        first.get(name, fn)()
        out[name] = {"first_call_s": time.perf_counter() - began, "first_call_load": load_average(),
                     "steady_s": [], "steady_load": []}
    names = list(methods)
    rounds = {name: repeats if seconds is None else max(1, min(repeats, int(seconds / max(out[name]["first_call_s"], 1e-9))))
              for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            if round_ >= rounds[name]:
                continue
            began = time.perf_counter()
            methods[name]()
            out[name]["steady_s"].append(time.perf_counter() - began)
            out[name]["steady_load"].append(load_average())
    for entry in out.values():  # every method takes part in one round at least
        entry["steady_min_s"] = min(entry["steady_s"])
        entry["steady_median_s"] = statistics.median(entry["steady_s"])
        entry["load_mean"] = statistics.fmean(entry["steady_load"])
    return out


# ------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """This process's resident set size now, in bytes (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Polls the resident set size every 2 ms in a thread; ``peak`` is the maximum seen
    (ru_maxrss cannot be reset, and setup may have peaked higher than the method)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


def peak_working_memory(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Calls ``fn()`` while polling RSS; returns ``(fn's value, working memory, baseline)``:
    working memory is the peak RSS during the call minus the RSS just before it (bytes, at
    least 0), baseline that RSS before it. Meaningful in a fresh process (:func:`run_child`),
    where nothing else allocates."""
    baseline = rss_bytes()
    with PeakRSS() as watcher:
        value = fn()
    return value, max(watcher.peak - baseline, 0), baseline


# ------------------------------------------------------------------------------- child process
def run_child(module: str, args: Sequence[str], timeout: float, env: dict[str, str | None] | None = None) -> dict:
    """Runs ``python -m module *args --child-out PATH`` in a fresh process, from the repository
    root, and returns the dict the child saved to PATH with ``torch.save``. ``env``: variables to
    set in the child's environment (None: to remove), over this process's.

    Returns ``{"error": text}`` instead when the child ran past ``timeout`` seconds, exited with
    an error or saved nothing (text: the end of its stderr, or stdout when stderr is empty).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        cmd = [sys.executable, "-m", module, *args, CHILD_OUT_FLAG, out]
        child_env = dict(os.environ)
        for name, value in (env or {}).items():
            if value is None:
                child_env.pop(name, None)
            else:
                child_env[name] = value
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=child_env)
        except subprocess.TimeoutExpired:
            return {"error": f"ran past {timeout} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        # our own child wrote this file into a private temporary folder a moment ago (plans and
        # timing records, not only tensors): nothing foreign is unpickled
        return torch.load(out, weights_only=False)


# ------------------------------------------------------------------------------------- FLOPs
def counted_flops(call: Callable[[], Any]) -> tuple[int, Any]:
    """``(FLOPs, result)`` of one ``call()``: matrix products, convolutions and their backward
    passes as ``torch.utils.flop_counter`` counts them (elementwise work is not counted), with a
    grouped convolution's weight gradient divided by its groups (:func:`conv_backward_flops`), and
    what its table leaves out: in-place products (``addmm_``, ``baddbmm_``: the dense route's sums of
    per-example gradients into group rows) and CPU's fused attention (``scaled_dot_product_attention``
    on CPU runs ``_scaled_dot_product_flash_attention_for_cpu``, uncounted, while the math attention of a
    vmapped or forward-mode pass is counted). The ratio of two counts is the time ratio a machine would
    reach if every product ran at one rate and nothing else cost anything: a floor no implementation of
    the same operations beats."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten.convolution_backward: conv_backward_flops, aten.addmm_: _in_place_mm_flops,
               aten.baddbmm_: _in_place_bmm_flops}
    for name, count in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward_flops)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = count
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = call()
    return counter.get_total_flops(), result


def _in_place_mm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``addmm_``: the product's 2·n·k·m (as torch counts ``addmm``)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _in_place_bmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``baddbmm_``: the batched product's 2·b·n·k·m (as torch counts ``baddbmm``)."""
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                        groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward`` (shapes, as ``torch.utils.flop_counter`` passes
    them): torch's own count of the input gradient, and of the weight gradient divided by
    ``groups``. torch counts a grouped convolution's weight gradient as if every group saw every
    group's channels, so per-example weight gradients formed by one convolution with an example
    per group (genkernel's per-example convolution gradients) would count B times over."""
    from torch.utils.flop_counter import conv_backward_flop

    shapes = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    inputs = conv_backward_flop(*shapes, [output_mask[0], False, False], out_val=out_shape)
    weights = conv_backward_flop(*shapes, [False, output_mask[1], False], out_val=out_shape)
    return inputs + weights // groups


def count_flops(run_slice: Callable[[int], bool], m: int, n: int) -> float | None:
    """Matmul-class FLOPs (``torch.utils.flop_counter``) of a full m × n run, or None.

    ``run_slice(k)`` runs the work on the first k rows of both sides and returns whether it
    finished. Counted for k = 4 and 8, fitted as a·k + b·k² (per-example work plus pairwise
    work) and evaluated as a·m + b·m·n; None when the counter fails or a slice did not finish.
    """
    counts = []
    try:
        for k in (4, 8):
            flops, finished = counted_flops(lambda: run_slice(k))  # noqa: B023 - called at once
            if not finished:
                return None
            counts.append(flops)
    except Exception:  # noqa: BLE001 - a counter failure must not lose the timing
        return None
    b = max((counts[1] - 2 * counts[0]) / 32, 0.0)
    a = max((counts[0] - 16 * b) / 4, 0.0)
    return a * m + b * m * n


def matmul_flops() -> float:
    """FLOP/s of a float32 1024² matmul on this machine, now (on :func:`use_bench_threads` threads)."""
    use_bench_threads()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * 1024**3 * reps / (time.perf_counter() - start)


def cpu_profile(fn: Callable[[], object], row_limit: int = 12) -> str:
    """Where the time of ``fn()`` goes: torch.profiler's table of its CPU operators, sorted by
    self CPU time, ``row_limit`` rows."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


# ----------------------------------------------------------------------------------- outputs
def print_ratios(title: str, table: dict[str, dict[str, float | None]]) -> str:
    """Prints ``table`` ({row: {column: ratio}}) as rows side by side under ``title``, columns in
    order of first appearance, "—" where a row has no value; returns the printed text."""
    columns = list(dict.fromkeys(col for cells in table.values() for col in cells))
    width = max([len(row) for row in table] + [4])
    lines = [title, " " * width + "".join(f" {col:>10s}" for col in columns)]
    for row, cells in table.items():
        values = "".join(" " + (f"{cells[col]:10.3g}" if cells.get(col) is not None else f"{'—':>10s}")
                         for col in columns)
        lines.append(f"{row:{width}s}{values}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_outputs(report: dict, json_path: Path, png_path: Path, plot: Callable[[dict, BinaryIO], None]) -> None:
    """Writes ``report`` as indented JSON to ``json_path``, then ``plot(report, file)``'s figure
    (a PNG written to an open binary file) to ``png_path``; each file is written beside its target
    and renamed into place (``io.atomic_file``), so a run that fails midway never leaves a
    half-written file. The JSON is strict: non-finite numbers
    are written as null (``NaN``/``Infinity`` tokens are not JSON; genkernel's ``jsonable``).
    Returns nothing."""
    from genkernel.core.tracking.io import jsonable

    text = json.dumps(jsonable(report), indent=2, allow_nan=False)
    from genkernel.core.tracking.io import atomic_file

    with atomic_file(json_path, "w") as handle:
        handle.write(text)
    with atomic_file(png_path, "wb") as handle:
        plot(report, handle)
