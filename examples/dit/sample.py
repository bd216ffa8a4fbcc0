"""
Sample a grid of images from a trained DiT (+ DTR): one image per class in eval.class_labels.

    python sample.py models.name=DiT-L/2 models.routing.sharing_ratio=0.8 eval.cfg_scale=4.0
    python sample.py data=digits eval.cfg_scale=2.0

Pass the training keys (or eval.ckpt=<path>); a general.path=flow model samples with eval.sampler's ODE
solver. The grid goes to eval.grid, by default {eval.samples_dir}/{model}/grid-{ckpt}-cfg-{scale}.png.
Runs on one GPU or the CPU.
"""

import os

import torch
from torchvision.utils import save_image

import common
import config
import runs


def grid_path(cfg):
    if cfg.eval.grid is not None:
        return cfg.eval.grid
    ckpt = os.path.splitext(os.path.basename(runs.checkpoint_path(cfg)))[0]
    return os.path.join(cfg.eval.samples_dir, config.model_string(cfg), f"grid-{ckpt}-cfg-{cfg.eval.cfg_scale}.png")


@torch.no_grad()
def main(cfg, per_class=1, upscale=None):
    """Write the grid (per_class rows of eval.class_labels); returns its path."""
    _, _, device = common.setup_distributed(cfg)
    diffusion = common.sampling_diffusion(cfg)
    vae = common.load_vae(cfg, device) if cfg.data.name != "digits" else None

    if not cfg.eval.class_labels or any(not 0 <= c < cfg.data.num_classes for c in cfg.eval.class_labels):
        raise config.ConfigError(
            f"eval.class_labels must be class indices in [0, {cfg.data.num_classes}), got {list(cfg.eval.class_labels)}"
        )
    labels = list(cfg.eval.class_labels) * per_class
    model = common.load_model_for_sampling(cfg, device)
    generator = torch.Generator(device).manual_seed(cfg.general.global_seed)
    channels, size = config.in_channels(cfg), config.input_size(cfg)
    z = torch.randn(len(labels), channels, size, size, generator=generator, device=device)
    y = torch.tensor(labels, device=device)
    images = common.to_images(common.sample(model, diffusion, z, y, cfg, generator), cfg, vae)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W) in [0, 1]
    if upscale is None:
        upscale = max(1, 64 // images.shape[-1])  # 8x8 digits become visible 64x64 tiles
    images = images.repeat_interleave(upscale, dim=-2).repeat_interleave(upscale, dim=-1)

    path = grid_path(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(images, path, nrow=len(cfg.eval.class_labels), padding=2, pad_value=1.0)  # white 2-pixel gaps
    print(f"Saved {len(labels)} samples to {path}")
    return path


if __name__ == "__main__":
    config.run(main)
