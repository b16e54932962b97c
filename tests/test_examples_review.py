"""Review of the example scripts (recipes/examples: train_unconditional, dcgan, overhead) and of the
GAN configurations (genkernel.gan.configs): fp16 on a CPU trains (in float32, analysed, bit for bit
the run without mixed precision), the analyzer is bound with the step's batch in K micro-batches
(DDPMTrainer(batch_size=B*K, micro_batches=K)'s), the overhead leaves out every optimizer's first
step and runs the --steps asked for, and the configurations refuse sizes of 0."""

from __future__ import annotations

import pytest
import torch

from recipes.examples import overhead
from recipes.examples.train_unconditional import main as train_unconditional


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset


def unconditional(image_folder, out, *extra):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train_unconditional([
        "--train_data_dir", str(image_folder), "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "2",
        "--lr_warmup_steps", "1", "--num_bins", "2", "--num_probes", "4", "--controls", "0", *extra,
    ])


@pytest.mark.skipif(torch.cuda.is_available(), reason="accelerate autocasts fp16 on a GPU (the analyzer refuses it)")
def test_fp16_on_a_cpu_trains_in_float32_analysed_and_bit_for_bit_as_without_mixed_precision(image_folder, tmp_path):
    # the docstring: "On CPU, accelerate runs fp16 without autocast, so that run is float32 and analysed".
    # Upstream's weight_dtype cast the images to fp16 anyway: the float32 UNet's first forward failed
    # (RuntimeError: Input type (c10::Half) and bias type (float) should be the same).
    fp16 = unconditional(image_folder, tmp_path / "fp16", "--mixed_precision", "fp16", "--max_train_steps", "2")
    assert fp16["global_step"] == 2 and fp16["analyzer"].ledger.steps == 2
    ledger = fp16["analyzer"].ledger
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12 * float(ledger.delta.abs().max()))
    plain = unconditional(image_folder, tmp_path / "plain", "--mixed_precision", "no", "--max_train_steps", "2",
                          "--no-analyze")
    assert all(p.dtype == torch.float32 for p in fp16["model"].parameters())
    assert all(torch.equal(p, q) for p, q in zip(fp16["model"].parameters(), plain["model"].parameters()))


def test_the_analyzer_is_bound_with_the_steps_batch_in_its_micro_batches(image_folder, tmp_path):
    # batches of 2 accumulated over 3: a step of 6 examples in 3 micro-batches, DDPMTrainer(batch_size=6,
    # micro_batches=3)'s step; the cost estimate was of a step of 4 examples (the probes' count) in one pass
    result = unconditional(image_folder, tmp_path / "out", "--gradient_accumulation_steps", "3", "--max_train_steps", "1")
    tracker = result["analyzer"].tracker
    assert tracker.cost.settings["batch"] == 6 and tracker.cost.settings["probes"] == 4
    assert tracker._cost_settings["micro_batches"] == 3
    assert [s["micro_batches"] for s in tracker.gradient_scales] == [3]


def fake_loop(clock, first_g_step: float):
    """A GAN loop of 4 iterations (a D step, then a G step) on a fake clock: every step takes 1 s, but G's
    first takes ``first_g_step``."""
    d = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    g = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def train(argv):
        clock[0] += 100.0  # set-up
        for i in range(4):
            clock[0] += 1.0
            d.step()
            clock[0] += first_g_step if i == 0 else 1.0
            g.step()
        clock[0] += 50.0  # the end
    return train


def test_the_timed_steps_leave_out_every_optimizers_first_step(monkeypatch):
    # The DCGAN's first G step carries the analyzer's one-time work (0.55 s against 0.08 s later, measured):
    # the mean from the first D step's end counted it, 6.4x overhead instead of 3.3x at 8 steps.
    clock = [0.0]
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: clock[0])
    result = overhead.timed_run(fake_loop(clock, first_g_step=20.0), [])
    assert result["steps"] == 8
    assert result["seconds_per_step"] == pytest.approx(1.0)  # old: (20 + 6) / 7 = 3.71
    assert result["total_s"] == pytest.approx(100 + 8 - 1 + 20 + 50)
    assert result["other_s"] == pytest.approx(result["total_s"] - 6 * 1.0)


def test_the_dcgan_overhead_runs_the_steps_asked_for_with_another_batch_or_a_folder_of_ones_own(tmp_path):
    tiny = ["--nz", "8", "--ngf", "4", "--ndf", "4", "--probes", "4", "--groups", "2"]
    # batches of 4: the 32 images written for batches of 16 ran 8 iterations, 16 steps for --steps 4
    summary = overhead.main(["--example", "dcgan", "--repeats", "1", "--steps", "4", "--", "--batchSize", "4", *tiny])
    assert [run["steps"] for mode in ("analyze", "no-analyze") for run in summary["runs"][mode]] == [4, 4]
    # a folder of 40 images: the whole folder ran, 3 iterations at batch 16, 6 steps for --steps 4
    folder = overhead.write_images(tmp_path / "mine", count=40)
    summary = overhead.main(["--example", "dcgan", "--repeats", "1", "--steps", "4", "--train_data_dir", str(folder),
                             "--", *tiny])
    assert [run["steps"] for mode in ("analyze", "no-analyze") for run in summary["runs"][mode]] == [4, 4]
    assert len(list(folder.rglob("*.png"))) == 40  # the user's folder is read, not changed


@pytest.mark.parametrize("build, kwargs, name", [
    ("dcgan64_generator", {"nz": 0}, "nz"),  # a generator that ignores its latents
    ("dcgan64_generator", {"nc": True}, "nc"),
    ("dcgan64_discriminator", {"ndf": 0}, "ndf"),  # no parameters: D(x) = 0.5
    ("cdcgan64_generator", {"num_classes": 3, "embed_dim": 0}, "embed_dim"),  # G(z, y) that ignores y
    ("cdcgan64_generator", {"num_classes": 0}, "num_classes"),
    ("cdcgan64_generator", {"num_classes": 3, "nz": 0, "embed_dim": 2}, "nz"),  # G(z, y) that ignores z
    ("cdcgan64_discriminator", {"num_classes": 0}, "num_classes"),
    ("cdcgan64_discriminator", {"num_classes": 3, "nc": 0}, "nc"),  # D(x, y) that sees only the class map
])
def test_the_dcgan_configurations_refuse_sizes_of_zero(build, kwargs, name):
    from genkernel.gan import configs

    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        getattr(configs, build)(**kwargs)


def test_the_dcgan_configurations_sizes_initialization_and_seed_as_documented():
    """Coverage: 3.6M / 2.8M parameters, DCGAN's N(0, 0.02) / N(1, 0.02) initialization, shapes, and
    seed= reseeding the global generator (documented): the same weights, and the draws after it as
    after torch.manual_seed(seed)."""
    from genkernel.gan.configs import cdcgan64_discriminator, cdcgan64_generator, dcgan64_discriminator, dcgan64_generator

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    G, D = dcgan64_generator(seed=0), dcgan64_discriminator(seed=0)
    assert (count(G), count(D)) == (3_576_704, 2_765_568)
    convs = torch.cat([m.weight.detach().flatten() for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)])
    norms = [m for m in D.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn = torch.cat([m.weight.detach().flatten() for m in norms])
    assert abs(float(convs.std()) - 0.02) < 5e-4 and abs(float(convs.mean())) < 1e-4
    assert abs(float(bn.std()) - 0.02) < 3e-3 and abs(float(bn.mean()) - 1.0) < 3e-3
    assert all(float(m.bias.abs().max()) == 0.0 for m in norms)
    with torch.no_grad():
        G.eval(), D.eval()
        assert D(G(torch.randn(2, 100, 1, 1))).shape == (2,)
    small = dict(nz=4, ngf=2, nc=1)
    first = dcgan64_generator(**small, seed=3)
    after = torch.rand(3)
    second = dcgan64_generator(**small, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    torch.manual_seed(3)
    dcgan64_generator(**small)
    assert torch.equal(torch.rand(3), after)
    cG, cD = cdcgan64_generator(3, nz=4, ngf=2, nc=1, seed=0), cdcgan64_discriminator(3, ndf=2, nc=1, seed=0)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        cG.eval(), cD.eval()
        assert cD(cG(torch.randn(2, 4), y), y).shape == (2,)


def test_a_local_model_config_builds_the_unet_it_describes(image_folder, tmp_path):
    """Coverage (the config is now read with local_files_only=True: a hub name is not fetched): the
    tiny UNet's saved config trains bit for bit as --unet tiny."""
    tiny = unconditional(image_folder, tmp_path / "tiny", "--max_train_steps", "1", "--no-analyze")
    tiny["model"].save_config(tmp_path / "config")
    loaded = unconditional(image_folder, tmp_path / "loaded", "--max_train_steps", "1", "--no-analyze",
                           "--model_config_name_or_path", str(tmp_path / "config"))
    mine, theirs = dict(loaded["model"].named_parameters()), dict(tiny["model"].named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
