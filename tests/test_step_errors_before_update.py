"""An error raised inside ``optimizer.step()`` before it writes anything is not a torn update.

A step pre-hook's refusal (``optimizer.register_step_pre_hook``) or Adam's refusal of sparse gradients raises from
inside ``optimizer.step()`` with no parameter and no state entry written (Adam's lazy initialization of the
parameters before the sparse one is the only thing made, and it is removed). The trainers took every error there for
an interrupt part-way through the update and refused every further step, ``state_dict`` and ``save_checkpoint``
until a checkpoint was loaded: the steps since the last checkpoint lost (or, with none, the trainer built again) for
an update never made. What must hold: the error comes through as raised, the batch is handed back, and the run
continued after it is the straight run, bit for bit; an update that did write part of itself is still refused
(tests/test_interrupted_updates.py).
"""


import pytest
import torch
from torch import nn

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, make_scheduler
from states import state_differences
from test_third_read import _ring

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _ddpm(foreach):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=foreach)
    return DDPMTrainer(model, make_scheduler(50), _ring(40), batch_size=8, optimizer=optimizer, progress=False)




@pytest.mark.parametrize("foreach", [False, True])
def test_ddpm_step_pre_hook_refusal_is_not_torn(foreach):
    straight = _ddpm(foreach)
    straight.train(5)
    trainer = _ddpm(foreach)
    trainer.train(2)
    refuse = {"on": True}

    def guard(optimizer, args, kwargs):
        if refuse["on"]:
            raise ValueError("gradient guard: step refused")

    handle = trainer.optimizer.register_step_pre_hook(guard)
    with pytest.raises(ValueError, match="gradient guard"):  # (not the torn update's RuntimeError)
        trainer.train(3)
    assert trainer.global_step == 2
    refuse["on"] = False
    handle.remove()
    trainer.state_dict()  # not refused
    trainer.train(3)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


def test_adam_sparse_gradient_refusal_leaves_the_optimizer_as_it_was():
    """Adam initializes the dense layer's state, then refuses the embedding's sparse gradient: nothing written,
    the lazy state removed (the step is not torn), and the optimizer then steps as a fresh one."""
    from genkernel.core.tracking.step import unwritten, write_marks

    torch.manual_seed(0)
    dense, table = nn.Linear(3, 2).double(), nn.Embedding(4, 2, sparse=True).double()
    optimizer = torch.optim.Adam([*dense.parameters(), *table.parameters()], lr=1e-2, foreach=False)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    (dense(x).sum() + table(torch.tensor([0, 2])).sum()).backward()
    weights = [p.detach().clone() for p in (*dense.parameters(), *table.parameters())]
    marks = write_marks(optimizer)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert len(optimizer.state) > 0  # (what the refusal left: the dense parameters' lazy state)
    assert unwritten(optimizer, marks) and len(optimizer.state) == 0
    assert all(torch.equal(w, p) for w, p in zip(weights, (*dense.parameters(), *table.parameters())))
    # a step that wrote part of itself is not "unwritten"
    table.weight.grad = None
    marks = write_marks(optimizer)
    optimizer.step()
    assert not unwritten(optimizer, marks)


def test_gan_step_pre_hook_refusal_is_not_torn():
    from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

    def gan():
        torch.manual_seed(0)
        G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
        return GANTrainer(G, D, _ring(32), batch_size=8, d_steps=1, seed=3, loss="hinge", progress=False,
                          g_optimizer=torch.optim.Adam(G.parameters(), lr=1e-2, foreach=False),
                          d_optimizer=torch.optim.Adam(D.parameters(), lr=1e-2, foreach=False))

    straight = gan()
    straight.train(4)
    trainer = gan()
    trainer.train(2)
    handle = trainer.g_optimizer.register_step_pre_hook(lambda *a: (_ for _ in ()).throw(ValueError("guard: refused")))
    with pytest.raises(ValueError, match="guard: refused"):
        trainer.train(4)
    handle.remove()
    trainer.state_dict()  # not refused
    trainer.train(4)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []
