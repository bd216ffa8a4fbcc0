"""What tests/test_hub.py needs: the tiny diffusers models of helpers.py by class, a routed model trained a few
steps, the call that compares outputs, and a Hugging Face cache holding a saved folder as a Hub repo (nothing is
downloaded here).

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
from helpers import diffusers_dit, dit_call, unet2d, unet2d_call

import dtr

MODELS = {
    "UNet2DModel": (UNet2DModel, unet2d, unet2d_call),
    "DiTTransformer2DModel": (DiTTransformer2DModel, diffusers_dit, dit_call),
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
