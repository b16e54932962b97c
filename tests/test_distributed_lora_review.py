"""A LoRA fine-tune under DistributedDataParallel (2 CPU processes, gloo), as accelerate runs diffusers'
LoRA scripts on several processes: a tiny conditional UNet with its base frozen and peft adapters on the
attention projections, wrapped in DDP, observed by ``NoiseLevelAnalyzer`` (bind(ddp_model, optimizer,
ema=)), AdamW over the adapters, gradient accumulation (the first micro-batch under ``no_sync()``),
global-norm clipping that bites, and an EMA of the adapters only.

* coverage: every rank's ledger and EMA ledger equal a single-process run on the same global batches
  (to float64 rounding), the ranks' ledgers are bit for bit equal, training is bit for bit the same as
  the same DDP loop without the analyzer, the frozen base never moves; ``find_unused_parameters=True``
  keeps the same ledger bit for bit.
* two frozen base weights of one shape swapped on one rank (the same values in other places) are
  refused on every rank. Before, the replicas' digests (sums of the bit patterns and their squares)
  could not tell them apart: the ranks stepped alike (DDP averages the adapters' gradients) but each
  rank's ledger followed its own model, rank 1's contributions off by 0.016 of a largest 0.025, with no
  error. The digest now also sums each element times a weight of its place (its row's and its column's); it
  tells a swap, a transpose, rows or columns exchanged apart, where the old two sums could not.
* a tracker that does not fit on one rank only (free memory is per device) is refused on every rank with a
  MemoryError. Before, rank 1 refused at bind and rank 0 waited in its first observe() until the process
  group's timeout.
"""

import contextlib

import pytest
import torch

from test_distributed_review import run_scenarios

pytest.importorskip("peft")

F64 = torch.float64
T = 100
WORLD = 2
STEPS = 2
MICRO_BATCHES = 2
GLOBAL_BATCH = 4  # examples per micro-batch over the ranks
MAX_GRAD_NORM = 0.05  # below every step's gradient norm (0.086, 0.077): the clipping bites

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def lora_unet(**config):
    from test_lora_review import lora_unet as make

    return make(**config)


def global_micro_batches():
    """``STEPS * MICRO_BATCHES`` global micro-batches ``(z [4, 1, 4, 4], t [4], text [4, 3, 8], target [4, 1, 4, 4])``."""
    from genkernel.diffusion import make_scheduler, noisy_input, training_target

    scheduler, gen, out = make_scheduler(T), torch.Generator().manual_seed(3), []
    for _ in range(STEPS * MICRO_BATCHES):
        x0 = torch.randn(GLOBAL_BATCH, 1, 4, 4, generator=gen, dtype=F64)
        noise, text = torch.randn_like(x0), torch.randn(GLOBAL_BATCH, 3, 8, generator=gen, dtype=F64)
        t = torch.randint(0, T, (GLOBAL_BATCH,), generator=gen)
        out.append((noisy_input(scheduler, x0, noise, t), t, text, training_target(scheduler, x0, noise, t)))
    return out


def accumulating_loop(model, rows, *, analyze):
    """The LoRA scripts' loop on ``rows`` of each global micro-batch: AdamW over the trainable parameters,
    micro-batches before a step's last under ``no_sync()`` (a DDP model), clip_grad_norm_, an EMAModel of
    the adapters stepped after each step. Returns ``{"params", "ema", "norms"[, "ledger", "ema_ledger",
    "residual"]}`` (every parameter, the EMA's shadows, each step's gradient norm before clipping; the
    analyzer's contributions [bins, probes, ...] and the EMA's)."""
    from diffusers.training_utils import EMAModel

    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
    from test_lora_review import probe_set

    module = getattr(model, "module", model)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    average = EMAModel(trainable, decay=0.9)
    analyzer = None
    if analyze:
        probes, probe_text, _ = probe_set()
        analyzer = NoiseLevelAnalyzer(make_scheduler(T), probes, num_bins=3, num_probes=2, controls=0, kernel_points=2,
                                      kernel_sketch=1, probe_conditioning=probe_text, progress=False)
        analyzer.bind(model, optimizer, ema=average)
    batches, norms = global_micro_batches(), []
    for k in range(STEPS):
        for m in range(MICRO_BATCHES):
            z, t, text, target = (v[rows] for v in batches[k * MICRO_BATCHES + m])
            accumulate = m < MICRO_BATCHES - 1 and hasattr(model, "no_sync")
            with model.no_sync() if accumulate else contextlib.nullcontext():
                losses = ((model(z, t, text).sample - target) ** 2).mean(dim=(1, 2, 3))
                if analyzer is not None:
                    analyzer.observe(losses, t)
                (losses.mean() / MICRO_BATCHES).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        average.step(trainable)
    out = {"params": [p.detach().clone() for p in module.parameters()], "norms": norms,
           "ema": [s.detach().clone() for s in average.shadow_params]}
    if analyzer is not None:
        out.update(ledger=analyzer.contributions.clone(), ema_ledger=analyzer.ema_ledgers["level"].contributions.clone(),
                   residual=analyzer.residual()["relative_residual"])
    return out


def ddp(unet, **kwargs):
    return torch.nn.parallel.DistributedDataParallel(unet, **kwargs)


def shard(rank):
    return slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)


def frozen_weights_swapped_on_rank_1(rank):
    """The observed loop after rank 1 exchanged the frozen base weights of its first cross-attention's to_k and
    to_v (both [8, 8]) once wrapped (a checkpoint mapped wrongly on one rank). Returns the ledger."""
    model = ddp(lora_unet())
    if rank == 1:
        attention = model.module.down_blocks[0].attentions[0].transformer_blocks[0].attn2
        to_k, to_v = attention.to_k.base_layer.weight, attention.to_v.base_layer.weight
        with torch.no_grad():
            saved = to_k.clone()
            to_k.copy_(to_v)
            to_v.copy_(saved)
    return accumulating_loop(model, shard(rank), analyze=True)["ledger"]


def memory_short_on_rank_1(rank):
    """The analyzer bound where rank 1's device has 1000 bytes free (another process holds its GPU's memory):
    rank 1 refuses the tracker at its memory check. Returns the ledger."""
    from unittest import mock

    from genkernel.core import cost

    free = (lambda device: 1000) if rank == 1 else cost.available_memory
    with mock.patch.object(cost, "available_memory", free):
        return accumulating_loop(ddp(lora_unet()), shard(rank), analyze=True)["ledger"]


SCENARIOS = {
    "bare": lambda rank: accumulating_loop(ddp(lora_unet()), shard(rank), analyze=False),
    "analyzed": lambda rank: accumulating_loop(ddp(lora_unet()), shard(rank), analyze=True),
    "find_unused_parameters": lambda rank: accumulating_loop(ddp(lora_unet(), find_unused_parameters=True), shard(rank),
                                                             analyze=True)["ledger"],
    "frozen_weights_swapped_on_rank_1": frozen_weights_swapped_on_rank_1,
    # last: before, rank 0 waited in its first observe() until the process group's timeout, which broke the group
    "memory_short_on_rank_1": memory_short_on_rank_1,
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario run once in a 2-process job (killed after 90 s); ``{scenario: [per-rank outcome]}``
    (None where a rank never got there), and ``"single"``: :func:`accumulating_loop` in one process on the
    global batches."""
    results, results["single"] = run_scenarios(
        tmp_path_factory.mktemp("ddp_lora_review"), __name__, timeout=90,
        # the single-process reference, computed while the ranks run
        while_running=lambda: accumulating_loop(lora_unet(), slice(0, GLOBAL_BATCH), analyze=True))
    return results


def ok(results):
    """The per-rank results of a scenario every rank finished."""
    assert all(r is not None and r[0] == "ok" for r in results), [r and r[:2] for r in results]
    return [r[1] for r in results]


def test_every_rank_keeps_the_single_process_ledger_and_trains_as_without_the_analyzer(ranks):
    """coverage: the ledgers, the EMA ledgers, the parameters and the EMA equal one process on the global
    batches (to float64 rounding; measured 4e-16 of a largest 0.03), the ranks' ledgers are equal bit for bit,
    and the DDP loop trains bit for bit as without the analyzer, its frozen base untouched."""
    bare, analyzed = ok(ranks["bare"]), ok(ranks["analyzed"])
    single = ranks["single"]
    assert min(single["norms"]) > MAX_GRAD_NORM  # the clipping scaled every step
    base = dict(lora_unet().named_parameters())
    frozen = [i for i, (n, p) in enumerate(lora_unet().named_parameters()) if not p.requires_grad]
    for rank in range(WORLD):
        run = analyzed[rank]
        assert all(torch.equal(p, q) for p, q in zip(run["params"], bare[rank]["params"]))
        assert all(torch.equal(p, q) for p, q in zip(run["ema"], bare[rank]["ema"]))
        assert all(torch.equal(run["params"][i], list(base.values())[i]) for i in frozen)
        assert all(torch.allclose(p, q, rtol=0, atol=1e-14) for p, q in zip(run["params"], single["params"]))
        assert all(torch.allclose(p, q, rtol=0, atol=1e-14) for p, q in zip(run["ema"], single["ema"]))
        for key in ("ledger", "ema_ledger"):
            scale = single[key].abs().max()
            assert scale > 1e-3
            assert (run[key] - single[key]).abs().max() <= 1e-12 * scale, key
            assert torch.equal(run[key], analyzed[0][key]), key
        assert run["residual"] < 2e-3
    assert not any(torch.equal(analyzed[0]["params"][i], list(base.values())[i]) for i in range(len(base)) if i not in frozen)


def test_find_unused_parameters_keeps_the_same_ledger(ranks):
    """coverage: DDP with find_unused_parameters=True (the frozen base is never handed to its reducer either
    way) keeps the default's ledger bit for bit on every rank."""
    default = [r["ledger"] for r in ok(ranks["analyzed"])]
    assert all(torch.equal(a, b) for a, b in zip(ok(ranks["find_unused_parameters"]), default))


def test_frozen_weights_swapped_on_one_rank_are_refused_on_every_rank(ranks):
    """Two frozen weights of one shape swapped on rank 1 (before: accepted, each rank's ledger its own model's,
    rank 1's 0.016 off on a largest 0.025): DDP averages only the adapters' gradients and the adapters stay
    equal, so only the replicas' digests can see it, and only a digest of the elements' places."""
    for result in ranks["frozen_weights_swapped_on_rank_1"]:
        assert result is not None and result[0] == "ValueError", result and result[0]
        assert "the ranks' parameters differ before this step (ranks [1] differ from rank 0)" in result[1], result[1]


def test_a_tracker_that_fits_on_one_rank_only_is_refused_on_every_rank(ranks):
    """Free memory is per device: a tracker refused by rank 1's memory check is refused on rank 0 too, with the
    MemoryError kind (before: rank 0 bound, then waited in its first observe() until the process group's
    timeout, 20 s here, and died with gloo's 'Connection closed by peer')."""
    rank_0, rank_1 = ranks["memory_short_on_rank_1"]
    assert rank_1 is not None and rank_1[0] == "MemoryError" and "would not fit" in rank_1[1], rank_1 and rank_1[:2]
    assert rank_0 is not None and rank_0[0] == "MemoryError", rank_0 and rank_0[:2]
    assert "was refused on rank [1] (MemoryError" in rank_0[1], rank_0[1]


def test_the_replica_digest_tells_the_same_values_in_other_places():
    """The replicas' parameter digest differs for the same values in other places: two [8, 8] weights swapped,
    one transposed, two of its rows or two of its columns exchanged (before: all four gave rank 0's digest), and
    stays equal for an equal replica (a None gradient counts as zeros, as before)."""
    from genkernel.core.tracking.distributed import _replica_digest

    def replica(change=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).double()
        first, second = net[0].weight, net[1].weight
        with torch.no_grad():
            if change == "swap":
                saved = first.clone()
                first.copy_(second)
                second.copy_(saved)
            elif change == "transpose":
                first.copy_(first.T.clone())
            elif change == "rows":
                first[[0, 1]] = first[[1, 0]]
            elif change == "columns":
                first[:, [0, 1]] = first[:, [1, 0]]
        return net

    reference = _replica_digest(replica())
    zero_gradients = replica()
    zero_gradients[0].weight.grad = torch.zeros_like(zero_gradients[0].weight)
    assert _replica_digest(zero_gradients) == reference
    for change in ("swap", "transpose", "rows", "columns"):
        digest = _replica_digest(replica(change))
        parameters = slice(0, len(digest) // 3)
        assert digest[parameters] != reference[parameters], change
        assert digest[len(digest) // 3:] == reference[len(reference) // 3:], change  # gradients and buffers alike
