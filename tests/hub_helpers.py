"""What tests/test_hub.py needs: tiny diffusers models, a routed model trained a few steps, the call that
compares outputs, and a Hugging Face cache holding a saved folder as a Hub repo (nothing is downloaded here).

The cache is laid out as huggingface_hub lays it out (``models--org--name/{blobs,refs,snapshots/<commit>}``,
snapshot files linking to content-addressed blobs, one file per ref holding a commit hash), so loading by repo
id offline (``HF_HUB_OFFLINE=1``) runs diffusers' and huggingface_hub's own resolution: refs, revisions,
subfolders.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

import dtr

INDEX_T = torch.tensor([0, 999, 500, 37])  # both ends of [0, T) and two inside


def perturbed(model, seed: int, scale: float = 0.1):
    """Random non-zero weights everywhere: zero-initialised output layers would hide what routing changes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def unet2d(seed: int = 0) -> UNet2DModel:
    """A 1-channel 8x8 UNet2DModel with an attention block: both routed kinds (ResNet and attention norms)."""
    torch.manual_seed(seed)
    return perturbed(
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        ),
        seed,
    )


def dit(seed: int = 0) -> DiTTransformer2DModel:
    """A 2-layer class-conditional DiTTransformer2DModel on 8x8 latents."""
    torch.manual_seed(seed)
    return perturbed(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        seed,
    )


def unet2d_call(model, t=INDEX_T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(len(t), 1, 8, 8, generator=g), t).sample


def dit_call(model, t=INDEX_T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(t), 4, 8, 8, generator=g)
    return model(x, timestep=t, class_labels=torch.arange(len(t)) % 10).sample


MODELS = {
    "UNet2DModel": (UNet2DModel, unet2d, unet2d_call),
    "DiTTransformer2DModel": (DiTTransformer2DModel, dit, dit_call),
}


def trained(make, call, steps: int = 3, **wrap_kwargs):
    """A routed model after a few SGD steps (weights no fresh model has), in eval mode, and its handle."""
    model = make().train()
    routing = dtr.wrap(model, **({"sharing_ratio": 0.5, "alpha": 2.0} | wrap_kwargs))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps):
        call(model, seed=10 + i).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), routing


def outputs(model, call) -> torch.Tensor:
    with torch.no_grad():
        return call(model.eval())


def publish(folder, cache_dir, repo_id: str, revision: str = "main") -> str:
    """Put the files of ``folder`` into ``cache_dir`` as commit ``revision`` of the Hub repo ``repo_id`` holds them
    (``revision`` is a branch name; the ref points to the new commit); returns the commit hash."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)
    contents = {rel: Path(folder, rel).read_bytes() for rel in files}
    commit = hashlib.sha1(
        repr((revision, sorted((k, hashlib.sha256(v).hexdigest()) for k, v in contents.items()))).encode()
    ).hexdigest()
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for rel, data in contents.items():
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        link = os.path.join(repo, "snapshots", commit, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(repo, "blobs", blob), os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit)
    return commit
