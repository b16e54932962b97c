"""The "example" route's activation count (engine.gradients.example_pass_measure) and the "group" route's
(_LeafOutputs over the batch's forward) count what the model's leaf modules return, whatever its layout, and a
cached count is taken again when the model changes.

Before: one example's count was ``output[:1].numel()`` of each leaf's tensor output on a batch of one, the first row
of dimension 0, which is the example's only where dimension 0 is the batch's. A model that runs its layers sequence
first inside (``x.transpose(0, 1)``: [T, 1, d] outputs) counted d of T·d values: 515 elements for 262 147 on the net
below, a chunk of 61 examples for a 16 MiB budget, and the pass grew the process by 95.8 MiB (6.0x the budget); now
9 examples and 14.5 MiB. A leaf returning a tuple or dict (an LSTM's ``(out, (h, c))``) counted nothing. The count was
cached by the modules' ids alone: a layer reconfigured in place (an Upsample's scale factor) or a module freed and a
new one built in its slot (CPython reuses the id) kept the old count."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from genkernel.core.adapter import functional_model
from genkernel.core.engine import gradients
from genkernel.core.engine.gradients import (example_pass_measure, example_chunk, group_gradients,
                                             membership_matrix, per_example_gradients)
from peak_rss import measure_script

pytestmark = pytest.mark.usefixtures("one_thread")


class SequenceFirst(nn.Module):
    """Batch-first inputs [B, T, 4], run sequence first inside: every leaf's output is [T, B, ...]."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.a, self.t1, self.b, self.t2 = nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        self.o = nn.Linear(width, 3)

    def forward(self, x):
        h = x.transpose(0, 1)
        return self.o(self.t2(self.b(self.t1(self.a(h)))).mean(0))


def brute_force_count(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Every element of every tensor every leaf module returns on one example's forward (a batch of one)."""
    total = [0]

    def hook(module, args, output):
        leaves = [output] if isinstance(output, torch.Tensor) else torch.utils._pytree.tree_leaves(output)
        total[0] += sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def count(model: nn.Module, x: torch.Tensor) -> int:
    """The engine's count of the leaf outputs alone (its measure of the pass, which takes the larger, left out)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    measure = gradients._measured_pass
    gradients._ACTIVATIONS.pop(model, None)
    gradients._measured_pass = lambda *args: gradients.ExamplePass(0, 0)
    try:
        return example_pass_measure(model, functional_model(model, flatten=False), params, (x[:1],)).activations
    finally:
        gradients._measured_pass = measure
        gradients._ACTIVATIONS.pop(model, None)


def test_a_sequence_first_model_counts_every_element_of_its_example():
    """On the sequence-first net (T = 64, width 16) the count is every element its leaves return for one example:
    64 x (16 + 16 + 16 + 16) + 3 = 4099 (before: 67, the first of 64 rows of each). The chunk it gives keeps the
    pass, counted with the true activations, within the budget."""
    torch.manual_seed(0)
    model, x = SequenceFirst(width=16), torch.randn(4, 64, 4)
    true = brute_force_count(model, (x[:1],))
    assert true == 64 * 4 * 16 + 3
    assert count(model, x) == true
    num = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    chunk = example_chunk(100_000, num, largest, 4, count(model, x))
    assert gradients.example_pass_bytes(chunk, num, largest, 4, true) <= 100_000


def test_tuple_and_dict_outputs_of_leaf_modules_are_counted():
    """A leaf LSTM (its ``(out, (h, c))``) and a leaf returning ``{"h": ...}``: each of their tensors counts, on one
    example and, through the "group" route's counter, over the batch (before: none of them, 3 elements of 835 for
    the LSTM net, the Linear head alone)."""

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.r, self.o = nn.LSTM(4, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            h, _ = self.r(x)
            return self.o(h[:, -1])

    class DictLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return {"h": x @ self.w.T}

    class WithDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.d, self.o = DictLeaf(), nn.Linear(5, 3)

        def forward(self, x):
            return self.o(self.d(x)["h"])

    torch.manual_seed(0)
    for model, x, expected in ((Recurrent(), torch.randn(6, 50, 4), 50 * 16 + 16 + 16 + 3),
                               (WithDict(), torch.randn(6, 4), 5 + 3)):
        assert brute_force_count(model, (x[:1],)) == expected
        assert count(model, x) == expected, type(model).__name__
        with gradients._LeafOutputs(model) as counted:
            model(x)
        assert counted.elements == 6 * expected  # (the batch's, as the group route counts them)


def test_a_layer_reconfigured_in_place_is_counted_again():
    """An Upsample's scale factor raised from 1 to 4 on the same object (its id unchanged): the next call counts the
    larger activations (before: the cached count of scale 1, 779 for 8 459 elements)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Upsample(scale_factor=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(4, 1, 8, 8)
    assert count(model, x) == brute_force_count(model, (x[:1],)) == 3 * 4 * 64 + 4 + 4 + 3
    model[1].scale_factor = 4
    assert count(model, x) == brute_force_count(model, (x[:1],)) == 4 * 64 + 2 * 4 * 1024 + 4 + 4 + 3


def test_a_module_built_in_a_freed_modules_slot_is_counted_again():
    """A stateless layer freed and another built at once (CPython gives the new object the freed one's address, so
    its id): the count is the new model's. Before, where the id was reused (it was here, in 20 of 20 tries), the old
    count came back: 779 for 8 459 elements."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(4, 1, 8, 8)
    assert count(model, x) == brute_force_count(model, (x[:1],))
    model._modules["1"] = None  # (the Tanh freed here: nothing else holds it)
    model._modules["1"] = nn.Upsample(scale_factor=4)
    assert count(model, x) == brute_force_count(model, (x[:1],)) == 4 * 64 + 4 * 1024 * 2 + 4 + 4 + 3


@pytest.mark.parametrize("route", ["example", "group", "factored", "auto"])
def test_no_parameters_is_refused_naming_the_problem(route):
    """An empty ``params`` is refused with a ValueError that says so (before: "max() arg is an empty sequence" from
    the example route's chunk, a bare StopIteration from the group route)."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    W = membership_matrix([torch.arange(8) % 2], torch.ones(8, dtype=torch.float64), [2])
    with pytest.raises(ValueError, match="params is empty"):
        group_gradients(model, {}, (x,), y, lambda o, t: ((o - t) ** 2).mean(1), W, route=route)
    with pytest.raises(ValueError, match="params is empty"):
        per_example_gradients(model, {}, (x,), y, lambda o, t: ((o - t) ** 2).mean(1), torch.ones(8))


MEASURE = textwrap.dedent("""
    import gc, json, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from genkernel.core.engine import gradients as G
    sys.path.insert(0, "tests")
    from test_example_chunk_review import SequenceFirst

    torch.manual_seed(0)
    net, batch, T = SequenceFirst(), 64, 512
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, T, 4, generator=g), torch.randn(batch, 3, generator=g)
    loss = lambda out, t: ((out - t) ** 2).mean(dim=1)
    params = dict(net.named_parameters())
    W = G.membership_matrix([torch.arange(batch) % 4], torch.ones(batch, dtype=torch.float64), [4])
    budget = 16 * 2**20
    G.group_gradients(net, params, (x,), y, loss, W, memory_budget=budget, route="example")  # (warm-up)
    gc.collect()
    start = rss()["VmRSS"]
    reset_peak()
    G.group_gradients(net, params, (x,), y, loss, W, memory_budget=budget, route="example")
    print(json.dumps({"peak": rss()["VmHWM"] - start, "rows": 4 * sum(p.numel() for p in params.values()) * 8}))
""")


def test_the_sequence_first_pass_stays_within_the_budget():
    """The "example" route on the sequence-first net (T = 512, width 128, B = 64, float32) at a 16 MiB budget grows
    the process by at most 1.1x the budget beyond the rows it returns. Measured after: 14.5 MiB (chunks of 9).
    Before: 95.8 MiB (6.0x; chunks of 61)."""
    measured = measure_script(MEASURE)
    assert measured["peak"] - measured["rows"] <= 1.1 * 16 * 2**20, measured["peak"] / 2**20


def test_a_parameter_replaced_by_a_larger_one_is_counted_again():
    """A module of a raw weight (no ``extra_repr``) given a new, wider weight, and the head after it too, on the
    same module objects: the count is the new model's (before: 5 + 3 = 8 elements for 50 + 3 = 53, the modules'
    ids unchanged)."""

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return x @ self.w.T

    torch.manual_seed(0)
    model = nn.Sequential(Raw(), nn.Linear(5, 3))
    x = torch.randn(4, 4)
    assert count(model, x) == brute_force_count(model, (x[:1],)) == 5 + 3
    model[0].w = nn.Parameter(torch.randn(50, 4))
    model[1].weight = nn.Parameter(torch.randn(3, 50))
    assert count(model, x) == brute_force_count(model, (x[:1],)) == 50 + 3


def test_the_cost_estimate_counts_an_examples_activations_as_the_engine_does():
    """Fails before the estimate's count took every element of every tensor a leaf returns: a sequence-first
    model's [T, 1, d] outputs were counted one row (d of T·d), an LSTM's (out, (h, c)) not at all, so the
    estimate's example_pass and the engine's chunk (engine.gradients.example_chunk) disagreed."""
    from genkernel.core.cost import hooked_forward_counts

    torch.manual_seed(0)
    lstm = nn.LSTM(4, 16, batch_first=True)
    for model, x in ((SequenceFirst(16), torch.randn(4, 64, 4)), (nn.Sequential(lstm), torch.randn(3, 10, 4))):
        assert hooked_forward_counts(model, (x[:1],), grad=True)[0] == count(model, x)


def test_a_chunk_of_a_plain_attention_model_stays_within_the_budget():
    """Fails before the pass was measured (engine.gradients._measured_pass): the chunk was sized by the
    leaf modules' outputs, and a self-attention written with plain operations holds its probabilities [heads, T, T],
    which no leaf returns. At T = 256 (one block, d = 32, 4 heads, B = 32) the pass held 143 MB of storages for a
    16 MiB budget (136 MiB of peak RSS in a fresh process; 12.7 MiB now); here the storages alive at once
    (push_memory.LiveBytes) against the budget, the rows and the parameters beside it."""
    from genkernel.core.push_memory import LiveBytes
    from test_graph_rows_review import PlainAttention

    torch.manual_seed(0)
    net, batch, budget = PlainAttention(), 32, 16 * 2**20
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 256, 32, generator=g), torch.randn(batch, 4, generator=g)
    params = dict(net.named_parameters())
    membership = gradients.membership_matrix([torch.arange(batch) % 4], torch.ones(batch, dtype=torch.float64), [4])
    with LiveBytes((*params.values(), x, y)) as live:
        group_gradients(net, params, (x,), y, lambda out, t: ((out - t) ** 2).mean(dim=1), membership,
                        route="example", memory_budget=budget)
    assert live.peak <= 1.1 * budget


def test_the_pass_is_measured_where_the_leaf_outputs_miss_what_it_holds():
    """What a forward computes with plain operations is no leaf's output: the engine's count takes the larger of the
    leaf outputs and the measured pass. A plain-operations attention at T = 256 and an LSTM's gates measure well
    above their leaf outputs (18 and 45 times); a conv net and an MLP measure under them (the leaf outputs count),
    and the estimate's example pass takes the engine's number (cost._pass_measure)."""
    from genkernel.core import cost
    from test_graph_rows_review import PlainAttention

    torch.manual_seed(0)
    lstm = nn.Sequential(nn.LSTM(4, 16, batch_first=True))
    for model, x, above in ((PlainAttention(), torch.randn(2, 256, 32), True), (lstm, torch.randn(2, 10, 4), True),
                            (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                           nn.Linear(4 * 8 * 8, 3)), torch.randn(2, 3, 8, 8), False),
                            (nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), torch.randn(2, 64), False)):
        leaves = count(model, x)
        params = {n: p.detach() for n, p in model.named_parameters()}
        taken = example_pass_measure(model, functional_model(model, flatten=False), params, (x[:1],)).activations
        assert (taken > 4 * leaves) if above else (taken == leaves), (type(model).__name__, taken, leaves)
        assert cost._pass_measure(model, (x,), dict(model.named_parameters())).activations == taken
