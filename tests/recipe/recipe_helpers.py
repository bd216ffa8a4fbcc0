"""Helpers shared by the recipe's tests: tiny keys, a tiny VAE, image folders, running the scripts, comparing states."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

EXAMPLES_DIT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "dit"
)
# A 2-block, width-32 DiT on the CPU: a training step takes milliseconds.
TINY = ["models.name=DiT-T/2", "models.depth=2", "models.hidden_size=32", "general.num_workers=0", "general.device=cpu"]
DIGITS = ["data=digits", *TINY]

# A diffusers AutoencoderKL config small enough for CPU tests (built from config: no download).
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}


def write_tiny_vae(folder):
    """TINY_VAE as folder/vae.json (general.vae_config); returns its path."""
    path = os.path.join(folder, "vae.json")
    with open(path, "w") as f:
        json.dump(TINY_VAE, f)
    return path


def make_image_folder(root, classes=2, per_class=5, seed=0):
    """An ImageFolder tree root/class<c>/<i>.png of random RGB images of random sizes (30-69 px)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(30, 70, size=2)
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            image.save(os.path.join(root, f"class{c}", f"{i}.png"))
    return root


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a, b):
    """Two train.py checkpoints hold the same step, weights, EMA, UW, optimizer state and random states, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    if a["uw"] is not None:
        assert torch.equal(a["uw"]["log_vars"], b["uw"]["log_vars"])
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values(), strict=True):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f"optimizer state {name} differs"
    assert len(a["rng"]) == len(b["rng"])
    for ra, rb in zip(a["rng"], b["rng"], strict=True):
        assert torch.equal(ra["generator"], rb["generator"]) and torch.equal(ra["cpu"], rb["cpu"])


@contextlib.contextmanager
def working_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(entry, argv, cwd=None):
    """(exit code, stderr) of a script's command line run in this process, e.g. run_cli(train.cli, [...]).

    Exits as Python's would: sys.exit("message") prints the message and exits 1, sys.exit(None) exits 0.
    """
    err = io.StringIO()
    with contextlib.redirect_stderr(err), working_dir(cwd or os.getcwd()):
        try:
            entry(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
            code = code or 0
    return code, err.getvalue()


def assert_one_line_error(code, stderr, *names, exit_code=2):
    """Exit code 2 and one line, `config error: ...`, naming each of names."""
    assert code == exit_code, (code, stderr[-2000:])
    lines = stderr.strip().splitlines()
    prefix = "config error: " if exit_code == 2 else "error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def run_script(script, args, cwd, nproc=None, check=True, timeout=300):
    """A recipe script in a subprocess: `python script`, or under torchrun with nproc processes (gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(os.path.join(cwd, "cache")))
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, os.path.join(EXAMPLES_DIT, script), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{script} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def flip_bit(path, tensor, index=3, bit=0):
    """Flip one bit of one element of `tensor` where the file stores it (found by its bytes; they must be unique).

    bit 0 of a float32 is its lowest mantissa bit: the weight changes by about 1e-7 of itself, a corruption that
    nothing but a digest notices.
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    pattern = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert data.count(pattern) == 1, "the tensor's bytes are not unique in the file"
    offset = data.find(pattern) + index * tensor.element_size()
    data[offset] ^= 1 << bit
    with open(path, "wb") as f:
        f.write(data)
