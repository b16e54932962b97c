"""Review of DDPMTrainer's embeddings given as a tuple (SD3's and FLUX's sequence and pooled text embeddings):
an empty tuple refused (it trained a conditional model as model(x_t, t)), a one-part tuple the same as its
Tensor, probes that lack the steps' pooled embedding refused (their kernels were of another input), a flat
batch (x, e, p) refused (p was passed over as not class labels), a null of fewer parts refused by the
dropout itself, a part of other rows named; and, as coverage, micro-batches, a failed step's hand-back,
resume and guided sampling on tuples against hand-written references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.guidance import EmbeddingDropout
from test_ddpm_trainer import params_equal, ring
from test_failed_step_retry import RefusesOnce
from test_resume import assert_resumes_bit_for_bit

F64 = torch.float64
T = 50
N, L, D, P = 24, 3, 4, 5  # examples, tokens, token width, pooled width
BATCH = 8

pytestmark = pytest.mark.usefixtures("one_thread")


class PooledMLP(nn.Module):
    """``model(x_t, t, e, p=None)``: x_t shifted by projections of the mean token and of the pooled embedding
    (a pooled embedding left out is skipped, as a hand-written model's optional input would be); keeps how
    many inputs each call had."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = MLPDenoiser(hidden=16, depth=2, time_dim=8)
        self.project = nn.Linear(D, 2)
        self.pool = nn.Linear(P, 2)
        self.double()
        self.calls: list[int] = []

    def forward(self, x_t, t, *conditioning):
        self.calls.append(len(conditioning))
        shift = sum((self.project(c.mean(1)) if c.dim() == 3 else self.pool(c)) for c in conditioning)
        return self.net(x_t + shift, t)


def pooled_data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, L, D, generator=gen, dtype=F64), torch.randn(N, P, generator=gen, dtype=F64)


SEQ, POOLED = pooled_data()
NULL = (torch.full((L, D), -0.5, dtype=F64), torch.full((P,), 0.25, dtype=F64))  # (not zeros: visible if given)


def tensor_trainer(*callbacks, embeddings=(SEQ, POOLED), null_embedding=NULL, class_dropout=0.3, **kwargs):
    return DDPMTrainer(PooledMLP(), make_scheduler(T), ring(N), conditional="embeddings", embeddings=embeddings,
                       batch_size=BATCH, class_dropout=class_dropout, null_embedding=null_embedding, lr=1e-2,
                       optimizer="sgd", progress=False, callbacks=list(callbacks), **kwargs)


class PooledPoints(Dataset):
    """SD3-style cached items: a dict with "pooled_prompt_embeds" beside "prompt_embeds", or a tuple
    ``(x, (sequence, pooled))`` (collated into a list of two batches)."""

    def __init__(self, form):
        self.form, self.points = form, ring(N)

    def __len__(self):
        return N

    def __getitem__(self, i):
        if self.form == "dict":
            return {"pixel_values": self.points[i], "prompt_embeds": SEQ[i], "pooled_prompt_embeds": POOLED[i]}
        return self.points[i], (SEQ[i], POOLED[i])


def loader_trainer(form, *callbacks, **kwargs):
    data = DataLoader(PooledPoints(form), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2))
    return DDPMTrainer(PooledMLP(), make_scheduler(T), data, conditional="embeddings", class_dropout=0.3,
                       null_embedding=NULL, lr=1e-2, progress=False, callbacks=list(callbacks), **kwargs)


# ------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------
def test_an_empty_tuple_of_embeddings_or_null_is_refused_not_trained_as_an_unconditioned_model():
    """embeddings=() passed every check (no part to check) and the model was called model(x_t, t) at every step: a
    conditional trainer trained without conditioning, silently. null_embedding=() died in the first step's draw
    with an IndexError."""
    with pytest.raises(TypeError, match="empty tuple"):
        tensor_trainer(embeddings=(), class_dropout=0.0, null_embedding=None)
    with pytest.raises(TypeError, match="empty tuple"):
        tensor_trainer(embeddings=[], class_dropout=0.0, null_embedding=None)
    with pytest.raises(TypeError, match="null_embedding is an empty tuple"):
        tensor_trainer(null_embedding=())


def test_a_one_part_tuple_is_the_plain_tensor_for_data_null_and_sampling():
    """A tuple of one part calls the model as its Tensor does, model(x_t, t, e); it was refused against a Tensor
    null (or a Tensor trainer against a one-part null or one-part prompts) with shapes ((3, 4),) vs (3, 4)."""
    plain = tensor_trainer(embeddings=SEQ, null_embedding=NULL[0])
    plain.train(3)
    for embeddings, null in (((SEQ,), NULL[0]), (SEQ, (NULL[0],)), ([SEQ], [NULL[0]])):
        one = tensor_trainer(embeddings=embeddings, null_embedding=null)
        one.train(3)
        assert params_equal(one.model, plain.model) and one.losses == plain.losses
        assert one.embedding_shape == plain.embedding_shape == (L, D)
    prompts = SEQ[:3] + 1
    expected, _ = plain.sample(3, embeddings=prompts, num_inference_steps=4, guidance_scale=2.0)
    given, _ = plain.sample(3, embeddings=(prompts,), num_inference_steps=4, guidance_scale=2.0)
    assert torch.equal(given, expected)


def test_probes_without_the_steps_pooled_embedding_are_refused_before_the_step():
    """A trainer giving (sequence, pooled) and probes given the sequence alone: the probes' forward
    model(z, s, e) ran without the pooled input (a model defaulting it), every kernel of another function than
    the one trained, without a word. Refused naming both, before the update; the run goes on once fixed."""
    gen = torch.Generator().manual_seed(5)
    probe_seq, probe_pooled = torch.randn(4, L, D, generator=gen, dtype=F64), torch.randn(4, P, generator=gen, dtype=F64)

    def analyzer(conditioning):
        return NoiseLevelAnalyzer(make_scheduler(T), ring(4, seed=4), num_bins=2, num_probes=4, kernel_points=2,
                                  probe_conditioning=conditioning, progress=False)

    run = tensor_trainer(analyzer(probe_seq))
    with pytest.raises(ValueError, match=r"probes 1 shaped \[\(3, 4\)\].*probe_conditioning"):
        run.train(1)
    # refused before the step's forward and update (the probes' own forwards ran as the analyzer bound)
    assert run.global_step == 0 and 2 not in run.model.calls
    fixed = tensor_trainer(analyzer((probe_seq, probe_pooled)))
    fixed.train(2)
    assert set(fixed.model.calls) == {2}  # steps and probes alike: model(x, t, e, p)


def test_a_flat_tuple_batch_with_a_pooled_embedding_is_refused_not_trained_without_it():
    """DataLoader(TensorDataset(latents, prompt_embeds, pooled_prompt_embeds)) yields [x, e, p]: p stood where class
    labels go, was no class labels and was passed over, the model trained as model(x_t, t, e) without a word.
    Refused naming the form that passes it; (x, (e, p)) trains on both."""
    flat = DataLoader(TensorDataset(ring(N), SEQ, POOLED), batch_size=BATCH)
    run = DDPMTrainer(PooledMLP(), make_scheduler(T), flat, conditional="embeddings", progress=False)
    with pytest.raises(TypeError, match=r"\(inputs, \(embeddings, pooled\)\)"):
        run.train(1)
    assert run.model.calls == []
    paired = [(ring(N)[:BATCH], (SEQ[:BATCH], POOLED[:BATCH]))]
    run = DDPMTrainer(PooledMLP(), make_scheduler(T), paired, conditional="embeddings", progress=False)
    run.train(1)
    assert run.model.calls == [2]


def test_parts_of_other_row_counts_are_refused_naming_the_part():
    """A pooled embedding with a row short (or a non-Tensor part) was refused as "got torch.float64 (23, 5)",
    not saying that it was the tuple's second part: the message now names the part."""
    with pytest.raises(TypeError, match=r"\[24, \*E\].*got torch.float64 \(23, 5\) as part 1 of the 2 given"):
        tensor_trainer(embeddings=(SEQ, POOLED[:-1]))
    trained = tensor_trainer()
    trained.train(1)
    with pytest.raises(TypeError, match=r"got NoneType as part 1 of the 2 given"):
        trained.sample(2, embeddings=(SEQ[:2], None))


def test_the_dropout_refuses_a_null_of_fewer_parts_than_the_embeddings():
    """EmbeddingDropout.draw zipped the parts with the null's: a Tensor null against (sequence, pooled) gave back
    a one-part tuple, the pooled embedding lost without an error (the trainer's shape check stood in front of it,
    a direct use of the dropout had none)."""
    dropout = EmbeddingDropout(0.5, NULL[0])
    with pytest.raises(ValueError):
        dropout.draw((SEQ[:4], POOLED[:4]), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        dropout.null_rows((SEQ[:4], POOLED[:4]))


# ------------------------------------------------------------------------------------------
# coverage: these hold on HEAD
# ------------------------------------------------------------------------------------------
def test_micro_batches_of_a_tuple_batch_are_the_sgd_step_written_by_hand():
    """coverage: micro_batches=3 (sizes 3, 3, 2) slices every part of (sequence, pooled) with its rows: two SGD
    steps equal the whole-batch steps written by hand with the dropout's draws (1e-14)."""
    run = tensor_trainer(micro_batches=3)
    run.train(2)
    twin = tensor_trainer(class_dropout=0.0, null_embedding=None)
    model = PooledMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        batch = twin.next_batch()
        dropped = torch.rand(BATCH, generator=twin.generator, dtype=F64) < 0.3
        seq, pooled = batch["embeddings"]
        assert torch.equal(seq, SEQ[batch["indices"]]) and torch.equal(pooled, POOLED[batch["indices"]])
        seq = torch.where(dropped[:, None, None], NULL[0], seq)
        pooled = torch.where(dropped[:, None], NULL[1], pooled)
        ((model(batch["noisy"], batch["timesteps"], seq, pooled) - batch["target"]) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-14) for p, q in zip(run.model.parameters(), model.parameters()))


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_a_refused_step_and_a_checkpoint_holding_its_batch_resume_the_straight_run(form, tmp_path):
    """coverage: a DataLoader of (sequence, pooled) batches (a dict's pooled_prompt_embeds, a collated tuple):
    a refused step hands back the data's pair, not the dropped one, and a checkpoint written then (the
    embedding shapes saved as nested tuples) resumes to the straight run, bit for bit."""
    straight = loader_trainer(form)
    straight.train(5)
    assert straight.embedding_shape == ((L, D), (P,))
    refused = loader_trainer(form, RefusesOnce(2))
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(5)
    refused.save_checkpoint(tmp_path / "held.pt")
    assert torch.load(tmp_path / "held.pt", weights_only=True)["iterable"]["embedding_shape"] == ((L, D), (P,))
    resumed = loader_trainer(form)
    assert resumed.resume(tmp_path / "held.pt")
    resumed.train(5 - resumed.global_step)
    assert params_equal(straight.model, resumed.model) and straight.losses == resumed.losses
    assert_resumes_bit_for_bit(lambda **kwargs: loader_trainer(form, **kwargs), tmp_path, 4, 2)


def test_guided_sampling_on_a_pair_is_the_guidance_loop_written_by_hand():
    """coverage: sample(embeddings=(sequence, pooled), guidance_scale=w) (or a list) steps with
    F(∅) + w (F(e, p) − F(∅)), ∅ the null pair in every row (1e-15)."""
    run = tensor_trainer()
    run.train(2)
    prompts = (SEQ[:3] + 1, POOLED[:3] - 1)
    samples, _ = run.sample(3, embeddings=prompts, num_inference_steps=4, guidance_scale=2.5)
    listed, _ = run.sample(3, embeddings=list(prompts), num_inference_steps=4, guidance_scale=2.5)
    assert torch.equal(samples, listed)
    sampler = make_scheduler(T)
    sampler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    null = (NULL[0].expand(3, L, D), NULL[1].expand(3, P))
    run.model.eval()
    with torch.no_grad():
        for t in sampler.timesteps:
            timestep = t.repeat(3)
            conditional, unconditional = run.model(x, timestep, *prompts), run.model(x, timestep, *null)
            x = sampler.step(unconditional + 2.5 * (conditional - unconditional), t, x, generator=gen).prev_sample
    torch.testing.assert_close(samples, x, rtol=0, atol=1e-15)


def test_a_dict_batch_with_both_pooled_keys_is_refused():
    """"pooled_projections" and "pooled_prompt_embeds" in one batch: the first was taken without a word."""
    from genkernel.core.tracking.batches import split_embedding_batch

    batch = {"pixel_values": torch.zeros(2, 3), "prompt_embeds": torch.zeros(2, 4, 5),
             "pooled_projections": torch.zeros(2, 6), "pooled_prompt_embeds": torch.ones(2, 6)}
    with pytest.raises(TypeError, match=r"pooled embeddings under both \['pooled_projections', 'pooled_prompt_embeds'\]"):
        split_embedding_batch(batch, "clean inputs")
