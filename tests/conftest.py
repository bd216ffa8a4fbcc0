"""Shared test set-up: the DiT recipe in examples/dit is imported the way its scripts import it."""

import os
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIT = os.path.join(ROOT, "examples", "dit")
if EXAMPLES_DIT not in sys.path:
    sys.path.insert(0, EXAMPLES_DIT)

# Two cores: keep intra-op threads fixed so timings and results do not depend on the host.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are deselected, not skipped, without a GPU: a CPU run neither runs nor counts them."""
    if torch.cuda.is_available():
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


# A diffusers AutoencoderKL config small enough for CPU tests (built from config: no download).
TINY_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
    "sample_size": 32, "scaling_factor": 0.18215,
}


def make_image_folder(root, classes=2, per_class=5, seed=0):
    """An ImageFolder tree root/class<c>/<i>.png of random RGB images of random sizes (30-69 px)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(30, 70, size=2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, f"class{c}", f"{i}.png"))
    return root


def assert_same_training_state(a, b):
    """Two train.py checkpoints hold the same step, weights, EMA, UW, optimizer state and random states, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    if a["uw"] is not None:
        assert torch.equal(a["uw"]["log_vars"], b["uw"]["log_vars"])
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f"optimizer state {name} differs"
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["generator"], rb["generator"]) and torch.equal(ra["cpu"], rb["cpu"])
