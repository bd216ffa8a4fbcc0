"""Training throughput of the recipe's train.py loop on CPU: DiT-S/2 with and without DTR, images vs latents.

Usage: python benchmarks/train_throughput.py [--image-size 256] [--batch-size 4] [--steps 3] [--warmup 1]
                                             [--threads N] [--model DiT-S/2]

It runs examples/dit/train.py's main() (the real loop: data loading, VAE, diffusion loss, AdamW, EMA)
on a generated ImageFolder, three ways:

  1. precomputed latents (extract_latents.py), DTR sharing_ratio 0.8
  2. precomputed latents, baseline (sharing_ratio 1.0: no routing)
  3. raw images encoded by the VAE every step, DTR 0.8

The VAE is stabilityai/sd-vae-ft-ema's architecture (84M parameters) built from its config with random
weights: the same compute as the real one, no download. Prints a markdown table of steps/s (after the
warm-up steps), DTR's overhead (1 vs 2) and the speed-up from precomputed latents (3 vs 1).
Expect about 10 minutes on 2 CPU cores at the defaults: the VAE encoder takes several seconds per
256x256 image on a CPU (extract_latents.py encodes 16 images twice, each raw-image step 4).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "dit"))

import config  # noqa: E402
import extract_latents  # noqa: E402
import train  # noqa: E402

SD_VAE = {  # stabilityai/sd-vae-ft-ema's config.json (architecture only)
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def make_image_folder(root, n, size, classes=4, seed=0):
    """n random photos-sized images (larger than `size`, various aspect ratios) in `classes` folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        h, w = rng.integers(size, 2 * size, size=2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"))


def run(argv, warmup):
    """train.main for these keys; steps/s over the steps after the warm-up."""
    out = train.main(config.load(argv))
    times = np.asarray(out["step_times"])
    timed = np.diff(times[warmup - 1 :]) if warmup > 0 else np.diff(times)
    return len(timed) / timed.sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="DiT-S/2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = max(1, args.warmup)

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        with open("sd-vae.json", "w") as f:
            json.dump(SD_VAE, f)
        make_image_folder("images", n=args.batch_size * (warmup + args.steps), size=args.image_size)
        common = [
            f"models.name={args.model}",
            "data.num_classes=4",
            "general.device=cpu",
            "general.num_workers=0",
            "general.vae_config=sd-vae.json",
            f"general.image_size={args.image_size}",
            f"general.global_batch_size={args.batch_size}",
            f"general.iterations={warmup + args.steps}",
            "logs.log_every=1000",
            "logs.ckpt_every=100000",
            "logs.results_dir=results",
        ]
        t = time.time()
        latents = extract_latents.main(config.load(["general.data_path=images", *common]))
        extract_s = time.time() - t
        results = {
            "latents, DTR 0.8": run([f"general.data_path={latents}", *common], warmup),
            "latents, baseline (no routing)": run(
                [f"general.data_path={latents}", *common, "models.routing.sharing_ratio=1.0"], warmup
            ),
            "images + VAE, DTR 0.8": run(["general.data_path=images", *common], warmup),
        }

    print(
        f"\n### train.py throughput, {args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, CPU\n"
    )
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.steps} timed steps after {warmup} warm-up step(s)\n"
    )
    print("| variant | steps/s | s/step |")
    print("|---|---|---|")
    for name, sps in results.items():
        print(f"| {name} | {sps:.3f} | {1 / sps:.2f} |")
    dtr_cost = results["latents, baseline (no routing)"] / results["latents, DTR 0.8"] - 1
    speedup = results["latents, DTR 0.8"] / results["images + VAE, DTR 0.8"]
    print(
        f"\nDTR overhead: {100 * dtr_cost:+.1f}% time per step; precomputed latents: {speedup:.1f}x the steps/s of "
        f"encoding images every step (extract_latents.py took {extract_s:.0f} s for "
        f"{args.batch_size * (warmup + args.steps)} images, both flips)."
    )


if __name__ == "__main__":
    main()
