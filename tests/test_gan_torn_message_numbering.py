"""The torn-update refusal of a GANTrainer under lazy R1 names the step interrupted as the counts number it.

``d_steps_done`` counts lazy R1's regularization steps too, so the message named the third discriminator step of a
run with one regularization step "discriminator step 4", and a regularization step a "discriminator step".
"""

import math

import pytest
import torch

from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _gan():
    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
    angle = torch.rand(32, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 * math.pi
    return GANTrainer(G, D, 2 * torch.stack([angle.cos(), angle.sin()], dim=1), batch_size=8, d_steps=1, seed=3,
                      loss="hinge", progress=False, r1_gamma=1.0, r1_interval=2,
                      g_optimizer=torch.optim.Adam(G.parameters(), lr=1e-2, foreach=False),
                      d_optimizer=torch.optim.Adam(D.parameters(), lr=1e-2, foreach=False))


def _interrupt_next_step(optimizer):
    """The optimizer's next step written, then Ctrl-C (the update is in the parameters: torn for the trainer)."""
    real = optimizer.step

    def step(closure=None):
        optimizer.step = real
        real(closure)
        raise KeyboardInterrupt("Ctrl-C inside optimizer.step")

    optimizer.step = step


@pytest.mark.parametrize("iterations, expected", [(2, "discriminator step 3"), (1, "regularization step 1")])
def test_lazy_r1_torn_message_numbers_the_step(iterations, expected):
    trainer = _gan()
    trainer.train(iterations)
    if iterations == 1:  # (iteration 2's D step made, its regularization step next)
        trainer.discriminator_step()
        step = trainer.regularization_step
    else:
        step = trainer.discriminator_step
    _interrupt_next_step(trainer.d_optimizer)
    with pytest.raises(RuntimeError) as info:
        step()
    assert f"optimizer.step() of {expected} raised KeyboardInterrupt" in str(info.value)
