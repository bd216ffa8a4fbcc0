"""DTR dropped into a standard diffusers training loop: a UNet2DModel on scikit-learn's digits.

The model, DDPMScheduler, the loss and DDPMPipeline are plain diffusers; the one DTR line is
``dtr.wrap(unet, sharing_ratio=...)``.  Runs on a CPU in about a minute with the defaults:

    python examples/diffusers_unet.py                          # writes digits_dtr.png
    python examples/diffusers_unet.py --sharing-ratio 1.0      # the same run without routing
    python examples/diffusers_unet.py --steps 20000 --batch-size 128 --channels 64 128 128 \\
        --sample-steps 1000 --threads 0 --out digits_long.png  # a longer run (a GPU helps)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits
from torchvision.utils import make_grid, save_image

import dtr


def digits(image_size: int) -> torch.Tensor:
    """The 1797 8x8 digits (values 0..16), resized to image_size and scaled to [-1, 1]: (N, 1, S, S)."""
    x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def make_unet(image_size: int, channels: list[int]) -> UNet2DModel:
    """A small UNet2DModel: attention at the lowest resolution, as diffusers' unconditional recipe does."""
    n = len(channels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def save_grid(images: np.ndarray, path: str, scale: int = 4) -> None:
    """(N, H, W, 1) images in [0, 1] -> one PNG: a square-ish grid, 1-pixel white gaps, pixels ``scale`` times."""
    grid = make_grid(
        torch.from_numpy(images).permute(0, 3, 1, 2), nrow=math.ceil(math.sqrt(len(images))), padding=1, pad_value=1.0
    )
    save_image(grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1), path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32], help="UNet widths, one per resolution")
    p.add_argument("--sharing-ratio", type=float, default=0.8, help="DTR's beta; 1.0 = no routing")
    p.add_argument("--sample-steps", type=int, default=100, help="DDPMPipeline inference steps")
    p.add_argument("--num-samples", type=int, default=36)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 0 = torch's default (tiny convolutions gain little from more, lose a lot on a busy machine)",
    )
    p.add_argument("--out", default="digits_dtr.png")
    args = p.parse_args(argv)

    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = digits(args.image_size).to(args.device)
    unet = make_unet(args.image_size, args.channels).to(args.device)
    routing = dtr.wrap(unet, sharing_ratio=args.sharing_ratio)  # <- the one line DTR adds
    print(routing.summary())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)

    start, unet = time.time(), unet.train()
    for step in range(1, args.steps + 1):
        clean = data[torch.randint(0, len(data), (args.batch_size,), device=args.device)]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), device=args.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, return_dict=False)[0], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:>6}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)

    pipe = DDPMPipeline(unet=unet.eval(), scheduler=scheduler).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipe(
        batch_size=args.num_samples, generator=generator, num_inference_steps=args.sample_steps, output_type="np"
    ).images
    save_grid(images, args.out)
    print(
        f"wrote {args.out} ({args.num_samples} samples, {args.sample_steps} DDPM steps) in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
