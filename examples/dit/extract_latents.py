"""
Encode an ImageFolder with the VAE once, so training reads latents instead of images (as fast-DiT).

    torchrun --nproc_per_node=8 extract_latents.py general.data_path=<IMAGENET/train> general.vae=ema
    torchrun --nproc_per_node=8 train.py general.data_path=<IMAGENET/train>-latents-256-ema ...

For every image (ADM center crop) and its horizontal flip, the VAE posterior's mean and std are
stored (float16), so training still flips at random and samples z ~ N(mean, std) each step, exactly
as when it encodes images itself, without running the encoder. ImageNet-1k at 256x256 takes about
42 GB. The output is general.latents_dir (default <data_path>-latents-<image_size>-<vae>): safetensors
shards of SHARD_SIZE samples and an index, latents.json, written last.
"""

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import common
import config
from data import ImageFolderDataset, write_latents_index, write_latents_shard

SHARD_SIZE = 8192


def latents_dir(cfg):
    """The output folder: general.latents_dir, else <data_path>-latents-<image_size>-<vae>."""
    if cfg.general.latents_dir is not None:
        return cfg.general.latents_dir
    vae = os.path.basename(os.path.normpath(cfg.general.vae))
    return f"{os.path.normpath(cfg.general.data_path)}-latents-{cfg.general.image_size}-{vae}"


@torch.no_grad()
def encode_moments(vae, x):
    """(B, 3, S, S) images -> (B, 2, 2, C, s, s): [image, flipped image] x [posterior mean, std]."""
    out = []
    for images in (x, x.flip(-1)):
        posterior = vae.encode(images).latent_dist
        out.append(torch.stack([posterior.mean, posterior.std], dim=1))
    return torch.stack(out, dim=1).float()


def main(cfg):
    """Write the latents folder; returns its path."""
    rank, world_size, device = common.setup_distributed(cfg)
    if cfg.data.name != "ImageNet" or cfg.general.data_path is None:
        raise config.ConfigError("extract_latents.py needs data=ImageNet and general.data_path=<an ImageFolder root>")
    out_dir = latents_dir(cfg)
    dataset = ImageFolderDataset(cfg.general.data_path, cfg.general.image_size)
    vae = common.load_vae(cfg, device)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        print(f"Encoding {len(dataset):,} images of {cfg.general.data_path} into {out_dir}")
    common.barrier()

    # This rank's images: rank, rank + W, ...; written in shards of SHARD_SIZE samples.
    mine = Subset(dataset, range(rank, len(dataset), world_size))
    batch_size = max(1, cfg.general.global_batch_size // world_size)
    loader = DataLoader(
        mine,
        batch_size=batch_size,
        shuffle=False,
        num_workers=cfg.general.num_workers,
        pin_memory=device.type == "cuda",
    )
    shards, moments, labels = [], [], []

    def flush():
        name = f"rank{rank:04d}-{len(shards):05d}.safetensors"
        write_latents_shard(os.path.join(out_dir, name), torch.cat(moments), torch.cat(labels))
        shards.append({"file": name, "count": sum(len(m) for m in moments)})
        moments.clear()
        labels.clear()

    for x, y in tqdm(loader, disable=None if rank == 0 else True, dynamic_ncols=True):
        moments.append(encode_moments(vae, x.to(device)).cpu())
        labels.append(y)
        if sum(len(m) for m in moments) >= SHARD_SIZE:
            flush()
    if moments:
        flush()

    # Every rank's shards go into one index, written by rank 0 when all are done:
    all_shards = [shards]
    if dist.is_initialized():
        all_shards = [None] * world_size
        dist.all_gather_object(all_shards, shards)
    if rank == 0:
        channels, factor = config.vae_geometry(cfg)
        meta = {
            "image_size": cfg.general.image_size,
            "vae": os.path.basename(os.path.normpath(cfg.general.vae)),
            "scaling_factor": common.vae_scaling_factor(vae),
            "latent_channels": channels,
            "latent_size": cfg.general.image_size // factor,
            "classes": dataset.classes,
            "source": os.path.abspath(cfg.general.data_path),
        }
        write_latents_index(out_dir, [s for rank_shards in all_shards for s in rank_shards], meta)
        print(f"Saved latents of {len(dataset):,} images to {out_dir}; train with general.data_path={out_dir}")
    common.barrier()
    common.cleanup()
    return out_dir


if __name__ == "__main__":
    config.run(main)
