"""The recipe's configuration (examples/dit/config.py): the paper code's keys, overrides, errors, paths."""

import os
import subprocess
import sys

import pytest

import config
import evaluate
import runs
import sample_ddp
import train
from config import ConfigError
from recipe_helpers import EXAMPLES_DIT


def test_defaults_are_the_papers():
    cfg = config.load([])
    assert cfg.data.name == "ImageNet" and cfg.data.num_classes == 1000
    assert cfg.general.iterations == 400_000 and cfg.general.global_batch_size == 256
    assert cfg.general.image_size == 256 and cfg.general.vae == "ema"
    assert cfg.general.loss_weight_type == "constant"
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.optim.ema_decay == 0.9999
    assert cfg.models.name == "DiT-L/2"
    assert dict(cfg.models.routing) == {
        "sharing_ratio": 0.8,
        "taskcount": 1000,
        "init_method": "DTR",
        "alpha": 4.0,
        "seed": 0,
        "task_axis": "linear",
    }
    assert cfg.eval.cfg_scale == 1.5 and cfg.eval.num_fid_samples == 50_000 and cfg.eval.num_sampling_steps == 250
    assert config.input_size(cfg) == 32 and config.in_channels(cfg) == 4
    assert config.architecture(cfg) == (24, 1024, 16, 2)


def test_paper_command_line():
    argv = [
        "general.data_path=/data/imagenet/train",
        "general.loss_weight_type=uw",
        "models.name=DiT-L/2",
        "models.routing.sharing_ratio=0.8",
        "eval.cfg_scale=1.5",
        "eval.num_fid_samples=50000",
    ]
    cfg = config.load(argv)
    assert cfg.general.data_path == "/data/imagenet/train" and cfg.general.loss_weight_type == "uw"
    assert cfg.logs.results_dir == "results/ImageNet/linear_scheduling/DTR_0.8_uw"
    assert cfg.eval.samples_dir == "samples/ImageNet/linear_scheduling/DTR_0.8_uw"
    assert (
        runs.checkpoint_path(cfg) == "results/ImageNet/linear_scheduling/DTR_0.8_uw/DiT-L-2/000/checkpoints/0400000.pt"
    )
    assert sample_ddp.sample_folder(cfg) == (
        "samples/ImageNet/linear_scheduling/DTR_0.8_uw/DiT-L-2/0400000-size-256-vae-ema-samples-50000-cfg-1.5-seed-0"
    )
    assert evaluate.sample_batch_path(cfg).endswith("-seed-0.npz")


def test_baseline_and_overrides():
    cfg = config.load(
        [
            "models.routing.sharing_ratio=1",
            "general.loss_weight_type=min_snr_5",
            "eval.ckpt_path.version=2",
            "eval.ckpt_path.iterations=50000",
        ]
    )
    assert cfg.models.routing.sharing_ratio == 1.0 and not config.is_routed(cfg)
    assert cfg.logs.results_dir.endswith("DTR_1.0_min_snr_5")
    assert runs.checkpoint_path(cfg).endswith("DiT-L-2/002/checkpoints/0050000.pt")
    cfg = config.load(
        ["eval.ckpt=/ckpts/x.pt", "eval.samples_dir=/s", "logs.results_dir=/r", "models.routing.init_method=random"]
    )
    assert runs.checkpoint_path(cfg) == "/ckpts/x.pt"
    assert sample_ddp.sample_folder(cfg).startswith("/s/DiT-L-2/x-size-256")
    assert runs.new_experiment_dir(runs.experiment_root(cfg)) == "/r/DiT-L-2/000"
    assert config.routing_method(cfg) == "random"


def test_flow_path_keys():
    """general.path=flow: SiT's default ODE solver (dopri5 at atol 1e-6, rtol 1e-3) unless eval.sampler says
    otherwise, the run folders of the same keys, the solver in the sample folder's name."""
    cfg = config.load(["general.path=flow", "general.loss_weight_type=uw"])
    assert config.is_flow(cfg) and cfg.eval.sampler == "dopri5" and (cfg.eval.atol, cfg.eval.rtol) == (1e-6, 1e-3)
    assert runs.checkpoint_path(cfg).endswith("DTR_0.8_uw/DiT-L-2/000/checkpoints/0400000.pt")
    assert sample_ddp.sample_folder(cfg).endswith("samples-50000-cfg-1.5-dopri5-1e-06-0.001-seed-0")
    cfg = config.load(["general.path=flow", "eval.sampler=heun2", "eval.num_sampling_steps=51"])
    assert sample_ddp.sample_folder(cfg).endswith("samples-50000-cfg-1.5-heun2-51-seed-0")
    assert config.load([]).eval.sampler == "ddpm" and not config.is_flow(config.load([]))


def test_digits_preset():
    cfg = config.load(["data=digits"])
    assert cfg.data.name == "digits" and cfg.data.num_classes == 10 and cfg.general.image_size == 8
    assert config.in_channels(cfg) == 1 and config.input_size(cfg) == 8
    assert config.architecture(cfg) == (4, 64, 4, 2)
    assert cfg.logs.results_dir == "results/digits/linear_scheduling/DTR_0.8_constant"
    assert 300 // cfg.logs.log_every >= 3  # a 300-step run shows its loss
    cfg = config.load(["data=digits", "models.depth=2", "models.hidden_size=32"])
    assert config.architecture(cfg) == (2, 32, 4, 2)


def test_new_experiment_dir_counts_up(tmp_path):
    root = runs.experiment_root(config.load([f"logs.results_dir={tmp_path}"]))
    assert root == str(tmp_path / "DiT-L-2")
    assert runs.new_experiment_dir(root).endswith("DiT-L-2/000")
    os.makedirs(runs.new_experiment_dir(root))
    assert runs.new_experiment_dir(root).endswith("DiT-L-2/001")


@pytest.mark.parametrize(
    "argv, names",
    [
        (["models.nmae=DiT-L/2"], ["models.nmae", "models.name"]),
        (["general.loss_weight_type=foo"], ["general.loss_weight_type", "min_snr_<gamma>", "uw"]),
        (["models.routing.sharing_ratio=abc"], ["models.routing.sharing_ratio"]),
        (["models.routing.sharing_ratio=0"], ["models.routing.sharing_ratio", "(0, 1]"]),
        (["models.routing.sharing_ratio=1.5"], ["models.routing.sharing_ratio"]),
        (["models.routing.init_method=learned"], ["models.routing.init_method", "DTR", "random"]),
        (["models.routing.taskcount=10"], ["models.routing.taskcount", "1000"]),
        (["models.name=DiT-Q/2"], ["models.name", "DiT-XL/2"]),
        (["data=cifar"], ["data=", "ImageNet", "digits"]),
        (["general.schedule_name=sigmoid"], ["general.schedule_name", "linear", "cosine"]),
        (["general.vae=foo"], ["general.vae", "ema", "mse"]),
        (["general.image_size=100"], ["general.image_size"]),
        (["general.iterations=0"], ["general.iterations"]),
        (["eval.cfg_scale=0.5"], ["eval.cfg_scale"]),
        (["eval.sampler=euler"], ["eval.sampler", "ddpm", "ddim"]),
        (["eval.sampler=rk4"], ["eval.sampler", "ddim", "heun2", "dopri5"]),
        (["general.path=sde"], ["general.path", "ddpm", "flow"]),
        (["general.path=flow", "eval.sampler=ddim"], ["eval.sampler", "general.path=flow", "euler", "heun2", "dopri5"]),
        (["general.path=flow", "eval.sampler=euler", "eval.num_sampling_steps=1"], ["eval.num_sampling_steps", ">= 2"]),
        (["general.path=flow", "general.schedule_name=cosine"], ["general.schedule_name", "general.path=flow"]),
        (["eval.atol=0"], ["eval.atol"]),
        (["flow.density=logit_normal"], ["flow.density", "general.path=flow"]),
        (["models.routing.task_axis=logsnr"], ["models.routing.task_axis", "general.path=flow"]),
        (["models.routing.task_axis=cubic"], ["models.routing.task_axis", "linear", "logsnr"]),
        (["flow.density=beta"], ["flow.density", "uniform", "logit_normal", "mode"]),
        (["general.path=flow", "flow.logit_std=0.5"], ["flow.logit_std", "flow.density=logit_normal"]),
        (["general.path=flow", "flow.density=logit_normal", "flow.mode_scale=1"], ["flow.mode_scale", "mode"]),
        (["general.path=flow", "flow.density=mode", "flow.mode_scale=2"], ["flow.mode_scale", "[-1, 1.75194]"]),
        (["general.path=flow", "flow.density=logit_normal", "flow.logit_std=0"], ["flow.logit_std", "> 0"]),
        (["general.path=flow", "flow.shift=-1"], ["flow.shift"]),
        (["eval.rtol=-1"], ["eval.rtol"]),
        (["eval.num_sampling_steps=5000"], ["eval.num_sampling_steps"]),
        (["optim.ema_decay=1.0"], ["optim.ema_decay"]),
        (["models.num_heads=5"], ["models.hidden_size", "models.num_heads"]),
        (["models.routing=1"], ["models.routing", "models.routing.sharing_ratio"]),
        (["foo=1"], ["foo", "general"]),
        (["general.iterations"], ["key=value"]),
        (["+general.new=1"], ["+key"]),
        (["data=digits", "general.image_size=16"], ["general.image_size", "8"]),
    ],
)
def test_config_errors_name_the_key(argv, names):
    with pytest.raises(ConfigError) as info:
        config.load(argv)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_cli_exits_2_with_the_message():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES_DIT, "train.py"), "models.nmae=DiT-L/2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    assert "models.nmae" in r.stderr and "models.name" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_needs_data_path(tmp_path):
    cfg = config.load([f"logs.results_dir={tmp_path}", "models.name=DiT-T/2", "general.device=cpu"])
    with pytest.raises(ConfigError, match="general.data_path"):
        train.main(cfg)


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as stop:
        config.run(sample_ddp.main, ["data=digits", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "loss_weight_type: constant" in out and "num_fid_samples: 50000" in out


def test_reproduce_script_commands(tmp_path):
    """reproduce.sh's dry run: the six rows, each trained, sampled and evaluated with the paper's keys."""
    env = dict(
        os.environ,
        DRY_RUN="1",
        DATA="/data/imagenet/train",
        REF=str(tmp_path / "ref.npz"),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    (tmp_path / "ref.npz").write_bytes(b"")
    r = subprocess.run(
        ["bash", os.path.join(EXAMPLES_DIT, "reproduce.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("extract_latents.py general.data_path=/data/imagenet/train" in line for line in lines) == 1
    for weighting in ("constant", "min_snr_5", "uw"):
        for ratio in ("1.0", "0.8"):
            keys = f"general.loss_weight_type={weighting} models.name=DiT-L/2 models.routing.sharing_ratio={ratio}"
            train_lines = [line for line in lines if "train.py" in line and keys in line]
            assert len(train_lines) == 1 and "torchrun --nnodes=1 --nproc_per_node=8" in train_lines[0]
            assert "general.data_path=/data/imagenet/train-latents-256-ema" in train_lines[0]
            sample_lines = [line for line in lines if "sample_ddp.py" in line and keys in line]
            assert (
                len(sample_lines) == 1
                and "eval.cfg_scale=1.5 eval.num_fid_samples=50000 eval.num_sampling_steps=250" in sample_lines[0]
            )
            assert sum("evaluate.py" in line and keys in line for line in lines) == 1
