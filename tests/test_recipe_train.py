"""train.py of the recipe: torchrun (2 processes, gloo) on digits and on an ImageFolder through a VAE
built from its config, exact resume, precomputed latents. CPU only, no download."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import train
from conftest import TINY_VAE, assert_same_training_state, make_image_folder

EXAMPLES_DIT = os.path.dirname(os.path.abspath(config.__file__))
TINY = ["models.name=DiT-T/2", "models.depth=2", "models.hidden_size=32", "general.num_workers=0", "general.device=cpu"]


def torchrun(script, args, cwd, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(cwd / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(EXAMPLES_DIT, script), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_torchrun_digits(tmp_path):
    """Two gloo processes on digits: the checkpoint holds everything, loads with weights_only=True."""
    args = ["data=digits", *TINY, "general.iterations=4", "general.global_batch_size=16", "logs.log_every=2",
            "logs.ckpt_every=100", "logs.results_dir=res", "general.loss_weight_type=min_snr_5",
            "models.routing.init_method=random", "logs.tensorboard=true"]
    torchrun("train.py", args, tmp_path)
    exp = tmp_path / "res" / "DiT-T-2" / "000"
    ckpt = load(exp / "checkpoints" / "0000004.pt")
    assert set(ckpt) == {"model", "ema", "opt", "uw", "config", "step", "rng"}
    assert ckpt["step"] == 4 and ckpt["uw"] is None and len(ckpt["rng"]) == 2
    assert ckpt["config"]["general"]["loss_weight_type"] == "min_snr_5"
    assert ckpt["model"].keys() == ckpt["ema"].keys()
    assert not any("mask" in k or "rout" in k for k in ckpt["model"])  # routing adds no state
    assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], ckpt["ema"]["blocks.0.attn.qkv.weight"])
    log = (exp / "log.txt").read_text()
    assert "2 process(es)" in log and "DTR routing" in log and "method=random" in log
    assert "(step=0000002, epoch=0) Train Loss: " in log and "(step=0000004, epoch=0) Train Loss: " in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(exp / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/steps_per_sec"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(2, pytest.approx(2e-3)), (4, pytest.approx(2e-3))]
    assert all(0 < e.value < 1e3 for e in events.Scalars("train/grad_norm"))
    assert not list((exp / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_torchrun_image_folder_uw_resumes_exactly(tmp_path):
    """ImageFolder -> tiny AutoencoderKL (from its config) -> DiT with ANT-UW on 2 processes; a run resumed
    from step 3 (crossing an epoch boundary at step 5) ends with the uninterrupted run's exact state."""
    make_image_folder(str(tmp_path / "imgs"), per_class=10)
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    args = ["general.data_path=imgs", "general.vae_config=vae.json", "general.image_size=32", "data.num_classes=2",
            *TINY, "general.global_batch_size=4", "general.iterations=8", "logs.ckpt_every=3", "logs.log_every=2",
            "general.loss_weight_type=uw", "logs.results_dir=res"]
    torchrun("train.py", args, tmp_path)
    ckpts = tmp_path / "res" / "DiT-T-2" / "000" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["0000003.pt", "0000006.pt", "0000008.pt"]
    uninterrupted = load(ckpts / "0000008.pt")
    assert uninterrupted["uw"]["log_vars"].shape == (8,)
    assert "Dataset: 20 samples (images), 5 steps per epoch" in (tmp_path / "res" / "DiT-T-2" / "000" / "log.txt").read_text()

    os.rename(ckpts / "0000008.pt", tmp_path / "uninterrupted.pt")  # as if the run had stopped after step 3
    os.remove(ckpts / "0000006.pt")
    torchrun("train.py", [*args, f"general.resume={ckpts / '0000003.pt'}"], tmp_path)
    assert_same_training_state(load(ckpts / "0000008.pt"), uninterrupted)
    assert not (tmp_path / "res" / "DiT-T-2" / "001").exists()  # the resumed run continues in its folder


def test_resume_is_exact_in_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["data=digits", *TINY, "general.global_batch_size=8", "logs.log_every=100", "logs.results_dir=res",
            "general.iterations=6", "logs.ckpt_every=3"]
    first = train.main(config.load(base))
    uninterrupted = load(first["checkpoint"])
    os.remove(first["checkpoint"])  # as if the run had stopped after step 3
    resumed = train.main(config.load([*base, f"general.resume={first['experiment_dir']}/checkpoints/0000003.pt"]))
    assert resumed["experiment_dir"] == first["experiment_dir"] and resumed["step"] == 6
    assert_same_training_state(load(resumed["checkpoint"]), uninterrupted)
    # log_every=100 > the run: its last step is logged anyway, with the gradient norm and the lr beside the loss.
    log = open(os.path.join(first["experiment_dir"], "log.txt")).read()
    assert log.count("(step=0000006, epoch=0) Train Loss: ") == 2 and log.count("LR: 0.002, ") == 2
    norms = [float(line.split("Grad Norm: ")[1].split(",")[0]) for line in log.splitlines() if "Grad Norm: " in line]
    assert len(norms) == 2 and all(0 < n < 1e3 for n in norms)  # steps 1-6, then 4-6


def test_resume_refuses_other_model_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["data=digits", *TINY, "general.global_batch_size=8", "logs.results_dir=res", "general.iterations=1"]
    out = train.main(config.load(base))
    with pytest.raises(config.ConfigError, match="models.routing.sharing_ratio=0.8"):
        train.main(config.load([*base, "models.routing.sharing_ratio=1.0", f"general.resume={out['checkpoint']}"]))


def test_train_on_precomputed_latents(tmp_path, monkeypatch):
    import extract_latents

    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "imgs"), per_class=4)
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    common = ["general.vae_config=vae.json", "general.image_size=32", "data.num_classes=2", *TINY,
              "general.global_batch_size=4", "logs.results_dir=res", "logs.log_every=1"]
    latents = extract_latents.main(config.load(["general.data_path=imgs", *common]))
    out = train.main(config.load([f"general.data_path={latents}", *common, "general.iterations=3"]))
    ckpt = load(out["checkpoint"])
    assert ckpt["step"] == 3 and np.isfinite(out["loss"])
    assert "(latents)" in open(os.path.join(out["experiment_dir"], "log.txt")).read()


def test_corrupt_image_stops_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "imgs"), per_class=2)
    with open(tmp_path / "imgs" / "class0" / "truncated.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    cfg = config.load(["general.data_path=imgs", "general.vae_config=vae.json", "general.image_size=32",
                       "data.num_classes=2", *TINY, "general.global_batch_size=5", "general.iterations=2",
                       "logs.results_dir=res"])
    with pytest.raises(RuntimeError, match="cannot read image .*truncated.png"):
        train.main(cfg)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["data=digits", *TINY, "general.global_batch_size=8", "logs.results_dir=res", "general.iterations=2"]
    plain = load(train.main(config.load(base))["checkpoint"])
    checkpointed = load(train.main(config.load([*base, "general.grad_checkpoint=true"]))["checkpoint"])
    assert_same_training_state(plain, checkpointed)
