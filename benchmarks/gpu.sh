#!/usr/bin/env bash
# One prepared GPU run (about 8-10 minutes on an H100/H200): DiT-L/2 and DiT-XL/2 training img/s
# (bf16, torch.compile) and sampling img/s, with and without DTR, on a single GPU.
#   bash benchmarks/gpu.sh            # uses the machine's python3 with torch; installs nothing else
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 benchmarks/gpu_throughput.py --models DiT-L/2 DiT-XL/2 --batch 64 --steps 20 --warmup 5 "$@"
