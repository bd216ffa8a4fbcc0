"""Every ```python block of README.md and docs/*.md runs, in order, one process per file.

A block may be prepared by HTML comments just before it (invisible on GitHub):
``<!-- docs-test-setup`` ... ``-->`` holds code run before the block (the objects a reader already has), and
``<!-- docs-test-replace OLD => NEW -->`` substitutes tiny sizes or fewer steps in the block itself.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FENCE = re.compile(r"((?:<!-- docs-test-(?:(?!-->).)*-->\s*)*)```python\n(.*?)```", re.S)
SETUP = re.compile(r"<!-- docs-test-setup\n(.*?)-->", re.S)
REPLACE = re.compile(r"<!-- docs-test-replace (.*?) => (.*?) -->")
FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def blocks(text):
    """(setup code, block code after replacements, line number) of each python block."""
    out = []
    for match in FENCE.finditer(text):
        notes, code = match.group(1), match.group(2)
        for old, new in REPLACE.findall(notes):
            if old not in code:
                raise AssertionError(f"docs-test-replace {old!r} does not occur in the block it prepares")
            code = code.replace(old, new)
        out.append(("".join(SETUP.findall(notes)), code, text[: match.start(2)].count("\n") + 1))
    return out


def script(path):
    """The file's blocks as one script; each block announces its line, so a failure names it."""
    parts = [
        "import sys; sys.path[:0] = [{!r}, {!r}]\n".format(
            os.path.join(ROOT, "examples", "dit"), os.path.join(ROOT, "examples")
        )
    ]
    for setup, code, line in blocks(read(path)):
        parts.append(f"print('--- {path}:{line}', flush=True)\n{setup}\n{code}\n")
    return "".join(parts)


def test_the_extractor_applies_setup_and_replacements():
    text = (
        "<!-- docs-test-setup\nx = 2\n-->\n<!-- docs-test-replace 1000 => 3 -->\n```python\ny = x * 1000\n```\n"
        "```bash\nnot python\n```\n```python\nprint(y)\n```\n"
    )
    assert blocks(text) == [("x = 2\n", "y = x * 3\n", 6), ("", "print(y)\n", 12)]
    with pytest.raises(AssertionError, match="does not occur"):
        blocks("<!-- docs-test-replace 7 => 8 -->\n```python\nz = 1\n```\n")


@pytest.mark.parametrize("path", [p for p in FILES if "```python" in read(p)])
def test_python_blocks_run(path, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", script(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    last = [line for line in r.stdout.splitlines() if line.startswith("--- ")][-1:] or ["before the first block"]
    assert r.returncode == 0, f"the block at {last[0][4:]} fails:\n{r.stderr[-3000:]}"
