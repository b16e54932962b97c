"""Second reading (read40) of the float64 gradient check's replay (tracking.rounding.TrainingReplay).

A replay runs the step's micro-batches' training forward again; every module outside the tracked one that it runs (a
GAN's discriminator) must run from its buffers as training's forward found them. A spectral-norm discriminator
(SNGAN's, ``nn.utils.parametrizations.spectral_norm``) moves its power-iteration vectors in every training-mode
forward, so a replay from the vectors training's forward left gives other losses, measures nothing, and the very
refusal the replay was made for ("group gradients ... of '4.bias' do not add up", G's last bias behind D's BatchNorm)
came back: 15 of 120 four-step runs of the configuration below were refused, every replay unreproduced.

Also: GenkernelCallback's load_state_dict after an evaluation loop that raised (no teardown), a GAN resumed after a
discriminator warm-up (G's Adam has no state yet), and a namedtuple of inference tensors given to an entry point run
outside inference mode.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_gan_bruteforce_hunt import DATA, F64, LAT, LR_D, LR_G, PROBES, _optimizer  # noqa: E402
from test_float64_floor import _Recorder  # noqa: E402

from genkernel.core.tracking import rounding  # noqa: E402
from genkernel.gan import GANKernelAnalyzer, GANTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _sn_players(seed):
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(LAT, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Dropout(0.2), nn.Linear(8, 2)).to(F64)
    G.latent_dim = LAT
    D = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 8)), nn.BatchNorm1d(8), nn.SiLU(),
                      nn.Dropout(0.3), nn.Linear(8, 1)).to(F64)
    return G, D


def _run(analyze, steps=2):
    G, D = _sn_players(22)
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=2, eval_every=1) if analyze else None
    recorder = _Recorder()  # (G's probe outputs as its first step finds them: after D's first step moved its buffers)
    trainer = GANTrainer(G, D, DATA, batch_size=6, seed=0, micro_batches=3,
                         callbacks=[recorder, analyzer] if analyze else [recorder],
                         g_optimizer=_optimizer("adam", G.parameters(), LR_G),
                         d_optimizer=_optimizer("adam", D.parameters(), LR_D))
    trainer.train(steps)
    state = {f"G.{k}": v.clone() for k, v in G.state_dict().items()}
    state.update({f"D.{k}": v.clone() for k, v in D.state_dict().items()})
    state["torch_rng"] = torch.get_rng_state()
    state["trainer_rng"] = trainer.rng.get_state()
    for i, opt in enumerate((trainer.g_optimizer, trainer.d_optimizer)):
        for j, s in enumerate(opt.state.values()):
            state.update({f"opt{i}.{j}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return G, analyzer, state, recorder.f_start


def test_a_spectral_norm_discriminator_replays_from_its_own_buffers_and_the_step_is_not_refused(monkeypatch):
    """An SN-GAN in float64 (spectral norm and BatchNorm in D, BatchNorm and dropout in G, Adam, micro_batches=3 at
    batch 6; model seed 22, trainer seed 0): its first G step fails the plain tolerance on '4.bias' (a zero gradient
    by symmetry) and replays. Checked: the replay reproduces training's losses (it returns a rounding sample), the run
    trains bit for bit as its untracked twin (parameters, buffers with the spectral-norm vectors, both optimizers'
    states, torch's and the trainer's generators), and every partition's ledger closes on the probes' real change
    (two eval forwards of G outside the analyzer) to 1e-13 relative.

    Fails on the old code (84668c7 and this session's HEAD alike): LedgerCheckError at step 1, "the group gradients of
    partition 'geometry' of '4.bias' do not add up to the real gradient (gap 4.065e-17, ...)": at HEAD the replay
    ran D from the power-iteration vectors training's forward had moved, did not reproduce the losses, and allowed
    nothing."""
    replays = []
    replay = getattr(getattr(rounding, "TrainingReplay", None), "rounding", None)
    if replay is not None:
        def counted(self, coefficients):
            out = replay(self, coefficients)
            replays.append(bool(out))
            return out

        monkeypatch.setattr(rounding.TrainingReplay, "rounding", counted)
    torch.manual_seed(5)
    *_, plain, _ = _run(False)
    torch.manual_seed(5)
    G, analyzer, analyzed, f0 = _run(True)
    assert replays and all(replays), replays
    assert plain.keys() == analyzed.keys()
    for key in plain:
        assert torch.equal(plain[key], analyzed[key]), key
    with torch.no_grad():
        G.eval()
        change = G(PROBES) - f0
        G.train()
    assert analyzer.generator_ledgers
    for name, ledger in analyzer.generator_ledgers.items():
        assert ledger.steps == 2, name
        assert torch.allclose(ledger.f_start, f0, rtol=0, atol=1e-15), name
        booked = ledger.contributions.sum(1) + ledger.rest + ledger.residual
        assert float((booked - change).abs().max()) <= 1e-13 * float(change.abs().max()), name


def test_a_callback_load_after_an_evaluation_that_raised_loads():
    """GenkernelCallback.load_state_dict outside a trainer's run loads the analyzer's state (teardown resets the stage
    it records at setup for that). Lightning calls no teardown hook after an exception: a ``validate`` whose
    validation_step raised left the stage "validate", and a later ``callback.load_state_dict(state)`` was dropped
    silently, a malformed state too. Checked: a malformed state is refused ("not a NoiseLevelAnalyzer state") and a
    saved one is taken (an unbound analyzer keeps it for its bind).

    Coverage: a regression of f5b5fcd (the load worked at 84668c7, where an unbound analyzer always loaded; fails at
    f5b5fcd..HEAD without /tmp/review_read40/02-lightning.patch)."""
    pytest.importorskip("lightning.pytorch")
    import warnings

    from genkernel.integrations.lightning import GenkernelCallback
    from test_lightning_fixes import Evaluated, analyzer, data, evaluation, fit, trainer

    class Failing(Evaluated):
        def validation_step(self, x0, index):
            raise RuntimeError("validation failed")

    source = analyzer()
    saving = GenkernelCallback(source, model_attribute="net")
    fit(trainer([saving], max_steps=2), Evaluated(source), data())
    state = saving.state_dict()
    assert source.global_steps == [1, 2]

    target = analyzer()
    callback = GenkernelCallback(target, model_attribute="net")
    with pytest.raises(RuntimeError, match="validation failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([callback]).validate(Failing(target), evaluation(), verbose=False)
    with pytest.raises(ValueError, match="not a NoiseLevelAnalyzer state"):  # (read, not dropped)
        callback.load_state_dict({"analyzer": {"format": "something else"}})
    callback.load_state_dict(state)
    assert target._pending_state is state["analyzer"]  # (an unbound analyzer applies it at bind)


def test_inputs_in_a_namedtuple_made_under_inference_mode_are_copied_whole():
    """``adapter.outside_inference_mode`` copies the inference tensors of a tuple argument; a namedtuple of inputs
    (accepted outside inference mode: ``covering_plan(model, Inputs(x))`` gives blocks ['0', '3'], and the tracker
    takes it as probes) was rebuilt as ``Inputs(x=<generator>)``: covering_plan raised "'generator' object has no
    attribute 'dim'" and the tracker "probes must be a Tensor or a non-empty tuple of Tensors ..., got Inputs".
    Checked: under inference mode, with inference tensors in the namedtuple, covering_plan gives the plan a call
    outside gives, and a factored tracker is built with the factored route's blocks.

    Fails on the old code: at 84668c7 the plan was [] (the covering check's passes could not record a graph); at
    f5b5fcd..HEAD, the errors above."""
    import collections

    from genkernel.core.engine.factors import covering_plan
    from genkernel.core.tracking import PathKernelTracker

    Inputs = collections.namedtuple("Inputs", "x")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)).double()
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)).double()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    assert [b.name for b in covering_plan(other, Inputs(x)).blocks] == ["0", "3"]
    with torch.inference_mode():
        made = Inputs(x.clone())
        assert made.x.is_inference()
        plan = covering_plan(model, made)
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    lambda out, target: ((out - target) ** 2).squeeze(1), Inputs(made.x[:4]),
                                    num_groups=2, group_state="factored")
    assert [b.name for b in plan.blocks] == ["0", "3"]
    assert made.x.is_inference()  # (the caller's tensors are not replaced)
    assert tracker.group_state == "factored"


def test_a_gan_resumed_after_a_discriminator_warm_up_numbers_the_generator_from_zero(tmp_path):
    """A Lightning GAN whose first batch trains D alone (a warm-up: 2 D steps), Adam for both, checkpointed with the
    callback's analyzer state at global_step 2 (G has not stepped: its Adam state is empty, the analyzer numbered D
    [1, 2] and G nothing), then resumed. G's count is 0 (one of torch's optimizers that write state["step"] at their
    first step, with no state), D's is 2 (its Adam). Checked: the resumed fit numbers G [1, 2] and D on from 3, each
    without gaps, as the uninterrupted fit numbers them.

    Fails on the old code: at 84668c7 G was numbered from global_step, G [3, 4]; at f5b5fcd..HEAD the resume was
    refused ("neither the generator's optimizer (Adam, which keeps no step count) nor the checkpoint (no analyzer
    state in it) says ...": Adam keeps one, and the analyzer state was there)."""
    pl = pytest.importorskip("lightning.pytorch")
    from genkernel.integrations.lightning import GenkernelCallback
    from test_lightning_fixes import GAN, gan_fit

    class WarmGAN(GAN):
        def training_step(self, batch, i):
            if self.global_step == 0:  # the warm-up: D alone
                for k in range(2):
                    self.d_step(batch[0], k)
                return
            super().training_step(batch, i)

    module = WarmGAN(True, ("adam", "adam"))
    run = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=[GenkernelCallback(module.analyzer)])
    gan_fit(module, 2, run=run)
    assert module.analyzer.g_loop_steps == [] and module.analyzer.d_loop_steps == [1, 2]
    path = str(tmp_path / "warm.ckpt")
    run.save_checkpoint(path)
    resumed = gan_fit(WarmGAN(True, ("adam", "adam")), 2, ckpt_path=path)
    assert resumed.g_loop_steps[:1] == [1] and resumed.g_loop_steps == list(range(1, len(resumed.g_loop_steps) + 1))
    assert len(resumed.d_loop_steps) > 2 and resumed.d_loop_steps == list(range(1, len(resumed.d_loop_steps) + 1))
