"""Sampling and batch-drawing review of genkernel.diffusion.trainer.

reverse_sample against diffusers' own DDPMPipeline / DDIMPipeline (the same UNet2DModel, generator and
initial noise; clipping and thresholding from the scheduler's config) and a hand-written scheduler loop
(kept states at the right timesteps); Tensor data without shuffling goes through every row; bad sampling
arguments are refused with the fix; seeds past 32 bits are seeds of their own; the model's modules keep
their own train/eval modes.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, make_scheduler, reverse_sample, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=8, depth=1, time_dim=4).double()


class Indices(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer, step):
        self.rows.append(step.info["indices"].tolist())


# ------------------------------------------------------------------------------------------
# reverse_sample against diffusers' pipelines and a hand-written loop
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{}, {"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5}])
def test_reverse_sample_is_diffusers_ddpm_and_ddim_pipelines_on_the_same_noise(config):
    import diffusers.pipelines.ddim.pipeline_ddim as ddim_module
    import diffusers.pipelines.ddpm.pipeline_ddpm as ddpm_module
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    torch.manual_seed(0)
    unet = tiny_unet(8, 1, channels=(8, 16), attention=False)
    scheduler = make_scheduler(50, **config)
    shape, seed, steps = (3, 1, 8, 8), 5, 10
    for pipeline, module, sampler in ((DDPMPipeline, ddpm_module, None), (DDIMPipeline, ddim_module, DDIMScheduler)):
        ours, _ = reverse_sample(unet, scheduler, shape, num_inference_steps=steps, seed=seed, sampler=sampler,
                                 step_kwargs=None if sampler is None else {"eta": 0.5})
        # the pipeline on the same generator: its initial draw replaced by reverse_sample's (float64, cast to the
        # model's dtype), every later draw (the steps' noise) its own, from that generator
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=generator, dtype=F64).float()
        pipe = pipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {} if sampler is None else {"eta": 0.5}
        with mock.patch.object(module, "randn_tensor", lambda *args, **kw: noise.clone()):
            images = pipe(batch_size=3, generator=generator, num_inference_steps=steps, output_type="pt", **kwargs).images
        assert torch.equal(images, (ours / 2 + 0.5).clamp(0, 1)), pipeline.__name__
        if config:  # the config's clipping / thresholding reached the sampler: x_0 stays in range
            assert ours.abs().max() <= config.get("sample_max_value", 1.0) + 1e-6


def test_kept_states_are_a_hand_written_ddpm_loop_at_the_requested_timesteps():
    from diffusers import DDPMScheduler

    model = small_mlp()
    scheduler = make_scheduler(100)
    samples, kept = reverse_sample(model, scheduler, (4, 2), num_inference_steps=10, seed=3, keep=[95, 50, 0, 3])
    # leading spacing: 90, 80, ..., 0; 95 and 3 snap to 90 and 0 (50 is a step)
    assert sorted(kept) == [0, 50, 90]
    loop = DDPMScheduler.from_config(scheduler.config)
    loop.set_timesteps(10)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((4, 2), generator=generator, dtype=F64)
    states = {}
    with torch.no_grad():
        for t in loop.timesteps:
            states[int(t)] = x.clone()
            x = loop.step(model(x, t.repeat(4)), t, x, generator=generator).prev_sample
    assert torch.equal(samples, x)
    for t, state in kept.items():
        assert torch.equal(state, states[t]), t
    # a Tensor or array of timesteps keeps the same states (`keep or ()` raised "Boolean value of Tensor ... is
    # ambiguous" for one)
    for timesteps in (torch.tensor([95, 50, 0, 3]), torch.tensor([95, 50, 0, 3]).numpy()):
        again, kept_again = reverse_sample(model, scheduler, (4, 2), num_inference_steps=10, seed=3, keep=timesteps)
        assert torch.equal(again, samples) and sorted(kept_again) == [0, 50, 90]
        assert all(torch.equal(kept_again[t], kept[t]) for t in kept)


# ------------------------------------------------------------------------------------------
# Tensor data in its own order
# ------------------------------------------------------------------------------------------
def test_unshuffled_tensor_data_goes_round_every_row_and_resumes_bit_identically(tmp_path):
    # N = 10, B = 4: the old trainer restarted at row 0 whenever 4 rows no longer fitted, so rows 8 and 9 were
    # never trained on
    data = torch.randn(10, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    scheduler = make_scheduler(50)
    rows = Indices()
    straight = DDPMTrainer(small_mlp(), scheduler, data, shuffle=False, batch_size=4, lr=1e-2, progress=False,
                           callbacks=[rows])
    straight.train(6)
    expected = [[(4 * step + i) % 10 for i in range(4)] for step in range(6)]  # by hand: cyclic
    assert rows.rows == expected
    seen = torch.bincount(torch.tensor(rows.rows[:5]).flatten(), minlength=10)
    assert seen.tolist() == [2] * 10  # 5 batches of 4 = every row twice
    # a checkpoint across the wrap-around resumes to the same run
    first = DDPMTrainer(small_mlp(), scheduler, data, shuffle=False, batch_size=4, lr=1e-2, progress=False)
    first.train(3)
    path = first.save_checkpoint(tmp_path / "c.pt")
    rows_resumed = Indices()
    resumed = DDPMTrainer(small_mlp(), scheduler, data, shuffle=False, batch_size=4, lr=1e-2, progress=False,
                          callbacks=[rows_resumed])
    assert resumed.resume(path)
    resumed.train(3)
    assert rows_resumed.rows == expected[3:]
    assert resumed.losses == straight.losses
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), straight.model.parameters()))


def test_data_that_fills_whole_batches_draws_as_before():
    # N = 8, B = 4 unshuffled: 0..3, 4..7, 0..3, ... as the old trainer drew them
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    rows = Indices()
    DDPMTrainer(small_mlp(), make_scheduler(50), data, shuffle=False, batch_size=4, progress=False,
                callbacks=[rows]).train(5)
    assert rows.rows == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2 + [[0, 1, 2, 3]]


# ------------------------------------------------------------------------------------------
# bad arguments and seeds
# ------------------------------------------------------------------------------------------
def test_bad_sampling_arguments_are_refused_with_the_fix():
    model, scheduler = small_mlp(), make_scheduler(100)

    def run(**kwargs):
        kwargs = {"shape": (3, 2), "num_inference_steps": 5, **kwargs}
        return reverse_sample(model, scheduler, kwargs.pop("shape"), **kwargs)

    # 0 ran all 100 steps; a negative count ran none and returned the initial noise as samples
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps .* must be a positive int"):
            run(num_inference_steps=steps)
    with pytest.raises(TypeError, match=r"keep must be a sequence of timesteps, e.g. keep=\[5\]"):
        run(keep=5)
    with pytest.raises(TypeError, match="keep must hold timesteps"):
        run(keep=["a"])
    # outside the training timesteps: snapped silently to the first or last step before
    for t in (100, -1):
        with pytest.raises(ValueError, match=r"outside the training timesteps 0\.\.99"):
            run(keep=[t])
    # flow matching (t = σ·T in [0, T]) and EDM (¼ ln σ up to ¼ ln(10 σ_max)): NaN, 2000 snapped to the first step
    from genkernel.diffusion import make_edm_scheduler, make_flow_scheduler

    torch.manual_seed(0)
    continuous = MLPDenoiser(hidden=8, depth=1, time_dim=4, time_input="continuous").double()
    for other, bad in ((make_flow_scheduler(100), (2000.0, -5.0, float("nan"))),
                       (make_edm_scheduler(100), (50.0, float("nan")))):
        for t in bad:
            with pytest.raises(ValueError, match="keep of a"):
                reverse_sample(continuous, other, (3, 2), num_inference_steps=5, keep=[t])
    # a generator of one's own was replaced by the seed's silently; return_dict=False failed on .prev_sample
    from diffusers import DDIMScheduler

    for kwargs in ({"eta": 1.0, "generator": torch.Generator().manual_seed(9)}, {"return_dict": False}):
        with pytest.raises(ValueError, match="set by reverse_sample"):
            run(sampler=DDIMScheduler, step_kwargs=kwargs)
    with pytest.raises(TypeError, match="step_kwargs must be a dict"):
        run(step_kwargs=[("eta", 1.0)])
    for seed in (1.5, None, True):
        with pytest.raises(TypeError, match="seed must be an int"):
            run(seed=seed)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        run(seed=-1)
    with pytest.raises(ValueError, match="shape must be"):
        run(shape=(3,))
    with pytest.raises(ValueError, match="shape must be a positive int|every entry of shape"):
        run(shape=(0, 2))
    trainer = DDPMTrainer(model, scheduler, torch.randn(8, 2, dtype=F64), progress=False)
    for n in (0, 2.0):
        with pytest.raises(ValueError, match="num_samples must be a positive int"):
            trainer.sample(n, num_inference_steps=5)
    with pytest.raises(TypeError, match="seed must be an int"):
        DDPMTrainer(model, scheduler, torch.randn(8, 2, dtype=F64), progress=False, seed=0.5)


def test_seeds_past_32_bits_are_seeds_of_their_own():
    # torch's CPU generator reads the low 32 bits of its seed: seed 2**32 sampled and trained as seed 0
    model, scheduler = small_mlp(), make_scheduler(50)
    a, _ = reverse_sample(model, scheduler, (3, 2), num_inference_steps=5, seed=0)
    b, _ = reverse_sample(model, scheduler, (3, 2), num_inference_steps=5, seed=2**32)
    assert not torch.equal(a, b)
    # seeds below 2**32 draw what torch.manual_seed(seed) draws, as before
    generator = torch.Generator().manual_seed(2**32 - 1)
    again, kept = reverse_sample(model, scheduler, (3, 2), num_inference_steps=5, seed=2**32 - 1, keep=[40])
    assert torch.equal(kept[40], torch.randn((3, 2), generator=generator, dtype=F64))
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    draws = [DDPMTrainer(small_mlp(), scheduler, data, progress=False, seed=s).next_batch()["noise"] for s in (0, 2**32)]
    assert not torch.equal(*draws)


# ------------------------------------------------------------------------------------------
# modes and the global RNG
# ------------------------------------------------------------------------------------------
class FrozenDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_mlp()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        return self.net(self.drop(x), t)


def test_sampling_leaves_every_module_in_its_own_mode_and_the_global_rng_alone():
    model = FrozenDropout()
    model.drop.eval()  # switched off by its owner
    state = torch.get_rng_state()
    first, _ = reverse_sample(model, make_scheduler(50), (3, 2), num_inference_steps=5, seed=2)
    assert model.training and not model.drop.training  # model.train(True) switched the dropout back on
    assert torch.equal(torch.get_rng_state(), state)
    again, _ = reverse_sample(model, make_scheduler(50), (3, 2), num_inference_steps=5, seed=2)
    assert torch.equal(first, again)
