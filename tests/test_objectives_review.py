"""Review of the training objective (genkernel.diffusion.objectives) against float64 formulas and diffusers."""

from __future__ import annotations

import pytest
import torch

from genkernel.diffusion.objectives import (
    make_edm_scheduler,
    make_flow_scheduler,
    make_scheduler,
    noisy_input,
    training_target,
)

F64 = torch.float64


def _pair(n=6, d=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64).to(dtype), torch.randn(n, d, generator=g, dtype=F64).to(dtype)


def _vp_reference(scheduler, clean, noise, t):
    """float64 z and v of the DDPM formulas from the scheduler's own alphas_cumprod."""
    a = scheduler.alphas_cumprod.to(F64)[t][:, None]
    x, e = clean.to(F64), noise.to(F64)
    return a.sqrt() * x + (1 - a).sqrt() * e, a.sqrt() * e - (1 - a).sqrt() * x


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "HeunDiscreteScheduler"])
def test_a_scheduler_with_alphas_cumprod_trains_the_ddpm_noise_and_velocity_it_is_binned_by(name):
    """The analyzer accepts every scheduler with alphas_cumprod (SD/SDXL pipelines ship Euler/DPM-Solver ones) and
    bins/weights by ᾱ_t; the noise and target must then be sqrt(ᾱ) x + sqrt(1 − ᾱ) ε and sqrt(ᾱ) ε − sqrt(1 − ᾱ) x,
    as diffusers' training scripts build them (DDPMScheduler.from_pretrained of that config). Old code called the
    scheduler's own add_noise: Euler's x + σ ε (max error 227 at t = 999) and, for v, a missing get_velocity."""
    import diffusers

    clean, noise = _pair()
    t = torch.tensor([0, 10, 250, 500, 998, 999])
    for kind in ("epsilon", "v_prediction"):
        scheduler = getattr(diffusers, name)(num_train_timesteps=1000, prediction_type=kind)
        z_ref, v_ref = _vp_reference(scheduler, clean, noise, t)
        z = noisy_input(scheduler, clean, noise, t)
        assert torch.allclose(z.to(F64), z_ref, rtol=0, atol=1e-6)
        # what diffusers' training scripts build from this config (DDPMScheduler.from_pretrained(subfolder="scheduler"))
        trained = diffusers.DDPMScheduler(**{k: scheduler.config[k] for k in (
            "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")})
        assert torch.equal(trained.alphas_cumprod, scheduler.alphas_cumprod)
        assert torch.equal(z, trained.add_noise(clean, noise, t))
        if kind == "v_prediction":
            v = training_target(scheduler, clean, noise, t)
            assert torch.allclose(v.to(F64), v_ref, rtol=0, atol=1e-6)
            assert torch.equal(v, trained.get_velocity(clean, noise, t))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_the_noise_of_the_first_timesteps(dtype):
    """diffusers' add_noise/get_velocity cast ᾱ_t to the samples' dtype before 1 − ᾱ_t: in float16 ᾱ_0 = 0.9999
    rounds to 1, so t = 0, 1 got no noise at all (z = x, v = ε), in bfloat16 t = 0..9 of the linear schedule. The
    coefficients must be the float64 ones rounded once to the dtype (relative error <= one ulp)."""
    for kind in ("epsilon", "v_prediction"):
        scheduler = make_scheduler(1000, "linear", kind)
        t = torch.arange(0, 40)
        ones, zeros = torch.ones(40, 2, dtype=dtype), torch.zeros(40, 2, dtype=dtype)
        a = scheduler.alphas_cumprod.to(F64)[t][:, None]
        eps = torch.finfo(dtype).eps
        # x = 0, ε = 1: z is the noise coefficient sqrt(1 − ᾱ_t) (0.0100 at t = 0)
        z = noisy_input(scheduler, zeros, ones, t).to(F64)
        assert torch.allclose(z, (1 - a).sqrt().expand(-1, 2), rtol=eps, atol=0)
        z = noisy_input(scheduler, ones, zeros, t).to(F64)
        assert torch.allclose(z, a.sqrt().expand(-1, 2), rtol=eps, atol=0)
        if kind == "v_prediction":
            v = training_target(scheduler, ones, zeros, t).to(F64)  # −sqrt(1 − ᾱ_t)
            assert torch.allclose(v, -(1 - a).sqrt().expand(-1, 2), rtol=eps, atol=0)


def test_float32_and_float64_noise_and_velocity_are_diffusers_own_numbers():
    """coverage: float32 and float64 samples get DDPMScheduler.add_noise's and get_velocity's numbers bit for bit
    (the recorded runs are unchanged), for every integer timestep dtype."""
    for (schedule, dtype) in [(a, b) for a in ("linear", "squaredcos_cap_v2") for b in (torch.float32, F64)]:
        clean, noise = _pair(n=8, dtype=dtype)
        scheduler = make_scheduler(1000, schedule, "v_prediction")
        t = torch.tensor([0, 1, 2, 100, 499, 500, 998, 999])
        want_z = scheduler.add_noise(clean, noise, t)
        want_v = scheduler.get_velocity(clean, noise, t)
        for integer in (torch.long, torch.int32, torch.int16):
            z = noisy_input(scheduler, clean, noise, t.to(integer))
            v = training_target(scheduler, clean, noise, t.to(integer))
            assert z.dtype == v.dtype == dtype
            assert torch.equal(z, want_z) and torch.equal(v, want_v)
        ts = torch.tensor([0, 1, 2, 100, 200, 250, 254, 255])  # uint8 is a bool-mask index in diffusers, not here
        assert torch.equal(noisy_input(scheduler, clean, noise, ts.to(torch.uint8)),
                           noisy_input(scheduler, clean, noise, ts))


@pytest.mark.parametrize("make", [lambda: make_scheduler(100), lambda: make_flow_scheduler(100),
                                  lambda: make_edm_scheduler(100)])
def test_integer_images_are_refused_instead_of_noised_with_integer_coefficients(make):
    """uint8 images not yet converted to float: old code cast the coefficients to uint8/long (sqrt(ᾱ_t) -> 0),
    returning e.g. z = 0 or z = x with no error."""
    scheduler = make()
    t = torch.tensor([1, 2]) if scheduler.__class__.__name__ == "DDPMScheduler" else scheduler.timesteps[:2].clone()
    images = torch.randint(0, 256, (2, 3), dtype=torch.uint8)
    with pytest.raises(TypeError, match="floating-point"):
        noisy_input(scheduler, images, torch.randn(2, 3), t)
    with pytest.raises(TypeError, match="floating-point"):
        training_target(scheduler, images.float(), torch.randint(0, 2, (2, 3)), t)


def test_binned_denoiser_refuses_real_edges_that_it_would_truncate():
    """Old code cast edges to long: [0., 2.5, 5.] became [0, 2, 5] and t = 2 (below the edge 2.5) went to expert 1."""
    from genkernel.diffusion.models import BinnedDenoiser

    with pytest.raises(TypeError, match="integer timesteps"):
        BinnedDenoiser(2, 5, edges=torch.tensor([0.0, 2.5, 5.0]), hidden=4, depth=1, time_dim=2)
    # integral float edges are the same edges as integers: every timestep is served by the same expert
    torch.manual_seed(0)
    a = BinnedDenoiser(2, 5, edges=torch.tensor([0.0, 3.0, 5.0]), hidden=4, depth=1, time_dim=2)
    torch.manual_seed(0)
    b = BinnedDenoiser(2, 5, edges=torch.tensor([0, 3, 5]), hidden=4, depth=1, time_dim=2)
    x, t = torch.randn(5, 2), torch.arange(5)
    assert torch.equal(a(x, t), b(x, t))
    assert torch.equal(a.edges, torch.tensor([0, 3, 5]))


@pytest.mark.parametrize("num_bins", [True, 2.0, 0])
def test_binned_denoiser_refuses_a_bin_count_that_is_not_a_positive_int(num_bins):
    """Old code took num_bins=True as one bin (a model with no level split, built without a word) and failed
    inside range() on 2.0; num_train_timesteps likewise."""
    from genkernel.diffusion.models import BinnedDenoiser

    with pytest.raises(ValueError, match="num_bins must be a positive int"):
        BinnedDenoiser(num_bins, 10, hidden=4, depth=1, time_dim=2)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int"):
        BinnedDenoiser(2, 10.0, hidden=4, depth=1, time_dim=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_losses_are_the_float32_loss_of_the_outputs(dtype):
    """The per-example loss of float16/bfloat16 outputs is computed and returned in float32, as diffusers' scripts
    compute it (F.mse_loss(pred.float(), target.float())): the float64 loss of the same rounded outputs to float32
    rounding. Old code squared and averaged in float16: errors of 1e-3 have subnormal squares and a loss of 9e-6 is
    itself subnormal, 1.5% to 2.6% off; w = 2 (f − y) / D likewise (subnormal in float16 for D = 3072)."""
    from genkernel.diffusion.objectives import diffusion_loss, loss_weight

    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 3 * 32 * 32, generator=g, dtype=F64)
    for scale in (1e-1, 1e-2, 3e-3, 1e-3):
        f = (y + scale * torch.randn(4, 3 * 32 * 32, generator=g, dtype=F64)).to(dtype)
        yy = y.to(dtype)
        exact = ((f.to(F64) - yy.to(F64)) ** 2).mean(dim=1)
        loss = diffusion_loss(f, yy)
        assert torch.allclose(loss.to(F64), exact, rtol=1e-6, atol=0)
        assert loss.dtype == torch.float32
        w = loss_weight(f, yy)
        assert w.dtype == torch.float32
        assert torch.allclose(w.to(F64), 2 * (f.to(F64) - yy.to(F64)) / f.shape[1], rtol=2 ** -23, atol=0)
    # float32 and float64 outputs keep their dtype
    for wide in (torch.float32, F64):
        assert diffusion_loss(y[:, :5].to(wide), y[:, 5:10].to(wide)).dtype == wide


def test_tiny_unet_refuses_a_head_size_that_does_not_divide_the_attention_width():
    """Old code built channels (24, 40) with attention_head_dim=16 silently: 40 // 16 = 2 heads of 16, the attention
    projecting 40 channels to 32 (to_q.weight [32, 40]). A dividing head size gives heads·head_dim = width."""
    from genkernel.diffusion.models import tiny_unet

    with pytest.raises(ValueError, match="attention_head_dim"):
        tiny_unet(channels=(24, 40), attention_head_dim=16, norm_num_groups=4)
    model = tiny_unet(channels=(24, 40), attention_head_dim=8, norm_num_groups=4)
    projections = [m.to_q.weight.shape for m in model.modules() if type(m).__name__ == "Attention"]
    assert projections and all(shape == (40, 40) for shape in projections)
    tiny_unet(channels=(24, 40), attention_head_dim=16, norm_num_groups=4, attention=False)  # no attention, no heads


def _attention_resolutions(model, sample):
    """``{module name: (heads, channels, height, width)}`` of every attention layer in a forward of ``sample``
    (shapes only: the model and sample may live on the meta device)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
        name, (mod.heads, *args[0].shape[1:])))
        for name, m in model.named_modules() if type(m).__name__ == "Attention"]
    with torch.no_grad():
        model(sample, torch.tensor([10], device=sample.device))
    for h in hooks:
        h.remove()
    return seen


def test_the_ddpm_cifar10_unet_attends_at_16x16_in_both_paths_with_one_head_and_resnet_dropout_only():
    """coverage: Ho et al.'s CIFAR-10 model (attn_resolutions=(16,), ch=128, ch_mult=(1, 2, 2, 2), one head,
    dropout 0.1 in the residual blocks only): 2 attention layers at 16×16 going down, 3 coming up, 1 in the middle
    at 4×4, every one a single head over 256 channels."""
    from genkernel.diffusion.configs import ddpm_cifar10_unet

    with torch.device("meta"):  # shapes only: no 35.7M random weights to draw
        model = ddpm_cifar10_unet().eval()
    seen = _attention_resolutions(model, torch.zeros(1, 3, 32, 32, device="meta"))
    spots = sorted((name.split(".")[0], size) for name, size in seen.items())
    assert spots == sorted([("down_blocks", (1, 256, 16, 16))] * 2 + [("up_blocks", (1, 256, 16, 16))] * 3
                           + [("mid_block", (1, 256, 4, 4))])
    drops = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for n, p in drops.items() if "attentions" in n} == {0.0}
    resnet_drops = [p for n, p in drops.items() if "resnets" in n]
    assert len(resnet_drops) == 2 * 4 + 3 * 4 + 2 and set(resnet_drops) == {0.1}


def test_the_mnist_unet_has_its_documented_size_and_attends_at_the_lowest_resolution():
    """coverage: 1,112,801 parameters ("about 1.1M"); attention at 7×7 for 28×28 inputs (down, up ×2, middle)."""
    from genkernel.diffusion.configs import mnist_unet

    model = mnist_unet(seed=0).eval()
    assert sum(p.numel() for p in model.parameters()) == 1_112_801
    seen = _attention_resolutions(model, torch.zeros(1, 1, 28, 28))
    assert sorted(seen.values()) == [(8, 64, 7, 7)] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_flow_matching_inputs_keep_the_signal_of_the_noisiest_levels(dtype):
    """z = (1 − σ) x + σ ε with each coefficient the float64 one rounded once. Old code rounded σ first and took
    1 − σ of that: in bfloat16 σ = 0.999 rounds to 1, so t = 999 lost its signal (z = ε), t = 998 had 5% of it and
    t = 990..997 were 12% to 30% off; float16 2.3%."""
    scheduler = make_flow_scheduler(1000)
    t = torch.arange(980, 1000, dtype=torch.float32)
    sigma = t.to(F64)[:, None] / 1000
    ones, zeros = torch.ones(20, 2, dtype=dtype), torch.zeros(20, 2, dtype=dtype)
    eps = torch.finfo(dtype).eps
    assert torch.allclose(noisy_input(scheduler, ones, zeros, t).to(F64), (1 - sigma).expand(-1, 2), rtol=eps, atol=0)
    assert torch.allclose(noisy_input(scheduler, zeros, ones, t).to(F64), sigma.expand(-1, 2), rtol=eps, atol=0)
    # float32 keeps its numbers: σ rounded to float32, then 1 − σ in float32 (the recorded runs)
    x, e = _pair(n=20)
    s32 = (t.to(F64) / 1000).to(torch.float32)[:, None]
    assert torch.equal(noisy_input(scheduler, x, e, t), (1 - s32) * x + s32 * e)
