"""Packaging: lower bounds only, a newer torch kept, every package installed, one version, an
installed wheel that runs `genkernel figures`, and library modules that choose no backend.

The pip tests build genkernel's wheel from a copy of the sources and install into throwaway
environments with pip's own resolver, offline (--no-index, a folder of wheels, no configuration
files), so they need no download and do not depend on this machine's pip settings.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
from packaging.requirements import Requirement  # noqa: E402  (pytest depends on packaging)


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


# -- metadata ----------------------------------------------------------------------------------
def test_requirements_have_lower_bounds_only():
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    for text in requirements:
        requirement = Requirement(text)
        operators = {spec.operator for spec in requirement.specifier}
        assert operators <= {">="}, f"{text}: only lower bounds (>=), or an upgrade-blocking pin creeps back"
        assert operators, f"{text}: give the lowest version that works"
    names = {Requirement(r).name for r in project["dependencies"]}
    assert {"torch", "torchvision"} <= names
    assert "captum" not in json.dumps(project), "the captum extra was unused and removed"


def test_every_package_folder_is_installed():
    """Every folder with an __init__.py under genkernel/ and recipes/ is in the explicit package list
    (recipes/ installs as genkernel.recipes), and every listed package exists."""
    config = pyproject()["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {"genkernel.recipes": "recipes"}
    on_disk = set()
    for top, name in (("genkernel", "genkernel"), ("recipes", "genkernel.recipes")):
        for init in (ROOT / top).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            parts = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((name, *parts)))
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed but not on disk: {sorted(listed - on_disk)}"


def test_one_version_license_changelog_and_py_typed():
    import genkernel

    data = pyproject()
    assert "version" not in data["project"] and data["project"]["dynamic"] == ["version"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "genkernel.__version__"}
    # setuptools reads the attribute statically: a plain string literal in genkernel/__init__.py
    tree = ast.parse((ROOT / "genkernel" / "__init__.py").read_text())
    literal = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
               and any(getattr(t, "id", None) == "__version__" for t in n.targets) and isinstance(n.value, ast.Constant)]
    assert literal == [genkernel.__version__]
    assert re.search(rf"^## \[{re.escape(genkernel.__version__)}\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert data["project"]["license"] == "MIT" and data["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "genkernel" / "py.typed").is_file() and data["tool"]["setuptools"]["package-data"]["genkernel"] == ["py.typed"]


# -- pip, offline -------------------------------------------------------------------------------
def _pip_env() -> dict:
    """No pip configuration (this machine's constraint file and indexes), no index, no cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1",
               PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _pip(python: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """This environment's pip, acting on ``python``'s environment (pip --python: no pip needed there)."""
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], env=_pip_env(),
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A minimal pure-Python wheel ``name==version`` (a stand-in distribution: nothing is downloaded)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: genkernel-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


@pytest.fixture(scope="module")
def genkernel_wheel(tmp_path_factory) -> Path:
    """genkernel's wheel, built from a copy of the sources (the working tree stays clean)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("genkernel", "recipes"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = work / "dist"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                             str(source)], env=_pip_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("genkernel-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "genkernel/py.typed" in names and "genkernel/recipes/experiments/null_space.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    return wheel


def _throwaway_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=False, clear=True).create(path)
    return path / "bin" / "python"


def test_a_newer_torch_already_installed_is_kept(genkernel_wheel, tmp_path):
    """pip install of genkernel into an environment with torch 99.0 keeps torch 99.0, and the same
    check with an upper pin (what pyproject.toml used to say) would have had pip replace it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(genkernel_wheel, wheels)
    for text in pyproject()["project"]["dependencies"]:
        requirement = Requirement(text)
        if requirement.name not in ("torch", "torchvision"):  # the others at their lowest allowed version
            _fake_wheel(wheels, requirement.name, str(next(iter(requirement.specifier)).version))
    _fake_wheel(wheels, "torch", "99.0")
    _fake_wheel(wheels, "torchvision", "99.0", ["torch==99.0"])
    _fake_wheel(wheels, "pinned", "1.0", ["torch>=2.1,<=2.14.1"])  # the old pin, as a control
    python = _throwaway_venv(tmp_path / "env")
    offline = ("--no-index", "--find-links", str(wheels))
    _pip(python, "install", *offline, "torch==99.0", "torchvision==99.0")

    report = tmp_path / "report.json"
    _pip(python, "install", "--dry-run", "--report", str(report), *offline, str(genkernel_wheel))
    planned = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert "genkernel" in planned and "torch" not in planned and "torchvision" not in planned, planned

    _pip(python, "install", *offline, str(genkernel_wheel))
    installed = {d["name"]: d["version"] for d in json.loads(_pip(python, "list", "--format", "json").stdout)}
    assert installed["torch"] == "99.0" and installed["torchvision"] == "99.0" and "genkernel" in installed

    # control: an upper pin makes pip want to replace the newer torch (here it cannot even find one)
    control = _pip(python, "install", "--dry-run", *offline, "pinned", check=False)
    assert control.returncode != 0 and "torch" in control.stdout + control.stderr


def test_installed_wheel_regenerates_a_figure(genkernel_wheel, tmp_path):
    """A non-editable install runs `genkernel figures` with no repository: the recipes come from
    genkernel.recipes. Dependencies are borrowed from this environment (a .pth line) so nothing
    is downloaded; genkernel itself is only the installed wheel."""
    import sysconfig

    python = _throwaway_venv(tmp_path / "env")
    _pip(python, "install", "--no-deps", "--no-index", str(genkernel_wheel))
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = tmp_path / "elsewhere"  # not the repository: its genkernel/ and recipes/ must not be importable
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(python), "-c", "import genkernel, genkernel.recipes as r; print(genkernel.__file__); print(r.__file__)"],
                           cwd=run, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    script = python.parent / "genkernel"
    result = subprocess.run([str(script), "figures", "--only", "null_space", "--smoke", "--out-dir", str(run / "out")],
                            cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run / "out" / "null_space.png").stat().st_size > 1000
    assert "claims" in json.loads((run / "out" / "null_space.json").read_text())


# -- library hygiene -------------------------------------------------------------------------------
def test_library_modules_choose_no_matplotlib_backend_and_import_lazily():
    """Importing genkernel's plotting, report and logging modules keeps the backend a user chose
    (so plt.show() works in a notebook); genkernel.logging imports tensorboard only when a writer is
    built; `import logging` still means the standard library."""
    for source in (ROOT / "genkernel").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert not re.search(r"\b(matplotlib|mpl)\.use\(|switch_backend\(", text), f"{source} chooses a backend"
    code = """
import sys, matplotlib
matplotlib.use("svg")
import genkernel.plotting.core, genkernel.plotting.figures, genkernel.plotting.diffusion, genkernel.plotting.gan
import genkernel.report, genkernel.report.figures, genkernel.logging, genkernel.cli
import matplotlib.pyplot as plt
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "tensorboard" not in sys.modules and "torch.utils.tensorboard" not in sys.modules
import logging
assert logging.__file__.startswith(sys.base_prefix) or "genkernel" not in logging.__file__, logging.__file__
assert genkernel.logging is not logging and hasattr(logging, "getLogger")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
