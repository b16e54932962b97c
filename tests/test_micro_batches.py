"""Gradient accumulation inside one step (OptimizerStep(micro_batches=K), DDPMTrainer(micro_batches=),
SupervisedTrainer(micro_batches=)): the batch runs forward and backward in K micro-batches with the
gradients summed, then one clipping and one update. Checked against a hand-written accumulation loop
(bit for bit), against the whole batch at once (float64, to rounding), and under every tracker route:
training unchanged by tracking, the ledger identity, and the same group contributions as the whole
batch's step."""

import copy
import math

import pytest
import torch
from torch import nn

from genkernel import OptimizerStep, PathKernelTracker
from genkernel.core.tracking.step import micro_batch_rows
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.models import MLPDenoiser
from genkernel.supervised import SupervisedTrainer, mse_loss

F64 = torch.float64


def _mlp(seed=0, dtype=F64, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 12), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(12, 1)]
    return nn.Sequential(*layers).to(dtype)


def _data(n=10, dtype=F64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, generator=g, dtype=dtype), torch.randn(n, 1, generator=g, dtype=dtype)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_micro_batch_rows_split_as_tensor_split():
    for batch, k in [(10, 3), (8, 4), (5, 5), (7, 1)]:
        rows = micro_batch_rows(batch, k)
        sizes = [len(t) for t in torch.arange(batch).tensor_split(k)]
        assert [r.stop - r.start for r in rows] == sizes and rows[0].start == 0 and rows[-1].stop == batch


@pytest.mark.parametrize("weighted", [False, True])
def test_a_step_in_micro_batches_is_a_hand_written_accumulation_loop(weighted):
    """float32, dropout, clipping: the same parameters bit for bit."""
    x, y = _data(10, torch.float32)
    weights = torch.linspace(0.05, 0.15, 10) if weighted else None
    models = [_mlp(dtype=torch.float32, dropout=0.3) for _ in range(2)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in models]
    torch.manual_seed(5)
    for _ in range(3):
        OptimizerStep(models[0], optimizers[0], mse_loss, x, y, weights, max_grad_norm=0.5, micro_batches=3).run()
    torch.manual_seed(5)
    model, optimizer = models[1], optimizers[1]
    for _ in range(3):
        optimizer.zero_grad()
        for rows in (slice(0, 4), slice(4, 7), slice(7, 10)):
            losses = ((model(x[rows]) - y[rows]) ** 2).mean(dim=1)
            loss = (losses * weights[rows]).sum() if weighted else losses.sum() / 10
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
    assert torch.equal(_flat(models[0]), _flat(models[1]))


def test_micro_batches_minimize_the_whole_batch_loss():
    x, y = _data(10)
    grads = []
    for k in (1, 3, 10):
        model = _mlp()
        step = OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x, y, micro_batches=k)
        losses = step.compute_gradients()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        assert losses.shape == (10,)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-13, atol=1e-15)


def test_bad_micro_batch_counts_and_targets_are_refused():
    x, y = _data(4)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="micro_batches must be a positive int"):
            OptimizerStep(model, opt, mse_loss, x, y, micro_batches=bad)
    with pytest.raises(ValueError, match="cannot be run in 5 micro-batches"):
        OptimizerStep(model, opt, mse_loss, x, y, micro_batches=5)
    with pytest.raises(ValueError, match="do not have the batch's 4 rows"):
        OptimizerStep(model, opt, lambda out, t: ((out - t) ** 2).mean(dim=1), x, torch.zeros(1, 1), micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches=9 exceeds batch_size=8"):
        SupervisedTrainer(model, opt, mse_loss, batch_size=8, micro_batches=9)


def test_ddpm_trainer_refuses_more_micro_batches_than_its_batch_size():
    """DDPMTrainer ran every batch of a batch size below K in one-example micro-batches, fewer than asked,
    silently; now refused for Tensor data (batch_size=, capped at N) and for a DataLoader's batch size. A
    DataLoader's short last batch still runs in fewer (test_micro_batches_review)."""
    from genkernel.diffusion import DDPMTrainer, make_scheduler
    from genkernel.diffusion.models import MLPDenoiser

    model = MLPDenoiser(hidden=4, depth=1, time_dim=4)
    data = torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"micro_batches=5 exceeds the batch size 4 \(batch_size="):
        DDPMTrainer(model, make_scheduler(10), data, batch_size=4, micro_batches=5, progress=False)
    with pytest.raises(ValueError, match=r"micro_batches=7 exceeds the batch size 6 \(batch_size=, capped"):
        DDPMTrainer(model, make_scheduler(10), data, batch_size=32, micro_batches=7, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)
    with pytest.raises(ValueError, match=r"micro_batches=3 exceeds the batch size 2 \(the DataLoader's\)"):
        DDPMTrainer(model, make_scheduler(10), loader, micro_batches=3, progress=False)
    assert DDPMTrainer(model, make_scheduler(10), data, batch_size=4, micro_batches=4, progress=False).micro_batches == 4


ROUTES = [
    ("dense", "graph", torch.optim.Adam, {"lr": 0.02, "weight_decay": 1e-3}),
    ("dense", "example", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ("dense", "factored", torch.optim.AdamW, {"lr": 0.02}),
    ("factored", "auto", torch.optim.SGD, {"lr": 0.05}),
    ("sketched", "auto", torch.optim.Adam, {"lr": 0.02}),
]


def _tracked(group_state, gradient_route, opt_cls, hp, micro_batches, steps=3, clip=math.inf):
    x, y = _data(12)
    model = _mlp()
    opt = opt_cls(model.parameters(), **hp)
    probes = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups={"three": 3, "two": 2}, group_state=group_state,
                                gradient_route=gradient_route, max_grad_norm=clip, sketch_dim=4096)
    groups = {"three": torch.arange(12) % 3, "two": torch.arange(12) // 6}
    for _ in range(steps):
        step = OptimizerStep(model, opt, mse_loss, x, y, max_grad_norm=clip, micro_batches=micro_batches)
        tracker.track(step, groups)
    return model, tracker


@pytest.mark.parametrize("group_state,gradient_route,opt_cls,hp", ROUTES,
                         ids=[f"{r[0]}-{r[1]}" for r in ROUTES])
def test_every_route_books_a_micro_batched_step_exactly(group_state, gradient_route, opt_cls, hp):
    clip = 0.3 if group_state == "dense" else math.inf
    model, tracker = _tracked(group_state, gradient_route, opt_cls, hp, 4, clip=clip)
    # training is what it is without the tracker
    bare = _mlp()
    opt = opt_cls(bare.parameters(), **hp)
    x, y = _data(12)
    for _ in range(3):
        OptimizerStep(bare, opt, mse_loss, x, y, max_grad_norm=clip, micro_batches=4).run()
    assert torch.equal(_flat(model), _flat(bare))
    # the identity: groups + rest + sketch error + residual = the real change, for every partition
    whole_model, whole = _tracked(group_state, gradient_route, opt_cls, hp, 1, clip=clip)
    for name, ledger in tracker.ledgers.items():
        total = ledger.contributions.sum(1) + ledger.rest + ledger.sketch_error + ledger.residual
        torch.testing.assert_close(total, ledger.f_end - ledger.f_start, rtol=0, atol=1e-12)
        assert float(ledger.residual.norm()) < 1e-3 * float((ledger.f_end - ledger.f_start).norm())
        # the same groups' contributions as the whole batch at once (the update differs by rounding only)
        reference = whole.ledgers[name]
        tolerance = 1e-3 if group_state == "sketched" else 1e-9
        torch.testing.assert_close(ledger.contributions, reference.contributions, rtol=tolerance, atol=tolerance)


def _ddpm(micro_batches, callbacks=(), **kw):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    data = torch.randn(24, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    return DDPMTrainer(model, make_scheduler(50), data, batch_size=8, micro_batches=micro_batches, optimizer="adam",
                       lr=1e-2, max_grad_norm=1.0, callbacks=list(callbacks), progress=False, **kw)


def _analyzer():
    data = torch.randn(24, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    return NoiseLevelAnalyzer(make_scheduler(50), data, num_bins=3, num_probes=6, controls=1, kernel_points=2)


def test_ddpm_trainer_in_micro_batches_trains_the_same_update_and_the_analyzer_books_it():
    whole, micro = _ddpm(1), _ddpm(3)
    whole.train(4)
    micro.train(4)
    # the same draws and, in float64, the same updates up to rounding
    torch.testing.assert_close(_flat(micro.model), _flat(whole.model), rtol=1e-10, atol=1e-12)
    assert micro.generator.get_state().equal(whole.generator.get_state())
    # an analyzer leaves the micro-batched run bit for bit as it is, and its ledger adds up
    analyzer = _analyzer()
    tracked = _ddpm(3, callbacks=[analyzer])
    tracked.train(4)
    assert torch.equal(_flat(tracked.model), _flat(micro.model))
    ledger = analyzer.tracker.ledger
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.f_end - ledger.f_start,
                               rtol=0, atol=1e-12)
    reference = _analyzer()
    _ddpm(1, callbacks=[reference]).train(4)
    torch.testing.assert_close(ledger.contributions, reference.tracker.ledger.contributions, rtol=1e-8, atol=1e-10)


def test_a_checkpoint_resumes_only_with_its_micro_batches(tmp_path):
    trainer = _ddpm(2, checkpoint_dir=tmp_path)
    trainer.train(2)
    trainer.save_checkpoint()
    with pytest.raises(ValueError, match="micro_batches"):
        _ddpm(1, checkpoint_dir=tmp_path).resume()
    again = _ddpm(2, checkpoint_dir=tmp_path)
    assert again.resume()
    again.train(2)
    trainer.train(2)
    assert torch.equal(_flat(again.model), _flat(trainer.model))


def test_supervised_trainer_runs_micro_batches():
    x, y = _data(16)
    runs = []
    for k in (1, 4):
        model = _mlp()
        SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=8,
                          micro_batches=k).fit(x, y, steps=3)
        runs.append(_flat(model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)


def test_the_cost_estimate_counts_micro_batches():
    from genkernel.core.cost import estimate_cost

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = (torch.randn(8, 2),)
    common = dict(outputs=1, rows=1, group_state="factored", gradient_route="graph", batch_size=64)
    whole, micro = (estimate_cost(model, opt, probes, micro_batches=k, **common) for k in (1, 4))
    # training holds a quarter of the activations; the training pass is not read, so step 1 runs its own
    assert micro.memory["training_activations"] < whole.memory["training_activations"]
    assert "training_records" in whole.memory and "training_records" not in micro.memory
    assert micro.work["group_gradients"] > whole.work["group_gradients"]
    # the tracker passes it on
    tracker = PathKernelTracker(model, opt, mse_loss, probes[0], num_groups=1, group_state="factored", batch_size=64,
                                micro_batches=4)
    assert tracker.cost.work["group_gradients"] == micro.work["group_gradients"]
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        estimate_cost(model, opt, probes, micro_batches=0, **common)


def test_the_gan_analyzer_performs_a_micro_batched_step_as_training_runs_it():
    """GANKernelAnalyzer refused owned steps in micro-batches; it now reads their geometry micro-batch by
    micro-batch (tests/test_gan_micro_batches.py): the step trains as step.run() does, bit for bit."""
    from genkernel.gan import GANKernelAnalyzer, GeneratorLoss, MLPDiscriminator, MLPGenerator

    def step_of(G, D):
        opt = torch.optim.SGD(G.parameters(), lr=0.1)
        z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
        return OptimizerStep(G, opt, GeneratorLoss(D), z, micro_batches=2, phase="generator")

    torch.manual_seed(0)
    G, D = MLPGenerator(3, 2, hidden=6).double(), MLPDiscriminator(2, hidden=6).double()
    plain = copy.deepcopy(G)
    step_of(plain, D).run()
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(4, 3, dtype=F64), num_groups=2, controls=0)
    step = step_of(G, D)
    analyzer.perform(step)
    assert step.applied and torch.equal(_flat(G), _flat(plain))
    assert float(analyzer.generator_ledger().residual.abs().max()) < 1e-6 * float(analyzer.generator_ledger().delta.abs().max())


def test_a_supervised_state_loads_only_with_its_micro_batches():
    """SupervisedTrainer.state_dict records K as DDPMTrainer's checkpoints do: with BatchNorm a run in 4
    micro-batches is another run than one in 1 (the statistics of 2 examples, not 8)."""
    x, y = _data(16)

    def trainer(k):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
        return SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=8,
                                 micro_batches=k)

    saved = trainer(4)
    saved.fit(x, y, steps=1)
    state = saved.state_dict()
    with pytest.raises(ValueError, match="micro_batches: saved 4, here 1"):
        trainer(1).load_state_dict(state)
    old = {**state, "config": {k: v for k, v in state["config"].items() if k != "micro_batches"}}
    with pytest.raises(ValueError, match="micro_batches: saved 1, here 4"):  # a state from before K: whole batches
        trainer(4).load_state_dict(old)
    again = trainer(4)
    again.load_state_dict(state)
    again.fit(x, y, steps=2)
    saved.fit(x, y, steps=2)
    assert torch.equal(_flat(again.model), _flat(saved.model))
