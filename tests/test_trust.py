"""Trustworthy under misuse and faults: no silent wrong number, no wedged tracker, analysis that
never touches the model, and errors that name the problem and the fix (issue 12)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel, tangent_features
from genkernel.supervised import mse_loss
from genkernel.core.engine.gradients import group_gradients

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# 1. Kernels that would drop a parameter: every pattern equals the torch.func reference
# ------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight inside the functional attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x [B, T, 3]
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


class TiedHead(nn.Module):
    """A language-model head tied to the embedding through F.linear(h, emb.weight)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens):  # tokens [B, T]
        h = torch.tanh(self.mix(self.emb(tokens))).mean(1)
        return F.linear(h, self.emb.weight)


class TwoLayers(nn.Module):
    """Two Linears, ``a`` (inputs → hidden) then ``b`` (hidden → 2); subclasses say how the forward
    uses them."""

    def __init__(self, inputs: int = 4, hidden: int = 4):
        super().__init__()
        self.a = nn.Linear(inputs, hidden)
        self.b = nn.Linear(hidden, 2)


class SharedWeight(TwoLayers):
    """One Linear's weight read by a second module's functional call."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(F.linear(h, self.a.weight * 0.5))
        return self.b(h)


class SameModuleTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.alias = self.shared  # registered under two names

    def forward(self, x):
        return self.out(torch.tanh(self.alias(torch.tanh(self.shared(x)))))


class SortedBatch(TwoLayers):
    """Sorts its batch by a key before a layer and restores the order after (length bucketing):
    the layer's row n is not example n."""

    def __init__(self):
        super().__init__(hidden=6)

    def forward(self, x):
        order = x[:, 0].argsort()
        h = torch.tanh(self.a(x[order]))
        return self.b(h[order.argsort()])


class FlippedBatch(TwoLayers):
    """Reverses its batch around a layer: a fixed reordering, for every batch."""

    def __init__(self):
        super().__init__(hidden=6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flip(0))).flip(0))


class SequenceFirst(TwoLayers):
    """A layer on the [T, B, D] layout, whose leading size may equal a batch's."""

    def __init__(self):
        super().__init__(inputs=3, hidden=6)

    def forward(self, x):  # x [B, T, 3]
        return self.b(torch.tanh(self.a(x.transpose(0, 1))).mean(0))


class GatedReuse(TwoLayers):
    """A weight read functionally only where the data open a gate (closed on the first rows)."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        gate = torch.relu(x[:, :1] - 1.0)
        return self.b(h + gate * F.linear(h, self.a.weight))


class UngradedCall(nn.Module):
    """A module called under no_grad, and one called with its input as a keyword."""

    def __init__(self):
        super().__init__()
        self.frozen_call = nn.Linear(4, 4)
        self.keyword = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.frozen_call(x)
        return self.b(torch.tanh(self.keyword(input=x) + h))


def _case(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "attention":
        return Attention().to(F64), torch.randn(5, 4, 3, generator=g, dtype=F64)
    if name == "encoder":
        return Encoder().to(F64), torch.randn(5, 4, 3, generator=g, dtype=F64)
    if name == "tied_head":
        return TiedHead().to(F64), torch.randint(0, 11, (5, 3), generator=g)
    if name == "shared_weight":
        return SharedWeight().to(F64), torch.randn(5, 4, generator=g, dtype=F64)
    if name in ("sequence_first_sample", "sequence_first_batch"):  # T = the check's sample, or the batch
        steps = 3 if name == "sequence_first_sample" else 5
        return SequenceFirst().to(F64), torch.randn(5, steps, 3, generator=g, dtype=F64)
    if name == "gated_reuse":
        x = torch.randn(5, 4, generator=g, dtype=F64)
        x[:, 0] = torch.tensor([-1.0, 0.0, 2.0, -2.0, 3.0], dtype=F64)  # the gate opens on rows 2 and 4
        return GatedReuse().to(F64), x
    kinds = {"sorted_batch": SortedBatch, "flipped_batch": FlippedBatch, "ungraded_call": UngradedCall,
             "same_module_twice": SameModuleTwice}
    return kinds[name]().to(F64), torch.randn(5, 4, generator=g, dtype=F64)


PATTERNS = ["attention", "encoder", "tied_head", "shared_weight", "same_module_twice", "sorted_batch", "flipped_batch",
            "sequence_first_sample", "sequence_first_batch", "gated_reuse", "ungraded_call"]


@pytest.mark.parametrize("name", PATTERNS)
def test_every_parameter_use_is_in_the_kernel(name):
    model, x = _case(name)
    reference = gradient_kernel(model, x, engine="functional")
    for engine in ("factored", "auto"):
        got = gradient_kernel(model, x, engine=engine)
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    torch.testing.assert_close(tangent_features(model, x, engine="factored"), tangent_features(model, x, engine="functional"),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["attention", "tied_head", "shared_weight"])
def test_the_factored_tracker_covers_every_parameter_use(name):
    model, x = _case(name)
    probes = x[:2]
    y = torch.randn(x.shape[0], 2 if name != "tied_head" else 11, dtype=F64, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=x.shape[0], group_state="factored",
                                quadrature="simpson")
    tracker.step(x, y, torch.arange(x.shape[0]))
    assert tracker.ledger.relative_residual() < 1e-6


@pytest.mark.parametrize("name", ["sorted_batch", "flipped_batch", "sequence_first_sample"])
@pytest.mark.parametrize("route", [dict(group_state="dense", gradient_route="example"), dict(group_state="factored")])
def test_per_example_routes_credit_each_example_its_own_gradient(name, route):
    """A model that reorders its batch: every example's contribution equals the graph route's
    (one backward per group, which needs no per-example reading). The groups' sum cannot tell."""
    model, x = _case(name)
    y = torch.randn(x.shape[0], 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def contributions(**kwargs):
        model.load_state_dict(state)
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.05), mse_loss, x[:3],
                                    num_groups=x.shape[0], quadrature="simpson", **kwargs)
        tracker.step(x, y, torch.arange(x.shape[0]))
        return tracker.ledger.contributions

    reference = contributions(group_state="dense", gradient_route="graph")
    torch.testing.assert_close(contributions(**route), reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))


def test_batch_norm_without_running_statistics_is_refused_in_eval_mode_too():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 2)).to(F64).eval()
    x = torch.randn(5, 4, dtype=F64)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        gradient_kernel(model, x)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        tangent_features(model, x)


def test_a_global_hook_registered_after_a_call_is_checked_again():
    """A global forward hook that adds a functional read of a weight changes what the hooks see:
    the remembered covering plan must not be reused."""
    model, x = _case("flipped_batch")
    before = gradient_kernel(model, x)
    torch.testing.assert_close(before, gradient_kernel(model, x, engine="functional"))

    def reread(module, args, output):  # b's weight read a second time, outside b's own call
        return output + 0.5 * F.linear(args[0], module.weight) if module is model.b else None

    handle = nn.modules.module.register_module_forward_hook(reread)
    try:
        got, reference = gradient_kernel(model, x), gradient_kernel(model, x, engine="functional")
    finally:
        handle.remove()
    assert not torch.allclose(reference, before)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))


def test_the_factored_engine_with_every_parameter_tied_is_the_reference():
    """No module keeps its parameters to itself: nothing is factored, torch.func computes it all."""
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(F64)
    tied[2].weight, tied[2].bias = tied[0].weight, tied[0].bias
    x = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(gradient_kernel(tied, x, engine="factored"), gradient_kernel(tied, x, engine="functional"))


# ------------------------------------------------------------------------------------------
# 1b. State changed outside the step: refused or booked in a named row, never in the residual
# ------------------------------------------------------------------------------------------
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64), torch.arange(n) % 2


def make_tracker(model, opt=None, **kwargs):
    opt = opt or torch.optim.Adam(model.parameters(), lr=0.01)
    probes = torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    return PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, quadrature="simpson", **kwargs)


def test_add_param_group_mid_run_is_refused_before_anything_changes():
    model = mlp()
    extra = nn.Parameter(torch.zeros(3, dtype=F64))
    tracker = make_tracker(model)
    tracker.step(*batch())
    tracker.optimizer.add_param_group({"params": [extra]})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="add_param_group"):
        tracker.step(*batch(2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and tracker.ledger.steps == 1


def test_frozen_parameters_and_buffers_edited_between_steps_are_booked_as_drift():
    model = mlp()
    model[2].bias.requires_grad_(False)  # frozen
    model.register_buffer("offset", torch.zeros(2, dtype=F64))
    model.register_forward_hook(lambda m, i, out: out + m.offset)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    tracker = make_tracker(model, opt)
    tracker.step(*batch())
    with torch.no_grad():
        model[2].bias.add_(0.3)
        model.offset.add_(0.2)
    tracker.step(*batch(2))
    ledger = tracker.ledger
    assert float(ledger.buffer_drift.abs().max()) > 0.4  # both edits moved every probe by 0.5
    assert ledger.relative_residual() < 1e-8  # and none of it is in the residual


def test_a_replaced_parameter_is_refused():
    model = mlp()
    tracker = make_tracker(model)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    with pytest.raises(RuntimeError, match=r"trainable parameters changed.*0.weight"):
        tracker.step(*batch())


def test_optimizer_step_hooks_are_refused_before_the_step():
    model = mlp()
    tracker = make_tracker(model)
    handle = tracker.optimizer.register_step_pre_hook(lambda opt, args, kwargs: None)
    with pytest.raises(RuntimeError, match="step hook"):
        tracker.step(*batch())
    handle.remove()
    tracker.step(*batch())


def test_a_state_loaded_against_other_probes_model_or_optimizer_is_refused(tmp_path):
    tracker = make_tracker(mlp())
    tracker.step(*batch())
    tracker.save(tmp_path / "t.pt")
    model = mlp()
    other_probes = PathKernelTracker(model, torch.optim.Adam(model.parameters()), mse_loss, torch.randn(4, 3, dtype=F64),
                                     num_groups=2, quadrature="simpson")
    with pytest.raises(ValueError, match="same shapes but other values"):
        other_probes.load(tmp_path / "t.pt")
    model = mlp()
    other_optimizer = make_tracker(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="optimizer was Adam, here SGD"):
        other_optimizer.load(tmp_path / "t.pt")
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 2)).to(F64)
    with pytest.raises(ValueError, match="other shapes: \\['0.bias', '0.weight', '2.weight'\\]"):
        make_tracker(wider).load(tmp_path / "t.pt")


def test_non_finite_probes_are_refused_up_front_and_summaries_keep_nan():
    model = mlp()
    for bad in (float("nan"), float("inf")):
        probes = torch.randn(4, 3, dtype=F64)
        probes[2, 1] = bad
        with pytest.raises(ValueError, match=r"probes hold NaN or infinite values at rows \[2\]"):
            PathKernelTracker(model, torch.optim.Adam(model.parameters()), mse_loss, probes, num_groups=2)
        with pytest.raises(ValueError, match="NaN or infinite"):
            gradient_kernel(model, probes)
    tracker = make_tracker(mlp())
    tracker.step(*batch())
    tracker.ledger.residual[1, 0] = float("nan")
    assert math.isnan(tracker.ledger.summary()["max_probe_relative_residual"])


# ------------------------------------------------------------------------------------------
# 2. Steps are all-or-nothing
# ------------------------------------------------------------------------------------------
STAGES = ["gradients", "split", "contributions", "probe_forward"]


@pytest.mark.parametrize("group_state", ["dense", "sketched"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_at_any_stage_rolls_the_step_back(stage, group_state, monkeypatch):
    model = mlp()
    tracker = make_tracker(model, torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01), group_state=group_state)
    reference_model = mlp()
    reference = make_tracker(reference_model, torch.optim.Adam(reference_model.parameters(), lr=0.01, weight_decay=0.01),
                             group_state=group_state)
    for t in (tracker, reference):
        t.step(*batch())
    theta = [p.detach().clone() for p in model.parameters()]
    optimizer_state = {k: v.clone() for k, v in tracker.optimizer.state[model[0].weight].items()}

    class Fault(RuntimeError):
        pass

    first_pass = "graph_gradients" if tracker.route.uses_graph() else "gradients"
    target = {"gradients": (tracker.route, first_pass), "split": (tracker.splitter, "split"),
              "contributions": (tracker.route, "contributions"), "probe_forward": (tracker, "_probe_outputs")}[stage]
    original = getattr(*target)

    def fail_late(*args, **kwargs):  # the probe forward may also run before the step: fail after it
        if stage != "probe_forward" or int(tracker.optimizer.state[model[0].weight]["step"]) == 2:
            raise Fault("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(*target, fail_late)
    with pytest.raises(Fault) as caught:
        tracker.step(*batch(2))
    assert any("rolled back" in note for note in getattr(caught.value, "__notes__", []))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    for key, value in tracker.optimizer.state[model[0].weight].items():
        assert torch.equal(value, optimizer_state[key])
    assert tracker.ledger.steps == 1 == int(tracker.optimizer.state[model[0].weight]["step"])
    monkeypatch.setattr(*target, original)
    # the tracker continues as if the failed step had never been tried
    tracker.step(*batch(2))
    reference.step(*batch(2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    torch.testing.assert_close(tracker.ledger.contributions, reference.ledger.contributions, rtol=0, atol=1e-15)


def test_keyboard_interrupt_in_the_analysis_rolls_back_too(monkeypatch):
    model = mlp()
    tracker = make_tracker(model)
    theta = [p.detach().clone() for p in model.parameters()]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker.route, "contributions", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tracker.step(*batch())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta)) and not tracker.optimizer.state


def test_batchnorm_switched_to_training_under_a_per_example_route_is_refused_before_it_moves_its_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(F64).eval()
    tracker = make_tracker(model, gradient_route="example")
    model.train()
    stats = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="BatchNorm1d"):
        tracker.step(*batch())
    assert torch.equal(model[1].running_mean, stats)


# ------------------------------------------------------------------------------------------
# 3. Analysis never touches the model
# ------------------------------------------------------------------------------------------
def _state(model):
    return {n: (t, t.detach().clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _unchanged(model, state):
    now = dict([*model.named_parameters(), *model.named_buffers()])
    return now.keys() == state.keys() and all(now[n] is t and torch.equal(t, v) for n, (t, v) in state.items())


@pytest.mark.parametrize("name", PATTERNS)
def test_no_analysis_entry_point_changes_the_model(name):
    from genkernel.core import kernel_plan, sketched_gradient_kernel

    model, x = _case(name)
    state = _state(model)
    for engine in ("functional", "factored", "auto"):
        gradient_kernel(model, x, x[:2], engine=engine)
        tangent_features(model, x, engine=engine)
        kernel_plan(model, x, engine=engine)
    sketched_gradient_kernel(model, x, k=8)
    PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x[:2], num_groups=2)
    assert _unchanged(model, state)


def test_layers_that_write_their_weights_in_the_forward_are_refused_before_anything_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 1))
    state = _state(model)
    tokens = torch.randint(0, 10, (5, 3))
    with pytest.raises(ValueError, match="max_norm=0.5"):
        gradient_kernel(model, tokens)
    with pytest.raises(ValueError, match="renormalizes its weight"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, tokens, num_groups=1)
    assert _unchanged(model, state)


# ------------------------------------------------------------------------------------------
# 4. Clear errors, raised before anything changes
# ------------------------------------------------------------------------------------------
def test_memory_budgets_are_checked_alike_everywhere():
    from genkernel.core.engine.gradients import group_gradients, membership_matrix

    model = mlp()
    x, y, groups = batch()
    for bad, error in ((0, ValueError), (-5, ValueError), (float("nan"), ValueError), (True, TypeError), ("1GB", TypeError)):
        with pytest.raises(error, match="memory_budget"):
            gradient_kernel(model, x, memory_budget=bad)
        with pytest.raises(error, match="memory_budget"):
            tangent_features(model, x, memory_budget=bad)
        with pytest.raises(error, match="memory_budget"):
            make_tracker(model, memory_budget=bad)
        with pytest.raises(error, match="memory_budget"):
            group_gradients(model, dict(model.named_parameters()), (x,), y, mse_loss,
                            membership_matrix([groups], torch.ones(8), [2]), memory_budget=bad)
    torch.testing.assert_close(gradient_kernel(model, x, memory_budget=2e6), gradient_kernel(model, x))


def test_empty_inputs_detached_losses_and_data_parallel():
    model = mlp()
    with pytest.raises(ValueError, match="empty"):
        gradient_kernel(model, torch.zeros(0, 3, dtype=F64))
    tracker = make_tracker(model)
    with pytest.raises(ValueError, match="inputs is empty"):
        tracker.step(torch.zeros(0, 3, dtype=F64), torch.zeros(0, 2, dtype=F64), torch.zeros(0, dtype=torch.long))
    detached = PathKernelTracker(model, tracker.optimizer, lambda out, t: mse_loss(out, t).detach(), torch.randn(2, 3, dtype=F64),
                                 num_groups=2)
    with pytest.raises(ValueError, match="do not depend on the model's parameters"):
        detached.step(*batch())
    assert detached.ledger.steps == 0
    wrapped = nn.DataParallel(mlp())
    torch.testing.assert_close(gradient_kernel(wrapped, batch()[0]), gradient_kernel(mlp(), batch()[0]))


def test_a_full_disk_is_reported_as_such_and_stale_temporary_files_are_cleaned(tmp_path, monkeypatch):
    tracker = make_tracker(mlp())
    tracker.step(*batch())
    path = tmp_path / "tracker.pt"
    tracker.save(path)
    (tmp_path / ".tracker.pt.leftover.tmp").write_bytes(b"a save killed half-way")

    def full(obj, handle, *args, **kwargs):
        handle.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0 (file write failed)")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="free disk space"):
        tracker.save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracker.pt"]  # the old file, nothing else
    tracker.load(path)


@pytest.mark.parametrize("layer", ["prelu", "gru"])
def test_layers_without_a_vmap_rule_are_computed_one_example_at_a_time(layer):
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    if layer == "prelu":
        model, x = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 1)).to(F64), torch.randn(4, 3, dtype=F64)
    else:
        model, x = Recurrent().to(F64), torch.randn(4, 5, 3, dtype=F64)
    rows = []
    for i in range(4):  # brute force: one autograd gradient per example
        grads = torch.autograd.grad(model(x[i : i + 1]).sum(), list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    j = torch.stack(rows)
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        got = gradient_kernel(model, x, engine="functional")
    torch.testing.assert_close(got, j @ j.T, rtol=1e-10, atol=1e-12)
    # The tracker's per-example group gradients (inputs and targets as tuples: vmap batches the
    # PReLU's gradients, not the GRU's) take the same path.
    membership = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=F64)
    params = dict(model.named_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups, _ = group_gradients(model, params, (x,), torch.zeros(4, 1, dtype=F64), lambda out, y: out.reshape(-1),
                                    membership, route="example")
    assert any("one example at a time" in str(w.message) for w in caught) == (layer == "gru")
    flat = torch.cat([groups[n].reshape(2, -1) for n in params], dim=1)
    torch.testing.assert_close(flat, membership @ j, rtol=1e-10, atol=1e-12)


def _analyzed_unet(checkpointing: bool):
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, tiny_unet

    torch.manual_seed(0)
    model = tiny_unet(8, channels=(8, 16), norm_num_groups=4)
    if checkpointing:
        model.enable_gradient_checkpointing()
    scheduler = make_scheduler(100)
    data = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=4, controls=1, progress=False, kernel_points=2)
    DDPMTrainer(model, scheduler, data, batch_size=8, lr=1e-3, progress=False, callbacks=[analyzer]).train(2)
    return model, analyzer


def test_diffusers_gradient_checkpointing_is_tracked_as_without_it():
    """diffusers' enable_gradient_checkpointing (which checkpoints in eval mode too, where torch.func
    cannot run it): analysis passes switch it off and back on; training and the ledger are those of
    the same run without checkpointing, bit for bit."""
    plain, plain_analyzer = _analyzed_unet(False)
    checkpointed, analyzer = _analyzed_unet(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # still on for training
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), checkpointed.parameters()))
    assert torch.equal(analyzer.contributions, plain_analyzer.contributions)
    assert analyzer.residual()["relative_residual"] == plain_analyzer.residual()["relative_residual"]


class _Checkpointed(nn.Module):
    """torch.utils.checkpoint called directly in the forward (no flag to switch it off)."""

    def __init__(self, checkpointed: bool = True):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 8), nn.Linear(8, 2)
        self.checkpointed = checkpointed

    def _body(self, h):
        return torch.tanh(self.inner(h))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self._body, x, use_reentrant=False) if self.checkpointed else self._body(x))


def _adam_tracker(model, x, **route):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return PathKernelTracker(model, opt, mse_loss, x[:2], num_groups=2, group_state="dense", quadrature="simpson", **route)


def test_a_forward_calling_torch_checkpoint_is_tracked_from_layer_factors():
    """The dense route's default group gradients are read from the training pass (autograd) and
    its pushes are forward mode: a checkpointed forward is tracked as the same model without it."""
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    ledgers = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _Checkpointed(checkpointed).to(F64)
        tracker = _adam_tracker(model, x)
        for _ in range(3):
            tracker.step(x, y, torch.arange(6) % 2)
        ledgers[checkpointed] = tracker.ledger
    scale = float(ledgers[False].contributions.abs().max())
    assert float((ledgers[True].contributions - ledgers[False].contributions).abs().max()) <= 1e-12 * scale
    assert ledgers[True].relative_residual() < 1e-6


def test_a_forward_calling_torch_checkpoint_is_refused_by_torch_func_routes_with_the_fix():
    """The probes' Jacobians (torch.func reverse mode) cannot run it: refused when the tracker is
    built, naming the routes that can, with the model untouched."""
    torch.manual_seed(0)
    model, x = _Checkpointed().to(F64), torch.randn(6, 3, dtype=F64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="torch.utils.checkpoint.*gradient_route='example'"):
        _adam_tracker(model, x, contribution_route="jacobian")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------------------------------------
# Parameters without a gradient at a step: PyTorch's optimizers skip them (no move, state kept)
# ------------------------------------------------------------------------------------------
class Staged(nn.Module):
    """A branch switched on and off between steps (staged training): its parameters get no
    gradient while it is off."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.branch = nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(5, 2)
        self.use_branch = True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + self.branch(h) if self.use_branch else self.b(h)


SKIPPING_OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", SKIPPING_OPTIMIZERS)
@pytest.mark.parametrize("switches", [(True, False, True), (False, True, False)])
def test_a_parameter_without_a_gradient_is_skipped_as_the_optimizer_skips_it(optimizer, switches):
    """Off at the first tracked step (no state yet) or at a later one (state kept, not decayed):
    training is bit for bit that of an untracked loop, and every route books the same contributions
    and leaves the same residual as the graph route."""
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)) for _ in switches]
    probes = torch.randn(4, 3, generator=g, dtype=F64)

    def run(**kwargs):
        torch.manual_seed(0)
        model = Staged().to(F64)
        opt = SKIPPING_OPTIMIZERS[optimizer](model.parameters())
        tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=3, quadrature="simpson", **kwargs)
        for (x, y), on in zip(steps, switches):
            model.use_branch = on
            tracker.step(x, y, torch.arange(6) % 3)
        return tracker.ledger, model

    torch.manual_seed(0)
    bare = Staged().to(F64)
    opt = SKIPPING_OPTIMIZERS[optimizer](bare.parameters())
    for (x, y), on in zip(steps, switches):
        bare.use_branch = on
        opt.zero_grad(set_to_none=True)
        mse_loss(bare(x), y).mean().backward()
        opt.step()
    reference, _ = run(group_state="dense", gradient_route="graph")
    for kwargs in (dict(group_state="dense", gradient_route="example"), dict(group_state="dense", gradient_route="factored")):
        ledger, model = run(**kwargs)
        for (name, p), q in zip(model.named_parameters(), bare.parameters()):
            assert torch.equal(p, q), name
        torch.testing.assert_close(ledger.contributions, reference.contributions, rtol=1e-9, atol=1e-14)
        assert abs(ledger.relative_residual() - reference.relative_residual()) < 1e-12


def test_the_sketched_route_refuses_a_skipped_parameter_with_state():
    """One sketch of every parameter's state cannot keep one parameter's state while the rest decay."""
    torch.manual_seed(0)
    model = Staged().to(F64)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=0.01), mse_loss, x[:2], num_groups=6,
                                group_state="sketched")
    tracker.step(x, y, torch.arange(6))
    model.use_branch = False
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="group_state='dense'"):
        tracker.step(x, y, torch.arange(6))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert tracker.ledger.steps == 1


def test_observed_micro_batches_of_a_one_entry_gradient_are_refused():
    """With one trainable number, any weighting of the micro-batches is one scale times their sum,
    so the check that they were weighted alike cannot fail: refused."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, opt, mse_loss, torch.randn(3, 1, dtype=F64), num_groups=2)
    x, y = torch.randn(4, 1, dtype=F64), torch.randn(4, 1, dtype=F64)
    with pytest.raises(ValueError, match="weighted alike"):
        for rows, weight, group in [(slice(0, 2), 0.25, 0), (slice(2, 4), 0.75, 1)]:
            losses = mse_loss(model(x[rows]), y[rows])
            tracker.observe(losses, torch.full((2,), group))
            (weight * losses.mean()).backward()
        opt.step()


def test_a_sparse_embedding_is_refused_with_the_fix():
    model = nn.Sequential(nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2)).to(F64)
    tokens = torch.randint(0, 7, (4, 2))
    with pytest.raises(ValueError, match="sparse=False"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, tokens, num_groups=2)
    with pytest.raises(ValueError, match="sparse=False"):
        gradient_kernel(model, tokens)


def test_a_compiled_model_that_donated_its_buffers_is_refused_with_the_fix():
    """torch.compile frees a backward's saved buffers once a model has trained compiled: a tracker
    attached then cannot differentiate the graph twice, and says how to attach it."""
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y, groups = batch()
    mse_loss(compiled(x), y).mean().backward()  # one untracked step first
    opt.step()
    opt.zero_grad()
    tracker = PathKernelTracker(compiled, opt, mse_loss, x[:2], num_groups=2)
    losses = mse_loss(compiled(x), y)
    try:
        tracker.observe(losses, groups)
    except ValueError as error:
        assert "donated_buffer" in str(error)
    else:  # a torch that keeps the buffers: the step is tracked as usual
        losses.mean().backward()
        opt.step()
        assert tracker.ledger.steps == 1
