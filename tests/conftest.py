import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs two workers) each worker takes its share of the cores: on two
# cores, one thread each. Most tests are small tensors and Python, where a second thread idles.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # (a container's own)
torch.set_num_threads(max(1, min(2, _CORES // _WORKERS)))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: meaningful on CUDA; runs only where a GPU is present (make gpu-check)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU here); make gpu-check runs these on a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def measures_of_this_file():
    """Each test file starts with no remembered measures (``push_memory.remembered``: push and pass measures, the
    cost estimate's counts, kept per process by architecture): a file's estimates then do not depend on which files
    ran before it on its worker (``--dist loadfile`` runs a file's tests in order, on one worker)."""
    from genkernel.core import push_memory

    push_memory._MEASURED.clear()
    yield


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype, restoring the previous one afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def batch_sets_the_peak(monkeypatch):
    """A training pass holding 10⁴ of its activation elements per example (``cost.TRAINING_ACTIVATIONS``): on tiny
    models the cost estimate's analysis phase (pushes, group rows) is otherwise its peak whatever the batch, and a
    first step's batch could not decide whether it fits (the memory check a module asking for this exercises)."""
    import genkernel.core.cost as cost

    monkeypatch.setattr(cost, "TRAINING_ACTIVATIONS", 1e4)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (faster, and far faster on a busy machine);
    a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_accelerate():
    """One thread (tiny UNets; extra threads spin on a busy machine), and accelerate's process-wide
    state reset around the test (it refuses a second mixed_precision in one process)."""
    from accelerate.state import AcceleratorState, GradientState

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(previous)


@pytest.fixture
def make_image_folder(tmp_path):
    """``make_image_folder(classes, per_class)``: an ImageFolder of RGB 16×16 PNGs (seeded noise) under
    ``tmp_path / "images"``, ``per_class`` in each class folder; returns its root."""
    import numpy as np
    from PIL import Image

    def make(classes=("a", "b"), per_class=6):
        rng = np.random.default_rng(0)
        root = tmp_path / "images"
        for name in classes:
            (root / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
        return root

    return make


@pytest.fixture
def captioned_image_folder(make_image_folder):
    """An ImageFolder of 12 RGB 16×16 PNGs in two class folders, "circles" and "squares" (the text-to-image
    example captions them "a picture of a circles", ...)."""
    return make_image_folder(("circles", "squares"), per_class=6)


@pytest.fixture
def image_folder(make_image_folder):
    """An ImageFolder of 12 RGB 16×16 PNGs in two class folders ("a", "b"); a module may define its own."""
    return make_image_folder()


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (what FSDP's wrappers need to be built), destroyed afterwards."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
