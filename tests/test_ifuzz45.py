"""GenkernelCallback beside Lightning's weight-averaging callbacks (found by fuzzing Lightning and accelerate
loops): StochasticWeightAveraging over a module with BatchNorm ends with an epoch that copies the average into
the module and runs training_step without backward; WeightAveraging is the averaging that can be booked."""

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from test_integrations import T, _analyzer, _trainer, lightning_denoiser, ring  # noqa: E402

from genkernel.integrations.lightning import GenkernelCallback  # noqa: E402


class NormedDenoiser(nn.Module):
    """(x [B, 2], t [B]) -> [B, 2] through a BatchNorm1d (float64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn, self.b = nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)
        self.double()

    def forward(self, x, t):
        return self.b(torch.tanh(self.bn(self.a(torch.cat([x, (t.to(x.dtype) / T)[:, None]], 1)))))


def _fit(analyzer, averaging):
    """A 2-epoch fit (2 batches of 4 per epoch) of the BatchNorm denoiser with ``averaging`` and, when
    ``analyzer`` is given, GenkernelCallback; returns the module."""
    module = lightning_denoiser(analyzer, net=NormedDenoiser)
    callbacks = [averaging] + ([] if analyzer is None else [GenkernelCallback(analyzer, model_attribute="net")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(callbacks, max_epochs=2).fit(module, torch.utils.data.DataLoader(ring(8), batch_size=4))
    return module


def test_stochastic_weight_averaging_over_batch_norm_is_refused_before_any_step_naming_weight_averaging():
    """Lightning's StochasticWeightAveraging with BatchNorm adds an epoch after the last one: the average is
    copied into the module and training_step runs without backward to recompute the statistics. Old: the
    analyzed fit trained every epoch and then failed in that extra epoch with "parameters changed outside the
    tracked optimizer step" (naming no averaging), while the fit without the analyzer ran to its end. Now it is
    refused at the start, naming the callback and the averaging that can be booked, with nothing moved."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    analyzer = _analyzer()
    module = lightning_denoiser(analyzer, net=NormedDenoiser)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = _trainer([StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1),
                        GenkernelCallback(analyzer, model_attribute="net")], max_epochs=2)
    with pytest.raises(ValueError, match=r"StochasticWeightAveraging.*BatchNorm \('net\.bn'\).*WeightAveraging\(\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(ring(8), batch_size=4))
    assert trainer.global_step == 0 and analyzer.tracker is None
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), before))


def test_weight_averaging_over_batch_norm_gets_a_ledger_of_the_average_equal_to_its_outputs():
    """coverage (the alternative the refusal names, booked on the old code too): WeightAveraging() averages as
    SWA does (decays 0, 1/2, 2/3, 3/4 read from its AveragedModel); the trained weights are bit for bit those of
    the fit without the analyzer, and the average's ledger ends at the averaged network's outputs at the
    probes, computed here in eval mode from the callback's AveragedModel."""
    from lightning.pytorch.callbacks import WeightAveraging

    bare = _fit(None, WeightAveraging())
    analyzer = _analyzer()
    averaging = WeightAveraging()
    tracked = _fit(analyzer, averaging)
    assert all(torch.equal(p, q) for p, q in zip(tracked.net.state_dict().values(), bare.net.state_dict().values()))
    average = averaging._average_model.module.net.eval()
    with torch.no_grad():
        z, s = analyzer.probes(next(average.parameters()))[:2]
        outputs = average(z, s).reshape(z.shape[0], -1)
    ledger = analyzer.ema_ledgers["level"]
    assert ledger.steps == 4
    assert float((outputs - ledger.f_end).abs().max()) <= 1e-14 * float(outputs.abs().max())
    identity = ledger.contributions.sum(1) + ledger.rest + ledger.residual - ledger.delta
    assert float(identity.abs().max()) < 1e-12 * float(ledger.delta.abs().max())
    assert analyzer.report()["ema"]["decays"] == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 4], rel=1e-12)
