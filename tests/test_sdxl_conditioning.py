"""SDXL's conditioning through the trainer and the analyzer: ``UNet2DConditionModel(addition_embed_type=
"text_time")`` takes its pooled text embedding and its size-and-crop ``time_ids`` in ``added_cond_kwargs``, which
``PositionalInputs``' dotted names fill ("added_cond_kwargs.text_embeds"). The prompt dropout of SDXL's script
empties the prompt (both embeddings) while each image keeps its own sizes and crops: ``null_embedding=(e0, p0,
None)``, None keeping the example's own ``time_ids``, in training and in guidance's unconditional rows."""

from __future__ import annotations

import pytest
import torch

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, PositionalInputs, make_scheduler
from genkernel.diffusion.trainer import make_sampler
from test_trainer_vae import assert_booked_as_trained_bare

F64 = torch.float64
T, N, L, D, P = 50, 12, 3, 8, 8
NAMES = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids")

pytestmark = pytest.mark.usefixtures("one_thread")


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=P + 6 * 4,
    ).double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 2, 4, 4, generator=g, dtype=F64)
    seq, pooled = torch.randn(N, L, D, generator=g, dtype=F64), torch.randn(N, P, generator=g, dtype=F64)
    time_ids = torch.tensor([32.0, 32.0, 0.0, 0.0, 32.0, 32.0], dtype=F64).repeat(N, 1)
    time_ids[:, 2] = torch.arange(N, dtype=F64)  # (each image its own crop: what a dropped example must keep)
    return x, (seq, pooled, time_ids)


NULL = (torch.zeros(L, D, dtype=F64), torch.zeros(P, dtype=F64), None)


class SeenConditioning(TrainerCallback):
    def __init__(self):
        self.embeddings, self.dropped = [], []

    def on_step_end(self, trainer, step):
        self.embeddings.append(tuple(part.clone() for part in step.inputs[2:]))
        self.dropped.append(step.info["dropped"].clone())


def trainer(*callbacks, unet=None, null=NULL, **kwargs):
    x, embeddings = data()
    return DDPMTrainer(PositionalInputs(sdxl_unet() if unet is None else unet, NAMES), make_scheduler(T), x,
                       conditional="embeddings", embeddings=embeddings, class_dropout=0.5, null_embedding=null,
                       batch_size=4, lr=1e-3, progress=False, callbacks=list(callbacks), **kwargs)


def test_dotted_names_fill_added_cond_kwargs_as_the_unet_takes_them():
    unet, (x, (seq, pooled, time_ids)) = sdxl_unet(), data()
    t = torch.arange(N) * 4
    expected = unet(x, t, seq, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(PositionalInputs(unet, NAMES)(x, t, seq, pooled, time_ids).sample, expected,
                               rtol=0, atol=0)
    # a fixed entry merged with the dotted ones (passed as it is: one row per row of the call)
    fixed = PositionalInputs(unet, NAMES[:4], added_cond_kwargs={"time_ids": time_ids})
    torch.testing.assert_close(fixed(x, t, seq, pooled).sample, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one dict level"):
        PositionalInputs(unet, ("sample", "timestep", "a.b.c"))
    with pytest.raises(ValueError, match="cannot also be given whole"):
        PositionalInputs(unet, ("sample", "timestep", "added_cond_kwargs", "added_cond_kwargs.time_ids"))
    with pytest.raises(ValueError, match=r"given twice"):
        PositionalInputs(unet, NAMES, added_cond_kwargs={"time_ids": time_ids})


def test_a_dropped_example_takes_the_empty_prompt_and_keeps_its_own_time_ids():
    seen = SeenConditioning()
    run = trainer(seen)
    run.train(3)
    _, (seq, pooled, time_ids) = data()
    assert sum(int(d.sum()) for d in seen.dropped) > 0 and not all(bool(d.all()) for d in seen.dropped)
    for (e, p, ids), dropped in zip(seen.embeddings, seen.dropped):
        rows = [int((time_ids[:, 2] == crop).nonzero()) for crop in ids[:, 2]]  # (the batch's rows of the data)
        torch.testing.assert_close(ids, time_ids[rows], rtol=0, atol=0)  # every row its own, dropped or not
        for i, row in enumerate(rows):
            expected_e, expected_p = (NULL[0], NULL[1]) if dropped[i] else (seq[row], pooled[row])
            torch.testing.assert_close(e[i], expected_e, rtol=0, atol=0)
            torch.testing.assert_close(p[i], expected_p, rtol=0, atol=0)


def test_the_analyzer_books_sdxl_steps_and_training_is_bit_for_bit_without_it():
    x, (seq, pooled, time_ids) = data()
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), x[:4], num_bins=2, num_probes=4, controls=1, kernel_points=2,
                                  probe_conditioning=(seq[:4], pooled[:4], time_ids[:4]), progress=False)
    assert_booked_as_trained_bare(trainer(analyzer), trainer(), analyzer, 3)


def test_guidances_unconditional_rows_keep_each_samples_time_ids():
    """Guided samples equal a hand-written loop over the UNet: F(z, t, e0, p0, ids_s) + w (F(z, t, e_s, p_s, ids_s)
    − F(z, t, e0, p0, ids_s)), the sample's own time_ids in both passes."""
    run = trainer()
    run.train(2)
    _, (seq, pooled, time_ids) = data()
    cond = (seq[:3], pooled[:3], time_ids[:3])
    samples, _ = run.sample(3, embeddings=cond, guidance_scale=3.0, num_inference_steps=4, seed=5)
    unet = run.model.model
    sampler = make_sampler(run.scheduler)
    sampler.set_timesteps(4)
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(3, 2, 4, 4, generator=generator, dtype=F64)
    unet.eval()
    with torch.no_grad():
        for t in sampler.timesteps:
            timestep = t.repeat(3)
            c = unet(z, timestep, cond[0], added_cond_kwargs={"text_embeds": cond[1], "time_ids": cond[2]}).sample
            u = unet(z, timestep, NULL[0].expand(3, L, D), added_cond_kwargs={
                "text_embeds": NULL[1].expand(3, P), "time_ids": cond[2]}).sample
            z = sampler.step(u + 3.0 * (c - u), t, z, generator=generator).prev_sample
    torch.testing.assert_close(samples, z, rtol=0, atol=1e-12)


def test_a_null_that_keeps_every_part_and_a_resume_with_another_null_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"drops no part"):
        trainer(null=(None, None, None))
    with pytest.raises(ValueError, match=r"shaped"):
        trainer(null=(torch.zeros(L, D + 1, dtype=F64), torch.zeros(P, dtype=F64), None))
    trainer(checkpoint_dir=tmp_path, checkpoint_every=1).train(1)
    dropping_all = trainer(null=(*NULL[:2], torch.zeros(6, dtype=F64)))
    with pytest.raises(ValueError, match="class_dropout"):
        dropping_all.resume(tmp_path / "checkpoint.pt")


def test_reverse_sample_takes_a_none_null_part_as_the_samples_own():
    """``reverse_sample(..., null_conditioning=(e0, p0, None))`` guides as with the samples' own time_ids written
    out (a None there was refused as not a Tensor)."""
    from genkernel.diffusion import reverse_sample

    run = trainer()
    _, (seq, pooled, time_ids) = data()
    cond = (seq[:3], pooled[:3], time_ids[:3])
    null = (NULL[0].expand(3, L, D), NULL[1].expand(3, P))
    kwargs = dict(num_inference_steps=3, seed=2, conditioning=cond, guidance_scale=2.0)
    written, _ = reverse_sample(run.model, run.scheduler, (3, 2, 4, 4), null_conditioning=(*null, cond[2]), **kwargs)
    kept, _ = reverse_sample(run.model, run.scheduler, (3, 2, 4, 4), null_conditioning=(*null, None), **kwargs)
    torch.testing.assert_close(kept, written, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one part per conditioning part"):
        reverse_sample(run.model, run.scheduler, (3, 2, 4, 4), null_conditioning=(null[0], None), **kwargs)
