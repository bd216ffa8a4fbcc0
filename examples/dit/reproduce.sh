#!/usr/bin/env bash
# Reproduce the DTR paper's ImageNet 256x256 table (Park et al., ICLR 2024, Table: loss weightings x DTR):
# DiT-L/2, 400K iterations, global batch 256, AdamW lr 1e-4, 250 DDPM steps, cfg 1.5, FID-50K against
# the ADM reference batch. Six runs: {constant, min_snr_5, uw} x {no routing (1.0), DTR (0.8)}.
#
#   DATA=/datasets/imagenet/train bash examples/dit/reproduce.sh
#
# Environment (all optional except DATA):
#   DATA          ImageNet train folder, ImageFolder layout (<DATA>/n01440764/*.JPEG, ...)
#   NPROC         processes (GPUs) per node                 [8]
#   NNODES        nodes; for NNODES > 1 also set TORCHRUN_ARGS, e.g.
#                 TORCHRUN_ARGS="--node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=host0:29500" (run on every node)
#   ROWS          which rows, as weighting:sharing_ratio    ["constant:1.0 constant:0.8 min_snr_5:1.0 min_snr_5:0.8 uw:1.0 uw:0.8"]
#   STAGES        any of: latents train sample eval       ["latents train sample eval"]
#   REF           ADM reference batch                       [VIRTUAL_imagenet256_labeled.npz, downloaded if missing]
#   ADM_EVALUATOR path to guided-diffusion/evaluations/evaluator.py (needs tensorflow); if unset, only
#                 evaluate.py (torch-fidelity) runs. The paper's numbers are the ADM evaluator's.
#   VAE           ema | mse                                 [ema]
#   DRY_RUN=1     print the commands instead of running them
#
# Cost (estimate, see README.md): ~110 A100-hours per training run on precomputed latents
# (~13 h on 8 A100s), ~9 A100-hours per FID-50K sampling, ~1.5 A100-hours to extract the latents once:
# about 700 A100-hours for the six rows.
set -euo pipefail

DATA=${DATA:?set DATA=<ImageNet train folder>}
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
ROWS=${ROWS:-"constant:1.0 constant:0.8 min_snr_5:1.0 min_snr_5:0.8 uw:1.0 uw:0.8"}
STAGES=${STAGES:-"latents train sample eval"}
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}
VAE=${VAE:-ema}
TORCHRUN="torchrun --nnodes=${NNODES} --nproc_per_node=${NPROC} ${TORCHRUN_ARGS:-}"
HERE=$(cd "$(dirname "$0")" && pwd)
LATENTS="${DATA%/}-latents-256-${VAE}"
has() { [[ " ${STAGES} " == *" $1 "* ]]; }
run() { if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }

# 0. Encode ImageNet with the VAE once (both flips, posterior mean and std): training then skips the encoder.
if has latents && [ ! -f "${LATENTS}/latents.json" ]; then
  run ${TORCHRUN} "${HERE}/extract_latents.py" general.data_path="${DATA}" general.vae="${VAE}"
fi

if has eval && [ ! -f "${REF}" ]; then
  run wget -O "${REF}" https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
fi

for row in ${ROWS}; do
  weighting=${row%%:*}
  ratio=${row##*:}
  # The paper code's keys: train and sample take the same ones, so sampling finds the checkpoint.
  KEYS=(general.loss_weight_type="${weighting}" models.name="DiT-L/2" models.routing.sharing_ratio="${ratio}" general.vae="${VAE}")
  EVAL=(eval.cfg_scale=1.5 eval.num_fid_samples=50000 eval.num_sampling_steps=250)
  echo "=== ${weighting}, sharing_ratio=${ratio}"

  # 1. Train 400K iterations (global batch 256, checkpoints every 50K steps; rerun with
  #    general.resume=<last checkpoint> after an interruption).
  if has train; then
    run ${TORCHRUN} "${HERE}/train.py" general.data_path="${LATENTS}" "${KEYS[@]}"
  fi

  # 2. Sample 50K images with the EMA weights: one .npz (arr_0: 50000x256x256x3 uint8).
  if has sample; then
    run ${TORCHRUN} "${HERE}/sample_ddp.py" "${KEYS[@]}" "${EVAL[@]}"
  fi

  # 3. FID, IS, precision, recall.
  if has eval; then
    run python "${HERE}/evaluate.py" "${KEYS[@]}" "${EVAL[@]}" eval.ref_batch="${REF}"
    if [ -n "${ADM_EVALUATOR:-}" ]; then
      NPZ=$(python - "${KEYS[@]}" "${EVAL[@]}" <<EOF
import sys; sys.path.insert(0, "${HERE}")
import config, evaluate; print(evaluate.sample_batch_path(config.load(sys.argv[1:])))
EOF
)
      if [ -n "${DRY_RUN:-}" ]; then echo "+ python ${ADM_EVALUATOR} ${REF} ${NPZ}"; else
        python "${ADM_EVALUATOR}" "${REF}" "${NPZ}" | tee "${NPZ%.npz}-adm.txt"; fi
    fi
  fi
done
