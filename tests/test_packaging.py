"""What `pip install` gives: one import name, `carve`, holding the three layers, with the public API at `import
carve`."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import tomllib
from conftest import REPO

FOLDERS = {"carve": "carve", "carve.pipeline": "pipeline", "carve.plugins": "plugins", "carve.models": "models"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_under_carve():
    """pyproject lists the packages explicitly (the folders are mapped, not found): a new folder must be added."""
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == FOLDERS
    found = set()
    for name, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([name, *rel]))
    assert set(setuptools["packages"]) == found
    # every folder holding Python is a package (an implicit namespace folder would be left out of the wheel)
    for folder in FOLDERS.values():
        for py in (REPO / folder).rglob("*.py"):
            assert (py.parent / "__init__.py").is_file(), f"{py.parent} has Python files but no __init__.py"


@pytest.mark.slow
def test_the_wheel_installs_exactly_one_top_level_name(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("carve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["carve"]
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"carve"}
    assert "carve/pipeline/graph/surgery.py" in names and "carve/plugins/criteria/magnitude.py" in names
    assert "carve/models/cifar_resnet.py" in names and "carve/pipeline/runtime/torch_graph.py" in names
    assert "carve = carve.pipeline.cli:main" in entry_points


def test_import_carve_gives_the_public_api_and_nothing_else_is_installed(tmp_path):
    code = (
        "import importlib.util, carve\n"
        "print(sorted(n for n in ('pipeline', 'plugins', 'models') if importlib.util.find_spec(n)))\n"
        "print(all(callable(getattr(carve, n)) for n in ('load', 'save', 'analyse', 'plan', 'prune', 'prune_model',"
        " 'load_data', 'model_cost')))\n"
        "import carve.models, carve.plugins.criteria, carve.pipeline.cli\n"
        "print(carve.models.available()[:1])\n"
    )
    # run from an empty folder so the repository's own folders are not on sys.path
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    generic, api, zoo = r.stdout.splitlines()
    assert generic == "[]"  # no `pipeline`, `plugins` or `models` next to the user's own packages
    assert api == "True" and zoo.startswith("['")


def test_every_public_name_of_the_facade_resolves():
    import carve

    for name in carve._LAZY:
        assert getattr(carve, name) is not None, name
    assert carve.finetune.__module__ == "carve.pipeline.training.finetune"
