"""A memory refusal names only options its reader can take: ``estimate_cost(options=)`` and
``PathKernelTracker(cost_options=)`` filter the cheaper options, and the GAN analyzer, whose
generator route is fixed, names groups, probes, ``state_dtype`` and a tracked window (both of which
it now takes) but never ``group_state='sketched'``."""
import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.cost import COST_OPTIONS, estimate_cost
from genkernel.data import gaussian_ring, ring_mode_centers
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

F32, F64 = torch.float32, torch.float64


def _estimate(**kwargs):
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters())
    # (sketch_dim=4: on this tiny model a sketch of the default 512 dimensions makes the sketched route's estimate 9x
    # the dense one's, and an option that raises the estimate is not named)
    return estimate_cost(model, optimizer, (torch.randn(4, 3),), outputs=2, rows=6, partitions=2,
                         quadrature_nodes=3, sketch_dim=4, **kwargs)


def _kinds(cheaper):
    names = {"fewer groups": "groups", "group_state=": "group_state", "state_dtype=": "state_dtype",
             "fewer probes": "probes", "tracked window": "window", "quadrature=": "quadrature"}
    return {kind for text in cheaper for key, kind in names.items() if key in text}


def test_the_cheaper_options_are_those_the_caller_allows(monkeypatch):
    import genkernel.core.cost as cost

    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    monkeypatch.setattr(cost.CostEstimate, "ratio", property(lambda self: 50.0))  # so quadrature applies
    everything = _estimate()
    assert _kinds(everything.cheaper) == set(COST_OPTIONS)
    for allowed in [(), ("probes",), ("groups", "state_dtype"), ("window", "quadrature", "group_state")]:
        estimate = _estimate(options=allowed)
        assert _kinds(estimate.cheaper) == set(allowed)
        assert estimate.memory == everything.memory and estimate.work == everything.work  # numbers unchanged


@pytest.mark.parametrize("options, error, match", [
    ("probes", TypeError, "options must be a tuple of names"),
    (("probes", "batch"), ValueError, r"\['batch'\] are not cost options"),
])
def test_unknown_cost_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        _estimate(options=options)
    model = nn.Linear(3, 2)
    with pytest.raises(error, match=match):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda out, y: (out - y).pow(2).sum(1),
                          torch.randn(4, 3), num_groups=2, cost_options=options)


def test_a_tracker_with_no_option_left_says_so(monkeypatch):
    import genkernel.core.cost as cost

    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    model = nn.Linear(3, 2)
    with pytest.raises(MemoryError, match="would not fit.*None of the settings it was built with would make it cheaper"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda out, y: (out - y).pow(2).sum(1),
                          torch.randn(4, 3), num_groups=2, group_state="dense", cost_options=())


def _ring():
    data, modes = gaussian_ring(256, radius=2.0, std=0.05, seed=0)
    return data.to(F32), modes


def _train(state_dtype=None, iterations=3, **options):
    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=16, depth=2), MLPDiscriminator(2, hidden=16, depth=2)
    callbacks = []
    if state_dtype is not None:
        callbacks.append(GANKernelAnalyzer(
            G, D, torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), num_groups=3, window=2, eval_every=1,
            mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05, state_dtype=state_dtype, **options))
    data, modes = _ring()
    trainer = GANTrainer(G, D, data, labels=modes, batch_size=16, callbacks=callbacks, seed=3)
    trainer.train(iterations)
    return trainer


def test_the_gan_analyzers_refusal_names_only_what_it_takes(monkeypatch):
    """Before: the refusal suggested group_state='sketched', which GANKernelAnalyzer does not take,
    and state_dtype and a tracked window, which it did not take then."""
    import genkernel.core.cost as cost

    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    with pytest.raises(MemoryError) as refused:
        _train(F64)
    message = str(refused.value)
    assert "fewer groups" in message and "fewer probes" in message and "state_dtype=torch.float32" in message
    assert "tracked window" in message and "group_state=" not in message


def test_float32_state_trains_the_same_networks_and_keeps_an_exact_ledger():
    plain, wide, narrow = _train(None), _train(F64), _train(F32)
    for trained in (wide, narrow):
        for a, b in ((plain.generator, trained.generator), (plain.discriminator, trained.discriminator)):
            for key, value in a.state_dict().items():
                assert torch.equal(value, b.state_dict()[key]), key
    a, b = wide.callbacks[0], narrow.callbacks[0]
    assert b.g_tracker._tracked.state_dtype == F32 and b.d_tracker._tracked.state_dtype == F32
    assert a.g_tracker._tracked.state_dtype == F64
    for which in ("g_tracker", "d_tracker"):
        x, y = getattr(a, which).ledger, getattr(b, which).ledger
        assert y.contributions.dtype == F64  # the ledgers stay float64
        scale = float(x.contributions.abs().max())
        torch.testing.assert_close(y.contributions, x.contributions, rtol=1e-4, atol=1e-5 * scale)
    report = b.report()
    assert report["generator"]["relative_residual"] < 1e-2
    # the report gives each tracker's cost estimate, as the diffusion analyzer's does
    assert {k: v["settings"]["state_dtype"] for k, v in report["cost"].items()} == {"generator": "float32",
                                                                                  "discriminator": "float32"}
    wide = a.report()["cost"]["generator"]["memory_bytes"]["group_state"]
    assert wide > 0 and wide == 2 * report["cost"]["generator"]["memory_bytes"]["group_state"]


def test_float32_state_is_refused_for_float64_networks_and_on_resume_into_float64(tmp_path):
    G, D = MLPGenerator(2, 2, hidden=8, depth=1).to(F64), MLPDiscriminator(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="the generator has float64 parameters.*leave state_dtype"):
        GANKernelAnalyzer(G, D, torch.randn(4, 2, dtype=F64), num_groups=2, state_dtype=F32)
    with pytest.raises(ValueError, match="state_dtype must be torch.float64 or torch.float32"):
        GANKernelAnalyzer(G, D, torch.randn(4, 2, dtype=F64), num_groups=2, state_dtype=torch.float16)
    saved = _train(F32, iterations=2).callbacks[0].state_dict()
    fresh = _train(F64, iterations=0).callbacks[0]
    with pytest.raises(ValueError, match="'state_dtype': 'float32'.*build it with the same settings"):
        fresh.load_state_dict(saved)
