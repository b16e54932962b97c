"""Batches carrying conditioning a trainer does not give its model are refused, not trained past.

A ``DataLoader(TensorDataset(latents, prompt_embeds))`` under ``DDPMTrainer``'s default ``conditional=False``
yields ``[x, e]``: e stood where class labels go, was found not to be class labels, and was dropped, so the
model learned the unconditional distribution of data whose captions were encoded to condition it, without a
word (a dict batch's "encoder_hidden_states" was already refused so). The same for a class-conditional
trainer's ``(x, y, e)`` and a dict's pooled embedding, and for ``GANTrainer``, which conditions on class
labels alone. Integer extras (class labels, dataset indices) are still read or passed over as before.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genkernel.diffusion import DDPMTrainer, make_scheduler
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from test_ddpm_trainer import ConditionalMLP, params_equal, ring, small_mlp
from test_trainer_embeddings import embeddings_of

F64 = torch.float64
N = 24


def diffusion(data, model=None, **kwargs):
    return DDPMTrainer(small_mlp() if model is None else model, make_scheduler(50), data, lr=1e-2, seed=1,
                       progress=False, **kwargs)


def loader(*columns):
    return DataLoader(TensorDataset(*columns), batch_size=8)


def test_a_tuple_batchs_floating_embeddings_under_an_unconditional_trainer_are_refused_before_any_update():
    """[x, e] with e a floating Tensor [B, L, D]: refused naming its position and conditional='embeddings';
    no step counted, no weight moved."""
    run = diffusion(loader(ring(N), embeddings_of(N)))
    before = [p.detach().clone() for p in run.model.parameters()]
    with pytest.raises(ValueError, match=r"conditioning at position 1 \(a floating Tensor \(8, 3, 4\)\) beside its "
                                         r"clean inputs.*conditional=False.*pass conditional='embeddings'"):
        run.train(1)
    assert run.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


def test_a_class_conditional_trainers_third_floating_element_is_refused():
    """(x, y, e) under conditional=True: y given to the model, e dropped before; now refused naming position 2."""
    run = diffusion(loader(ring(N), torch.arange(N) % 3, embeddings_of(N)), model=ConditionalMLP(record=False),
                    conditional=True)
    with pytest.raises(ValueError, match=r"position 2 .*model\(x_t, t, labels\)"):
        run.train(1)


def test_a_dict_batchs_pooled_embedding_under_a_class_conditional_trainer_is_refused():
    """A dict's "pooled_prompt_embeds" beside the class labels: only "encoder_hidden_states" under
    conditional=False was refused; a class-conditional trainer passed any of them over."""
    batches = [{"images": ring(8), "class_labels": torch.arange(8) % 3, "pooled_prompt_embeds": torch.randn(8, 5,
                                                                                                         dtype=F64)}]
    run = diffusion(batches, model=ConditionalMLP(record=False), conditional=True)
    with pytest.raises(ValueError, match="under 'pooled_prompt_embeds'"):
        run.train(1)


def test_a_gan_batchs_floating_second_element_is_refused_naming_what_the_gan_conditions_on():
    torch.manual_seed(0)
    generator, discriminator = MLPGenerator(2, 2, hidden=8, depth=1).double(), MLPDiscriminator(2, hidden=8, depth=1).double()
    run = GANTrainer(generator, discriminator, loader(ring(N), torch.randn(N, 6, dtype=F64)), seed=3)
    with pytest.raises(ValueError, match=r"position 1 .*beside its real samples.*class labels alone"):
        run.train(1)


def test_integer_extras_are_read_or_passed_over_as_before():
    """Coverage: (x, classes, indices) under conditional=False trains as plain x batches (the classes kept for
    the analyzers, the indices passed over), to the bit."""
    plain, extras = diffusion(loader(ring(N))), diffusion(loader(ring(N), torch.arange(N) % 3, torch.arange(N)))
    plain.train(3)
    extras.train(3)
    assert params_equal(plain.model, extras.model)
