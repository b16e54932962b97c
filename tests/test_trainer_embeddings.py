"""DDPMTrainer(conditional="embeddings"): a denoiser conditioned on embeddings ``model(x_t, t, e)`` (a text
encoder's hidden states encoded beforehand, ``UNet2DConditionModel``'s ``encoder_hidden_states``), from
Tensor data or a DataLoader's dict batches; classifier-free guidance's dropout towards a null embedding
drawn from the trainer's generator; the analyzer's ledger equal to a float64 brute force; resumed bit for
bit; guided sampling equal to a hand-written loop; bad set-ups refused with the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from test_ddpm_trainer import StepRecorder, params_equal, ring
from test_failed_step_retry import RefusesOnce
from test_flow_matching_review import brute_force_adamw, close
from test_guidance import guided_by_hand as guided_by_hand_of_labels
from test_resume import assert_resumes_bit_for_bit

F64 = torch.float64
T = 50
P = 0.3
L, D = 3, 4  # tokens and width of an example's embedding

pytestmark = pytest.mark.usefixtures("one_thread")


class EmbeddingMLP(nn.Module):
    """``model(x_t, t, e)``: an MLP denoiser of x_t shifted by a projection of the mean token; keeps the
    embeddings it saw."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = MLPDenoiser(hidden=16, depth=2, time_dim=8)
        self.project = nn.Linear(D, 2)
        self.double()
        self.seen: list[torch.Tensor] = []
        self.record = True

    def forward(self, x_t, t, e):
        if self.record:
            self.seen.append(e.detach().clone())
        return self.net(x_t + self.project(e.mean(1)), t)


def embeddings_of(n, seed=1):
    return torch.randn(n, L, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


NULL = torch.full((L, D), -0.5, dtype=F64)  # (not zeros: a zero row would hide a null never given)


def trainer(*callbacks, model=None, data=None, embeddings="the data's", **kwargs):
    settings = dict(conditional="embeddings", class_dropout=P, null_embedding=NULL)
    settings.update(kwargs)
    data = ring(40) if data is None else data
    if isinstance(data, torch.Tensor):
        settings.update(embeddings=embeddings_of(data.shape[0]) if isinstance(embeddings, str) else embeddings,
                        batch_size=min(16, data.shape[0]))
    return DDPMTrainer(EmbeddingMLP() if model is None else model, make_scheduler(T), data, lr=1e-2,
                       progress=False, callbacks=list(callbacks), **settings)


class CaptionedPoints(Dataset):
    """A text-to-image script's cached dataset: dict items with the inputs, their encoded captions and a class."""

    def __init__(self, n=40):
        self.points, self.embeddings = ring(n), embeddings_of(n)
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return self.points.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.points[i], "encoder_hidden_states": self.embeddings[i],
                "class_labels": self.labels[i]}


def loader(dataset, seed=2):
    return DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


class DroppedRecorder(TrainerCallback):
    """Keeps every step's ``info["dropped"]``."""

    def __init__(self):
        self.dropped = []

    def on_step_end(self, trainer, step):
        self.dropped.append(step.info["dropped"].clone())


def test_each_embedding_is_given_to_the_model_and_dropped_to_the_null_by_one_draw_after_the_noise():
    recorder = DroppedRecorder()
    ours = trainer(recorder)
    ours.train(6)
    twin = trainer(class_dropout=0.0, null_embedding=None)  # the same batches, timesteps and noise, then the draw by hand
    data = embeddings_of(40)
    dropped_total = 0
    for step in range(6):
        batch = twin.next_batch()
        assert torch.equal(batch["embeddings"], data[batch["indices"]])  # the rows' own embeddings
        dropped = torch.rand(16, generator=twin.generator, dtype=F64) < P
        expected = torch.where(dropped[:, None, None], NULL.expand(16, L, D), batch["embeddings"])
        assert torch.equal(ours.model.seen[step], expected)  # what the model was given
        assert torch.equal(recorder.dropped[step], dropped)  # which rows, as the analyzers get it
        dropped_total += int(dropped.sum())
    assert 0 < dropped_total < 6 * 16
    # without dropout nothing more is drawn: the generator drew exactly order, timesteps and noise
    plain = trainer(class_dropout=0.0, null_embedding=None)
    plain.train(6)
    again = trainer(class_dropout=0.0, null_embedding=None)
    for _ in range(6):
        again.next_batch()
    assert torch.equal(plain.generator.get_state(), again.generator.get_state())


def test_tensor_datas_embeddings_stay_where_given_and_each_batchs_rows_are_moved_to_the_model():
    """A cache of text encodings is large (CLIP's 77 × 768 per example): it was copied whole to the model's device
    and dtype. Now it stays as given, and each batch's rows reach the model in its dtype."""

    class Indices(TrainerCallback):
        def __init__(self):
            self.indices = []

        def on_step_end(self, trainer, step):
            self.indices.append(step.info["indices"].clone())

    given, recorder = embeddings_of(40).float(), Indices()
    run = trainer(recorder, embeddings=given, class_dropout=0.0, null_embedding=None)
    assert run.embeddings.data_ptr() == given.data_ptr() and run.embeddings.dtype == torch.float32  # no copy
    run.train(2)
    for seen, rows in zip(run.model.seen, recorder.indices):
        assert seen.dtype == F64 and torch.equal(seen, given[rows].double())


def tiny_text_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, norm_num_groups=4, attention_head_dim=2,
    ).double()


class CaptionedImages(Dataset):
    def __init__(self, n=12, seed=3):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 2, 4, 4, generator=gen, dtype=F64)
        self.embeddings = torch.randn(n, L, D, generator=gen, dtype=F64)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "prompt_embeds": self.embeddings[i]}


def unet_trainer(*callbacks, **kwargs):
    pytest.importorskip("diffusers")
    data = DataLoader(CaptionedImages(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(4))
    return DDPMTrainer(tiny_text_unet(), make_scheduler(T), data, conditional="embeddings", optimizer="adamw",
                       lr=1e-3, progress=False, callbacks=list(callbacks), **kwargs)


def test_a_cross_attention_unet_trains_as_the_text_to_image_loop_written_by_hand():
    ours = unet_trainer(class_dropout=0.25, null_embedding=torch.zeros(L, D, dtype=F64))
    ours.train(4)
    # the hand loop: the same batches and draws (a twin's next_batch), diffusers' train_text_to_image step
    twin = unet_trainer()
    unet = tiny_text_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)  # (make_optimizer's)
    dropped_any = False
    for _ in range(4):
        batch = twin.next_batch()
        dropped = torch.rand(3, generator=twin.generator, dtype=F64) < 0.25
        dropped_any |= bool(dropped.any())
        text = torch.where(dropped[:, None, None], torch.zeros(L, D, dtype=F64), batch["embeddings"])
        prediction = unet(batch["noisy"], batch["timesteps"], encoder_hidden_states=text).sample
        loss = nn.functional.mse_loss(prediction, batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert dropped_any
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(ours.model.parameters(), unet.parameters()))
    assert not params_equal(ours.model, tiny_text_unet())


def test_the_analyzer_books_a_cross_attention_unet_as_a_float64_brute_force_and_training_is_unchanged():
    gen = torch.Generator().manual_seed(5)
    probes, probe_text = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64), torch.randn(3, L, D, generator=gen, dtype=F64)
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), probes, num_bins=2, num_probes=3, controls=0, kernel_points=2,
                                  probe_conditioning=probe_text, progress=False)

    class Inputs(StepRecorder):
        def __init__(self):
            super().__init__()
            self.steps = []

        def on_step_end(self, trainer, step):
            self.steps.append((step.inputs, step.targets))

    recorder = Inputs()
    analyzed = unet_trainer(analyzer, recorder)
    analyzed.train(3)
    bare = unet_trainer()
    bare.train(3)
    assert params_equal(analyzed.model, bare.model) and analyzed.losses == bare.losses
    examples = []
    for (z, t, text), target in recorder.steps:
        bins = analyzer.bins(t)
        examples.append([((z[n : n + 1], t[n : n + 1], text[n : n + 1]), target[n : n + 1], 1 / 3, int(bins[n]))
                         for n in range(3)])
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    expected, _, reference, _ = brute_force_adamw(tiny_text_unet(), examples, probes, 2, lr=1e-3)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-13) for p, q in zip(analyzed.model.parameters(), reference.parameters()))
    ok, gap = close(analyzer.contributions, expected, 1e-9)
    assert ok, gap
    for ledger in analyzer.ledgers.values():  # (the residual is the midpoint rule's over whole-UNet Adam steps: ~5 %)
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12)


def test_class_labels_beside_embeddings_reach_the_analyzers_level_class_split():
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(6, seed=4), num_bins=2, num_probes=6, kernel_points=2,
                                  probe_conditioning=embeddings_of(6, seed=7), num_classes=3, progress=False)
    recorder = StepRecorder()
    run = trainer(analyzer, recorder, data=loader(CaptionedPoints()))
    run.train(5)
    dataset = CaptionedPoints()
    for clean, labels in zip(recorder.clean, recorder.labels):  # each row's own class, not given to the model
        rows = [int(torch.nonzero((dataset.points == c).all(1))[0]) for c in clean]
        assert torch.equal(labels, dataset.labels[rows])
    level, level_class = analyzer.ledgers["level"], analyzer.ledgers["level_class"]
    torch.testing.assert_close(level_class.contributions.reshape(6, 2, 3, -1).sum(2), level.contributions,
                               rtol=0, atol=1e-12 * float(level.contributions.abs().max()))
    for ledger in analyzer.ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("source", ["tensor", "dataloader"])
def test_a_run_on_embeddings_resumes_bit_for_bit(source, tmp_path):
    def data():
        return None if source == "tensor" else loader(CaptionedPoints())

    straight, resumed = assert_resumes_bit_for_bit(lambda **kwargs: trainer(data=data(), **kwargs), tmp_path, 7, 3)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.seen[3:], resumed.model.seen))
    with pytest.raises(ValueError, match="class_dropout"):  # another null embedding: another run
        trainer(data=data(), null_embedding=NULL + 1).resume(tmp_path / "checkpoint.pt")


def test_a_checkpoint_on_other_embeddings_or_conditioning_is_refused(tmp_path):
    trainer(checkpoint_dir=tmp_path, checkpoint_every=2).train(2)
    with pytest.raises(ValueError, match="data_fingerprint"):
        trainer(embeddings=embeddings_of(40, seed=9)).resume(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="conditional"):
        trainer(conditional=False, class_dropout=0.0, null_embedding=None, embeddings=None,
                data=ring(40)).resume(tmp_path / "checkpoint.pt")


def test_a_refused_step_on_a_dataloader_hands_back_the_datas_embeddings_not_the_dropped_ones():
    straight = trainer(data=loader(CaptionedPoints()))
    straight.train(6)
    refused = trainer(RefusesOnce(3), data=loader(CaptionedPoints()))
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(6)
    refused.train(6 - refused.global_step)
    assert params_equal(straight.model, refused.model) and straight.losses == refused.losses
    assert len(refused.model.seen) == 6  # (refused before its forward)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.seen, refused.model.seen))


def guided_by_hand(model, embeddings, scale, seed=0):
    """test_guidance's guidance loop by hand, ∅ the null embedding in every row."""
    return guided_by_hand_of_labels(model, embeddings, scale, seed=seed, null=NULL.expand_as(embeddings))


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guided_samples_on_embeddings_are_the_hand_written_guidance_loop(scale, tmp_path):
    run = trainer()
    run.train(4)
    prompts = embeddings_of(5, seed=6)
    samples, _ = run.sample(5, embeddings=prompts, guidance_scale=scale)
    run.model.record = False
    torch.testing.assert_close(samples, guided_by_hand(run.model, prompts, scale), rtol=0, atol=1e-12)
    plain, _ = run.sample(5, embeddings=prompts)
    assert not torch.allclose(plain, samples)
    run.model.train()
    saved = run.save_samples(tmp_path / "guided.png", 5, embeddings=prompts, guidance_scale=scale)
    assert torch.equal(saved, samples)


def test_float32_prompts_sample_a_float64_model_as_their_values_in_its_dtype():
    """reverse_sample (and retrieval through it) gave a float64 model float32 embeddings: torch's "mat1 and mat2
    must have the same dtype". Floating conditioning now meets the model's dtype, as in training."""
    from genkernel.diffusion import reverse_sample

    run = trainer()
    run.train(2)
    run.model.record = False
    prompts = embeddings_of(5, seed=6).float()
    ours, _ = reverse_sample(run.model, run.scheduler, (5, 2), seed=3, conditioning=prompts, guidance_scale=3.0,
                             null_conditioning=NULL.float().expand(5, L, D))
    expected, _ = run.sample(5, embeddings=prompts.double(), guidance_scale=3.0, seed=3)
    assert ours.dtype == F64 and torch.equal(ours, expected)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(embeddings=None, data=ring(40)), ValueError, "give embeddings="),
    (dict(conditional=False, class_dropout=0.0, null_embedding=None), ValueError, "conditional='embeddings'"),
    (dict(conditional="text"), ValueError, "'class_labels' or 'embeddings'"),
    (dict(null_embedding=None), ValueError, "needs null_embedding="),
    (dict(class_dropout=0.0), ValueError, "pass class_dropout > 0"),
    (dict(null_class=0), ValueError, "drops them to null_embedding="),
    (dict(conditional=True, labels=torch.zeros(40, dtype=torch.long)), ValueError, "build the trainer with"),
    (dict(null_embedding=torch.zeros(L + 1, D)), ValueError, r"shaped \(3, 4\) per example, null_embedding \(4, 4\)"),
    (dict(null_embedding=torch.zeros(L, D, dtype=torch.long)), TypeError, "floating Tensor"),
    (dict(embeddings=torch.zeros(40, L, D, dtype=torch.long)), TypeError, r"floating Tensor \[40, \*E\]"),
    (dict(embeddings=embeddings_of(39)), TypeError, r"\[40, \*E\]"),
])
def test_bad_embedding_settings_are_refused_with_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        trainer(**kwargs).train(1)


@pytest.mark.parametrize("batch,match", [
    ({"pixel_values": ring(8)}, "encoder_hidden_states"),
    ((ring(8),), r"tuple \(inputs, embeddings\[, labels\]\)"),
    ((ring(8), embeddings_of(7)), r"\[8, \*E\]"),
])
def test_a_dataloader_batch_without_its_embeddings_is_refused_naming_the_form(batch, match):
    run = trainer(data=[batch])
    with pytest.raises(TypeError, match=match):
        run.train(1)
    assert run.global_step == 0


def test_embeddings_shaped_otherwise_than_the_datas_are_refused():
    run = trainer(data=[(ring(8), embeddings_of(8)), (ring(8), torch.zeros(8, L + 1, D, dtype=F64))],
                  class_dropout=0.0, null_embedding=None)
    with pytest.raises(ValueError, match=r"shaped \(4, 4\) per example, the data's embeddings \(3, 4\)"):
        run.train(2)
    assert run.global_step == 1
    with pytest.raises(ValueError, match=r"shaped \(2, 4\) per example"):
        run.sample(2, embeddings=torch.zeros(2, 2, D, dtype=F64))
    with pytest.raises(ValueError, match="conditioned on embeddings: pass embeddings"):
        run.sample(2)
    with pytest.raises(ValueError, match="not \\['labels'\\]"):
        run.sample(2, labels=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("conditional", ["embeddings", True])
def test_an_analyzer_without_probe_conditioning_on_a_conditional_trainer_names_it(conditional):
    """Its probes' forward model(z, s) missed the trainer's third input: torch's "missing 1 required positional
    argument" from inside the tracker's check, naming neither the analyzer nor probe_conditioning."""
    from test_ddpm_trainer import ConditionalMLP

    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(6, seed=4), num_bins=2, num_probes=6, kernel_points=2,
                                  progress=False)
    if conditional is True:
        run = DDPMTrainer(ConditionalMLP(), make_scheduler(T), ring(40), labels=torch.arange(40) % 3, conditional=True,
                          progress=False, callbacks=[analyzer])
    else:
        run = trainer(analyzer)
    with pytest.raises(ValueError, match="build it with probe_conditioning=, the probes' " +
                       ("embeddings" if conditional == "embeddings" else "class labels")):
        run.train(1)
    assert run.global_step == 0


def tiny_pixart(seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=2, num_layers=1, norm_num_groups=1,
        cross_attention_dim=8, caption_channels=D, sample_size=4, patch_size=2, use_additional_conditions=False,
    ).double()


PIXART_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states")
PIXART_FIXED = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def test_a_text_conditioned_transformer_taking_its_inputs_by_name_trains_and_is_analyzed_exactly():
    """PixArt's transformer takes (hidden_states, encoder_hidden_states, timestep): called model(z, t, e) it got the
    timesteps as the text. PositionalInputs names the trainer's inputs: its output is the transformer's own called
    by keyword, training is bit for bit with and without the analyzer, and the ledgers add up."""
    pytest.importorskip("diffusers")
    from genkernel.diffusion import PositionalInputs

    gen = torch.Generator().manual_seed(8)
    images, text = torch.randn(12, 2, 4, 4, generator=gen, dtype=F64), torch.randn(12, L, D, generator=gen, dtype=F64)
    wrapped = PositionalInputs(tiny_pixart(), PIXART_INPUTS, **PIXART_FIXED)
    t = torch.tensor([3, 17, 40])
    direct = tiny_pixart()(hidden_states=images[:3], timestep=t, encoder_hidden_states=text[:3], **PIXART_FIXED).sample
    assert torch.equal(wrapped(images[:3], t, text[:3]).sample, direct)

    def run(*callbacks):
        return DDPMTrainer(PositionalInputs(tiny_pixart(), PIXART_INPUTS, **PIXART_FIXED), make_scheduler(T), images,
                           conditional="embeddings", embeddings=text, batch_size=4, progress=False,
                           callbacks=list(callbacks))

    analyzer = NoiseLevelAnalyzer(make_scheduler(T), images[:3], probe_conditioning=text[:3], num_bins=2, num_probes=3,
                                  kernel_points=2, progress=False)
    analyzed, bare = run(analyzer), run()
    analyzed.train(3)
    bare.train(3)
    assert params_equal(analyzed.model, bare.model) and analyzed.losses == bare.losses
    for ledger in analyzer.ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12 * float(ledger.delta.abs().max()))


def test_positional_inputs_refuse_a_call_or_names_that_do_not_match():
    from genkernel.diffusion import PositionalInputs

    with pytest.raises(TypeError, match=r"called with 2 inputs, but names has 3"):
        PositionalInputs(nn.Identity(), ("a", "b", "c"))(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"\['timestep'\] given twice"):
        PositionalInputs(nn.Identity(), ("hidden_states", "timestep"), timestep=None)
    with pytest.raises(TypeError, match="names must be a tuple"):
        PositionalInputs(nn.Identity(), "hidden_states")


def tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=2, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=D, caption_projection_dim=8, pooled_projection_dim=6, out_channels=2, pos_embed_max_size=8,
    ).double()


SD3_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")


class PooledCaptions(Dataset):
    """SD3's cached text: a sequence embedding and a pooled one per image (dict items as its scripts' batches)."""

    def __init__(self, n=12, seed=9):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 2, 4, 4, generator=gen, dtype=F64)
        self.text = torch.randn(n, L, D, generator=gen, dtype=F64)
        self.pooled = torch.randn(n, 6, generator=gen, dtype=F64)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "prompt_embeds": self.text[i], "pooled_prompt_embeds": self.pooled[i]}


def test_an_sd3_transformer_with_a_pooled_embedding_trains_by_flow_matching_as_written_by_hand():
    """SD3 and FLUX take a sequence and a pooled text embedding: batches' "pooled_prompt_embeds" (or Tensor data's
    embeddings=(sequence, pooled)) reach the model as its fourth input; both drop to the null pair together. Training
    equals the flow-matching step written by hand (1e-12), bit for bit with and without the analyzer, ledgers add up,
    and a resumed run is the straight one."""
    pytest.importorskip("diffusers")
    from genkernel.diffusion import PositionalInputs, make_flow_scheduler

    null = (torch.zeros(L, D, dtype=F64), torch.full((6,), 0.5, dtype=F64))

    def run(*callbacks, **kwargs):
        return DDPMTrainer(PositionalInputs(tiny_sd3(), SD3_INPUTS), make_flow_scheduler(T, shift=3.0),
                           DataLoader(PooledCaptions(), batch_size=4, shuffle=True,
                                      generator=torch.Generator().manual_seed(4)),
                           conditional="embeddings", class_dropout=0.3, null_embedding=null, optimizer="sgd", lr=0.05,
                           progress=False, callbacks=list(callbacks), **kwargs)

    ours = run()
    ours.train(3)
    twin = DDPMTrainer(PositionalInputs(tiny_sd3(), SD3_INPUTS), make_flow_scheduler(T, shift=3.0),
                       DataLoader(PooledCaptions(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(4)),
                       conditional="embeddings", progress=False)
    model = tiny_sd3()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dropped_any = False
    for _ in range(3):
        batch = twin.next_batch()
        dropped = torch.rand(4, generator=twin.generator, dtype=F64) < 0.3
        dropped_any |= bool(dropped.any())
        text, pooled = batch["embeddings"]
        text = torch.where(dropped[:, None, None], null[0], text)
        pooled = torch.where(dropped[:, None], null[1], pooled)
        prediction = model(hidden_states=batch["noisy"], timestep=batch["timesteps"], encoder_hidden_states=text,
                           pooled_projections=pooled).sample
        ((prediction - batch["target"]) ** 2).mean(dim=(1, 2, 3)).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert dropped_any
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(ours.model.model.parameters(), model.parameters()))

    gen = torch.Generator().manual_seed(5)
    probe_text = (torch.randn(3, L, D, generator=gen, dtype=F64), torch.randn(3, 6, generator=gen, dtype=F64))
    analyzer = NoiseLevelAnalyzer(make_flow_scheduler(T, shift=3.0), PooledCaptions().images[:3], num_bins=2,
                                  num_probes=3, kernel_points=2, probe_conditioning=probe_text, progress=False)
    analyzed = run(analyzer)
    analyzed.train(3)
    assert params_equal(analyzed.model, ours.model) and analyzed.losses == ours.losses
    for ledger in analyzer.ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12 * float(ledger.delta.abs().max()))
    samples, _ = ours.sample(2, embeddings=(probe_text[0][:2], probe_text[1][:2]), num_inference_steps=3,
                             guidance_scale=2.0)
    assert samples.shape == (2, 2, 4, 4) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match=r"null_embedding \(\(3, 4\), \(6,\)\)"):
        DDPMTrainer(tiny_sd3(), make_flow_scheduler(T), PooledCaptions().images, conditional="embeddings",
                    embeddings=(PooledCaptions().text, PooledCaptions().text[:, 0]), class_dropout=0.1,
                    null_embedding=null, progress=False)


def test_tensor_data_with_a_pooled_embedding_resumes_bit_for_bit_and_refuses_other_pooled_embeddings(tmp_path):
    from genkernel.diffusion import PositionalInputs, make_flow_scheduler

    data = PooledCaptions()

    def build(pooled=data.pooled, **kwargs):
        return DDPMTrainer(PositionalInputs(tiny_sd3(), SD3_INPUTS), make_flow_scheduler(T), data.images,
                           conditional="embeddings", embeddings=(data.text, pooled), batch_size=4, progress=False,
                           **kwargs)

    assert_resumes_bit_for_bit(build, tmp_path, 4, 2)
    with pytest.raises(ValueError, match="data_fingerprint"):
        build(pooled=data.pooled.flip(0)).resume(tmp_path / "checkpoint.pt")


def test_a_pooled_embedding_for_a_unet_taking_class_labels_next_is_refused():
    """A dict batch with "pooled_prompt_embeds" (SDXL's scripts cache it) gave UNet2DConditionModel the pooled
    embedding as its fourth input, class_labels: ignored without a class embedding, silently."""
    pytest.importorskip("diffusers")
    data = CaptionedImages()
    pooled = torch.randn(len(data), 6, dtype=F64)

    class WithPooled(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {**data[i], "pooled_prompt_embeds": pooled[i]}

    run = DDPMTrainer(tiny_text_unet(), make_scheduler(T), DataLoader(WithPooled(), batch_size=3), conditional="embeddings",
                      progress=False)
    with pytest.raises(ValueError, match=r"inputs \['encoder_hidden_states', 'class_labels'\].*give the sequence alone"):
        run.train(1)
    assert run.global_step == 0
    with pytest.raises(ValueError, match="class_labels"):
        DDPMTrainer(tiny_text_unet(), make_scheduler(T), data.images, conditional="embeddings",
                    embeddings=(data.embeddings, pooled), progress=False)
