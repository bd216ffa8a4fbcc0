"""Print the lowest versions pyproject.toml allows, as pip constraints: every `name>=X` of the core and of the
extras becomes `name==X` (pip's and uv's lowest-direct resolution of our own declarations).

    python .ci/floors.py > floors.txt && pip install -c floors.txt -e ".[test]"

A direct dependency without a lower bound is an error: a floor we do not declare is a floor we do not test.
"""

import re
import sys
from pathlib import Path

import tomllib


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for req in requirements:
        if req.startswith(project["name"] + "["):  # an extra naming other extras: already listed
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", req)
        if match is None:
            sys.exit(f"floors.py: {req!r} in pyproject.toml has no `>=` lower bound to test")
        pins[match.group(1).lower()] = match.group(2)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parent.parent / "pyproject.toml")))
