"""train.py of the recipe: torchrun (2 processes, gloo) against the reference step, exact resume (2 processes, and
through a VAE built from its config), precomputed latents, gradient checkpointing, random routing. CPU only, no
download."""

import os

import numpy as np
import pytest
import torch

import config
import models
import runs
import train
from recipe_helpers import (
    DIGITS,
    TINY,
    assert_same_training_state,
    load,
    make_image_folder,
    run_script,
    write_tiny_vae,
)
from recipe_reference import REFERENCE_KEYS, assert_matches_reference, reference


@pytest.mark.slow
def test_torchrun_digits_matches_the_reference(tmp_path):
    """Two gloo processes, Min-SNR and DTR with a non-default alpha and task count: the checkpoint holds the
    reference's weights, EMA and optimizer state (gradients averaged over the ranks, each rank its own data,
    timesteps, noise and label dropout), loads with weights_only=True, and the log and tensorboard say so."""
    args = [
        *REFERENCE_KEYS,
        "general.global_batch_size=16",
        "general.loss_weight_type=min_snr_3",
        "models.routing.sharing_ratio=0.75",
        "logs.log_every=2",
        "logs.ckpt_every=100",
        "logs.tensorboard=true",
    ]
    run_script("train.py", args, tmp_path, nproc=2)
    exp = tmp_path / "res" / "DiT-T-2" / "000"
    ckpt = load(exp / "checkpoints" / "0000004.pt")
    assert set(ckpt) == {*runs.CONTENTS, "digest"} and len(ckpt["rng"]) == 2
    assert not any("mask" in k or "rout" in k for k in ckpt["model"])  # routing adds no state
    ref = reference("min_snr_3", 0.75, world_size=2, batch=16)
    assert_matches_reference(ckpt, ref)
    log = (exp / "log.txt").read_text()
    assert "2 process(es)" in log and "DTR routing" in log
    lines = [line for line in log.splitlines() if "Train Loss" in line]
    assert "(step=0000002, epoch=0) Train Loss: " in lines[0] and "(step=0000004, epoch=0) Train Loss: " in lines[1]
    ref_loss = sum(ref.losses[2:]) / 2  # the ranks' mean loss over steps 3 and 4
    assert float(lines[1].split("Train Loss: ")[1].split(",")[0]) == pytest.approx(ref_loss, abs=2e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(exp / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/steps_per_sec"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [
        (2, pytest.approx(2e-3)),
        (4, pytest.approx(2e-3)),
    ]
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert norms == pytest.approx([sum(ref.grad_norms[:2]) / 2, sum(ref.grad_norms[2:]) / 2], abs=2e-4)
    assert not list((exp / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_torchrun_uw_matches_the_reference_and_resumes_exactly(tmp_path):
    """ANT-UW on two gloo processes, 2 steps per epoch (global batch 600): the checkpoint holds the reference's
    state (the log-variances' gradients averaged over the ranks too), and a run resumed from step 3 (crossing
    the epoch boundary at step 4) ends with the uninterrupted run's exact state, in the same folder."""
    args = [
        *REFERENCE_KEYS,
        "general.global_batch_size=600",
        "general.loss_weight_type=uw",
        "models.routing.sharing_ratio=0.75",
        "general.iterations=5",
        "logs.ckpt_every=3",
    ]
    run_script("train.py", args, tmp_path, nproc=2)
    run = tmp_path / "res" / "DiT-T-2" / "000"
    assert sorted(os.listdir(run / "checkpoints")) == ["0000003.pt", "0000005.pt"]
    uninterrupted = load(run / "checkpoints" / "0000005.pt")
    assert_matches_reference(uninterrupted, reference("uw", 0.75, steps=5, world_size=2, batch=600))
    log = (run / "log.txt").read_text()
    assert "Dataset: 1,797 samples (pixels), 2 steps per epoch" in log and "(step=0000005, epoch=2)" in log

    os.rename(run / "checkpoints" / "0000005.pt", tmp_path / "uninterrupted.pt")  # as if stopped after step 3
    run_script("train.py", [*args, f"general.resume={run / 'checkpoints' / '0000003.pt'}"], tmp_path, nproc=2)
    assert_same_training_state(load(run / "checkpoints" / "0000005.pt"), uninterrupted)
    assert not (tmp_path / "res" / "DiT-T-2" / "001").exists()  # the resumed run continues in its folder


def test_images_through_the_vae_resume_exactly(tmp_path, monkeypatch):
    """ImageFolder -> tiny AutoencoderKL (from its config) -> DiT with ANT-UW: a run resumed from step 3
    (crossing an epoch boundary at step 5) ends with the uninterrupted run's exact state: the data order,
    flips and latent samples continue as well as the timesteps and noise."""
    monkeypatch.chdir(tmp_path)
    make_image_folder("imgs", per_class=10)
    write_tiny_vae(tmp_path)
    keys = ["general.data_path=imgs", "general.vae_config=vae.json", "general.image_size=32", "data.num_classes=2"]
    keys += [*TINY, "general.global_batch_size=4", "general.iterations=6", "logs.ckpt_every=3"]
    keys += ["general.loss_weight_type=uw", "logs.results_dir=res"]
    first = train.main(config.load(keys))
    uninterrupted = load(first["checkpoint"])
    with open(os.path.join(first["experiment_dir"], "log.txt")) as f:
        assert "Dataset: 20 samples (images), 5 steps per epoch" in f.read()
    os.remove(first["checkpoint"])  # as if the run had stopped after step 3
    resumed = train.main(config.load([*keys, f"general.resume={first['experiment_dir']}/checkpoints/0000003.pt"]))
    assert resumed["checkpoint"] == first["checkpoint"]
    assert_same_training_state(load(resumed["checkpoint"]), uninterrupted)


@pytest.mark.parametrize("path", ["ddpm", "flow"])
def test_resume_is_exact_in_one_process(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    base = [
        *DIGITS,
        f"general.path={path}",
        "general.global_batch_size=8",
        "logs.log_every=100",
        "logs.results_dir=res",
        "general.iterations=6",
        "logs.ckpt_every=3",
    ]
    first = train.main(config.load(base))
    uninterrupted = load(first["checkpoint"])
    os.remove(first["checkpoint"])  # as if the run had stopped after step 3
    resumed = train.main(config.load([*base, f"general.resume={first['experiment_dir']}/checkpoints/0000003.pt"]))
    assert resumed["experiment_dir"] == first["experiment_dir"] and resumed["step"] == 6
    assert_same_training_state(load(resumed["checkpoint"]), uninterrupted)
    # log_every=100 > the run: its last step is logged anyway, with the gradient norm and the lr beside the loss.
    with open(os.path.join(first["experiment_dir"], "log.txt")) as f:
        log = f.read()
    assert log.count("(step=0000006, epoch=0) Train Loss: ") == 2 and log.count("LR: 0.002, ") == 2
    norms = [float(line.split("Grad Norm: ")[1].split(",")[0]) for line in log.splitlines() if "Grad Norm: " in line]
    assert len(norms) == 2 and all(0 < n < 1e3 for n in norms)  # steps 1-6, then 4-6


def test_resume_refuses_other_model_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [*DIGITS, "general.global_batch_size=8", "logs.results_dir=res", "general.iterations=1"]
    out = train.main(config.load(base))
    with pytest.raises(config.ConfigError, match="models.routing.sharing_ratio=0.8"):
        train.main(config.load([*base, "models.routing.sharing_ratio=1.0", f"general.resume={out['checkpoint']}"]))


def test_train_on_precomputed_latents(tmp_path, monkeypatch):
    import extract_latents

    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "imgs"), per_class=4)
    write_tiny_vae(tmp_path)
    keys = [
        "general.vae_config=vae.json",
        "general.image_size=32",
        "data.num_classes=2",
        *TINY,
        "general.global_batch_size=4",
        "logs.results_dir=res",
        "logs.log_every=1",
    ]
    latents = extract_latents.main(config.load(["general.data_path=imgs", *keys]))
    out = train.main(config.load([f"general.data_path={latents}", *keys, "general.iterations=3"]))
    ckpt = load(out["checkpoint"])
    assert ckpt["step"] == 3 and np.isfinite(out["loss"])
    with open(os.path.join(out["experiment_dir"], "log.txt")) as f:
        assert "(latents)" in f.read()


def test_corrupt_image_stops_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "imgs"), per_class=2)
    with open(tmp_path / "imgs" / "class0" / "truncated.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
    write_tiny_vae(tmp_path)
    cfg = config.load(
        [
            "general.data_path=imgs",
            "general.vae_config=vae.json",
            "general.image_size=32",
            "data.num_classes=2",
            *TINY,
            "general.global_batch_size=5",
            "general.iterations=2",
            "logs.results_dir=res",
        ]
    )
    with pytest.raises(RuntimeError, match="cannot read image .*truncated.png"):
        train.main(cfg)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, monkeypatch):
    """With general.grad_checkpoint=true every block runs twice per step, in train mode (forward, then again in
    the backward pass: counted by its attention, which routing leaves alone), and training ends in the same
    state as without: same weights, EMA, optimizer and random states, with label dropout on."""
    monkeypatch.chdir(tmp_path)
    calls = []
    forward = models.Attention.forward

    def counted(self, *args, **kwargs):
        calls.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(models.Attention, "forward", counted)
    base = [
        *DIGITS,
        "general.global_batch_size=8",
        "logs.results_dir=res",
        "general.iterations=3",
        "models.class_dropout_prob=0.5",
    ]
    plain = load(train.main(config.load(base))["checkpoint"])
    assert calls == [True] * 3 * 2  # 3 steps x 2 blocks, in train mode
    calls.clear()
    checkpointed = load(train.main(config.load([*base, "general.grad_checkpoint=true"]))["checkpoint"])
    assert calls == [True] * 2 * 3 * 2  # each block once more, in the backward pass
    assert_same_training_state(plain, checkpointed)


def test_random_routing_follows_its_seed(tmp_path, monkeypatch):
    """models.routing.init_method=random (the paper's R-TR baseline) draws its masks from models.routing.seed."""
    monkeypatch.chdir(tmp_path)
    base = [
        *DIGITS,
        "general.global_batch_size=8",
        "logs.results_dir=res",
        "general.iterations=2",
        "models.routing.init_method=random",
    ]
    outs = [train.main(config.load([*base, f"models.routing.seed={seed}"])) for seed in (0, 0, 1)]
    a, b, c = (load(r["checkpoint"])["model"] for r in outs)
    with open(os.path.join(outs[0]["experiment_dir"], "log.txt")) as f:
        assert "method=random" in f.read()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
