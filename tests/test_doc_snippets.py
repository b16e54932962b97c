"""The fenced ``python`` blocks of README.md and docs/*.md run, and do what their comments say.

coverage: passes on the code before (every block ran as written; the faults this review found were
in the prose around them, fixed in the pages, not in the blocks).

A block that is complete (README's "The core") runs verbatim. A block that elides context (a
``loader``, a ``model``, an ``accelerator``, the ``...`` of "noise, timesteps, x_t as you do") runs
with the least context a user would have, written here and not in the pages: tiny models, a few
batches. Step counts shrink through that context only: the core example keeps its 100 steps; the
observed loops run 3 to 4 batches of their loaders; usage.md's ``trainer.train(2000)`` is the one
text substitution (3 steps), its 2000 not being part of any claim. Each test asserts what the
block's comments and the sentences around it claim: shapes, summary keys, that the analyzer lines
leave training bit for bit as it is without them (the block with those statements removed, found by
``ast``), the ledger identity, that reports are strict JSON, what a TensorBoard run holds.

The blocks are found by page and heading; a block added, removed or moved fails
``test_the_pages_hold_the_blocks_these_tests_run``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# page -> the heading each python block sits under, in order
EXPECTED = {
    "README.md": ["The core", "In your own training loop", "In your own training loop", "In your own training loop"],
    "docs/usage.md": ["Streaming a run", "Streaming a run"],
    "docs/diffusion.md": ["Flow matching", "EDM"],
}


def blocks(page: str) -> list[tuple[str, str]]:
    """(heading, source) of every fenced python block of a page, in order."""
    found, heading, inside, lines = [], None, False, []
    for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
        if inside:
            if line.strip() == "```":
                found.append((heading, "\n".join(lines) + "\n"))
                inside = False
            else:
                lines.append(line)
        elif line.strip() == "```python":
            inside, lines = True, []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    assert not inside, f"{page}: a python block is not closed"
    return found


def block(page: str, index: int) -> str:
    found = blocks(page)
    assert [h for h, _ in found] == EXPECTED[page], f"{page}'s python blocks moved: {[h for h, _ in found]}"
    return found[index][1]


def without(source: str, name: str) -> str:
    """The block with every statement that mentions ``name`` removed (in loop bodies too): the run
    without the analyzer or tracker."""

    class Strip(ast.NodeTransformer):
        def strip(self, body):
            kept = [self.visit(s) for s in body if not any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(s))
                    or isinstance(s, (ast.For, ast.While, ast.If))]
            return kept or [ast.Pass()]

        def visit_Module(self, node):
            node.body = self.strip(node.body)
            return node

        def visit_For(self, node):
            node.body = self.strip(node.body)
            return node

        visit_If = visit_For

    tree = Strip().visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))


def test_the_pages_hold_the_blocks_these_tests_run():
    pages = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    for page in pages:
        headings = [h for h, _ in blocks(page)]
        assert headings == EXPECTED.get(page, []), (
            f"{page}'s python blocks are {headings}, tests/test_doc_snippets.py runs {EXPECTED.get(page, [])}: "
            "give a new block its context and assertions there"
        )


def assert_ledger_identity(ledger):
    change = ledger.f_end - ledger.f_start
    booked = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
    torch.testing.assert_close(booked, change, rtol=0, atol=1e-12 * float(change.abs().max()))


# --- README: The core ----------------------------------------------------------------------------


def test_readme_core_runs_verbatim_and_trains_the_untracked_loops_parameters(capsys):
    from genkernel.supervised import mlp, mse_loss

    torch.manual_seed(0)
    ns: dict = {}
    exec(block("README.md", 0), ns)
    tracked = [p.detach().clone() for p in ns["model"].parameters()]
    printed = capsys.readouterr().out
    summary = ns["ledger"].summary()
    # "steps, relative residual, median κ, ..."
    assert {"steps", "relative_residual", "median_kappa"} <= set(summary) and summary["steps"] == 100
    assert "'relative_residual'" in printed
    shares = ns["shares"]  # "net shares [16, 2] with their κ [16]"
    assert tuple(shares.groups.shape) == (16, 2) and tuple(shares.kappa.shape) == (16,)
    for name, groups in (("half", 2), ("parity", 2)):  # one ledger per partition
        ledger = ns["tracker"].ledgers[name]
        assert ledger.contributions.dtype == torch.float64
        assert tuple(ledger.contributions.shape) == (16, groups, 1) and tuple(ledger.traffic.shape) == (16, groups)
        assert tuple(ledger.rest.shape) == tuple(ledger.residual.shape) == (16, 1)
        assert_ledger_identity(ledger)
    # "trains the model to the same parameters, bit for bit, as the untracked loop"
    torch.manual_seed(0)
    x, y = torch.randn(256, 2), torch.randn(256, 1)
    model = mlp(2, [64, 64], 1, act="tanh")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.randn(16, 2)  # the probes' draw
    for _ in range(100):
        batch = torch.randint(0, 256, (32,))
        mse_loss(model(x[batch]), y[batch]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(tracked, model.parameters()))


# --- README: an observed loop --------------------------------------------------------------------


def observed_loop_context():
    from genkernel import PathKernelTracker
    from genkernel.supervised import mlp, mse_loss

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp(2, [16], 1, act="tanh").double()
    x = torch.randn(48, 2, generator=g, dtype=torch.float64)
    y = 10 * torch.randn(48, 1, generator=g, dtype=torch.float64)  # large enough that the clip acts
    loader = [(x[i:i + 16], y[i:i + 16], (x[i:i + 16, 0] > 0).long()) for i in range(0, 48, 16)]
    return dict(torch=torch, PathKernelTracker=PathKernelTracker, model=model,
                optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), loss_fn=mse_loss,
                per_example_loss=mse_loss, probes=torch.randn(6, 2, generator=g, dtype=torch.float64), G=2,
                loader=loader)


def test_readme_observed_loop_is_the_owned_step_and_leaves_training_as_it_was():
    from genkernel import PathKernelTracker
    from genkernel.supervised import mse_loss

    source = block("README.md", 1)
    ns = observed_loop_context()
    exec(source, ns)
    bare = observed_loop_context()
    exec(without(source, "tracker"), bare)  # "the one added line" (and the tracker's construction)
    assert all(torch.equal(a, b) for a, b in zip(ns["model"].parameters(), bare["model"].parameters()))
    tracker = ns["tracker"]
    scales = [entry["scale"] for entry in tracker.gradient_scales]
    assert len(scales) == 3 and all(s < 1 for s in scales)  # the global-norm clip factor, reported
    # "Observed ledgers equal owned ones on the same steps to 1e-12 of the largest contribution" (float64)
    ref = observed_loop_context()
    owned = PathKernelTracker(ref["model"], ref["optimizer"], mse_loss, ref["probes"], num_groups=2, max_grad_norm=1.0)
    for x, y, groups in ref["loader"]:
        owned.step(x, y, groups)
    a, b = tracker.ledger, owned.ledger
    scale = float(b.contributions.abs().max())
    for field in ("contributions", "rest", "residual", "traffic"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-12 * scale, msg=field)
    assert_ledger_identity(a)


# --- README: a DDPM loop with accelerate and an EMA ----------------------------------------------


class TinyDenoiser(nn.Module):
    """``model(x_t, t[, labels]).sample``, called as a diffusers UNet is: a small conv net."""

    def __init__(self, num_class_embeds=None):
        super().__init__()
        self.inp, self.time, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(1, 4), nn.Conv2d(4, 1, 3, padding=1)
        self.cls = nn.Embedding(num_class_embeds, 4) if num_class_embeds else None

    def forward(self, x, t, labels=None):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = self.inp(x) + self.time(t / 1000)[:, :, None, None]
        if self.cls is not None:
            h = h + self.cls(labels)[:, :, None, None]
        return UNet2DOutput(sample=self.out(torch.tanh(h)))


ELIDED = "    ...                                            # noise, timesteps, x_t as you do\n"
FILLED = ("    noise = torch.randn_like(x0)\n    t = torch.randint(0, 1000, (x0.shape[0],))\n"
          "    x_t = scheduler.add_noise(x0, noise, t)\n    snr_weight = 1.0\n")


def ddpm_loop_context():
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from genkernel.diffusion import make_scheduler

    torch.manual_seed(0)
    model = TinyDenoiser(num_class_embeds=10)
    g = torch.Generator().manual_seed(1)
    return dict(torch=torch, scheduler=make_scheduler(1000), model=model,
                optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), ema_model=EMAModel(model.parameters()),
                accelerator=Accelerator(cpu=True), probe_images=torch.randn(4, 1, 4, 4, generator=g),
                probe_labels=torch.arange(4),
                loader=[(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g))
                        for _ in range(3)])


def test_readme_ddpm_loop_keeps_level_class_and_ema_ledgers_and_a_strict_json_report(fresh_accelerate):
    source = block("README.md", 2)
    assert ELIDED in source, "README's DDPM block no longer elides the noise with '...': update FILLED"
    source = source.replace(ELIDED, FILLED)
    ns = ddpm_loop_context()
    exec(source, ns)
    analyzer, report = ns["analyzer"], ns["report"]
    json.dumps(report, allow_nan=False)  # "strict JSON"
    assert {"matrices", "locality"} <= set(report)  # "noise×noise matrices, locality vs control"
    assert analyzer.partitions["level_class"] == 10 * 10  # "level × class too"
    assert analyzer.ledger.steps == 3 and analyzer.ema_ledgers  # "diffusers EMAModel: a second ledger"
    assert all(ledger.steps == 3 for ledger in analyzer.ema_ledgers.values())
    assert_ledger_identity(analyzer.ledger)
    bare = ddpm_loop_context()
    exec(without(source, "analyzer"), bare)
    assert all(torch.equal(a, b) for a, b in zip(ns["model"].parameters(), bare["model"].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ns["ema_model"].shadow_params, bare["ema_model"].shadow_params))


# --- README: the DCGAN loop ----------------------------------------------------------------------


def dcgan_run(setup: str | None, d_step: str | None, g_step: str | None):
    """PyTorch's DCGAN loop at 8×8 (BatchNorm in G, BCE on a sigmoid D, Adam), with the README's
    lines run where they go."""
    torch.manual_seed(0)
    nz, B = 3, 8
    netG = nn.Sequential(nn.ConvTranspose2d(nz, 4, 4, 1, 0, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.ConvTranspose2d(4, 1, 4, 2, 1, bias=False), nn.Tanh())
    netD = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 4, 1, 0, bias=False),
                         nn.Sigmoid(), nn.Flatten(0))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ns = dict(torch=torch, netG=netG, netD=netD, nz=nz, B=B, optimizerG=optimizerG, optimizerD=optimizerD)
    if setup:
        exec(setup, ns)
    per_example = nn.BCELoss(reduction="none")
    for real in torch.rand(3, B, 1, 8, 8) * 2 - 1:
        netD.zero_grad()
        errD_real_per_example = per_example(netD(real), torch.ones(B))
        noise = torch.randn(B, nz, 1, 1)
        fake = netG(noise)
        errD_fake_per_example = per_example(netD(fake.detach()), torch.zeros(B))
        ns.update(errD_real_per_example=errD_real_per_example, errD_fake_per_example=errD_fake_per_example,
                  real=real, fake=fake, noise=noise)
        if d_step:
            exec(d_step, ns)
        errD_real_per_example.mean().backward()
        errD_fake_per_example.mean().backward()
        optimizerD.step()
        netG.zero_grad()
        errG_per_example = per_example(netD(fake), torch.ones(B))
        ns["errG_per_example"] = errG_per_example
        if g_step:
            exec(g_step, ns)
        errG_per_example.mean().backward()
        optimizerG.step()
    return ns


def test_readme_dcgan_lines_observe_both_players_and_leave_training_as_it_was():
    source = block("README.md", 3)
    setup, rest = source.split("# discriminator step:")
    d_step, g_step = rest.split("# generator step:")
    ns = dcgan_run(setup, "#" + d_step, "#" + g_step)
    analyzer = ns["analyzer"]
    analyzer.finish()
    report = analyzer.report()
    json.dumps(report, allow_nan=False)
    assert report["generator_steps"] == report["discriminator_steps"] == 3
    generator = analyzer.generator_ledger()
    assert tuple(generator.f_start.shape[:1]) == (64,)  # probe_latents=torch.randn(64, nz, 1, 1)
    assert_ledger_identity(generator)
    assert_ledger_identity(analyzer.discriminator_ledger)
    bare = dcgan_run("torch.randn(64, nz, 1, 1)", None, None)  # the probe latents' draw
    for net in ("netG", "netD"):
        assert all(torch.equal(a, b) for a, b in zip(ns[net].state_dict().values(), bare[net].state_dict().values()))


# --- docs/usage.md: streaming to TensorBoard -----------------------------------------------------


def usage_context():
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
    from genkernel.logging import TensorBoardWriter

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return dict(torch=torch, TensorBoardWriter=TensorBoardWriter, NoiseLevelAnalyzer=NoiseLevelAnalyzer,
                DDPMTrainer=DDPMTrainer, model=TinyDenoiser(), scheduler=make_scheduler(20),
                data=torch.rand(32, 1, 4, 4, generator=g) * 2 - 1,
                probe_data=torch.rand(4, 1, 4, 4, generator=g) * 2 - 1)


def tensorboard_run(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    run = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
    run.Reload()
    return run


def test_usage_streaming_blocks_write_what_the_page_lists(tmp_path, monkeypatch):
    first, second = block("docs/usage.md", 0), block("docs/usage.md", 1)
    monkeypatch.chdir(tmp_path)
    ns = usage_context()
    exec(first, ns)
    ns["trainer"].train(3)
    ns["writer"].close()
    run = tensorboard_run(tmp_path / "runs" / "ddpm")
    scalars = set(run.Tags()["scalars"])
    assert [e.step for e in run.Scalars("loss")] == [e.step for e in run.Scalars("lr")] == [1, 2, 3]  # "loss and lr"
    # the analyzer's running numbers at steps divisible by log_every=10 (none of 1..3) and at the end
    assert [e.step for e in run.Scalars("ledger/relative_residual")] == [3]
    assert {"ledger/rest_share_median", "ledger/kappa_median", "locality/traffic/measured_minus_control",
            "locality/share/measured_minus_control", "traffic_share/bin_0"} <= scalars
    assert {"matrix/traffic", "matrix/share"} <= set(run.Tags()["images"])

    assert "trainer.train(2000)" in second
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "second")
    ns = usage_context()
    ns["analyzer"] = ns["NoiseLevelAnalyzer"](ns["scheduler"], ns["probe_data"])
    exec(second.replace("trainer.train(2000)", "trainer.train(3)"), ns)
    ns["writer"].close()
    run = tensorboard_run(tmp_path / "second" / "runs" / "ddpm")
    assert [e.step for e in run.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in run.Scalars("ledger/relative_residual")] == [3]  # once more when training ends
    assert {"samples", "matrix/traffic"} <= set(run.Tags()["images"])  # the sample grid and the matrices


# --- docs/diffusion.md: flow matching and EDM loops ----------------------------------------------


def diffusion_loop_context():
    torch.manual_seed(0)
    model = TinyDenoiser()
    g = torch.Generator().manual_seed(1)
    return dict(torch=torch, model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                probe_images=torch.randn(4, 1, 4, 4, generator=g),
                loader=[torch.randn(8, 1, 4, 4, generator=g) for _ in range(3)])


@pytest.mark.parametrize("index", [0, 1], ids=["flow_matching", "edm"])
def test_diffusion_loops_book_every_step_and_leave_training_as_it_was(index):
    source = block("docs/diffusion.md", index)
    ns = diffusion_loop_context()
    exec(source, ns)
    analyzer = ns["analyzer"]
    assert analyzer.ledger.steps == 3
    assert_ledger_identity(analyzer.ledger)
    bare = diffusion_loop_context()
    exec(without(source, "analyzer"), bare)
    assert all(torch.equal(a, b) for a, b in zip(ns["model"].parameters(), bare["model"].parameters()))
    if index == 1:  # the EDM paper's λ(σ)‖D − x‖² is ‖F − y‖² with training_target's y (the page's claim)
        from genkernel.diffusion import training_target

        scheduler, x0 = ns["scheduler"], ns["loader"][0][:3].double()
        rows = torch.tensor([0, 300, 999])
        t, sigma = scheduler.timesteps[rows], scheduler.sigmas[rows].double().view(-1, 1, 1, 1)
        noise = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        z = x0 + sigma * noise  # add_noise
        F = ns["model"](scheduler.precondition_inputs(z, sigma).float(), t).sample.double()
        denoised = scheduler.precondition_outputs(z, F, sigma)
        weighting = (sigma**2 + scheduler.config.sigma_data**2) / (sigma * scheduler.config.sigma_data) ** 2
        target = training_target(scheduler, x0, noise, t)
        torch.testing.assert_close(weighting * (denoised - x0) ** 2, (F - target) ** 2, rtol=1e-9, atol=1e-12)


# --- README: "With accelerate ... resume ... in either order" -------------------------------------


def test_readme_accelerate_checkpoint_resumes_the_ledgers_bit_for_bit_loaded_before_or_after_bind(tmp_path, fresh_accelerate):
    """``accelerator.register_for_checkpointing(analyzer)`` (and the EMA), ``save_state``; then a new
    analyzer with the same settings, ``load_state`` and ``bind(..., ema=, start_step=)`` in either
    order: the ledgers (and the EMA's) equal the uninterrupted run's bit for bit."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler

    scheduler = make_scheduler(1000)
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(6, 1, 4, 4, generator=g), torch.randint(0, 1000, (6,), generator=g),
              torch.randn(6, 1, 4, 4, generator=g)) for _ in range(3)]
    probes = torch.randn(3, 1, 4, 4, generator=g)

    def build():
        torch.manual_seed(0)
        model = TinyDenoiser()
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-3))
        ema = EMAModel(model.parameters())
        analyzer = NoiseLevelAnalyzer(scheduler, probes, num_bins=3, controls=1, progress=False)
        accelerator.register_for_checkpointing(analyzer)
        accelerator.register_for_checkpointing(ema)
        return model, optimizer, accelerator, ema, analyzer

    def train(model, optimizer, accelerator, ema, analyzer, batches):
        for x0, t, noise in batches:
            losses = ((model(scheduler.add_noise(x0, noise, t), t).sample - noise) ** 2).mean(dim=(1, 2, 3))
            analyzer.observe(losses, t)
            accelerator.backward(losses.mean())
            optimizer.step()
            optimizer.zero_grad()
            ema.step(model.parameters())

    run = build()
    run[4].bind(run[0], run[1], ema=run[3])
    train(*run, steps[:1])
    run[2].save_state(str(tmp_path / "state"))
    train(*run, steps[1:])
    straight = run[4]
    for order in ("load_then_bind", "bind_then_load"):
        model, optimizer, accelerator, ema, analyzer = resumed = build()
        if order == "load_then_bind":
            accelerator.load_state(str(tmp_path / "state"))
        analyzer.bind(model, optimizer, ema=ema, start_step=1)
        if order == "bind_then_load":
            accelerator.load_state(str(tmp_path / "state"))
        train(*resumed, steps[1:])
        assert analyzer.ledger.steps == straight.ledger.steps == 3, order
        for name in ("contributions", "rest", "residual", "traffic", "f_end"):
            assert torch.equal(getattr(analyzer.ledger, name), getattr(straight.ledger, name)), (order, name)
        assert analyzer.ema_ledgers.keys() == straight.ema_ledgers.keys()
        for key, ledger in analyzer.ema_ledgers.items():
            assert torch.equal(ledger.contributions, straight.ema_ledgers[key].contributions), (order, key)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), run[0].parameters())), order
