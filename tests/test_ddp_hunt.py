"""A black-box hunt of multi-process training (2 CPU processes, gloo) against one process on the same global
batches: GANKernelAnalyzer observing a loop whose G and D are each wrapped in DistributedDataParallel, and the
tracker observing an accumulating loop.

* The grouping fitted on "the first batch" (without ``reference_latents``: "magnitude" quantile edges, "direction"
  k-means centres) was fitted by each rank on its own shard, so group g meant another range of ‖w‖ on each rank;
  the ranks' group rows, summed row by row, mixed them. Silently: the groups' sum, the ledger identity and
  training stayed exact and the ranks agreed with each other, but the per-group generator ledger was off the
  single-process run's by 0.005 (2 ranks) to 0.08 (3 ranks) of its largest entry with "magnitude", 0.24 to 0.57 with
  "direction", and the group counts were other counts. It is now fitted on the global first batch (every rank's
  shard gathered in rank order), as one process fits it.
* D's default probes ("the first 32 real and 32 generated rows of the first discriminator batch") were each rank's
  own rows: each rank kept D's ledger at other points (4 + 4 rows here instead of the global batch's 8 + 8), the
  ranks' D ledgers disagreed. They are now taken from the global first batch.
* A generator micro-batch the analyzer refused on one rank only (its own check of a non-finite loss or D
  gradient) was refused on that rank alone: the ranks fell apart (rank 1 crashed in gloo). It is now refused on
  every rank.
* The kernel-smoothed field −Σ_i c_i K_G(z', z_i) w_i (``alignment``'s cos_kernel_field, cos_field_vs_local, the
  field snapshots) was each rank's shard's alone: every rank reported another field, none the step's (plain SGD:
  the single-process run's cos_kernel_field is 1 to rounding, each rank's 0.99999). The pulled vector is now
  averaged over the ranks as DDP averages the gradient.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from test_distributed_review import run_scenarios

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
WORLD = 2
B = 4  # examples per rank (generator step) / real and generated rows per rank (discriminator step)
LATENT = 3
ITERATIONS = 3
PER_RANK = 4


def gan_pair():
    from genkernel.gan import MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    return (MLPGenerator(LATENT, 2, hidden=6, depth=2).to(F64).train(),
            MLPDiscriminator(2, hidden=6, depth=2).to(F64).train())


def gan_batches():
    """``ITERATIONS`` global batches: real rows, D's latents, G's latents (``WORLD * B`` rows each)."""
    gen = torch.Generator().manual_seed(11)
    return (torch.randn(ITERATIONS, WORLD * B, 2, generator=gen, dtype=F64) * 2.0,
            torch.randn(ITERATIONS, WORLD * B, LATENT, generator=gen, dtype=F64),
            torch.randn(ITERATIONS, WORLD * B, LATENT, generator=gen, dtype=F64))


def gan_loop(G, D, rows, *, analyze, nan_on_rank=None):
    """A non-saturating GAN loop on ``rows`` of every global batch (plain SGD for both players), observed by a
    GANKernelAnalyzer with the "magnitude" grouping fitted on the first batch and D's default probes; G and D may
    be DDP-wrapped. ``nan_on_rank``: that rank's second generator loss has a NaN row, and a micro-batch the
    analyzer refuses (NonFiniteError) is skipped by the loop, its generator step not taken. Returns the parameters,
    the refusals and, analyzed, the generator's geometry ledger, D's ledger, the group counts and the alignment
    rows."""
    from genkernel.core.errors import NonFiniteError
    from genkernel.gan import GANKernelAnalyzer
    from genkernel.gan.losses import REAL

    g_module, d_module = getattr(G, "module", G), getattr(D, "module", D)
    g_opt, d_opt = torch.optim.SGD(g_module.parameters(), lr=0.05), torch.optim.SGD(d_module.parameters(), lr=0.04)
    analyzer = None
    if analyze:
        probes = torch.randn(4, LATENT, generator=torch.Generator().manual_seed(5), dtype=F64)
        analyzer = GANKernelAnalyzer(G, D, probes, grouping="magnitude", num_groups=2, window=2, eval_every=1)
        analyzer.bind(g_opt, d_opt)
    real_all, zd_all, zg_all = gan_batches()
    refusals = []
    n = real_all[0, rows].shape[0]
    roles = torch.cat([torch.full((n,), REAL), torch.zeros(n, dtype=torch.long)])
    for i in range(ITERATIONS):
        real, zd, zg = real_all[i, rows], zd_all[i, rows], zg_all[i, rows]
        with torch.no_grad():
            fake = g_module(zd)
        x = torch.cat([real, fake])
        s = D(x).reshape(-1)
        losses = torch.cat([F.softplus(-s[:n]), F.softplus(s[n:])])
        d_opt.zero_grad()
        if analyzer is not None:
            analyzer.observe_discriminator(losses, roles, x, weights=torch.full((2 * n,), 1.0 / n, dtype=F64))
        (losses.sum() / n).backward()
        d_opt.step()
        g_opt.zero_grad()
        d_module.requires_grad_(False)
        fake = G(zg)
        g_losses = F.softplus(-d_module(fake).reshape(-1))
        if nan_on_rank is not None and i == 1 and dist.get_rank() == nan_on_rank:
            g_losses = g_losses * torch.tensor([float("nan")] + [1.0] * (n - 1), dtype=F64)
        try:
            if analyzer is not None:
                analyzer.observe_generator(g_losses, zg, fake)
        except NonFiniteError as error:  # the loop skips the generator step
            refusals.append((i, str(error)))
        else:
            g_losses.mean().backward()
            g_opt.step()
        d_module.requires_grad_(True)
    out = {"g": [p.detach().clone() for p in g_module.parameters()],
           "d": [p.detach().clone() for p in d_module.parameters()], "refusals": refusals}
    if analyzer is not None:
        g_ledger, d_ledger = analyzer.generator_ledger(), analyzer.discriminator_ledger
        out.update(g_ledger=g_ledger.contributions.clone(), d_ledger=d_ledger.contributions.clone(),
                   d_probes=analyzer.discriminator_probes.clone(), g_counts=list(analyzer.g_group_counts),
                   alignment=[dict(row) for row in analyzer.alignment])
    return out


def global_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ITERATIONS, WORLD * PER_RANK, 3, generator=gen, dtype=F64)
    y = torch.randn(ITERATIONS, WORLD * PER_RANK, 2, generator=gen, dtype=F64)
    groups = torch.randint(0, 3, (ITERATIONS, WORLD * PER_RANK), generator=gen)
    groups[:, PER_RANK:] %= 2  # group 2 never on rank 1's shard; group 3 (of 4) on none
    return x, y, groups


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def accumulating_loop(model, micro_rows, *, track):
    """Adam, each step of 2 micro-batches (the first under no_sync() for a DDP model), clip_grad_norm_ at 0.05
    (below every step's norm), observed by a PathKernelTracker with 4 groups. Returns parameters (and the ledger)."""
    from genkernel import PathKernelTracker
    from genkernel.supervised import mse_loss

    module = getattr(model, "module", model)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02, weight_decay=0.01)
    probes = torch.linspace(-1, 1, 12, dtype=F64).reshape(4, 3)
    tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=4) if track else None
    x, y, groups = global_data()
    norms = []
    for k in range(ITERATIONS):
        for m, rows in enumerate(micro_rows):
            accumulate = m < len(micro_rows) - 1 and hasattr(model, "no_sync")
            with model.no_sync() if accumulate else contextlib.nullcontext():
                losses = mse_loss(model(x[k, rows]), y[k, rows])
                if tracker is not None:
                    tracker.observe(losses, groups[k, rows])
                (losses.mean() / len(micro_rows)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(module.parameters()), 0.05)))
        optimizer.step()
        optimizer.zero_grad()
    out = {"params": [p.detach().clone() for p in module.parameters()], "norms": norms}
    if tracker is not None:
        ledger = tracker.ledger
        out.update(contributions=ledger.contributions.clone(), rest=ledger.rest.clone(), steps=ledger.steps,
                   identity=float((ledger.contributions.sum(1) + ledger.rest + ledger.residual
                                   - (ledger.f_end - ledger.f_start)).abs().max()))
    return out


def ddp(module):
    return torch.nn.parallel.DistributedDataParallel(module)


def gan_scenario(rank):
    rows = slice(rank * B, (rank + 1) * B)
    bare = gan_loop(*(ddp(m) for m in gan_pair()), rows, analyze=False)
    return {"bare": bare, "analyzed": gan_loop(*(ddp(m) for m in gan_pair()), rows, analyze=True)}


def accumulation_scenario(rank):
    half = PER_RANK // 2
    rows = [slice(rank * PER_RANK + i * half, rank * PER_RANK + (i + 1) * half) for i in range(2)]
    return {"bare": accumulating_loop(ddp(make_net()), rows, track=False),
            "tracked": accumulating_loop(ddp(make_net()), rows, track=True)}


def single_process():
    """Both loops in one process on the global batches (micro-batch i: every rank's i-th half, in rank order)."""
    half = PER_RANK // 2
    micro = [torch.cat([torch.arange(r * PER_RANK + i * half, r * PER_RANK + (i + 1) * half) for r in range(WORLD)])
             for i in range(2)]
    return {"gan": gan_loop(*gan_pair(), slice(0, WORLD * B), analyze=True),
            "accumulation": accumulating_loop(make_net(), micro, track=True)}


# (the single-process references run in the workers too, which have paid the imports a first optimizer makes:
# torch._dynamo, 4 s a process)
def nan_on_one_rank(rank):
    rows = slice(rank * B, (rank + 1) * B)
    return gan_loop(*(ddp(m) for m in gan_pair()), rows, analyze=True, nan_on_rank=1)


# (last: before, rank 1 crashed there, in gloo)
SCENARIOS = {"gan": gan_scenario, "accumulation": accumulation_scenario, "single": lambda rank: single_process(),
             "nan_on_one_rank": nan_on_one_rank}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process job once (test_distributed_review's :func:`run_scenarios`, spawned, killed after 120 s):
    every scenario's per-rank results, and the single-process references (computed by rank 0, each loop without
    DDP on the global batches). (Spawned, not forked: a worker forked from a pytest process that has run autograd
    in threads, a torch.compile'd test before in the same xdist worker, fails in its first backward.)"""
    results, _ = run_scenarios(tmp_path_factory.mktemp("ddp_hunt"), __name__, timeout=120)
    return results, results.pop("single")[0]


def finished(results):
    """Each rank's result of a scenario, checked to have returned on every rank."""
    for rank, result in enumerate(results):
        assert result is not None and result[0] == "ok", (rank, result)
    return [result[1] for result in results]


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_gan_groups_fitted_on_the_first_batch_are_the_global_batchs_under_ddp(runs):
    """Every rank's generator ledger per "magnitude" group (quantile edges fitted on the first batch and the
    probes) and its group counts equal the single-process run's on the global batches, to float64 rounding;
    training is bit for bit the un-analyzed DDP loop's. Fails on the old code: each rank fitted the edges on its
    own shard; the ranks' ledgers agreed with each other but were 0.005 of the largest entry off per group (the
    groups' sum exact), the counts [[2, 6], [1, 7], [0, 8]] where one process counts [[3, 5], [0, 8], [0, 8]]."""
    ranks, single = runs
    reference = finished([single])[0]["gan"]
    for result in finished(ranks["gan"]):
        analyzed, bare = result["analyzed"], result["bare"]
        assert all(torch.equal(a, b) for a, b in zip(analyzed["g"] + analyzed["d"], bare["g"] + bare["d"]))
        assert relative(analyzed["g_ledger"].sum(1), reference["g_ledger"].sum(1)) < 1e-12  # held before too
        assert analyzed["g_counts"] == reference["g_counts"]
        assert relative(analyzed["g_ledger"], reference["g_ledger"]) < 1e-12


def test_gan_default_discriminator_probes_are_the_global_first_batchs_under_ddp(runs):
    """D's default probes (the first real and generated rows of the first discriminator batch) are the global
    batch's on every rank, and D's ledger is the single-process run's. Fails on the old code: each rank took its
    own 4 + 4 rows (of the global 8 + 8), and the ranks kept D's ledger at other points."""
    ranks, single = runs
    reference = finished([single])[0]["gan"]
    for result in finished(ranks["gan"]):
        analyzed = result["analyzed"]
        assert torch.equal(analyzed["d_probes"], reference["d_probes"])
        assert relative(analyzed["d_ledger"], reference["d_ledger"]) < 1e-12


def test_gan_kernel_field_is_the_global_batchs_under_ddp(runs):
    """The alignment rows (cos_kernel_field: the probes' change against the kernel-smoothed field of the step's
    examples; cos_field_vs_local) equal the single-process run's on every rank, to 1e-9. Fails on the old code:
    each rank's field was its own shard's (cos_kernel_field 0.99999 on each rank where one process has 1.0)."""
    ranks, single = runs
    reference = finished([single])[0]["gan"]["alignment"]
    assert len(reference) == ITERATIONS
    for result in finished(ranks["gan"]):
        rows = result["analyzed"]["alignment"]
        assert len(rows) == len(reference)
        for row, expected in zip(rows, reference):
            for key in ("cos_kernel_field", "cos_field_vs_local", "cos_local_push", "cos_formula"):
                assert abs(row[key] - expected[key]) < 1e-9, (key, row[key], expected[key])


def test_coverage_an_accumulating_clipped_adam_loop_keeps_the_single_process_ledger_under_ddp(runs):
    """Coverage (passes before): Adam with weight decay, two micro-batches a step (the first under no_sync()),
    clip_grad_norm_ that bites, a group absent from rank 1's shard and one absent everywhere: every rank's ledger is
    the single-process run's on the global micro-batches to float64 rounding, the ranks' ledgers are bit for bit
    equal, the ledger identity holds, and training is bit for bit the un-tracked DDP loop's."""
    ranks, single = runs
    reference = finished([single])[0]["accumulation"]
    assert min(reference["norms"]) > 0.05  # the clipping bites
    scale = float(reference["contributions"].abs().max())
    accumulation = finished(ranks["accumulation"])
    for result in accumulation:
        tracked, bare = result["tracked"], result["bare"]
        assert all(torch.equal(a, b) for a, b in zip(tracked["params"], bare["params"]))
        assert tracked["steps"] == ITERATIONS and tracked["identity"] < 1e-12
        torch.testing.assert_close(tracked["contributions"], reference["contributions"], rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(tracked["rest"], reference["rest"], rtol=0, atol=1e-12 * scale)
        assert float(tracked["contributions"][:, 3].abs().max()) == 0.0  # the empty group
    assert torch.equal(accumulation[0]["tracked"]["contributions"], accumulation[1]["tracked"]["contributions"])


def test_a_generator_micro_batch_the_gan_analyzer_refuses_on_one_rank_is_refused_on_every_rank(runs):
    """Rank 1 alone has a non-finite generator loss at the second iteration; the loop skips a generator step the
    analyzer refuses. Every rank refuses it (rank 1 with the analyzer's own error, rank 0 naming rank 1, both
    NonFiniteError), the run goes on, and the ranks' generators and ledgers stay equal, bit for bit. Fails on the
    old code: the analyzer's own finiteness check ran on rank 1 alone, before any meeting of the ranks; rank 0 went
    on into the generator's collectives while rank 1 skipped to the discriminator's, and gloo crashed rank 1 (or the
    ranks waited until the process group's timeout)."""
    ranks, _ = runs
    results = finished(ranks["nan_on_one_rank"])
    assert [i for i, _ in results[0]["refusals"]] == [i for i, _ in results[1]["refusals"]] == [1]
    assert "non-finite generator loss" in results[1]["refusals"][0][1]
    assert "refused on rank [1]" in results[0]["refusals"][0][1]
    assert all(torch.equal(a, b) for a, b in zip(results[0]["g"] + results[0]["d"], results[1]["g"] + results[1]["d"]))
    assert torch.equal(results[0]["g_ledger"], results[1]["g_ledger"])
