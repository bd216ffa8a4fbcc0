"""sample.py, sample_ddp.py (2 gloo processes: exactly N samples, ADM .npz format), evaluate.py with offline
feature extractors, and the digits demo end to end at toy size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import config
import digits_classifier
import evaluate
import sample
import sample_ddp
import train

EXAMPLES_DIT = os.path.dirname(os.path.abspath(config.__file__))
TINY = ["data=digits", "models.name=DiT-T/2", "models.depth=2", "models.hidden_size=32", "general.num_workers=0",
        "general.device=cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny trained digits checkpoint and a quickly trained digits classifier."""
    root = tmp_path_factory.mktemp("recipe")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        out = train.main(config.load([*TINY, "general.iterations=2", "general.global_batch_size=8", "logs.results_dir=res"]))
    finally:
        os.chdir(cwd)
    classifier = root / "digits_classifier.pt"
    digits_classifier.train_classifier(str(classifier), epochs=1, log=lambda *_: None)
    return {"root": root, "ckpt": str(root / out["checkpoint"]), "classifier": str(classifier)}


def sampling_args(workdir, n):
    return [*TINY, f"eval.ckpt={workdir['ckpt']}", f"eval.num_fid_samples={n}", "eval.per_proc_batch_size=2",
            "eval.num_sampling_steps=3", f"eval.samples_dir={workdir['root'] / 'samples'}",
            f"eval.feature_extractor_weights={workdir['classifier']}"]


def check_npz(path, n):
    with np.load(path) as f:
        assert f["arr_0"].shape == (n, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].shape == (n,) and ((0 <= f["arr_1"]) & (f["arr_1"] < 10)).all()
        gray = f["arr_0"]
        assert (gray[..., 0] == gray[..., 1]).all()
        return f["arr_0"].copy(), f["arr_1"].copy()


@pytest.mark.slow
def test_sample_ddp_two_ranks_gives_exactly_n(workdir):
    n = 5  # not a multiple of the 2 ranks, nor of the per-process batch of 2
    args = [*sampling_args(workdir, n), "eval.save_png=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(EXAMPLES_DIT, "sample_ddp.py"), *args]
    r = subprocess.run(cmd, cwd=workdir["root"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    folder = sample_ddp.sample_folder(config.load(args))
    images, _ = check_npz(folder + ".npz", n)
    pngs = sorted(os.listdir(folder))
    assert pngs == [f"{i:06d}.png" for i in range(n)]
    for i in range(n):  # the PNGs are the .npz's samples, in the same order
        assert np.array_equal(np.asarray(Image.open(os.path.join(folder, pngs[i]))), images[i])


def test_sample_ddp_one_process_and_evaluate(workdir):
    n = 7
    args = sampling_args(workdir, n)
    path = sample_ddp.main(config.load(args))
    assert path == evaluate.sample_batch_path(config.load(args))
    check_npz(path, n)
    assert not os.path.exists(path[: -len(".npz")])  # no PNGs asked for: no folder left behind

    metrics = evaluate.main(config.load(args))
    for key in ("fid", "is", "precision", "recall", "class_accuracy"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["class_accuracy"] <= 1 and 0 <= metrics["precision"] <= 1
    assert metrics["num_samples"] == n and metrics["num_reference"] == 1797
    assert metrics["feature_extractor"] == "digits-classifier"
    with open(path[: -len(".npz")] + "-metrics.json") as f:
        assert json.load(f)["fid"] == metrics["fid"]


def test_sampling_refuses_other_routing(workdir):
    with pytest.raises(config.ConfigError, match="models.routing.sharing_ratio=0.8"):
        sample_ddp.main(config.load([*sampling_args(workdir, 2), "models.routing.sharing_ratio=0.5"]))


def test_sample_grid(workdir):
    out = workdir["root"] / "grid.png"
    path = sample.main(config.load([*sampling_args(workdir, 1), "eval.class_labels=[0,1,2]", f"eval.grid={out}"]), per_class=2)
    assert path == str(out)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * (64 + 2), 2 + 3 * (64 + 2), 3)  # 2 rows x 3 classes of 64x64 tiles
    gaps = np.ones(grid.shape[:2], dtype=bool)
    for r in range(2):
        for c in range(3):
            top, left = 2 + r * 66, 2 + c * 66
            gaps[top : top + 64, left : left + 64] = False
            tile = grid[top : top + 64, left : left + 64, 0].reshape(8, 8, 8, 8)  # 8x8 digit pixels, each 8x8
            assert (tile == tile[:, :1, :, :1]).all() and (grid[top : top + 64, left : left + 64] == tile.reshape(64, 64)[..., None]).all()
    assert (grid[gaps] == 255).all()  # white 2-pixel gaps
    with pytest.raises(config.ConfigError, match="eval.class_labels"):
        sample.main(config.load([*sampling_args(workdir, 1), "eval.class_labels=[3,10]"]))


def test_evaluate_with_an_offline_extractor_against_a_folder(tmp_path):
    """The ImageNet path of evaluate.py (reference .npz or folder, any registered torch-fidelity extractor)
    run with a small random conv net instead of Inception; identical sets give FID ~ 0, P = R = 1."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    class RandomFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            f = self.net(x.float() / 255)
            out = {"feat": f, "logits": f[:, :10]}
            return tuple(out[k] for k in self.features_list)

    if "test-random" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("test-random", RandomFeatures)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    os.makedirs(tmp_path / "ref")
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "ref" / f"{i:03d}.png")
    base = [f"eval.sample_batch={tmp_path / 'samples.npz'}", "eval.feature_extractor=test-random",
            f"eval.metrics_file={tmp_path / 'm.json'}"]
    same = evaluate.main(config.load([*base, f"eval.ref_batch={tmp_path / 'ref'}"]))
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8))
    other = evaluate.main(config.load([*base, f"eval.ref_batch={tmp_path / 'ref.npz'}"]))
    assert other["fid"] > 1e-3 and "class_accuracy" not in other
    with pytest.raises(config.ConfigError, match="eval.ref_batch"):
        evaluate.main(config.load(base))
    with pytest.raises(config.ConfigError, match="eval.feature_extractor"):
        evaluate.main(config.load([*base, "eval.feature_extractor=nope", f"eval.ref_batch={tmp_path / 'ref'}"]))


def test_demo_end_to_end_at_toy_size(workdir, tmp_path, monkeypatch, capsys):
    import demo

    monkeypatch.chdir(tmp_path)
    metrics = demo.main(["models.depth=2", "models.hidden_size=32", "general.iterations=2", "eval.num_fid_samples=12",
                         "eval.num_sampling_steps=2", f"eval.feature_extractor_weights={workdir['classifier']}"])
    out = capsys.readouterr().out
    assert "Digits demo done" in out and "FID" in out and "class accuracy" in out
    model_dir = tmp_path / "samples" / "digits" / "linear_scheduling" / "DTR_0.8_constant" / "DiT-T-2"
    assert (model_dir / "grid.png").exists() and (model_dir / "masks.png").exists()
    assert np.isfinite(metrics["fid"])


def test_latent_model_samples_through_the_vae(tmp_path, monkeypatch):
    """ImageNet path: a DiT on VAE latents (tiny AutoencoderKL from its config) samples decoded RGB images."""
    from conftest import TINY_VAE, make_image_folder

    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "imgs"), per_class=2)
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    keys = ["general.vae_config=vae.json", "general.image_size=32", "data.num_classes=2", "models.name=DiT-T/2",
            "models.depth=2", "models.hidden_size=32", "general.num_workers=0", "general.device=cpu",
            "logs.results_dir=res", "eval.samples_dir=samples", "general.iterations=1"]
    train.main(config.load(["general.data_path=imgs", "general.global_batch_size=2", *keys]))
    ev = [*keys, "eval.num_fid_samples=3", "eval.num_sampling_steps=2", "eval.sampler=ddim", "eval.class_labels=[0,1]"]
    path = sample_ddp.main(config.load(ev))  # finds res/DiT-T-2/000/checkpoints/0000001.pt from the keys
    assert path == "samples/DiT-T-2/0000001-size-32-vae-ema-samples-3-cfg-1.5-seed-0.npz"
    with np.load(path) as f:
        assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    grid = np.asarray(Image.open(sample.main(config.load(ev))))
    assert grid.shape == (2 + 64 + 2, 2 + 2 * (64 + 2), 3)  # 32x32 images shown at 2x
