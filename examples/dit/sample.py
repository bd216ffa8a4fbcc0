"""
Sample a grid of images from a trained DiT (+ DTR): one image per class in eval.class_labels.

    python sample.py models.name=DiT-L/2 models.routing.sharing_ratio=0.8 eval.cfg_scale=4.0
    python sample.py data=digits eval.cfg_scale=2.0

Pass the training keys (or eval.ckpt=<path>). The grid goes to eval.grid, by default
{eval.samples_dir}/{model}/grid-{ckpt}-cfg-{scale}.png. Runs on one GPU or the CPU.
"""

import os

import numpy as np
import torch
from PIL import Image

import common
import config


def save_grid(images, path, nrow):
    """(n, H, W, 3) uint8 images as one PNG, nrow images per row, 2-pixel gaps."""
    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    Image.fromarray(grid).save(path)


def grid_path(cfg):
    if cfg.eval.grid is not None:
        return cfg.eval.grid
    ckpt = os.path.splitext(os.path.basename(config.checkpoint_path(cfg)))[0]
    return os.path.join(cfg.eval.samples_dir, config.model_string(cfg), f"grid-{ckpt}-cfg-{cfg.eval.cfg_scale}.png")


@torch.no_grad()
def main(cfg, per_class=1, upscale=None):
    """Write the grid (per_class rows of eval.class_labels); returns its path."""
    _, _, device = common.setup_distributed(cfg)
    diffusion = common.sampling_diffusion(cfg)
    vae = common.load_vae(cfg, device) if cfg.data.name != "digits" else None

    if not cfg.eval.class_labels or any(not 0 <= c < cfg.data.num_classes for c in cfg.eval.class_labels):
        raise config.ConfigError(f"eval.class_labels must be class indices in [0, {cfg.data.num_classes}), got {list(cfg.eval.class_labels)}")
    labels = list(cfg.eval.class_labels) * per_class
    model = common.load_model_for_sampling(cfg, device)
    generator = torch.Generator(device).manual_seed(cfg.general.global_seed)
    channels, size = config.in_channels(cfg), config.input_size(cfg)
    z = torch.randn(len(labels), channels, size, size, generator=generator, device=device)
    y = torch.tensor(labels, device=device)
    images = common.to_images(common.sample(model, diffusion, z, y, cfg, generator), cfg, vae)
    if upscale is None:
        upscale = max(1, 64 // images.shape[1])  # 8x8 digits become visible 64x64 tiles
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)

    path = grid_path(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_grid(images, path, nrow=len(cfg.eval.class_labels))
    print(f"Saved {len(labels)} samples to {path}")
    return path


if __name__ == "__main__":
    config.run(main)
