"""Reading read40b of f5b4e20..fdb9be8: the float64 replay's watch of outside modules (TrainingReplay.watching) and
the GAN analyzer's gather of the global batch under DDP (distributed.gathered_over_ranks).

1. ``watching()`` registered a fresh global forward pre-hook around every float64 training forward. A compiled
   module in the loss (a GAN's ``torch.compile``-d discriminator) runs the global hooks inside its compiled frame:
   dynamo traced the hook, failed on its dict of modules, and every tracked step was refused and rolled back (the
   model did not train at all; at f5b4e20 it trained bit for bit as untracked). Made traceable only, the hook
   recompiled the discriminator at every step (dynamo guards the global hooks' dict keys), past its cache limit.
2. ``gathered_over_ranks`` reshaped a rank's rows with ``reshape(n, -1)``, which raises for n = 0: a rank whose
   shard is empty crashed and the other ranks waited in the next collective (the docstring allows unequal counts).
"""

import datetime
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _compiled_d_run(track: bool, steps: int):
    """G (float64) trained by SGD on (D(G(x)) - y)², D a compiled BatchNorm network in train mode (its running
    statistics move in every forward); tracked by a float64 graph-route tracker (whose step watches outside
    modules) or not. Returns G's parameters, D's buffers and dynamo's count of compiled graphs."""
    from torch._dynamo.utils import counters

    from genkernel.core.tracking.tracker import PathKernelTracker

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    D = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 1)).to(F64)
    compiled = torch.compile(D, backend="eager")
    optimizer = torch.optim.SGD(G.parameters(), lr=0.05)

    def loss_fn(out, y):
        return (compiled(out) - y).pow(2).flatten()

    tracker = PathKernelTracker(G, optimizer, loss_fn, torch.randn(4, 3, dtype=F64), num_groups=2,
                                gradient_route="graph", group_state="dense") if track else None
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, dtype=F64, generator=data), torch.randn(8, 1, dtype=F64, generator=data)
        if track:
            tracker.step(x, y, torch.arange(8) % 2)
        else:
            optimizer.zero_grad()
            loss_fn(G(x), y).mean().backward()
            optimizer.step()
    if tracker is not None:
        tracker.close()
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return [p.detach().clone() for p in G.parameters()] + [b.clone() for b in D.buffers()], graphs


def _replay_scenario():
    """One lr-0 float64 step with a compiled BatchNorm D in the loss, then its replay run by hand: (the allowance's
    parameter names, G's parameter names, whether D's buffers are as training left them)."""
    from genkernel.core.tracking import rounding
    from genkernel.core.tracking.tracker import PathKernelTracker

    made = []
    original = rounding.TrainingReplay.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    rounding.TrainingReplay.__init__ = init
    torch._dynamo.reset()
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    D = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 1)).to(F64)
    compiled = torch.compile(D, backend="eager")
    optimizer = torch.optim.SGD(G.parameters(), lr=0.0)
    tracker = PathKernelTracker(G, optimizer, lambda out, y: (compiled(out) - y).pow(2).flatten(),
                                torch.randn(4, 3, dtype=F64), num_groups=2, gradient_route="graph", group_state="dense")
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64)
    start = D[1].running_mean.clone()
    tracker.step(x, y, torch.arange(8) % 2)
    assert not torch.equal(D[1].running_mean, start)  # training's forward moved them
    after = [b.clone() for b in D.buffers()]
    allowance = made[-1].rounding(torch.full((8,), 1 / 8, dtype=F64))
    tracker.close()
    rounding.TrainingReplay.__init__ = original
    torch._dynamo.reset()
    return sorted(allowance), sorted(name for name, _ in G.named_parameters()), \
        all(torch.equal(a, b) for a, b in zip(after, D.buffers()))


def _child_main(out: str) -> None:
    """The compiled scenarios, run in a child process (dynamo's compilation in this one made the autograd engine
    refuse fork-based workers of later tests: test_ddp_hunt's)."""
    torch.set_num_threads(1)
    results = {}
    for name, scenario in (("plain", lambda: _compiled_d_run(False, 10)), ("tracked", lambda: _compiled_d_run(True, 10)),
                           ("replay", _replay_scenario)):
        try:
            results[name] = ("ok", scenario())
        except Exception as error:  # noqa: BLE001 - the outcome is the test's subject
            results[name] = (type(error).__name__, str(error)[:2000])
    torch.save(results, out)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("read40b") / "compiled.pt"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
    code = f"import sys; sys.path.insert(0, {tests!r}); import test_read40b; test_read40b._child_main({str(out)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, timeout=120, check=True)
    return torch.load(out, weights_only=False)


def test_a_compiled_discriminator_in_the_loss_trains_as_untracked_and_compiles_once(compiled):
    """A float64 tracker whose loss runs a ``torch.compile``-d BatchNorm discriminator (backend "eager"), 10 steps
    (past dynamo's default cache limit of 8). Checked: every step is taken (no refusal), G's parameters and D's
    running statistics after the run equal the untracked twin's bit for bit, and D is compiled once (1 graph), as in
    the untracked run.

    Fails on HEAD fdb9be8 (passes at f5b4e20): step 1 is refused, dynamo's AssertionError "UnspecializedNNModule
    Variable(Sequential) is already tracked for mutation" raised from tracing watching()'s hook; with the hook
    merely skipped while compiling, 10 graphs (one recompile per step: the hooks dict's key is guarded)."""
    assert compiled["plain"][0] == "ok" and compiled["tracked"][0] == "ok", compiled["tracked"]
    (plain, plain_graphs), (tracked, tracked_graphs) = compiled["plain"][1], compiled["tracked"][1]
    assert all(torch.equal(a, b) for a, b in zip(plain, tracked))
    assert plain_graphs == 1 and tracked_graphs == 1


def test_the_replay_of_a_compiled_discriminator_reproduces_training_from_its_kept_statistics(compiled):
    """At lr 0 (θ unchanged by the step), after one float64 step whose loss runs a compiled BatchNorm D in train mode,
    the step's replay is run again by hand: it must reproduce the training losses (an allowance for every parameter
    of G) from D's running statistics as the training forward found them (kept from the compiled module's wrapper,
    whose buffers lie in its submodules), and leave D's buffers as training left them, bit for bit.

    Fails on HEAD fdb9be8: the step itself is refused (dynamo fails tracing the watch hook)."""
    assert compiled["replay"][0] == "ok", compiled["replay"]
    allowance, names, untouched = compiled["replay"][1]
    assert allowance == names and untouched


WORLD = 2
# rank r's rows in each case: unequal counts, one rank's shard empty, integer rows (roles, classes), non-contiguous
CASES = {
    "empty_shard": lambda r: torch.arange(6, dtype=torch.float32).reshape(3, 2)[: 0 if r == 0 else 3] + 10 * r,
    "all_empty": lambda r: torch.zeros(0, 2, 5),
    "integers": lambda r: torch.arange(r + 1, dtype=torch.long) + 100 * r,
    "transposed": lambda r: (torch.arange(12.0).reshape(3, 4) + r).t(),
}


def _gather_worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=8))
    try:
        from genkernel.core.tracking.distributed import gathered_over_ranks

        results = {}
        for name, rows in CASES.items():
            try:
                results[name] = ("ok", gathered_over_ranks(rows(rank), dist.group.WORLD))
            except Exception as error:  # noqa: BLE001 - the outcome is the test's subject
                results[name] = (type(error).__name__, str(error))
                break  # (the other rank waits in a collective this one left)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gathered_over_ranks_is_the_concatenation_in_rank_order_with_an_empty_shard(tmp_path):
    """Two gloo ranks gather rows with unequal counts, one rank's shard empty ([0, 2] beside [3, 2]), every shard
    empty ([0, 2, 5]), long rows of counts 1 and 2, transposed (non-contiguous) rows. Checked on every rank: the
    result is torch.cat of the ranks' rows in rank order, with their dtype and trailing shape.

    Fails on HEAD fdb9be8: rank 0 raises "cannot reshape tensor of 0 elements into shape [0, -1]" (its empty shard)
    while rank 1 waits in the gather (the group's timeout)."""
    import genkernel.core.tracking.distributed  # noqa: F401 - imported once, for the forked workers

    context = mp.start_processes(_gather_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="fork")
    for process in context.processes:
        process.join(timeout=60)
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    for rank in range(WORLD):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} did not finish"
        results = torch.load(path, weights_only=False)
        for name, rows in CASES.items():
            assert results.get(name, ("missing",))[0] == "ok", (rank, name, results.get(name))
            expected = torch.cat([rows(r) for r in range(WORLD)])
            got = results[name][1]
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), name
