"""What must hold on CUDA as on the CPU: exact ledgers, training that the analysis leaves
bit-for-bit unchanged (deterministic algorithms), engines that agree. Skipped without a GPU;
``make gpu-check`` runs them where one is present."""

import os

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_flow_scheduler, make_scheduler, tiny_unet
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def deterministic():
    """Deterministic algorithms and no TF32 (trackers refuse it: tracker._check_precision)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = False, False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = previous[1], previous[2]
    torch.set_float32_matmul_precision(previous[3])


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).to(device=DEVICE, dtype=dtype)


def test_the_ledger_adds_up_on_cuda():
    model = mlp()
    g = torch.Generator().manual_seed(1)
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), mse_loss,
                                torch.randn(8, 3, generator=g, dtype=torch.float64).to(DEVICE), num_groups={"a": 3, "b": 2},
                                quadrature="simpson")
    for _ in range(3):
        x = torch.randn(16, 3, generator=g, dtype=torch.float64).to(DEVICE)
        y = torch.randn(16, 2, generator=g, dtype=torch.float64).to(DEVICE)
        ids = torch.randint(0, 3, (16,), generator=g).to(DEVICE)
        tracker.step(x, y, {"a": ids, "b": ids % 2})
    for ledger in tracker.ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12)
        assert ledger.relative_residual() < 1e-6


def test_engines_agree_on_cuda():
    model = mlp(torch.float64)
    x = torch.randn(12, 3, dtype=torch.float64, device=DEVICE)
    reference = gradient_kernel(model, x, engine="functional")
    torch.testing.assert_close(gradient_kernel(model, x, engine="factored"), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["ddpm", "flow_matching"])
def test_the_analyzer_leaves_unet_training_bit_for_bit_unchanged_on_cuda(objective):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 16, 16, generator=g) * 2 - 1

    def trainer(analyze, device=DEVICE):
        if objective == "flow_matching":
            scheduler = make_flow_scheduler(100, shift=3.0)
        else:
            scheduler = make_scheduler(100, clip_sample=True)
        data = images.to(device)
        torch.manual_seed(0)
        model = tiny_unet(16, 1, channels=(8, 16)).to(device)
        callbacks = []
        if analyze:
            callbacks.append(NoiseLevelAnalyzer(scheduler, data[:8], num_bins=4, num_probes=8, kernel_points=2,
                                                state_dtype=torch.float32, progress=False))
        t = DDPMTrainer(model, scheduler, data, batch_size=8, progress=False, callbacks=callbacks)
        t.train(3)
        return t

    bare, tracked = trainer(False), trainer(True)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    ledger = tracked.callbacks[0].ledger
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                               rtol=0, atol=1e-9 * float(ledger.delta.abs().max()))
    # Three early Adam steps of a float32 UNet leave a quadrature residual of several percent (the
    # midpoint rule on a curved path); the GPU's must be the CPU's, up to float32 rounding.
    on_cpu = trainer(True, "cpu").callbacks[0].ledger
    assert ledger.steps == on_cpu.steps == 3
    assert abs(ledger.relative_residual() - on_cpu.relative_residual()) <= 0.05 * on_cpu.relative_residual()
    samples, _ = tracked.sample(2, num_inference_steps=3)  # DDPM's ancestral steps, or the flow's Euler steps
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all()


def test_tf32_convolutions_are_refused_with_the_switch_to_turn_them_off():
    torch.backends.cudnn.allow_tf32 = True  # torch's default; the fixture restores its own setting
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("this GPU has no TF32")
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()).to(DEVICE)
    with pytest.raises(RuntimeError, match="TF32 is on.*convolutions.*allow_tf32 = False"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss,
                          torch.randn(4, 1, 5, 5, device=DEVICE), num_groups=2)


def test_a_tracker_resumed_from_its_saved_state_goes_on_on_cuda(tmp_path):
    """States load onto the CPU (any machine can read them) and go back beside the parameters."""
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 3, generator=g, dtype=torch.float64).to(DEVICE),
                torch.randn(16, 2, generator=g, dtype=torch.float64).to(DEVICE)) for _ in range(4)]
    probes = torch.randn(8, 3, generator=g, dtype=torch.float64).to(DEVICE)

    def tracker():
        model = mlp()
        return PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), mse_loss, probes, num_groups=3)

    straight = tracker()
    for x, y in batches:
        straight.step(x, y, torch.arange(16, device=DEVICE) % 3)
    first = tracker()
    for x, y in batches[:2]:
        first.step(x, y, torch.arange(16, device=DEVICE) % 3)
    first.save(tmp_path / "tracker.pt")
    resumed = tracker()
    resumed.module.load_state_dict(first.module.state_dict())
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load(tmp_path / "tracker.pt")
    for x, y in batches[2:]:
        resumed.step(x, y, torch.arange(16, device=DEVICE) % 3)
    assert resumed.ledger.contributions.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(resumed.ledger.contributions, straight.ledger.contributions, rtol=0, atol=0)


def test_samples_and_noise_bins_after_training_on_cuda():
    """diffusers' add_noise moves the scheduler's alphas_cumprod to the GPU for good: the bins and
    the sampler's schedule check read it on the CPU."""
    scheduler = make_scheduler(100, clip_sample=True)
    data = (torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DEVICE)
    torch.manual_seed(0)
    trainer = DDPMTrainer(tiny_unet(16, 1, channels=(8, 16)).to(DEVICE), scheduler, data, batch_size=8, progress=False)
    trainer.train(1)
    assert scheduler.alphas_cumprod.device.type == "cuda"
    from diffusers import DDIMScheduler

    samples, _ = trainer.sample(2, num_inference_steps=3, sampler=DDIMScheduler)
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:4], num_bins=3, num_probes=4, progress=False)
    assert analyzer.bins.edges.tolist()[0] == 0 and len(analyzer.bins.edges) == 4


def test_an_ema_kept_on_the_cpu_is_read_beside_the_model():
    """diffusers' offload_ema keeps the averaged weights on the CPU."""
    import copy

    model = mlp()
    ema = copy.deepcopy(model).cpu()
    g = torch.Generator().manual_seed(3)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.05), mse_loss,
                                torch.randn(8, 3, generator=g, dtype=torch.float64).to(DEVICE), num_groups=2)
    tracker.track_ema(ema)
    for _ in range(3):
        x = torch.randn(16, 3, generator=g, dtype=torch.float64).to(DEVICE)
        y = torch.randn(16, 2, generator=g, dtype=torch.float64).to(DEVICE)
        tracker.step(x, y, torch.arange(16, device=DEVICE) % 2)
        with torch.no_grad():
            for averaged, p in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(p.detach().cpu(), 0.1)
    tracker.step(x, y, torch.arange(16, device=DEVICE) % 2)  # syncs the EMA's last move
    assert tracker.ema.ledger.steps == 3 and tracker.ema.ledger.relative_residual() < 1e-5


def test_a_unet_kernel_agrees_between_engines_on_cuda():
    """A diffusers UNet (convolutions, GroupNorm, attention, time embedding) in float64: the factored
    engine against torch.func's vmap + jacrev, whose per-example check runs a batch of one where
    jacrev of one example alone is refused on CUDA (see reference.per_example)."""
    from test_factored import tiny_unet as small_unet

    model = small_unet(torch.float64).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64).to(DEVICE)
    t = torch.tensor([1, 300, 700], device=DEVICE)
    reference = gradient_kernel(model, (x, t), engine="functional")
    factored = gradient_kernel(model, (x, t), engine="factored")
    assert float((factored - reference).abs().max() / reference.abs().max()) < 1e-10


@pytest.mark.parametrize("kind", ["mixed", "convnet"])
def test_the_factored_route_keeps_the_dense_routes_ledger_on_cuda(kind):
    """Plain SGD, one group per example, weight decay, clipping, two learning rates: the factored
    route's ledger (layer factors, no per-group copies) is the dense route's, on CUDA as on the CPU."""
    from test_per_example import batches, build, sgd

    def run(group_state):
        model, probes = build(kind, torch.float64)
        model, probes = model.to(DEVICE), probes.to(DEVICE)
        tracker = PathKernelTracker(model, sgd(model, weight_decay=0.01), mse_loss, probes, num_groups=30,
                                    quadrature="simpson", group_state=group_state, max_grad_norm=0.5)
        for k, (x, y) in enumerate(batches(kind, torch.float64)):
            tracker.step(x.to(DEVICE), y.to(DEVICE), torch.arange(10 * k, 10 * k + 10, device=DEVICE))
        return tracker, model

    (dense, dense_model), (factored, factored_model) = run("dense"), run("factored")
    assert factored.group_state == "factored"
    scale = float(dense.ledger.contributions.abs().max())
    assert float((factored.ledger.contributions - dense.ledger.contributions).abs().max()) < 1e-10 * scale
    assert float((factored.ledger.rest - dense.ledger.rest).abs().max()) < 1e-10 * scale
    assert all(torch.equal(a, b) for a, b in zip(dense_model.parameters(), factored_model.parameters()))


def test_gauss_legendre_ledgers_converge_on_a_unet_step_on_cuda():
    """One large Adam step of a float64 tiny UNet: more Gauss-Legendre nodes leave less residual, as
    on the CPU (docs/ledger.md: the CIFAR UNet at lr 2e-4, 0.28 midpoint to 0.011 gauss6)."""
    images = (torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).double().to(DEVICE)

    def residual(quadrature):
        scheduler = make_scheduler(100, clip_sample=True)
        torch.manual_seed(0)
        model = tiny_unet(16, 1, channels=(8, 16)).double().to(DEVICE)
        analyzer = NoiseLevelAnalyzer(scheduler, images[:4], num_bins=2, num_probes=4, controls=0, kernel_points=2,
                                      quadrature=quadrature, progress=False)
        DDPMTrainer(model, scheduler, images, batch_size=8, lr=3e-3, progress=False, callbacks=[analyzer]).train(1)
        return analyzer.ledger.relative_residual()

    midpoint, gauss4 = residual("midpoint"), residual("gauss4")
    assert gauss4 < 0.1 * midpoint, (midpoint, gauss4)


@pytest.mark.parametrize("rule", ["adam", "adamw_amsgrad", "sgd_nesterov"])
def test_fused_and_capturable_optimizers_are_split_as_the_single_tensor_loop_is_on_cuda(rule):
    # CUDA's own code paths: fused kernels and capturable (graph-safe, step count on the device) Adam
    from test_workflow_optimizers import IMPLEMENTATIONS, ledgers_under

    make = IMPLEMENTATIONS[rule]
    reference, delta = ledgers_under(lambda p: make(p, foreach=False), DEVICE)
    variants = [{"foreach": True}, {"fused": True}] + ([{"capturable": True}] if rule != "sgd_nesterov" else [])
    for implementation in variants:
        contributions, other_delta = ledgers_under(lambda p: make(p, **implementation), DEVICE)
        torch.testing.assert_close(other_delta, delta, rtol=1e-10, atol=0)
        torch.testing.assert_close(contributions, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))


NEW_RULES = {  # Adagrad, Adamax, RAdam, NAdam, Adafactor, Adadelta, ASGD: their single-tensor loop against CUDA's foreach kernels (and Adagrad's fused)
    "adagrad": lambda p, **kw: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01, weight_decay=0.01, **kw),
    "adamax": lambda p, **kw: torch.optim.Adamax(p, lr=0.01, weight_decay=0.01, **kw),
    "radam": lambda p, **kw: torch.optim.RAdam(p, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True, **kw),
    "nadam": lambda p, **kw: torch.optim.NAdam(p, lr=0.01, weight_decay=0.01, **kw),
    "adafactor": lambda p, **kw: torch.optim.Adafactor(p, lr=0.01, weight_decay=0.01, **kw),
    "adadelta": lambda p, **kw: torch.optim.Adadelta(p, lr=0.5, weight_decay=0.01, **kw),
    # ASGD's two paths form η_{k+1} = lr / (1 + λ_d lr k)^α differently (foreach from its float32 step count in float32,
    # single-tensor in float64): with λ_d lr a power of two and α = 1 both round the same exact quotient once, so the
    # two runs' Δθ agree to 1e-10 (with lr=0.05, λ_d=0.01, α=0.75 they differ by 1.7e-7, PyTorch's doing, not the split's).
    "asgd": lambda p, **kw: torch.optim.ASGD(p, lr=2 ** -5, lambd=2.0, alpha=1.0, t0=2.0, weight_decay=0.01, **kw),
}


@pytest.mark.parametrize("rule", sorted(NEW_RULES))
def test_the_newer_optimizers_are_split_on_cuda_as_on_their_plain_loop(rule):
    """docs/optimizers.md: CUDA's foreach kernels (and Adagrad's fused one) split as the single-tensor loop,
    the ledger identity on the way (8 steps: RAdam crosses its rectification switch at step 6)."""
    from test_workflow_optimizers import ledgers_under

    make = NEW_RULES[rule]
    reference, delta = ledgers_under(lambda p: make(p, foreach=False), DEVICE, steps=8)
    variants = [{"foreach": True}] + ([{"fused": True}] if rule == "adagrad" else [])
    for implementation in variants:
        contributions, other_delta = ledgers_under(lambda p: make(p, **implementation), DEVICE, steps=8)
        torch.testing.assert_close(other_delta, delta, rtol=1e-10, atol=0)
        torch.testing.assert_close(contributions, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_autocast_unet_loop_is_observed_on_cuda_and_trains_as_without_the_tracker(dtype):
    """docs/observing.md, "Mixed precision", on cuBLAS/cuDNN's half-precision kernels: a float32 tiny UNet
    trained under torch.autocast (float16 with a GradScaler), observed with mixed_precision='observe':
    parameters bit for bit those of the loop without the tracker, every step booked in its precision, the
    ledger identity, a residual the precision can explain (each step's relative residual reported)."""
    scheduler = make_scheduler(100)
    images = (torch.rand(3, 8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DEVICE)

    def run(observe):
        torch.manual_seed(0)
        model = tiny_unet(16, 1, channels=(8, 16)).to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        analyzer = None
        if observe:
            analyzer = NoiseLevelAnalyzer(scheduler, images[0, :4], num_bins=2, num_probes=4, controls=0, kernel_points=2,
                                          progress=False, mixed_precision="observe")
            analyzer.bind(model, optimizer)
        g = torch.Generator(device=DEVICE).manual_seed(1)
        for x0 in images:
            noise = torch.randn(x0.shape, generator=g, device=DEVICE)
            t = torch.randint(0, 100, (x0.shape[0],), generator=g, device=DEVICE)
            with torch.autocast("cuda", dtype=dtype):
                prediction = model(scheduler.add_noise(x0, noise, t), t).sample
            losses = ((prediction.float() - noise) ** 2).flatten(1).mean(1)
            if analyzer is not None:
                analyzer.observe(losses, t)
            scaler.scale(losses.mean()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return model, None if analyzer is None else analyzer.tracker

    plain, _ = run(False)
    model, tracker = run(True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    ledger = tracker.ledger
    assert ledger.steps + len(tracker.skipped_steps) == 3 and ledger.steps >= 2
    assert {e["gradient_precision"] for e in tracker.gradient_scales} == {str(dtype).removeprefix("torch.")}
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta, rtol=0,
                               atol=1e-10)
    assert all(e["relative_residual"] < 0.1 for e in tracker.gradient_scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_autocast_gan_loop_is_observed_on_cuda_and_trains_as_without_the_analyzer(dtype):
    """A DCGAN-like pair (BatchNorm in both) trained under CUDA autocast (float16 through a GradScaler),
    observed by GANKernelAnalyzer(mixed_precision='observe'): both networks bit for bit as without it,
    every step of both booked at its precision, each partition adding up to the change."""
    from test_gan_mixed_precision import STEPS, _equal, _state, _train

    G0, D0, _ = _train(dtype, analyze=False, device="cuda")
    G1, D1, analyzer = _train(dtype, analyze=True, device="cuda")
    assert _equal(_state(G0), _state(G1)) and _equal(_state(D0), _state(D1))
    name = str(dtype).replace("torch.", "")
    for tracker in (analyzer.g_tracker, analyzer.d_tracker):
        assert [entry["gradient_precision"] for entry in tracker.gradient_scales] == [name] * STEPS
    for ledger in analyzer.generator_ledgers.values():
        total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
        assert torch.allclose(total, ledger.delta, rtol=0, atol=1e-12 * float(ledger.delta.abs().max()))


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_the_ddpm_trainer_in_half_precision_is_split_on_cuda_as_without_the_analyzer(mixed_precision):
    """DDPMTrainer(mixed_precision=) on CUDA (fp16 through its GradScaler), a NoiseLevelAnalyzer with
    mixed_precision='observe': the UNet bit for bit the trainer's without it, every update booked at its
    precision, the identity closed, the residual of the order the CPU's is."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 16, 16, generator=g) * 2 - 1

    def trainer(analyze):
        scheduler = make_scheduler(100, clip_sample=True)
        data = images.to(DEVICE)
        torch.manual_seed(0)
        model = tiny_unet(16, 1, channels=(8, 16)).to(DEVICE)
        callbacks = [NoiseLevelAnalyzer(scheduler, data[:8], num_bins=4, num_probes=8, kernel_points=2,
                                        state_dtype=torch.float32, progress=False, mixed_precision="observe")] \
            if analyze else []
        t = DDPMTrainer(model, scheduler, data, batch_size=8, progress=False, callbacks=callbacks,
                        mixed_precision=mixed_precision)
        t.train(3)
        return t

    bare, tracked = trainer(False), trainer(True)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert tracked.skipped_steps == bare.skipped_steps and tracked.global_step == 3
    analyzer = tracked.callbacks[0]
    name = {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    assert [e["gradient_precision"] for e in analyzer.tracker.gradient_scales] == [name] * 3
    ledger = analyzer.ledger
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                               rtol=0, atol=1e-9 * float(ledger.delta.abs().max()))
    assert ledger.relative_residual() < 0.2


def test_a_text_conditioned_unet_trains_on_cuda_as_without_the_analyzer():
    """DDPMTrainer(conditional="embeddings") on a cross-attention UNet: CPU embeddings, null embedding and probe
    conditioning given to a CUDA model; the dropout's and the offset noise's draws on the trainer's CPU generator.
    Bit for bit with and without the analyzer, the identity closes, guided samples come out finite."""
    diffusers = pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(24, 4, 8, 8, generator=g), torch.randn(24, 5, 16, generator=g)

    def trainer(analyze):
        torch.manual_seed(0)
        model = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
        ).to(DEVICE)
        callbacks = []
        if analyze:
            callbacks.append(NoiseLevelAnalyzer(make_scheduler(100), latents[:6], probe_conditioning=text[:6], num_bins=3,
                                                num_probes=6, kernel_points=2, state_dtype=torch.float32, progress=False))
        run = DDPMTrainer(model, make_scheduler(100), latents, conditional="embeddings", embeddings=text, batch_size=8,
                          class_dropout=0.2, null_embedding=torch.zeros(5, 16), noise_offset=0.1, progress=False,
                          callbacks=callbacks)
        run.train(3)
        return run

    bare, tracked = trainer(False), trainer(True)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    for ledger in tracked.callbacks[0].ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-9 * float(ledger.delta.abs().max()))
    samples, _ = tracked.sample(2, embeddings=text[:2], num_inference_steps=3, guidance_scale=2.0)
    assert samples.device.type == "cuda" and samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()


def dream_controlnet_runs(device: str):
    """A ControlNet beside a frozen cross-attention UNet, trained by DDPMTrainer with DREAM on ``device`` (float32),
    with and without the analyzer: ``(bare, tracked)`` after three steps."""
    diffusers = pytest.importorskip("diffusers")
    from genkernel.diffusion import ControlNetDenoiser

    g = torch.Generator().manual_seed(0)
    latents, text, controls = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 5, 16, generator=g), torch.rand(
        16, 3, 16, 16, generator=g)

    def trainer(analyze):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
        ).to(device).requires_grad_(False)
        controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).to(device)
        callbacks = []
        if analyze:
            callbacks.append(NoiseLevelAnalyzer(make_scheduler(100), latents[:6], probe_conditioning=(text[:6], controls[:6]),
                                                num_bins=3, num_probes=6, kernel_points=2, state_dtype=torch.float32,
                                                progress=False))
        run = DDPMTrainer(ControlNetDenoiser(unet, controlnet), make_scheduler(100), latents, conditional="embeddings",
                          embeddings=(text, controls), batch_size=8, class_dropout=0.2,
                          null_embedding=(torch.zeros(5, 16), None), dream=1.0, progress=False, callbacks=callbacks,
                          optimizer=torch.optim.AdamW(controlnet.parameters(), lr=1e-3))
        run.train(3)
        return run

    return trainer(False), trainer(True)


def test_a_controlnet_trained_with_dream_on_cuda_as_without_the_analyzer():
    """DDPMTrainer(dream=) over ControlNetDenoiser on CUDA: the DREAM forward, the control images (CPU data to a CUDA
    model) and the frozen UNet; bit for bit with and without the analyzer, the identity closes."""
    bare, tracked = dream_controlnet_runs(DEVICE)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    for ledger in tracked.callbacks[0].ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-9 * float(ledger.delta.abs().max()))


def augmented_gan_runs(device: str):
    """A small conv GAN trained by GANTrainer(augment=DiffAugment's three policies, r1_gamma) on ``device``, with
    and without the analyzer: ``(bare, tracked)`` after three iterations."""
    from genkernel.gan import GANKernelAnalyzer, GANTrainer

    def players():
        torch.manual_seed(0)
        g = nn.Sequential(nn.Linear(4, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8))).to(device)
        d = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 1)).to(device)
        return g, d

    data = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def trainer(analyze):
        g, d = players()
        callbacks = [GANKernelAnalyzer(g, d, torch.randn(6, 4, generator=torch.Generator().manual_seed(2)),
                                       num_groups=3)] if analyze else []
        run = GANTrainer(g, d, data, latent_dim=4, batch_size=8, augment="color,translation,cutout", r1_gamma=1.0,
                         seed=3, callbacks=callbacks, progress=False)
        run.train(3)
        return run

    return trainer(False), trainer(True)


def test_an_augmented_gan_trains_on_cuda_as_without_the_analyzer():
    """GANTrainer(augment=) on CUDA: the augmentation's parameters drawn on the trainer's CPU generator and applied
    on the GPU; both players bit for bit with and without the analyzer, every ledger's identity closes."""
    bare, tracked = augmented_gan_runs(DEVICE)
    for a, b in ((bare.generator, tracked.generator), (bare.discriminator, tracked.discriminator)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    analyzer = tracked.callbacks[0]
    for ledger in [*analyzer.generator_ledgers.values(), analyzer.discriminator_ledger]:
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-9 * float(ledger.delta.abs().max()))


def test_a_jvp_pass_of_the_measured_width_stays_within_its_count_on_cuda():
    """core.push_memory on CUDA: the tracker's measure of its model's JVP pass (live storages, the CUDA caching
    allocator's blocks not counted) sizes a pass of many rows whose allocated peak stays within what
    push_pass_bytes counts for it (the tangents made before left out)."""
    from torch.func import vmap

    from genkernel.core.adapter import analysis_mode
    from genkernel.core.cost import push_pass_bytes, push_pass_shape
    from genkernel.core.push_memory import DEFAULT_PUSH_MEMORY, jvp_pass

    torch.manual_seed(0)
    model = tiny_unet(16, 1).to(DEVICE)  # (called as model(x_t, t): the adapter reads its output's .sample)
    probes = (torch.randn(8, 1, 16, 16, device=DEVICE), torch.arange(8, device=DEVICE))
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-3),
                                lambda out, y: out.flatten(1).pow(2).mean(1), probes, num_groups=4, batch_size=8)
    tracked = tracker._tracked
    push = tracked.push_memory
    assert push != DEFAULT_PUSH_MEMORY
    budget = int(8 * tracked.record_bytes * (push.primal + 6 * push.row)) + 1
    assert push_pass_shape(budget, 8, tracked.record_bytes, push) == (6, 8)
    theta = {n: p.detach() for n, p in tracked.params.items()}
    tangents = {n: torch.randn(6, *p.shape, device=DEVICE) for n, p in theta.items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), analysis_mode(model):
        out = vmap(jvp_pass(model, theta, probes))(tangents)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    assert peak <= push_pass_bytes(0, 4, 6, 8 * tracked.record_bytes, push)


def test_a_float32_conv_step_with_a_long_bias_reduction_is_booked_on_cuda():
    """tracking.rounding on cuDNN: a correct float32 step of a conv net at 64 examples of 64x64 (its second conv's
    bias summed over 262144 positions) is booked on the graph route, and the same step with that bias's gradient
    1e-2 off is refused."""
    from genkernel import LedgerCheckError

    for fault in (None, 1e-2):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).to(DEVICE)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(64, 3, 64, 64, generator=g).to(DEVICE), torch.randn(64, 4, generator=g).to(DEVICE)
        ids = torch.randint(0, 8, (64,), generator=g).to(DEVICE)
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-2), mse_loss,
                                    torch.randn(2, 3, 64, 64, generator=g).to(DEVICE), num_groups=8, batch_size=64,
                                    group_state="dense", gradient_route="graph")
        if fault is None:
            tracker.step(x, y, ids)
            assert tracker.ledger.steps == 1 and tracker.ledger.relative_residual() < 1e-4
        else:
            model[2].bias.register_post_accumulate_grad_hook(lambda p: (p.grad.mul_(1 + fault), None)[1])
            with pytest.raises(LedgerCheckError, match="'2.bias'"):
                tracker.step(x, y, ids)
