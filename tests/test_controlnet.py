"""ControlNet training (diffusers' ``train_controlnet.py``) in the built-in trainer: ``ControlNetDenoiser(unet,
controlnet)`` is the script's training forward as one module, called ``model(z, t, e, control_image)``, with the
UNet frozen and the ControlNet (``ControlNetModel.from_unet``) trained. The trainer takes the control images as
the second part of its embeddings; a prompt dropped for guidance keeps its image's control (``null_embedding=(e0,
None)``). The wrapper equals the script's two calls exactly; two steps equal the script's loop written by hand;
the UNet does not move; an analyzer's ledgers over the ControlNet's parameters add up and training is bit for bit
without it."""

from __future__ import annotations

import copy

import pytest
import torch

from genkernel import TrainerCallback
from genkernel.diffusion import ControlNetDenoiser, DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from test_trainer_vae import assert_booked_as_trained_bare

F64 = torch.float64
T, N, L, D = 50, 12, 3, 6

pytestmark = pytest.mark.usefixtures("one_thread")


def cross_attention_unet(dtype=F64, dropout=0.0):
    """A cross-attention UNet2DConditionModel on 2×4×4 latents and D-wide text."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=4, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=D,
                                attention_head_dim=2, norm_num_groups=4, dropout=dropout).to(dtype)


def models():
    """A frozen cross-attention UNet on 2×4×4 latents and a ControlNet from it taking 3×8×8 control images."""
    unet = cross_attention_unet().requires_grad_(False)
    return unet, controlnet_from(unet)


def controlnet_from(unet):
    """``ControlNetModel.from_unet(unet)`` on 3×8×8 control images (float64, trainable), its zero convolutions given
    weights so that the residuals steer the UNet from the first step."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).double()
    controlnet.requires_grad_(True)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64))
    return controlnet


def data(dtype=F64):
    """``(latents [N, 2, 4, 4], prompts [N, L, D], control images [N, 3, 8, 8])``."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(N, 2, 4, 4, generator=g, dtype=dtype)
    prompts = torch.randn(N, L, D, generator=g, dtype=dtype)
    controls = torch.rand(N, 3, 8, 8, generator=g, dtype=dtype)
    return latents, prompts, controls


NULL = (torch.zeros(L, D, dtype=F64), None)


class Seen(TrainerCallback):
    """Each step's inputs, targets, noise and dropped rows, as the step trains on them."""

    def __init__(self):
        self.inputs, self.targets, self.noise, self.dropped = [], [], [], []

    def on_step_end(self, trainer, step):
        self.inputs.append(tuple(t.clone() for t in step.inputs))
        self.targets.append(step.targets.clone())
        self.noise.append(step.info["noise"].clone())
        self.dropped.append(step.info.get("dropped"))


def trainer(*callbacks, pair=None, **kwargs):
    unet, controlnet = models() if pair is None else pair
    latents, prompts, controls = data()
    kwargs.setdefault("optimizer", torch.optim.AdamW(controlnet.parameters(), lr=1e-3))
    return DDPMTrainer(ControlNetDenoiser(unet, controlnet), make_scheduler(T), latents, conditional="embeddings",
                       embeddings=(prompts, controls), batch_size=4, progress=False, callbacks=list(callbacks),
                       **kwargs)


def test_the_wrapper_is_the_scripts_two_calls():
    unet, controlnet = models()
    latents, prompts, controls = data()
    t = torch.arange(N) * 4
    down, mid = controlnet(latents, t, encoder_hidden_states=prompts, controlnet_cond=controls, return_dict=False)
    expected = unet(latents, t, encoder_hidden_states=prompts, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]
    got = ControlNetDenoiser(unet, controlnet)(latents, t, prompts, controls)
    assert torch.equal(got, expected)
    assert not torch.equal(got, unet(latents, t, prompts).sample)  # (the control steers the UNet)
    with pytest.raises(ValueError, match="conditioning_scale"):
        ControlNetDenoiser(unet, controlnet, conditioning_scale=float("nan"))


def train_as_the_script(unet, controlnet, seen):
    """``controlnet`` after train_controlnet.py's loop (``controlnet.train()``, AdamW at 1e-3, the residuals then
    the UNet under them, the MSE to the target) over the steps ``seen`` recorded (their inputs and targets)."""
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    for (z, t, e, c), target in zip(seen.inputs, seen.targets):
        down, mid = controlnet(z, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
        prediction = unet(z, t, encoder_hidden_states=e, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(prediction, target).backward()
        optimizer.step()
    return controlnet


def test_two_steps_equal_the_scripts_loop_and_the_unet_does_not_move():
    """AdamW over the ControlNet, the UNet frozen: the weights after two steps equal the loop of train_controlnet.py
    (controlnet residuals, the UNet under them, the MSE to ε) on the trainer's draws, to float64 rounding."""
    seen = Seen()
    run = trainer(seen)
    frozen = copy.deepcopy(run.model.unet.state_dict())
    run.train(2)
    controlnet = train_as_the_script(*models(), seen)
    for p, q in zip(run.model.controlnet.parameters(), controlnet.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert all(torch.equal(v, frozen[k]) for k, v in run.model.unet.state_dict().items())
    _, _, controls = data()
    for _, _, _, c in seen.inputs:  # every row's control image is one of the data's
        assert all(any(torch.equal(row, image) for image in controls) for row in c)


def test_a_dropped_prompt_keeps_its_images_control():
    seen = Seen()
    trainer(seen, class_dropout=0.5, null_embedding=NULL).train(3)
    _, prompts, controls = data()
    dropped = torch.cat(seen.dropped)
    assert 0 < int(dropped.sum()) < dropped.numel()
    for (_, _, e, c), rows_dropped in zip(seen.inputs, seen.dropped):
        for i in range(c.shape[0]):
            row = next(j for j in range(N) if torch.equal(controls[j], c[i]))
            expected = NULL[0] if rows_dropped[i] else prompts[row]
            assert torch.equal(e[i], expected)


@pytest.mark.parametrize("group_state", ["dense", "factored"])
def test_the_analyzer_books_the_controlnets_steps_and_training_is_bit_for_bit_without_it(group_state):
    """(factored, plain SGD: coverage of the factored engine on the ControlNet's layers, its zero convolutions and
    conditioning embedding among them)"""
    latents, prompts, controls = data()
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), latents[:4], num_bins=2, num_probes=4, controls=1,
                                  kernel_points=2, probe_conditioning=(prompts[:4], controls[:4]), progress=False,
                                  group_state=group_state)
    sgd = (lambda pair: torch.optim.SGD(pair[1].parameters(), lr=1e-2)) if group_state == "factored" else None
    pairs = [models(), models()]
    run = trainer(analyzer, pair=pairs[0], **({} if sgd is None else {"optimizer": sgd(pairs[0])}))
    bare = trainer(pair=pairs[1], **({} if sgd is None else {"optimizer": sgd(pairs[1])}))
    assert_booked_as_trained_bare(run, bare, analyzer, 3)
    tracked = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert tracked and all(name.startswith("controlnet.") for name in tracked)


def sdxl_models():
    """SDXL's UNet (pooled embedding and time_ids through added_cond_kwargs), frozen, and a ControlNet from it."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=5 + 6 * 4,
    ).double().requires_grad_(False)
    return unet, controlnet_from(unet)


def sdxl_conditioning():
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(N, 5, generator=g, dtype=F64)
    time_ids = torch.tensor([8.0, 8.0, 0.0, 0.0, 8.0, 8.0], dtype=F64).repeat(N, 1)
    time_ids[:, 2] = torch.arange(N, dtype=F64)
    return pooled, time_ids


def test_sdxl_controlnet_passes_added_cond_kwargs_to_both_and_is_booked_bit_for_bit():
    """train_controlnet_sdxl.py's forward: the pooled embedding and time_ids in added_cond_kwargs of the ControlNet
    and of the UNet alike (the wrapper equals the two calls exactly); through the trainer with embeddings
    (e, control, pooled, time_ids) and a null that empties the prompt and keeps the control and the sizes, the
    analyzer's ledgers add up and training is bit for bit the same without it."""
    unet, controlnet = sdxl_models()
    latents, prompts, controls = data()
    pooled, time_ids = sdxl_conditioning()
    added = {"text_embeds": pooled, "time_ids": time_ids}
    t = torch.arange(N) * 4
    down, mid = controlnet(latents, t, encoder_hidden_states=prompts, controlnet_cond=controls,
                           added_cond_kwargs=added, return_dict=False)
    expected = unet(latents, t, encoder_hidden_states=prompts, added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    keys = ("text_embeds", "time_ids")
    assert torch.equal(ControlNetDenoiser(unet, controlnet, added_cond_keys=keys)(latents, t, prompts, controls,
                                                                                   pooled, time_ids), expected)
    with pytest.raises(TypeError, match="added_cond_keys names 2"):
        ControlNetDenoiser(unet, controlnet, added_cond_keys=keys)(latents, t, prompts, controls, pooled)

    def sdxl_trainer(*callbacks):
        unet, controlnet = sdxl_models()
        return DDPMTrainer(ControlNetDenoiser(unet, controlnet, added_cond_keys=keys), make_scheduler(T), latents,
                           conditional="embeddings", embeddings=(prompts, controls, pooled, time_ids),
                           class_dropout=0.5, null_embedding=(NULL[0], None, torch.zeros(5, dtype=F64), None),
                           optimizer=torch.optim.AdamW(controlnet.parameters(), lr=1e-3), batch_size=4,
                           progress=False, callbacks=list(callbacks))

    analyzer = NoiseLevelAnalyzer(make_scheduler(T), latents[:4], num_bins=2, num_probes=4, controls=1,
                                  kernel_points=2, probe_conditioning=(prompts[:4], controls[:4], pooled[:4],
                                                                       time_ids[:4]), progress=False)
    assert_booked_as_trained_bare(sdxl_trainer(analyzer), sdxl_trainer(), analyzer, 2)


def test_a_checkpoint_of_another_conditioning_scale_or_input_names_is_refused(tmp_path):
    """The wrapper's settings are not in its state dict: a resume with another conditioning_scale trained another
    function on the saved weights, one with PositionalInputs' names in another order routed every input elsewhere."""
    from genkernel.diffusion import PositionalInputs

    trainer(checkpoint_dir=tmp_path / "scale", checkpoint_every=1).train(1)
    unet, controlnet = models()
    other = DDPMTrainer(ControlNetDenoiser(unet, controlnet, conditioning_scale=0.5), make_scheduler(T), data()[0],
                        conditional="embeddings", embeddings=data()[1:], batch_size=4, progress=False,
                        optimizer=torch.optim.AdamW(controlnet.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="model_settings"):
        other.resume(tmp_path / "scale" / "checkpoint.pt")
    assert trainer().resume(tmp_path / "scale" / "checkpoint.pt")  # (the same settings: resumed)

    def positional(names, **kwargs):
        latents, prompts, _ = data()
        return DDPMTrainer(PositionalInputs(cross_attention_unet(), names), make_scheduler(T), latents,
                           conditional="embeddings", embeddings=prompts, batch_size=4, progress=False, **kwargs)

    names = ("sample", "timestep", "encoder_hidden_states")
    positional(names, checkpoint_dir=tmp_path / "names", checkpoint_every=1).train(1)
    with pytest.raises(ValueError, match="model_settings"):
        positional(("sample", "timestep", "added_cond_kwargs.text_embeds")).resume(tmp_path / "names" / "checkpoint.pt")
