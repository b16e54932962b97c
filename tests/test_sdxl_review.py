"""Second read of SDXL's conditioning (``PositionalInputs``' dotted names, ``null_embedding=(e0, p0, None)``) and of
the refusal of a trainer's state inside a step.

Faults (each test fails on the code it names; the others are coverage):
- a null embedding of another number of parts than the data's failed with zip's own "argument 2 is longer than
  argument 1" (95ec0cc; before it the trainer named both shapes);
- a dict batch holding SDXL's size conditioning (``add_time_ids``) trained without it, silently (no dict key gives a
  third part to the model: a wrapper with a fixed ``added_cond_kwargs`` time_ids trained every image on those);
- ``load_state_dict()`` inside a step (a roll-back callback) was taken: the step then counted on top of it, the
  state of step 1 came back as step 2 holding step 1's weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, PositionalInputs, make_scheduler
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.supervised import SupervisedTrainer, mse_loss
from test_ddpm_trainer import ring, small_mlp
from test_sdxl_conditioning import NAMES, NULL, T, data, sdxl_unet

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(TrainerCallback):
    """Keeps each step's inputs, targets and dropped rows (clones)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, step):
        self.steps.append((tuple(t.clone() for t in step.inputs), step.targets.clone(), step.info["dropped"].clone()))


def sdxl_trainer(*callbacks, null=NULL, embeddings=None, names=NAMES, **kwargs):
    x, data_embeddings = data()
    settings = dict(batch_size=4, lr=1e-3, progress=False)
    settings.update(kwargs)
    return DDPMTrainer(PositionalInputs(sdxl_unet(), names), make_scheduler(T), x, conditional="embeddings",
                       embeddings=data_embeddings if embeddings is None else embeddings, class_dropout=0.5,
                       null_embedding=null, callbacks=list(callbacks), **settings)


# -- faults --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts, null", [(2, NULL), (3, NULL[:2])], ids=["null_of_3_on_2", "null_of_2_on_3"])
def test_a_null_counting_other_parts_than_the_embeddings_is_refused_naming_both_shapes(parts, null):
    """Fails on 95ec0cc (zip's "argument 2 is longer than argument 1", naming neither shape); passes with the fix."""
    _, embeddings = data()
    with pytest.raises(ValueError, match=r"shaped .* per example, null_embedding .*as many parts.*None for a part"):
        sdxl_trainer(null=null, embeddings=embeddings[:parts], names=NAMES[:parts + 2])


def test_a_dict_batch_holding_sdxl_size_conditioning_is_refused_naming_the_tuple_form():
    """Fails on 95ec0cc: the batch's per-image add_time_ids were left out and the wrapper's fixed time_ids (image
    0's) trained every image, without an error."""
    x, (seq, pooled, time_ids) = data()
    batches = [{"pixel_values": x[:4], "prompt_embeds": seq[:4], "pooled_prompt_embeds": pooled[:4],
                "add_time_ids": time_ids[:4]}]
    model = PositionalInputs(sdxl_unet(), NAMES[:4], added_cond_kwargs={"time_ids": time_ids[:1].expand(4, 6)})
    run = DDPMTrainer(model, make_scheduler(T), batches, conditional="embeddings", progress=False)
    with pytest.raises(TypeError, match=r"'add_time_ids' \(SDXL's time_ids\).*tuples \(images, \(prompt_embeds"):
        run.train(1)
    assert run.global_step == 0
    # the tuple form the message names gives the model each image's own (coverage)
    seen = SeenInputs()
    tuple_run = DDPMTrainer(PositionalInputs(sdxl_unet(), NAMES), make_scheduler(T),
                            [(x[:4], (seq[:4], pooled[:4], time_ids[:4]))], conditional="embeddings", progress=False,
                            callbacks=[seen])
    tuple_run.train(1)
    torch.testing.assert_close(seen.inputs[4], time_ids[:4], rtol=0, atol=0)


class SeenInputs(TrainerCallback):
    def on_step_end(self, trainer, step):
        self.inputs = tuple(t.clone() for t in step.inputs)


class LoadsInStep(TrainerCallback):
    """A roll-back callback: loads ``state`` in its ``on_step_end``."""

    def __init__(self, state):
        self.state = state

    def on_step_end(self, trainer, step):
        trainer.load_state_dict(self.state)


def ddpm():
    return DDPMTrainer(small_mlp(), make_scheduler(20), ring(24), batch_size=8, lr=1e-2, progress=False)


def gan():
    torch.manual_seed(0)
    return GANTrainer(MLPGenerator(2, 2, hidden=8, depth=1).double(), MLPDiscriminator(2, hidden=8, depth=1).double(),
                      ring(24), batch_size=8)


def supervised():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    return SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=4)


def fit(run, steps):
    """``steps`` more steps (GANTrainer.train takes the iteration to reach)."""
    if isinstance(run, SupervisedTrainer):
        x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        return run.fit(x, x.sum(1, keepdim=True), steps=steps)
    return run.train(run.iteration + steps if isinstance(run, GANTrainer) else steps)


@pytest.mark.parametrize("build", [ddpm, gan, supervised], ids=["ddpm", "gan", "supervised"])
def test_loading_a_state_inside_a_step_is_refused_and_between_steps_it_loads(build):
    """Fails on 7d17fe1 / 95ec0cc: the DDPM run came back as global_step 2 holding step 1's weights."""
    run = build()
    fit(run, 1)
    state = copy.deepcopy(run.state_dict())
    run.callbacks.append(LoadsInStep(state))
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) was called inside a .* step.*Load between steps"):
        fit(run, 1)
    run.callbacks.pop()
    run.load_state_dict(state)  # between steps: as before
    if isinstance(run, DDPMTrainer):
        assert run.global_step == 1


# -- coverage ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_state", ["factored", "dense"])
def test_the_analyzer_books_an_sgd_step_on_sdxl_inputs_as_the_midpoint_jvp_by_hand(group_state):
    """Coverage: one SGD step with dropped rows (e0, p0, own time_ids): the level ledger's contributions equal
    J(θ0 + Δ/2) Δ_g by hand (Δ_g = −lr Σ_{n ∈ g} ∇ℓ_n / B from the step's recorded inputs), 1e-12 relative"""
    x, (seq, pooled, time_ids) = data()
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), x[:2], num_bins=2, num_probes=2, controls=0, kernel_points=2,
                                  probe_conditioning=(seq[:2], pooled[:2], time_ids[:2]), progress=False,
                                  group_state=group_state)
    recorder = Recorder()
    run = sdxl_trainer(analyzer, recorder, optimizer="sgd", lr=0.05)
    start = copy.deepcopy(run.model)
    run.train(1)
    (inputs, target, dropped), = recorder.steps
    assert 0 < int(dropped.sum()) < 4  # (both kinds of row in the step)
    params = {name: p.detach() for name, p in start.named_parameters()}
    groups = analyzer.bins(inputs[1])
    deltas = []
    for g in range(2):
        grads = {name: torch.zeros_like(p) for name, p in params.items()}
        for n in range(4):
            if int(groups[n]) != g:
                continue
            out = start(*(t[n:n + 1] for t in inputs)).sample
            loss = ((out - target[n:n + 1]) ** 2).mean() / 4
            for (name, _), grad in zip(start.named_parameters(), torch.autograd.grad(loss, list(start.parameters()))):
                grads[name] += grad
        deltas.append({name: -0.05 * grad for name, grad in grads.items()})
    middle = {name: p + 0.5 * sum(delta[name] for delta in deltas) for name, p in params.items()}
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    start.model.set_attn_processor(AttnProcessor())  # (matmul attention: forward AD has no CPU flash-attention rule)

    def outputs(theta):
        return torch.func.functional_call(start, theta, probes).sample.reshape(probes[0].shape[0], -1)

    expected = torch.stack([torch.func.jvp(outputs, (middle,), (delta,))[1] for delta in deltas], dim=1)
    scale = float(expected.abs().max())
    torch.testing.assert_close(analyzer.contributions, expected, rtol=0, atol=1e-12 * scale)
    assert scale > 1e-4


def test_micro_batches_split_all_three_parts_and_dropped_rows_keep_their_time_ids():
    """Coverage: micro_batches=2 gives the UNet the same (e, p, ids) rows as one batch and trains to the same
    weights up to rounding (1e-12); dropped rows hold (e0, p0) and the data's own time_ids."""
    whole, split = Recorder(), Recorder()
    one = sdxl_trainer(whole)
    one.train(2)
    two = sdxl_trainer(split, micro_batches=2)
    two.train(2)
    _, (seq, pooled, time_ids) = data()
    for (inputs, _, dropped), (inputs_split, _, _) in zip(whole.steps, split.steps):
        for a, b in zip(inputs, inputs_split):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        rows = inputs[4][:, 2].long()  # (each image's crop is its row: data())
        torch.testing.assert_close(inputs[4], time_ids[rows], rtol=0, atol=0)
        e = torch.where(dropped.view(-1, 1, 1), NULL[0], seq[rows])
        torch.testing.assert_close(inputs[2], e, rtol=0, atol=0)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_a_resume_under_a_null_whose_dropped_or_kept_parts_changed_is_refused(tmp_path):
    """Coverage: the checkpoint's fingerprint follows the dropped parts' values and which parts are kept."""
    sdxl_trainer(checkpoint_dir=tmp_path, checkpoint_every=1).train(1)
    for null in [(NULL[0] + 1, NULL[1], None), (NULL[0], None, torch.zeros(6, dtype=F64))]:
        with pytest.raises(ValueError, match="class_dropout"):
            sdxl_trainer(null=null).resume(tmp_path / "checkpoint.pt")
    same = sdxl_trainer()
    assert same.resume(tmp_path / "checkpoint.pt") and same.global_step == 1


def test_a_trainer_trained_inside_anothers_step_gives_its_state_and_the_outer_ones_is_refused():
    """Coverage: the in-step mark is per trainer: an inner trainer trained in an outer one's on_step_end saves
    between its own steps, while the outer trainer's state taken from the inner's callback is refused."""
    outer, inner = ddpm(), ddpm()
    seen = {}

    class AsksOuter(TrainerCallback):
        def on_step_end(self, trainer, step):
            try:
                outer.state_dict()
            except RuntimeError as error:
                seen["outer"] = str(error)

    class TrainsInner(TrainerCallback):
        def on_step_end(self, trainer, step):
            inner.train(1)
            seen["inner_step"] = inner.state_dict()["global_step"]

    inner.callbacks.append(AsksOuter())
    outer.callbacks.append(TrainsInner())
    outer.train(1)
    assert seen["inner_step"] == 1
    assert "DDPMTrainer.state_dict() was called inside a" in seen["outer"]
    assert outer.state_dict()["global_step"] == 1
