"""A new user's mistakes, read from README.md and docs/ and tried on the example scripts and the analyzers: each
must either work exactly or be refused with a ValueError/TypeError (or the tracker's RuntimeError) that names the
problem and the fix, before anything runs that it would spoil; and the pages' code blocks either run as written or
say they are fragments.

Each fault test failed on the code before its fix: data folders handed to torchvision unchecked, a DCGAN image
size the networks cannot take, class labels dropped without ``num_classes``, an unobserved first step blamed on a
warm-up, and a dtype mismatch in torch's words alone.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the pages' code blocks --------------------------------------------------------------------------------------


def _python_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, source) of every fenced ``python`` block of a page."""
    found, inside, lines, start = [], False, [], 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if inside:
            if line.strip() == "```":
                found.append((start, "\n".join(lines) + "\n"))
                inside = False
            else:
                lines.append(line)
        elif line.strip() == "```python":
            inside, lines, start = True, [], number + 1
    return found


def _free_names(source: str) -> set[str]:
    """Names a block reads that it neither binds (assignment, import, loop or comprehension target, def, with-as)
    nor are builtins: what a reader must bring from elsewhere to run it."""
    tree = ast.parse(source)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def test_every_python_block_of_the_pages_is_self_contained_or_says_it_is_a_fragment():
    """A block a user copies either runs as written (every name it reads is bound in it or a builtin) or opens with a comment saying it is a fragment and naming what
    comes from the user's script. Fails on the old pages: README's observed loop read ``model``, ``loader``,
    ``per_example_loss`` and ``PathKernelTracker`` (not imported) with no word that it was a fragment, and so did
    the DDPM and DCGAN blocks, usage.md's two and diffusion.md's two."""
    unmarked = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, source in _python_blocks(page):
            first = source.lstrip().splitlines()[0].lower()
            if first.startswith("#") and ("fragment" in first or "lines to add" in first):
                continue
            free = _free_names(source)
            if free:
                unmarked.append(f"{page.name}:{line} reads {sorted(free)}")
    assert not unmarked, unmarked


def test_a_fragment_block_still_names_every_genkernel_api_it_calls_in_an_import_or_its_comment():
    """The fragments' first comment names what the user brings; every genkernel name a fragment uses is imported
    in it or named there (a reader must not guess that ``PathKernelTracker`` comes from ``genkernel``). Fails on
    the old pages: README's observed loop used ``PathKernelTracker`` with no import, usage.md's first block
    ``TensorBoardWriter``, ``NoiseLevelAnalyzer`` and ``DDPMTrainer``."""
    import genkernel
    import genkernel.diffusion
    import genkernel.logging

    api = set(genkernel.__all__) | set(dir(genkernel.diffusion)) | set(dir(genkernel.logging))
    api = {n for n in api if n[:1].isupper()}  # the classes a block builds
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, source in _python_blocks(page):
            comment = " ".join(ln for ln in source.splitlines() if ln.lstrip().startswith("#"))
            for name in sorted((_free_names(source) & api) - set(comment.replace(",", " ").replace(")", " ").split())):
                missing.append(f"{page.name}:{line} {name}")
    assert not missing, missing


# --- the example scripts' data folders ---------------------------------------------------------------------------


def _png(path: Path, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (40, 90, 160)).save(path)


def _folders(tmp_path: Path) -> dict[str, Path]:
    """The folders a new user passes instead of an ImageFolder: none there, a file, images put in the folder
    directly, another data set's files (MNIST's raw idx files), an empty one."""
    missing = tmp_path / "no_such_folder"
    a_file = tmp_path / "images.png"
    _png(a_file)
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.png")
    mnist = tmp_path / "mnist" / "MNIST" / "raw"
    mnist.mkdir(parents=True)
    (mnist / "train-images-idx3-ubyte").write_bytes(b"\0" * 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"missing": missing, "file": a_file, "flat": flat, "mnist": tmp_path / "mnist", "empty": empty}


@pytest.mark.parametrize("kind", ["missing", "file", "flat", "mnist", "empty"])
def test_dcgan_refuses_a_dataroot_that_is_not_an_image_folder_naming_the_option_and_the_layout(kind, tmp_path):
    """``python -m recipes.examples.dcgan --dataroot DIR``: DIR is an ImageFolder (one sub-folder of images per
    class). Any other folder is a ValueError naming ``--dataroot`` and the layout, before the output folder is
    made. Fails on the old code: torchvision's FileNotFoundError ("Couldn't find any class folder in ...", or
    "[Errno 2] No such file or directory") from inside ``ImageFolder``, after ``--outf`` was created."""
    from recipes.examples.dcgan import main

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--dataroot .*one sub-folder of images per class"):
        main(["--dataroot", str(_folders(tmp_path)[kind]), "--outf", str(out), "--dry-run", "--workers", "0"])
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "flat"])
def test_train_unconditional_refuses_a_train_data_dir_that_is_not_an_image_folder_before_making_anything(
        kind, tmp_path, fresh_accelerate):
    """diffusers' flow takes ``--train_data_dir DIR``, an ImageFolder here: a missing folder, or the images put
    in it directly (upstream's ``datasets`` "imagefolder" reads those; torchvision's does not) is a ValueError
    naming the option and the layout, before ``--output_dir`` is made. Fails on the old code: torchvision's
    FileNotFoundError from inside ``ImageFolder``, the output folder already created."""
    from recipes.examples.train_unconditional import main

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--train_data_dir .*one sub-folder of images per class"):
        main(["--train_data_dir", str(_folders(tmp_path)[kind]), "--output_dir", str(out), "--resolution", "8",
              "--max_train_steps", "1", "--no-analyze"])
    assert not out.exists()


@pytest.mark.parametrize("size", [32, 128])
def test_dcgan_refuses_an_image_size_its_networks_cannot_take_before_anything_runs(size, tmp_path):
    """Upstream's G always outputs 64×64 and D's last 4×4 convolution needs a 64×64 input, so ``--imageSize``
    must be 64 (the data are resized to it). Fails on the old code: torch's "Kernel size can't be greater than
    actual input size" (32) or a BCELoss shape error (128) from the first iteration (with the analyzer on,
    after some 30 s of building it)."""
    from recipes.examples.dcgan import main

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--imageSize .*pass --imageSize 64"):
        main(["--dataset", "fake", "--imageSize", str(size), "--outf", str(out), "--dry-run", "--no-analyze",
              "--workers", "0", "--batchSize", "2", "--ngf", "2", "--ndf", "2", "--nz", "2"])
    assert not (out / "netG_epoch_0.pth").exists()


# --- the analyzers and the tracker in a loop of one's own --------------------------------------------------------


class _Denoiser(nn.Module):
    """``model(x_t, t).sample``, as a diffusers UNet is called."""

    def __init__(self):
        super().__init__()
        self.inp, self.time, self.out = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(1, 3), nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x, t):
        from types import SimpleNamespace

        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return SimpleNamespace(sample=self.out(torch.tanh(self.inp(x) + self.time(t / 1000)[:, :, None, None])))


def test_class_labels_observed_by_an_analyzer_without_num_classes_are_refused_not_dropped():
    """``analyzer.observe(losses, t, class_labels=labels)`` asks for the level × class split, which only an
    analyzer built with ``num_classes`` keeps: without it the labels are a ValueError naming ``num_classes``, the
    micro-batch is not observed, and the loop goes on observing without them. Fails on the old code: the labels
    were ignored, no level × class ledger and no error."""
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    scheduler, model = make_scheduler(100), _Denoiser()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    analyzer = NoiseLevelAnalyzer(scheduler, torch.randn(2, 1, 4, 4), num_bins=2, num_probes=4, controls=0,
                                  kernel_points=2, progress=False, snapshot_every=0, memory_check="warn")
    analyzer.bind(model, optimizer, batch_size=4)
    x0, noise, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.tensor([3, 40, 60, 95])
    losses = ((model(scheduler.add_noise(x0, noise, t), t).sample - noise) ** 2).mean(dim=(1, 2, 3))
    with pytest.raises(ValueError, match="num_classes"):
        analyzer.observe(losses, t, class_labels=torch.tensor([0, 1, 0, 1]))
    analyzer.observe(losses, t)
    losses.mean().backward()
    optimizer.step()
    assert analyzer.ledger.steps == 1 and "level_class" not in analyzer.partitions


def test_an_unobserved_first_step_is_refused_naming_the_missing_observe():
    """In an observed loop every optimizer step needs ``tracker.observe(...)`` before its backward. After the first
    observed step a step without it is refused at once, naming observe(); before it, the step went through and the
    next observed step was refused as "untracked training, a warm-up, a checkpoint loaded", which a user who
    only forgot the observe line for one step does not recognise. Fails on the old code: the message did not name
    observe()."""
    from genkernel import PathKernelTracker
    from genkernel.supervised import mlp, mse_loss

    torch.manual_seed(0)
    model = mlp(2, [8], 1, act="tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(3, 2), num_groups=2)
    x, y, groups = torch.randn(8, 2), torch.randn(8, 1), torch.arange(8) % 2
    ((model(x) - y) ** 2).sum(1).mean().backward()  # the observe line forgotten
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match=r"before its first step.*optimizer\.step\(\) with no tracker\.observe"):
        losses = ((model(x) - y) ** 2).sum(1)
        tracker.observe(losses, groups)
        losses.mean().backward()
        optimizer.step()
    assert tracker.ledger.steps == 0


@pytest.mark.parametrize("where", ["probes", "inputs"])
def test_data_of_another_dtype_than_the_model_is_refused_saying_which_is_which_and_the_cast(where):
    """A float64 model (the docs' exact set-ups) given float32 probes or a float32 batch: a ValueError that says
    the data are float32, the model's parameters float64, and how to cast them. Fails on the old code: the
    message said "mat1 and mat2 must have the same dtype, but got Float and Double", not which was the model's."""
    from genkernel import PathKernelTracker
    from genkernel.supervised import mlp, mse_loss

    torch.manual_seed(0)
    model = mlp(2, [8], 1, act="tanh").double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    message = rf"the {where} are torch\.float32; the model's parameters are torch\.float64 on cpu: pass the {where} as"
    with pytest.raises(ValueError, match=message):
        probes = torch.randn(3, 2, dtype=torch.float64 if where == "inputs" else torch.float32)
        tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=2)
        tracker.step(torch.randn(8, 2), torch.randn(8, 1, dtype=torch.float64), torch.arange(8) % 2)
