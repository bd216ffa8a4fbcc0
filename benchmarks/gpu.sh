#!/usr/bin/env bash
# The one prepared GPU run: at most 8 minutes on one H100/H200 (deadline 465 s for the parts, most important
# first: eager train and CFG sampling ratios, pytest -m cuda, regional compile, DiT-L/2, a torchrun train ->
# resume check, full compile). Writes benchmarks/results/gpu/gpu.{json,md,log} after every part.
#   bash benchmarks/gpu.sh            # uses the machine's python3 with torch and the project installed or on PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 benchmarks/gpu_suite.py "$@"
