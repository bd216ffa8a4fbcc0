"""
Sample eval.num_fid_samples images from a trained DiT (+ DTR), split over all processes, into one
.npz that the ADM evaluator (guided-diffusion/evaluations) and evaluate.py read: arr_0 is
(N, H, W, 3) uint8, arr_1 the (N,) class labels.

Pass the training keys, so the checkpoint is found where train.py wrote it (the paper code's rule):

    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py general.loss_weight_type=uw \
        models.name=DiT-L/2 models.routing.sharing_ratio=0.8 eval.cfg_scale=1.5 eval.num_fid_samples=50000

A general.path=flow model samples with SiT's ODE solvers (eval.sampler=dopri5 | euler | heun2).

eval.ckpt=<path> samples any checkpoint; eval.save_png=true also writes one PNG per sample.
Exactly N samples are written whatever the number of processes: rank r draws samples r, r + W, ...
Multi-node runs need eval.samples_dir on a shared file system (rank 0 assembles the .npz).
"""

import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common
import config


def sample_folder(cfg):
    """{samples_dir}/{model}/{ckpt}-size-{S}-vae-{vae}-samples-{N}-cfg-{scale}-seed-{seed}; the .npz goes beside it.

    general.path=flow adds the ODE solver before the seed: -euler-{steps}, -heun2-{steps}, -dopri5-{atol}-{rtol}.
    """
    e, g = cfg.eval, cfg.general
    ckpt = os.path.splitext(os.path.basename(e.ckpt))[0] if e.ckpt is not None else f"{e.ckpt_path.iterations:07d}"
    vae = "none" if cfg.data.name == "digits" else os.path.basename(os.path.normpath(g.vae))
    name = f"{ckpt}-size-{g.image_size}-vae-{vae}-samples-{e.num_fid_samples}"
    if cfg.data.num_classes > 1:
        name += f"-cfg-{e.cfg_scale}"
    if config.is_flow(cfg):
        name += f"-dopri5-{e.atol}-{e.rtol}" if e.sampler == "dopri5" else f"-{e.sampler}-{e.num_sampling_steps}"
    name += f"-seed-{g.global_seed}"
    return os.path.join(e.samples_dir, config.model_string(cfg), name)


def assemble_npz(folder, world_size, num_samples):
    """Merge the per-rank parts into {folder}.npz (arr_0 images in sample order, arr_1 labels); remove the parts."""
    parts = [np.load(os.path.join(folder, f"part-{r:05d}-of-{world_size:05d}.npz")) for r in range(world_size)]
    first = parts[0]["images"]
    images = np.empty((num_samples, *first.shape[1:]), dtype=np.uint8)
    labels = np.empty((num_samples,), dtype=np.int64)
    filled = np.zeros(num_samples, dtype=bool)
    for part in parts:
        images[part["indices"]] = part["images"]
        labels[part["indices"]] = part["labels"]
        filled[part["indices"]] = True
    assert filled.all(), f"missing samples: {np.flatnonzero(~filled)[:10]}"
    assert images.shape == (num_samples, images.shape[1], images.shape[2], 3)
    path = f"{folder}.npz"
    tmp = f"{folder}.tmp.npz"
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, path)
    for r in range(world_size):
        os.remove(os.path.join(folder, f"part-{r:05d}-of-{world_size:05d}.npz"))
    if not os.listdir(folder):  # no PNGs asked for: only the .npz remains
        os.rmdir(folder)
    return path, images.shape


@torch.no_grad()
def main(cfg):
    """Write the samples; returns the .npz path (on every rank)."""
    rank, world_size, device = common.setup_distributed(cfg)
    logger = common.create_logger(None, rank)

    # Load the model, the sampling diffusion and the VAE:
    model = common.load_model_for_sampling(cfg, device, logger.info)
    diffusion = common.sampling_diffusion(cfg)
    vae = common.load_vae(cfg, device) if cfg.data.name != "digits" else None
    channels, size = config.in_channels(cfg), config.input_size(cfg)

    folder = sample_folder(cfg)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        logger.info(f"Sampling {cfg.eval.num_fid_samples} images into {folder}.npz")
    common.barrier()

    # This rank's share: samples rank, rank + W, rank + 2W, ... (exactly N over all ranks).
    mine = np.arange(rank, cfg.eval.num_fid_samples, world_size)
    n = cfg.eval.per_proc_batch_size
    generator = torch.Generator(device).manual_seed(cfg.general.global_seed * world_size + rank)
    images, labels = [], []
    for start in tqdm(range(0, len(mine), n), disable=None if rank == 0 else True, dynamic_ncols=True):
        indices = mine[start : start + n]
        z = torch.randn(len(indices), channels, size, size, generator=generator, device=device)
        y = torch.randint(0, cfg.data.num_classes, (len(indices),), generator=generator, device=device)
        batch = common.to_images(common.sample(model, diffusion, z, y, cfg, generator), cfg, vae)
        images.append(batch)
        labels.append(y.cpu().numpy())
        if cfg.eval.save_png:
            for i, image in zip(indices, batch, strict=True):
                Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"))
    images = np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    np.savez(
        os.path.join(folder, f"part-{rank:05d}-of-{world_size:05d}.npz"), images=images, labels=labels, indices=mine
    )

    # Make sure every rank has written its part before rank 0 assembles the .npz:
    common.barrier()
    path = f"{folder}.npz"
    if rank == 0:
        path, shape = assemble_npz(folder, world_size, cfg.eval.num_fid_samples)
        logger.info(f"Saved .npz file to {path} [shape={shape}]")
    common.barrier()
    common.cleanup()
    return path


if __name__ == "__main__":
    config.run(main)
