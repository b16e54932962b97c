"""Second read of DDPMTrainer(conditional="embeddings"): combinations tests/test_trainer_embeddings.py does not
cover (micro-batches, the factored analyzer route, a checkpoint written right after a handed-back step, bf16
autocast over float64 embeddings, the EMA's guided samples) and the refusals it missed (a DataLoader's dict
batches carrying embeddings to a model called without them, a null embedding of another shape found only at
the first step, a sampling message that blamed the wrong argument)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from test_ddpm_trainer import params_equal, ring
from test_failed_step_retry import RefusesOnce
from test_resume import elsewhere, same
from test_trainer_embeddings import (
    NULL, CaptionedPoints, D, EmbeddingMLP, L, P, T, embeddings_of, guided_by_hand, loader, trainer,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class OptionalEmbeddingMLP(EmbeddingMLP):
    """``model(x_t, t, e=None)``: conditioned when given e, unconditional (a zero embedding) otherwise, as a
    model with an optional conditioning input is; counts the calls made without e."""

    def __init__(self):
        super().__init__()
        self.calls_without = 0

    def forward(self, x_t, t, e=None):
        if e is None:
            self.calls_without += 1
            e = torch.zeros(x_t.shape[0], L, D, dtype=x_t.dtype)
        return super().forward(x_t, t, e)


# -- refusals ------------------------------------------------------------------------------------------------
def test_dict_batches_carrying_embeddings_to_a_model_called_without_them_are_refused():
    """A DataLoader whose dict batches hold "encoder_hidden_states" under conditional=False (the default) trained
    the model as model(x_t, t): every caption ignored, no word (Tensor data's ``embeddings=`` is refused so)."""
    model = OptionalEmbeddingMLP()
    run = DDPMTrainer(model, make_scheduler(T), loader(CaptionedPoints()), lr=1e-2, progress=False)
    with pytest.raises(ValueError, match="under 'encoder_hidden_states'.*pass conditional='embeddings'"):
        run.train(2)
    assert run.global_step == 0 and model.calls_without == 0


def test_a_null_embedding_shaped_otherwise_than_tensor_datas_embeddings_is_refused_when_the_trainer_is_built():
    """Tensor data's embeddings are known at construction, as class labels are (checked there against
    null_class); a null embedding of another shape was refused only by the first step, after its draws."""
    with pytest.raises(ValueError, match=r"embeddings are shaped \(3, 4\) per example, null_embedding \(1, 3, 4\)"):
        trainer(null_embedding=NULL[None])  # (text_encoder(tokenizer(""))[0] keeps its batch dimension)


def test_sampling_with_labels_beside_the_embeddings_names_the_labels_as_what_is_extra():
    """sample(embeddings=..., labels=...) on a model conditioned on embeddings said "pass embeddings", which
    were passed; the message names what is not wanted."""
    run = trainer(class_dropout=0.0, null_embedding=None)
    run.train(1)
    with pytest.raises(ValueError, match=r"conditioned on embeddings: .*, not \['labels'\]"):
        run.sample(2, embeddings=embeddings_of(2), labels=torch.zeros(2, dtype=torch.long))


# -- combinations (coverage) ---------------------------------------------------------------------------------
def test_micro_batches_give_each_micro_batch_its_own_rows_of_the_dropped_embeddings():
    """Coverage: micro_batches=3 on a batch of 16 (sizes 6, 5, 5) gives the model the rows of the embeddings
    that the whole batch gives (after the same dropout draw), in order, and updates the weights as K = 1 to
    float64 rounding."""
    whole, micro = trainer(), trainer(micro_batches=3)
    whole.train(3)
    micro.train(3)
    assert [e.shape[0] for e in micro.model.seen] == [6, 5, 5] * 3
    for step in range(3):
        assert torch.equal(torch.cat(micro.model.seen[3 * step : 3 * step + 3]), whole.model.seen[step])
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(whole.model.parameters(), micro.model.parameters()))
    assert 0 <= gap < 1e-14
    assert max(abs(a - b) for a, b in zip(whole.losses, micro.losses)) < 1e-14


def _analyzer(group_state):
    return NoiseLevelAnalyzer(make_scheduler(T), ring(6, seed=4), num_bins=2, num_probes=6, kernel_points=2,
                              controls=1, probe_conditioning=embeddings_of(6, seed=7), group_state=group_state,
                              progress=False)


def test_the_factored_route_books_embedding_steps_as_the_dense_one_and_leaves_training_bit_for_bit():
    """Coverage: SGD over a DataLoader of captioned points with dropout and micro_batches=3: the factored
    analyzer's ledger (per-example gradients from layer factors, a pass of its own) equals the dense route's
    to 1e-12 relative and adds up exactly, and the weights and losses are bit for bit those of a run without
    an analyzer."""
    runs = {}
    for route in ("dense", "factored", None):
        callbacks = [] if route is None else [_analyzer(route)]
        run = trainer(*callbacks, data=loader(CaptionedPoints()), optimizer="sgd", micro_batches=3)
        run.train(3)
        runs[route] = (run, callbacks[0] if callbacks else None)
    bare = runs[None][0]
    for route in ("dense", "factored"):
        run, analyzer = runs[route]
        assert analyzer.tracker.group_state == route
        assert params_equal(run.model, bare.model) and run.losses == bare.losses
        for ledger in analyzer.ledgers.values():
            torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                       rtol=0, atol=1e-15)
    dense, factored = runs["dense"][1].ledgers["level"], runs["factored"][1].ledgers["level"]
    scale = float(dense.contributions.abs().max())
    assert scale > 0
    torch.testing.assert_close(factored.contributions, dense.contributions, rtol=0, atol=1e-12 * scale)


def test_a_checkpoint_written_right_after_a_handed_back_step_resumes_bit_for_bit(tmp_path):
    """Coverage: a DataLoader with dropout; step 4 refused before its update (its batch handed back, the
    data's embeddings kept, not the dropped ones), a checkpoint written at once, resumed elsewhere: the
    resumed run trains on the held batch and equals the straight run bit for bit, embeddings included."""
    straight = trainer(data=loader(CaptionedPoints()))
    straight.train(7)
    refused = trainer(RefusesOnce(4), data=loader(CaptionedPoints()))
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(7)
    assert refused.global_step == 3
    refused.save_checkpoint(tmp_path / "held.pt")
    resumed = trainer(data=loader(CaptionedPoints()))
    elsewhere()
    assert resumed.resume(tmp_path / "held.pt")
    resumed.train(4)
    same(straight.state_dict()["model"], resumed.state_dict()["model"], "model")
    assert straight.losses == resumed.losses
    assert len(resumed.model.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(straight.model.seen[3:], resumed.model.seen))


def test_bf16_autocast_gives_a_float32_model_the_float32_rounding_of_float64_embeddings_and_the_null():
    """Coverage: mixed_precision="bf16", a float32 model, float64 data embeddings: the model is given float32
    embeddings, each row the float32 rounding of its data row or of the null embedding, by the same dropout
    draws as a float64 run."""
    run = trainer(model=EmbeddingMLP().float(), data=ring(40).float(), mixed_precision="bf16")
    run.train(3)
    twin = trainer(class_dropout=0.0, null_embedding=None)
    for step in range(3):
        batch = twin.next_batch()
        dropped = torch.rand(16, generator=twin.generator, dtype=F64) < P
        expected = torch.where(dropped[:, None, None], NULL.expand(16, L, D), batch["embeddings"]).float()
        assert run.model.seen[step].dtype == torch.float32
        assert torch.equal(run.model.seen[step], expected)


def test_guided_samples_from_the_ema_weights_are_the_guidance_loop_on_the_averaged_model():
    """Coverage: sample(weights="ema", guidance_scale=3) steps with the EMA's weights (not the trained ones)
    between the prompts and the null embedding: the hand-written guidance loop on the averaged module."""
    model = EmbeddingMLP()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    run = trainer(model=model, ema=ema)
    run.train(4)
    prompts = embeddings_of(4, seed=6)
    samples, _ = run.sample(4, embeddings=prompts, guidance_scale=3.0, weights="ema")
    averaged = ema.module
    averaged.record = False
    assert not params_equal(averaged, model)
    torch.testing.assert_close(samples, guided_by_hand(averaged, prompts, 3.0), rtol=0, atol=1e-12)
    trained, _ = run.sample(4, embeddings=prompts, guidance_scale=3.0)
    assert not torch.allclose(trained, samples)


def test_embeddings_encoded_with_their_graph_train_as_the_detached_ones_and_leave_the_encoder_alone():
    """Prompt embeddings cached without torch.no_grad() (``text_encoder(ids)[0]`` carries the encoder's graph):
    the first step's backward ran into the text encoder (gradients in its weights), the second failed with
    "backward through the graph a second time". They are data: trained on as the detached values."""
    torch.manual_seed(3)
    encoder = torch.nn.Linear(D, D).double()
    encoded = encoder(embeddings_of(40))
    assert encoded.requires_grad
    run, detached = trainer(embeddings=encoded), trainer(embeddings=encoded.detach())
    run.train(3)
    detached.train(3)
    assert params_equal(run.model, detached.model) and run.losses == detached.losses
    assert encoder.weight.grad is None and encoder.bias.grad is None
