""".ci/floors.py: the lowest-versions CI run pins exactly the declared floor of every direct dependency."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib  # floors.py runs on CI's own Python (3.11); .ci/lowest.sh leaves this file out of its 3.10 run

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "floors.py"


def floors(pyproject: Path) -> list[str]:
    spec = importlib.util.spec_from_file_location("ci_floors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.floors(pyproject)


def write(tmp_path, dependencies, extras):
    lines = [
        "[project]",
        'name = "my-pkg"',
        f"dependencies = {dependencies!r}".replace("'", '"'),
        "[project.optional-dependencies]",
    ]
    lines += [f"{name} = {reqs!r}".replace("'", '"') for name, reqs in extras.items()]
    path = tmp_path / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_core_and_every_extra_pinned_at_their_floor_self_references_skipped(tmp_path):
    path = write(
        tmp_path,
        ["Torch>=2.1", "numpy >= 1.23, <3"],
        {"examples": ["einops>=0.7", "torch-fidelity>=0.4"], "dev": ["my-pkg[examples]", "pytest>=7.4"]},
    )
    assert floors(path) == ["einops==0.7", "numpy==1.23", "pytest==7.4", "torch==2.1", "torch-fidelity==0.4"]


@pytest.mark.parametrize("bad", ["scipy", "scipy<2", "scipy==1.9"])
def test_a_requirement_without_a_lower_bound_is_refused_by_name(tmp_path, bad):
    with pytest.raises(SystemExit, match=re.escape(f"{bad!r} in pyproject.toml has no `>=` lower bound")):
        floors(write(tmp_path, ["torch>=2.1"], {"examples": [bad]}))


def test_the_real_pyproject_pins_each_direct_dependency_once_at_its_declared_floor():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout.split()
    pins = dict(line.split("==") for line in out)
    assert len(pins) == len(out)
    # the floors docs/api.md's compatibility table states and the lowest CI run installs
    assert {"torch": "2.8", "numpy": "1.23", "diffusers": "0.33.0", "torchvision": "0.23"}.items() <= pins.items()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [
        r for extra in project["optional-dependencies"].values() for r in extra if not r.startswith(project["name"])
    ]
    assert sorted(pins) == sorted({re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in declared})
