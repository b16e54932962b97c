"""Review of classifier-free guidance in DDPMTrainer (commit 596eae1): guidance asked of a sampler with
no conditioning, diffusers' class embeddings other than a table of rows (UNet2DModel's
class_embed_type="timestep"), DiT's LabelEmbedding (it drops labels itself, from the global RNG), guided
sampling under EDM / flow matching / DDIM against hand-written loops, old checkpoints, and DataLoader
runs with dropout resumed mid-epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from genkernel import TrainerCallback
from genkernel.diffusion import (
    DDPMTrainer, make_edm_scheduler, make_flow_scheduler, make_scheduler, reverse_sample,
)
from genkernel.diffusion.trainer import make_sampler
from genkernel.diffusion import MLPDenoiser
from test_ddpm_trainer import ConditionalMLP, params_equal, ring, small_mlp
from test_resume import elsewhere, same

T = 50
P, NULL = 0.3, 3

pytestmark = pytest.mark.usefixtures("one_thread")


def labels_of(n, seed=1):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def conditional_trainer(scheduler=None, model=None, **kwargs):
    settings = dict(labels=labels_of(40), conditional=True, class_dropout=P, null_class=NULL, batch_size=16, lr=1e-2,
                    progress=False)
    settings.update(kwargs)
    return DDPMTrainer(ConditionalMLP(num_classes=4) if model is None else model,
                       make_scheduler(T) if scheduler is None else scheduler, ring(40), **settings)


class RealTimeConditionalMLP(ConditionalMLP):
    """ConditionalMLP taking real levels t (flow matching, EDM)."""

    def __init__(self):
        super().__init__(num_classes=4)
        torch.manual_seed(0)
        self.net = MLPDenoiser(hidden=16, depth=2, time_dim=8, time_input="continuous").double()


class LabelsSeen(TrainerCallback):
    def __init__(self):
        self.labels = []

    def on_step_end(self, trainer, step):
        self.labels.append(step.info["class_labels"].clone())


# ------------------------------------------------------------------------------------------
# guidance asked of a sampler that has nothing to guide
# ------------------------------------------------------------------------------------------
def test_reverse_sample_refuses_guidance_without_conditioning():
    # Old code: both conditionings are empty, so the check passes and the sampler runs the unconditional model
    # twice per step and returns its plain samples: a silent no-op for any guidance_scale.
    with pytest.raises(ValueError, match=r"guidance_scale=3 .*conditioning="):
        reverse_sample(small_mlp(), make_scheduler(T), (3, 2), guidance_scale=3.0)
    # guidance_scale=1 (the default) stays the plain sampler
    samples, _ = reverse_sample(small_mlp(), make_scheduler(T), (3, 2), guidance_scale=1.0)
    assert samples.shape == (3, 2)


def test_guidance_on_an_unconditional_trainer_is_refused_with_the_fix():  # coverage
    run = DDPMTrainer(small_mlp(), make_scheduler(T), ring(40), batch_size=16, progress=False)
    run.train(1)
    with pytest.raises(ValueError, match="never learned an unconditional one: train with class_dropout="):
        run.sample(3, guidance_scale=2.0)


def test_sampling_the_null_class_is_the_unconditional_model_at_every_guidance_scale():  # coverage
    run = conditional_trainer()
    run.train(4)
    null = torch.full((5,), NULL)
    plain, _ = run.sample(5, labels=null)  # legitimate: the unconditional model
    for scale in (0.0, 4.0):
        guided, _ = run.sample(5, labels=null, guidance_scale=scale)
        # F(∅) + w (F(∅) − F(∅)) = F(∅); the batched pass differs from the single one by rounding only
        torch.testing.assert_close(guided, plain, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# diffusers' class embeddings
# ------------------------------------------------------------------------------------------
def tiny_unet(**kwargs):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, add_attention=False, **kwargs,
    )


def test_a_unet_whose_class_embedding_is_a_timestep_embedding_is_not_refused_by_num_class_embeds():
    # class_embed_type="timestep" embeds the label sinusoidally: UNet2DModel ignores num_class_embeds (no table),
    # so null_class=3 is as good an input as any. Old code: refused ("not a row of the model's class embedding").
    unet = tiny_unet(class_embed_type="timestep", num_class_embeds=3)
    assert not isinstance(unet.class_embedding, torch.nn.Embedding)
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    run = DDPMTrainer(unet, make_scheduler(T), images, labels=labels_of(8), conditional=True, class_dropout=P,
                      null_class=NULL, batch_size=8, progress=False)
    run.train(1)
    assert torch.isfinite(torch.tensor(run.losses)).all()
    # a table of rows is still checked
    with pytest.raises(ValueError, match="num_class_embeds=4"):
        DDPMTrainer(tiny_unet(num_class_embeds=3), make_scheduler(T), images, labels=labels_of(8), conditional=True,
                    class_dropout=P, null_class=NULL, progress=False)


def tiny_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                           num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=3).double()


def label_embeddings(model):
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "token_drop", None))]


def test_a_dit_label_embedding_that_drops_labels_itself_is_refused_beside_class_dropout():
    # diffusers' DiT builds its LabelEmbedding with dropout_prob=0.1 and drops labels in train mode from the global
    # RNG: with class_dropout the labels are dropped twice (1 - 0.7 * 0.9 = 37 % instead of 30 %) and the analyzers
    # book labels the model never saw. Old code: accepted.
    images = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dit = tiny_dit()
    (name, embedding), = label_embeddings(dit)
    assert embedding.dropout_prob == 0.1
    with pytest.raises(ValueError, match=rf"drops class labels itself.*{name}.*dropout_prob = 0"):
        DDPMTrainer(dit, make_scheduler(T), images, labels=labels_of(16), conditional=True, class_dropout=P,
                    null_class=NULL, progress=False)
    # the fix the message names: the null row (index num_classes) stays, the model sees what the ledgers book
    embedding.dropout_prob = 0.0
    seen = []
    embedding.embedding_table.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    recorder = LabelsSeen()
    run = DDPMTrainer(dit, make_scheduler(T), images, labels=labels_of(16), conditional=True, class_dropout=P,
                      null_class=NULL, batch_size=16, progress=False, callbacks=[recorder])
    run.train(3)
    assert sum(int((labels == NULL).sum()) for labels in recorder.labels) > 0
    # DiT embeds the labels twice per forward (its first block and its output layer): both are the booked ones
    assert len(seen) == 2 * len(recorder.labels)
    assert all(torch.equal(seen[i], recorder.labels[i // 2]) for i in range(len(seen)))


def test_a_null_class_outside_a_dit_label_table_is_refused():
    # Old code: only config.num_class_embeds was read; DiT's table (num_embeds_ada_norm + 1 rows) was not, and a
    # null class past it failed in the forward with an IndexError naming no cause.
    dit = tiny_dit()
    (_, embedding), = label_embeddings(dit)
    embedding.dropout_prob = 0.0
    rows = embedding.embedding_table.num_embeddings
    assert rows == 4
    images = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"null_class=7 is not a row of the model's class embedding.*{rows} rows"):
        DDPMTrainer(dit, make_scheduler(T), images, labels=labels_of(16), conditional=True, class_dropout=P,
                    null_class=7, progress=False)


# ------------------------------------------------------------------------------------------
# guided sampling under other processes and samplers, against hand-written loops
# ------------------------------------------------------------------------------------------
def test_edm_guidance_on_the_raw_output_is_guidance_on_the_denoised_output():  # coverage
    # EDM's sampler steps with D = c_skip z + c_out F: guiding F (the code) equals guiding D (a hand loop) since
    # c_skip z is shared by both rows.
    scheduler = make_edm_scheduler(T)
    run = conditional_trainer(scheduler, RealTimeConditionalMLP())
    run.train(3)
    labels, scale, steps = torch.tensor([0, 1, 2, 0]), 2.5, 12
    samples, kept = run.sample(4, labels=labels, guidance_scale=scale, num_inference_steps=steps)
    model = run.model
    model.record = False
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=generator, dtype=torch.float64) * sampler.init_noise_sigma
    model.eval()
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            sigma = sampler.sigmas[i]
            state, timestep = sampler.scale_model_input(x, t), t.repeat(4)  # c_in z
            f_cond, f_null = model(state, timestep, labels), model(state, timestep, torch.full_like(labels, NULL))
            guided = f_null + scale * (f_cond - f_null)
            d_cond, d_null = (sampler.precondition_outputs(x, f, sigma) for f in (f_cond, f_null))
            torch.testing.assert_close(sampler.precondition_outputs(x, guided, sigma), d_null + scale * (d_cond - d_null),
                                       rtol=0, atol=1e-12 * float(x.abs().max()))
            x = sampler.step(guided, t, x).prev_sample
    model.train()
    torch.testing.assert_close(samples, x, rtol=0, atol=1e-12)


def test_flow_matching_guidance_steps_with_the_guided_velocity():  # coverage
    scheduler = make_flow_scheduler(T)
    run = conditional_trainer(scheduler, RealTimeConditionalMLP())
    run.train(3)
    labels, scale, steps = torch.tensor([2, 1, 0]), 4.0, 10
    samples, _ = run.sample(3, labels=labels, guidance_scale=scale, num_inference_steps=steps)
    model = run.model
    model.record = False
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(steps)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            timestep = t.repeat(3)
            v_cond, v_null = model(x, timestep, labels), model(x, timestep, torch.full_like(labels, NULL))
            x = sampler.step(v_null + scale * (v_cond - v_null), t, x).prev_sample  # (float32 inside, as diffusers')
    model.train()
    torch.testing.assert_close(samples, x, rtol=0, atol=1e-12)


def test_ddim_guidance_keeps_the_states_of_the_hand_written_chain():  # coverage
    from diffusers import DDIMScheduler

    run = conditional_trainer()
    run.train(3)
    labels, scale = torch.tensor([0, 2, 1]), 3.0
    samples, kept = run.sample(3, labels=labels, guidance_scale=scale, sampler=DDIMScheduler, num_inference_steps=10,
                               keep=[45, 25])
    model = run.model
    model.record = False
    sampler = make_sampler(run.scheduler, DDIMScheduler)
    sampler.set_timesteps(10)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = {}
    model.eval()
    with torch.no_grad():
        for t in sampler.timesteps:
            states[int(t)] = x.clone()
            timestep = t.repeat(3)
            cond, null = model(x, timestep, labels), model(x, timestep, torch.full_like(labels, NULL))
            x = sampler.step(null + scale * (cond - null), t, x).prev_sample
    model.train()
    torch.testing.assert_close(samples, x, rtol=0, atol=1e-12)
    assert sorted(kept) == [25, 45]  # DDIM's leading steps 45, 40, ..., 0
    for t, state in kept.items():
        torch.testing.assert_close(state, states[t], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def test_an_old_checkpoint_resumes_without_dropout_and_is_refused_with_it(tmp_path):  # coverage
    # a checkpoint written before class_dropout existed: its config has no "class_dropout" key
    kwargs = dict(class_dropout=0.0, null_class=None)
    straight = conditional_trainer(**kwargs)
    straight.train(4)
    writer = conditional_trainer(**kwargs)
    writer.train(2)
    state = writer.state_dict()
    del state["config"]["class_dropout"]
    torch.save(state, tmp_path / "old.pt")
    resumed = conditional_trainer(**kwargs)
    elsewhere()
    assert resumed.resume(tmp_path / "old.pt")
    resumed.train(2)
    same(straight.state_dict()["model"], resumed.state_dict()["model"], "model")
    assert straight.losses == resumed.losses
    with pytest.raises(ValueError, match="class_dropout"):
        conditional_trainer().resume(tmp_path / "old.pt")


class LabelledDicts(Dataset):
    """Dict examples with the labels under "class_labels" (a datasets-style batch)."""

    def __init__(self, n):
        self.x, self.y = ring(n), labels_of(n)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input": self.x[i], "class_labels": self.y[i]}


def test_a_dataloader_run_with_dropout_min_snr_and_ema_resumes_mid_epoch_bit_for_bit(tmp_path):  # coverage
    from diffusers.training_utils import EMAModel

    def run(callbacks=(), **kwargs):
        model = ConditionalMLP(num_classes=4)
        loader = DataLoader(LabelledDicts(40), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
        return DDPMTrainer(model, make_scheduler(T), loader, conditional=True, class_dropout=P, null_class=NULL, lr=1e-2,
                           loss_weighting="min_snr", ema=EMAModel(model.parameters(), decay=0.9), progress=False,
                           callbacks=list(callbacks), **kwargs)

    recorder = LabelsSeen()
    straight = run([recorder])
    straight.train(7)  # 5 batches an epoch: the checkpoint at step 3 is mid-epoch
    run(checkpoint_dir=tmp_path, checkpoint_every=3).train(3)
    resumed = run()
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(4)
    assert params_equal(straight.model, resumed.model) and straight.losses == resumed.losses
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params))
    assert torch.equal(torch.stack(straight.model.seen[3:]), torch.stack(resumed.model.seen))
    assert sum(int((labels == NULL).sum()) for labels in recorder.labels) > 0
