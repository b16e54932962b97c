"""Review of the end-of-training EMA handling (tracker.at_last_step, WeightAveraging's EMA ledger)."""

import copy
import warnings

import torch
from torch import nn

from test_integrations import (
    T, _analyzer, _fit_quietly, _trainer, assert_ema_ledger_adds_up, denoiser, lightning_denoiser, per_example_loss, ring,
)


class _NormedDenoiser(nn.Module):
    """``denoiser()`` behind a BatchNorm of its input: running statistics that training moves."""

    def __init__(self):
        super().__init__()
        self.net = denoiser()
        self.norm = nn.BatchNorm1d(2).to(torch.float64)

    def forward(self, x, t):
        return self.net(self.norm(x), t)


def _fit(analyzer, averaging=None, net=_NormedDenoiser):
    from genkernel.integrations.lightning import GenkernelCallback

    module = lightning_denoiser(analyzer, net=net)
    callbacks = [GenkernelCallback(analyzer, model_attribute="net")]
    if averaging is not None:
        callbacks = [averaging, *callbacks]  # its on_train_end (the copy) runs before the analyzer's finish
    _fit_quietly(_trainer(callbacks, max_epochs=1), module,
                 torch.utils.data.DataLoader(ring(48), batch_size=8, shuffle=False))
    return module


def test_weight_averaging_of_buffers_copied_in_at_the_end_leaves_the_final_kernel_at_the_trained_buffers():
    """WeightAveraging (use_buffers=True, its default) averages BatchNorm's running statistics too and
    copies them into the model when training ends. The final kernel belongs to the ledger's last θ with
    the buffers it was computed with; old: the averaged running statistics (by_distance off in the 3rd digit)."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    plain = _analyzer()
    trained = _fit(plain)
    analyzer = _analyzer()
    averaged = _fit(analyzer, WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)))
    assert not torch.equal(averaged.net.norm.running_mean, trained.net.norm.running_mean)  # the average, copied in
    with analyzer.tracker.at_last_step() as held:
        statistics = held.norm.running_mean.clone(), held.norm.running_var.clone()
    assert torch.equal(statistics[0], trained.net.norm.running_mean)
    assert torch.equal(statistics[1], trained.net.norm.running_var)
    assert not torch.equal(averaged.net.norm.running_mean, trained.net.norm.running_mean)  # put back after the block
    assert torch.equal(analyzer.ledger.contributions, plain.ledger.contributions)
    assert analyzer.kernel_history[-1]["by_distance"] == plain.kernel_history[-1]["by_distance"]


def test_a_weight_averaging_that_skips_steps_keeps_an_ema_ledger_that_adds_up():
    """Coverage: a WeightAveraging whose should_update skips every other step (the average stands still
    after steps 2, 4, 6): the EMA ledger records one move per update made (3 of them: the copy, then
    two of decay 0.9), its identity holds and its residual is small; the model ledger is the plain run's."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    class EveryOther(WeightAveraging):
        def should_update(self, step_idx=None, epoch_idx=None):
            return step_idx is not None and step_idx % 2 == 0

    plain = _analyzer()
    _fit(plain, net=denoiser)
    analyzer = _analyzer()
    module = _fit(analyzer, EveryOther(multi_avg_fn=get_ema_multi_avg_fn(0.9)), net=denoiser)
    assert torch.equal(analyzer.ledger.contributions, plain.ledger.contributions)
    assert_ema_ledger_adds_up(analyzer, [0.0, 0.9, 0.9])
    with analyzer.tracker.at_last_step() as held:
        theta = next(held.parameters()).detach().clone()
    assert not torch.equal(next(module.net.parameters()), theta)  # the average, copied in


def test_the_final_kernel_after_an_average_is_copied_in_does_not_copy_the_analyzer(monkeypatch):
    """GenkernelCallback(analyzer) binds the LightningModule itself, which holds the analyzer it observes
    with. Old: the final kernel after WeightAveraging copied the average in ran on copy.deepcopy(module),
    which also deep-copied the analyzer, its tracker and group state (G times the model's size, at the end
    of training, on its device). The kernel must still be the plain run's."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from genkernel.diffusion import NoiseLevelAnalyzer
    from genkernel.integrations.lightning import GenkernelCallback

    def fit(analyzer, averaging):
        callbacks = [GenkernelCallback(analyzer)]
        if averaging:
            callbacks.insert(0, WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)))
        module = lightning_denoiser(analyzer)
        _fit_quietly(_trainer(callbacks, max_epochs=1), module,
                     torch.utils.data.DataLoader(ring(48), batch_size=8, shuffle=False))
        return module

    plain = _analyzer()
    trained = fit(plain, False)
    copies = []

    def refuse_copy(self, memo):  # (WeightAveraging's setup copies the module, with the analyzer not yet bound)
        if self.tracker is not None:
            copies.append(self)
            raise AssertionError("the bound analyzer was deep-copied")
        new = memo[id(self)] = object.__new__(type(self))
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    analyzer = _analyzer()
    monkeypatch.setattr(NoiseLevelAnalyzer, "__deepcopy__", refuse_copy, raising=False)
    averaged = fit(analyzer, True)
    monkeypatch.undo()
    assert not copies
    assert not torch.equal(next(averaged.net.parameters()), next(trained.net.parameters()))  # the average, copied in
    assert analyzer.kernel_history[-1]["by_distance"] == plain.kernel_history[-1]["by_distance"]
    assert torch.equal(analyzer.ledger.contributions, plain.ledger.contributions)


def _partly_frozen():
    net = denoiser()
    for p in net.time_proj.parameters():
        p.requires_grad_(False)
    return net


def test_weight_averaging_of_a_partly_frozen_network_keeps_an_ema_ledger_of_the_trained_parameters():
    """Coverage: WeightAveraging averages every parameter, frozen ones too (the average of a constant is
    that constant, bit for bit); the EMA ledger follows the trained ones and adds up, decays 0 then 0.9,
    and the model ledger and final kernel are the plain run's."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    plain = _analyzer()
    _fit(plain, net=_partly_frozen)
    analyzer = _analyzer()
    module = _fit(analyzer, WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)), net=_partly_frozen)
    assert set(analyzer.tracker.params) == {n for n, p in module.net.named_parameters() if not n.startswith("time_proj")}
    assert torch.equal(analyzer.ledger.contributions, plain.ledger.contributions)
    assert analyzer.kernel_history[-1]["by_distance"] == plain.kernel_history[-1]["by_distance"]
    assert_ema_ledger_adds_up(analyzer, [0.0] + [0.9] * 5)


def test_reading_the_ema_ledger_during_validation_under_weight_averaging_neither_breaks_nor_bends_it():
    """WeightAveraging swaps its average into the module for each validation loop (and back after it), so
    the bound EMA holds the trained weights meanwhile. Old: the analyzer's report read in validation_step
    synced that swap as an EMA copy (a decay of 0 after step 6), and the next step refused the swap back
    (LedgerCheckError), ending the fit. The ledger must end as a run without the reads ends."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from genkernel.diffusion import make_scheduler
    from genkernel.integrations.lightning import GenkernelCallback

    scheduler = make_scheduler(T)

    def fit(analyzer, read):
        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = denoiser()
                self.g = torch.Generator().manual_seed(5)

            def training_step(self, x0, index):
                losses, t = per_example_loss(self.net, scheduler, x0, self.g)
                analyzer.observe(losses, t)
                return losses.mean()

            def validation_step(self, x0, index):
                if read and index == 0:
                    analyzer.report()  # e.g. to log the EMA ledger's numbers

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        loader = torch.utils.data.DataLoader(ring(48), batch_size=8, shuffle=False)
        callbacks = [WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)), GenkernelCallback(analyzer, model_attribute="net")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(callbacks, max_epochs=2, num_sanity_val_steps=0).fit(Module(), loader, loader)

    quiet, reading = _analyzer(), _analyzer()
    fit(quiet, read=False)
    fit(reading, read=True)
    assert reading.ledger.steps == quiet.ledger.steps == 12
    assert reading.report()["ema"]["decays"] == quiet.report()["ema"]["decays"]
    assert torch.equal(reading.ema_ledgers["level"].contributions, quiet.ema_ledgers["level"].contributions)
