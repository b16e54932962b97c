"""Third read of the second-read fixes: five faults, each found by a script (/tmp/review_read3).

1. ``write_marks``/``unwritten`` read version counters, which torch's fused optimizer kernels (SGD and Adam with
   ``fused=True``) never move: an error after a fused update was written (an interrupt, an out-of-memory error in a
   step post-hook or in the GradScaler's update) was taken for "nothing written", so the trainer handed the batch back
   and trained on it a second time on top of the update already in the weights (and Adam's first-step state was
   deleted): silent, 0.024 (SGD) and 0.041 (Adam) off the straight run after five steps.
2. An accelerate ``AcceleratedOptimizer`` got no marks (its class is not torch.optim's), so a step pre-hook's refusal
   before anything was written was still a torn update: every further step refused until a checkpoint was loaded.
3. ``restored_module_generators`` read ``getattr(value, "__self__", None)`` on every object held by a module: an
   attribute-style config whose ``__getattr__`` raises KeyError for a name it lacks made every check (and the tracker's
   construction) raise ``KeyError: '__self__'``.
4. An object first reached from deeper in (a settings dict naming the augmentation object also held as an attribute)
   was marked seen with fewer levels left, so its own generator two levels down was never found: the construction's
   check advanced it (training drew other numbers) and reported the model deterministic.
5. ``output_cotangents``' diagonal fill gave outputs past the model's last a zero cotangent where the indexed write
   raised.
"""

import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.adapter import random_forward
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, make_scheduler
from genkernel.supervised import mse_loss

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _ring(n, seed=0):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def _ddpm(kind):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    optimizer = (torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True) if kind == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-2, fused=True))
    return DDPMTrainer(model, make_scheduler(50), _ring(40), batch_size=8, optimizer=optimizer, progress=False)


class Interrupted(Exception):
    """Raised after the update was written (as an out-of-memory error in a step post-hook would be)."""


@pytest.mark.parametrize("kind, at", [("sgd", 2), ("adam", 0)])
def test_an_error_after_a_fused_update_is_torn(kind, at):
    trainer = _ddpm(kind)
    trainer.train(at)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    fire = {"on": True}

    def after(optimizer, args, kwargs):
        if fire["on"]:
            fire["on"] = False
            raise Interrupted("after the update")

    handle = trainer.optimizer.register_step_post_hook(after)
    with pytest.raises(RuntimeError, match="part-way"):
        trainer.train(1)
    handle.remove()
    # (the update is in the weights: it was written, so the step is torn, not handed back to be trained again)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    with pytest.raises(RuntimeError):
        trainer.state_dict()


def test_a_pre_hook_refusal_through_accelerates_optimizer_is_not_torn():
    from accelerate import Accelerator

    def build():
        torch.manual_seed(0)
        model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
        optimizer = Accelerator(cpu=True).prepare_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
        return DDPMTrainer(model, make_scheduler(50), _ring(40), batch_size=8, optimizer=optimizer, progress=False)

    straight = build()
    straight.train(4)
    trainer = build()
    trainer.train(2)
    handle = trainer.optimizer.optimizer.register_step_pre_hook(
        lambda *a: (_ for _ in ()).throw(ValueError("guard: refused")))
    with pytest.raises(ValueError, match="guard: refused"):  # (not the torn update's RuntimeError)
        trainer.train(1)
    handle.remove()
    assert trainer.global_step == 2
    trainer.train(2)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), trainer.model.parameters()))


class _Config:
    """An attribute-style config: a name it lacks raises KeyError (not AttributeError)."""

    def __init__(self, **values):
        self._values = values

    def __getattr__(self, name):
        return self._values[name]


def test_a_model_holding_an_attribute_style_config_is_tracked():
    class WithConfig(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.cfg = nn.Linear(3, 2), _Config(width=3)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = WithConfig()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(4, 3), num_groups=2)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    losses = ((model(x) - y) ** 2).mean(1)
    tracker.observe(losses, torch.arange(6) % 2)
    losses.mean().backward()
    optimizer.step()
    assert tracker.ledger.steps == 1


class _Box:
    def __init__(self):
        self.generator = torch.Generator().manual_seed(1)


class _Noise:
    def __init__(self):
        self.box = _Box()

    def __call__(self, h):
        return h + 0.1 * torch.randn(h.shape, generator=self.box.generator)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        noise = _Noise()
        self.lin = nn.Linear(3, 2)
        self.settings = {"augment": {"noise": noise}}  # set first: the object is reached from deeper in first
        self.noise = noise

    def forward(self, x):
        return self.noise(self.lin(x))


def test_a_generator_reached_first_from_deeper_in_is_found_and_put_back():
    model = _Shared()
    before = model.noise.box.generator.get_state().clone()
    assert random_forward(model, (torch.randn(4, 3),)) == ["_Shared (draws random numbers in its forward)"]
    assert torch.equal(before, model.noise.box.generator.get_state())


def test_output_cotangents_refuse_outputs_past_the_last():
    """The diagonal fill of a contiguous run cut short at the last output gave the outputs past it a zero cotangent
    (a zero Jacobian row from factored_jacobian); a non-contiguous list raised IndexError, and so must this one."""
    from genkernel.core.engine.factors import output_cotangents

    raw = torch.zeros(2, 4)
    out, cot = output_cotangents([1, 2, 3])(raw)
    assert torch.equal(cot.sum(dim=(1, 2)), torch.full((3,), 2.0))  # each E_k holds one 1 per example
    with pytest.raises(IndexError):
        output_cotangents([2, 3, 4])(raw)
