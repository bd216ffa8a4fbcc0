"""train.py as a demanding user runs it (its command line, in this process; digits, a few steps each): a run never
overwrites or silently changes another run; bad numbers and bad checkpoints stop it with exit code 2 before
anything is written; a corrupted checkpoint (one flipped bit) is refused by resume and by sampling; a loss that
turns NaN stops it (exit 1) with the last good checkpoint intact; kill -9 then resume is exact."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import config
import runs
import sample
import sample_ddp
import train
from recipe_helpers import (
    DIGITS,
    EXAMPLES_DIT,
    assert_one_line_error,
    assert_same_training_state,
    flip_bit,
    load,
    run_cli,
    snapshot,
)

KEYS = [*DIGITS, "general.global_batch_size=8", "logs.results_dir=res", "logs.log_every=100"]
RUN = os.path.join("res", "DiT-T-2")


def train_py(cwd, *args):
    """train.py's command line with KEYS and args, run in cwd: (exit code, stderr)."""
    return run_cli(train.cli, [*KEYS, *args], cwd)


def sample_py(script, cwd, checkpoint, *args):
    """sample.py or sample_ddp.py's command line for a checkpoint of KEYS: (exit code, stderr)."""
    argv = [
        *KEYS,
        f"eval.ckpt={checkpoint}",
        "eval.num_fid_samples=2",
        "eval.num_sampling_steps=2",
        "eval.class_labels=[0,1]",
        "eval.samples_dir=samples",
        *args,
    ]
    return run_cli(lambda a: config.run(script.main, a), argv, cwd)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 5-step run with a checkpoint after every step: res/DiT-T-2/000/checkpoints/000000{1..5}.pt."""
    root = tmp_path_factory.mktemp("base")
    assert train_py(root, "general.iterations=5", "logs.ckpt_every=1")[0] == 0
    return root


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the base run to change."""
    shutil.copytree(base_run / "res", tmp_path / "res")
    return tmp_path


def ckpt(cwd, step, run="000"):
    return os.path.join(cwd, RUN, run, "checkpoints", f"{step:07d}.pt")


#################################################################################
#                         Folders: never another run's                          #
#################################################################################


def test_a_gap_in_the_numbering_is_never_filled(tmp_path):
    for name in ("000", "002"):
        os.makedirs(tmp_path / RUN / name)
    (tmp_path / RUN / "002" / "notes.txt").write_text("another run's work")
    assert train_py(tmp_path, "general.iterations=1")[0] == 0
    assert sorted(os.listdir(tmp_path / RUN)) == ["000", "002", "003"]
    assert os.listdir(tmp_path / RUN / "002") == ["notes.txt"] and not os.listdir(tmp_path / RUN / "000")
    assert load(tmp_path / RUN / "003" / "checkpoints" / "0000001.pt")["step"] == 1


def test_new_experiment_dir_follows_the_highest_index(tmp_path):
    root = str(tmp_path / "DiT-L-2")
    for name in ("000", "007", "notes", "01"):
        os.makedirs(os.path.join(root, name))
    assert runs.new_experiment_dir(root) == os.path.join(root, "008")
    os.makedirs(os.path.join(root, "1000"))
    assert runs.claim_experiment_dir(root) == os.path.join(root, "1001")
    assert os.path.isdir(os.path.join(root, "1001"))


def test_resume_from_an_early_checkpoint_is_refused_then_forks(run_copy, base_run):
    before = snapshot(run_copy / RUN / "000")
    code, err = train_py(run_copy, "general.iterations=8", f"general.resume={ckpt(run_copy, 2)}")
    assert_one_line_error(code, err, "0000002.pt", "0000003.pt", "0000004.pt", "0000005.pt", "general.fork=true")
    assert snapshot(run_copy / RUN / "000") == before and os.listdir(run_copy / RUN) == ["000"]

    # Forking: a new folder that says where it came from; the run forked from is untouched, byte for byte.
    code, _ = train_py(run_copy, "general.iterations=4", "general.fork=true", f"general.resume={ckpt(run_copy, 2)}")
    assert code == 0 and snapshot(run_copy / RUN / "000") == before
    fork = run_copy / RUN / "001"
    saved = OmegaConf.load(fork / "config.yaml")
    assert saved.general.fork is True and saved.general.resume == ckpt(run_copy, 2)
    assert f"Forked from {ckpt(run_copy, 2)} at step 2" in (fork / "log.txt").read_text()
    assert sorted(os.listdir(fork / "checkpoints")) == ["0000004.pt"]
    # With the same keys, the fork continues exactly as the original run did.
    assert_same_training_state(load(fork / "checkpoints" / "0000004.pt"), load(ckpt(base_run, 4)))


def test_keys_that_break_exactness_need_a_fork(run_copy):
    before = snapshot(run_copy / "res")
    code, err = train_py(
        run_copy,
        "general.iterations=6",
        "general.global_seed=1",
        "general.global_batch_size=16",
        f"general.resume={ckpt(run_copy, 5)}",
    )
    names = ("general.global_seed=0 (now 1)", "general.global_batch_size=8 (now 16)", "general.fork=true")
    assert_one_line_error(code, err, *names)
    assert snapshot(run_copy / "res") == before


def test_optim_keys_on_resume_are_applied_and_logged(run_copy, base_run):
    """Resumed after step 4 with half the lr: step 5 moves every weight by exactly half of what the original
    step 5 did (Adam's update is lr * m / (sqrt(v) + eps), the same m and v), and says so. (Every optim key
    against the reference step: test_recipe_step.py.)"""
    os.remove(ckpt(run_copy, 5))  # as if the run had stopped after step 4
    config_yaml = (run_copy / RUN / "000" / "config.yaml").read_bytes()
    code, _ = train_py(run_copy, "general.iterations=5", "optim.lr=0.001", f"general.resume={ckpt(run_copy, 4)}")
    assert code == 0
    w4, original, resumed = (load(p) for p in (ckpt(base_run, 4), ckpt(base_run, 5), ckpt(run_copy, 5)))
    assert resumed["opt"]["param_groups"][0]["lr"] == 0.001 == resumed["config"]["optim"]["lr"]
    assert original["opt"]["param_groups"][0]["lr"] == 0.002
    moved = 0
    for name, w in w4["model"].items():
        full, half = original["model"][name] - w, resumed["model"][name] - w
        torch.testing.assert_close(half, full / 2, rtol=1e-3, atol=1e-7)
        moved += int(full.abs().max() > 1e-4)
    assert moved > 10
    run = run_copy / RUN / "000"
    assert (run / "config.yaml").read_bytes() == config_yaml  # the run's config is never rewritten
    assert OmegaConf.load(run / "config-0000004.yaml").optim.lr == 0.001  # one per resumed segment
    log = (run / "log.txt").read_text()
    assert "optim.lr: 0.002 -> 0.001 from step 5 on" in log and "LR: 0.001, " in log


#################################################################################
#                   Bad numbers and bad checkpoints: exit 2, nothing written     #
#################################################################################


def test_a_non_finite_key_exits_2_before_anything_is_written(tmp_path):
    code, err = train_py(tmp_path, "general.iterations=1", "optim.lr=inf")
    assert_one_line_error(code, err, "optim.lr must be a finite number > 0, got inf")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "arg, message",
    [
        ("models.routing.alpha=nan", "models.routing.alpha must be a finite number > 0, got nan"),
        (
            "models.routing.sharing_ratio=0.02",
            "models.routing.sharing_ratio with models.hidden_size=32: .* leaves no active channel",
        ),
        ("general.global_batch_size=4096", "general.global_batch_size=4096 is larger than the data set"),
        ("general.fork=true", "general.fork=true needs general.resume"),
    ],
)
def test_config_errors_leave_nothing_on_disk(tmp_path, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match=message):
        train.main(config.load([*KEYS, arg]))
    assert os.listdir(tmp_path) == []


def numeric_keys(node, prefix=""):
    """Every int or float key of the schema, by walking the Config dataclass."""
    for name in node:
        key = f"{prefix}{name}"
        child = node._get_node(name)
        if OmegaConf.is_dict(child):
            yield from numeric_keys(child, key + ".")
        elif child._metadata.ref_type in (int, float):
            yield key


def test_every_numeric_key_has_a_range():
    keys = set(numeric_keys(OmegaConf.structured(config.Config)))
    assert keys == set(config.INT_RANGES) | set(config.FLOAT_RANGES)
    assert all(isinstance(OmegaConf.select(config.load([]), k), float) for k in config.FLOAT_RANGES)


@pytest.mark.parametrize("key", sorted(config.FLOAT_RANGES))
def test_non_finite_floats_are_refused(key):
    for value in ("inf", "-inf", "nan"):
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
            config.load([f"{key}={value}"])


@pytest.mark.parametrize("key", sorted(k for k, r in config.INT_RANGES.items() if r))
@settings(max_examples=2, deadline=None)
@given(below=st.integers(1, 10**6), above=st.integers(1, 10**6))
def test_ints_outside_their_range_are_refused(key, below, above):
    bounds = config.INT_RANGES[key]
    outside = [bounds["minimum"] - below] + ([bounds["maximum"] + above] if "maximum" in bounds else [])
    for value in outside:
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
            config.load([f"{key}={value}"])


def test_a_truncated_checkpoint_exits_2_naming_the_file(run_copy):
    bad = run_copy / "truncated.pt"
    with open(ckpt(run_copy, 5), "rb") as f:
        bad.write_bytes(f.read()[:20_000])
    before = snapshot(run_copy)
    code, err = train_py(run_copy, "general.iterations=6", f"general.resume={bad}")
    assert_one_line_error(code, err, f"cannot read checkpoint {bad} (", "expected a file written by train.py")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"cannot read checkpoint .*empty.pt \(EOFError"),
        (
            {"state_dict": {"weight": torch.zeros(3)}, "epoch": 3},
            "empty.pt is not a train.py checkpoint: it has no model, ema, opt, uw, config, step, rng",
        ),
        (torch.zeros(3), "empty.pt holds a Tensor, not a checkpoint"),
    ],
)
def test_empty_or_foreign_checkpoints_are_refused_naming_the_file(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "empty.pt"
    bad.write_bytes(b"") if content is None else torch.save(content, bad)
    with pytest.raises(config.ConfigError, match=message):
        train.main(config.load([*KEYS, f"general.resume={bad}"]))
    assert os.listdir(tmp_path) == ["empty.pt"]


@pytest.mark.parametrize("part", ["model", "ema"])
def test_a_flipped_bit_in_a_weight_is_refused_by_resume_and_by_sampling(run_copy, part):
    """One bit of one weight changed on disk (torch.load does not notice): resume, sample.py and sample_ddp.py
    stop with exit code 2 and one line naming the file and the entry, before writing anything."""
    path, name = ckpt(run_copy, 5), "blocks.0.attn.qkv.weight"
    weight = load(path)[part][name]
    flip_bit(path, weight)
    changed = load(path)[part][name] - weight  # torch.load reads the corrupted file without a word
    assert (changed != 0).sum() == 1 and 0 < changed.abs().max() < 1e-6 * weight.abs().max()
    before = snapshot(run_copy)
    code, err = train_py(run_copy, "general.iterations=6", f"general.resume={path}")
    assert_one_line_error(code, err, f"{path} is corrupt: the digest written with it does not match its {part} (")
    for script in (sample, sample_ddp):
        code, err = sample_py(script, run_copy, path)
        assert_one_line_error(code, err, f"{path} is corrupt: the digest written with it does not match its {part} (")
    assert snapshot(run_copy) == before


def test_a_checkpoint_without_a_digest_still_loads_with_a_note(run_copy, capsys):
    """A checkpoint written before checkpoints carried a digest resumes and samples, saying it was not verified."""
    path = ckpt(run_copy, 5)
    old = load(path)
    del old["digest"]
    torch.save(old, path)
    note = f"{path} has no digest (written before checkpoints carried one): loaded without an integrity check"
    code, _ = train_py(run_copy, "general.iterations=6", f"general.resume={path}")
    assert code == 0 and note in (run_copy / RUN / "000" / "log.txt").read_text()
    assert runs.verify(load(ckpt(run_copy, 6)), "new") is None  # the resumed run's checkpoints have one again
    capsys.readouterr()
    assert sample_py(sample, run_copy, path)[0] == 0
    assert note in capsys.readouterr().out


def test_a_checkpoint_from_before_general_path_is_a_ddpm_one(run_copy):
    """A checkpoint whose config has no general.path (written before the flow path) samples and resumes as DDPM,
    and is refused for general.path=flow, naming the key."""
    path = ckpt(run_copy, 5)
    old = load(path)
    del old["config"]["general"]["path"], old["digest"]
    torch.save(old, path)
    assert sample_py(sample, run_copy, path)[0] == 0
    code, err = sample_py(sample, run_copy, path, "general.path=flow", "eval.sampler=euler")
    assert_one_line_error(code, err, f"{path} was trained with general.path=ddpm")
    code, err = train_py(run_copy, "general.iterations=6", "general.path=flow", f"general.resume={path}")
    assert_one_line_error(code, err, f"{path} was trained with general.path=ddpm")
    assert train_py(run_copy, "general.iterations=6", f"general.resume={path}")[0] == 0


#################################################################################
#                        Divergence and hard kills                              #
#################################################################################


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(run_copy):
    """Resumed with an absurd lr, step 6 throws the weights to ~1e30 and step 7's loss is NaN: training
    stops (exit 1) before the optimizer step and before any checkpoint, so step 5's stays the last."""
    before = snapshot(run_copy / RUN / "000" / "checkpoints")
    code, err = train_py(
        run_copy, "general.iterations=20", "logs.ckpt_every=4", "optim.lr=1e30", f"general.resume={ckpt(run_copy, 5)}"
    )
    assert_one_line_error(
        code,
        err,
        "training diverged: at step 7 the loss is nan",
        f"the last checkpoint, {ckpt(run_copy, 5)}, is intact",
        exit_code=1,
    )
    assert snapshot(run_copy / RUN / "000" / "checkpoints") == before
    assert "training diverged" in (run_copy / RUN / "000" / "log.txt").read_text()


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Weights that turn non-finite in an optimizer step with finite gradients (here: injected after the
    step) are caught before the checkpoint that would hold them."""
    step, calls = torch.optim.AdamW.step, []

    def step_then_break(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_break)
    monkeypatch.chdir(tmp_path)
    message = "weights are not finite after step 2; the last checkpoint, .*0000001.pt, is intact"
    with pytest.raises(train.TrainingDiverged, match=message):
        train.main(config.load([*KEYS, "general.iterations=3", "logs.ckpt_every=1"]))
    assert os.listdir(tmp_path / RUN / "000" / "checkpoints") == ["0000001.pt"]


@pytest.mark.parametrize("path", ["ddpm", "flow"])
def test_kill_9_then_resume_is_exact(tmp_path, path):
    """SIGKILL at a random moment of a long run (a real process); resuming from its last checkpoint reaches the
    state of an uninterrupted run bit for bit, and every checkpoint the killed run left loads, verified."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        os.path.join(EXAMPLES_DIT, "train.py"),
        *KEYS,
        f"general.path={path}",
        "general.iterations=100000",
        "logs.ckpt_every=3",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / RUN / "000" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "0000006.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(runs.checkpoints_in(ckpts))
    assert steps[:2] == [3, 6] and all(runs.load_checkpoint(str(ckpts / f"{s:07d}.pt"))[0]["step"] == s for s in steps)
    last, target = steps[-1], steps[-1] + 2

    keys = (f"general.path={path}", f"general.iterations={target}")
    assert train_py(tmp_path, *keys, f"general.resume={ckpts / f'{last:07d}.pt'}")[0] == 0
    assert train_py(tmp_path, *keys, "logs.results_dir=uninterrupted")[0] == 0
    reference = tmp_path / "uninterrupted" / "DiT-T-2" / "000" / "checkpoints" / f"{target:07d}.pt"
    assert_same_training_state(load(ckpts / f"{target:07d}.pt"), load(reference))
