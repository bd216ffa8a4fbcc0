#!/usr/bin/env bash
# The lowest versions pyproject.toml declares (.ci/floors.py pins every `>=X` of the core and the extras to X;
# what they depend on resolves to the newest that fits), on the oldest Python we declare, in .venv-lowest.
# Left out, each because the lowest run installs the `test` extra, without peft and transformers (peft's floor
# resolves transformers releases that need torch and safetensors far above our floors; newest versions only):
# tests/test_hf_workflow.py (PEFT LoRA), tests/examples/test_flux_example.py (FluxPipeline imports transformers)
# and docs/workflows.md's snippets (LoRA); and tests/test_ci_floors.py, which tests this CI's own script on CI's
# Python 3.11 (tomllib).  tests/test_families.py and tests/test_diffusers_families.py skip themselves below
# diffusers 0.42 (their families are declared against it); tests/test_families_older.py runs here instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for candidate in "$(pyenv root 2>/dev/null)"/versions/3.10.*/bin/python3.10 python3.10; do
    if "$candidate" --version >/dev/null 2>&1; then PY=$candidate; break; fi  # pyenv's shim exists but may refuse
done
[ -n "$PY" ] || { echo "lowest.sh: python3.10 (the oldest Python pyproject.toml allows) not found" >&2; exit 1; }
"$PY" -m venv .venv-lowest
.venv-lowest/bin/python -m pip install -q --upgrade pip
python3 .ci/floors.py > .venv-lowest/floors.txt
.venv-lowest/bin/python -m pip install -q -c .venv-lowest/floors.txt -e ".[test]"
.venv-lowest/bin/python -m pip freeze | grep -iE "^(torch|torchvision|numpy|diffusers|torch.fidelity|omegaconf|safetensors|scipy|scikit.learn|einops|tqdm|pillow|matplotlib|tensorboard|pytest|pytest.xdist|hypothesis|huggingface.hub)==" || true
.venv-lowest/bin/python -m pytest -q -n 2 -p no:cacheprovider tests --ignore tests/test_hf_workflow.py \
    --ignore tests/examples/test_flux_example.py --ignore tests/test_ci_floors.py \
    --deselect "tests/test_docs.py::test_python_blocks_run[docs/workflows.md]"
