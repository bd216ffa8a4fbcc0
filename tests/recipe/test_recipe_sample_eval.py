"""sample.py, sample_ddp.py (2 gloo processes: exactly N samples, ADM .npz format), evaluate.py with offline
feature extractors, and the digits demo end to end at toy size. Every sample is compared with the reference
sampler (recipe_reference.sample) run on the checkpoint's EMA weights, routed with the trained alpha and task count:
samples from other weights (a zeroed EMA, the non-EMA weights), other masks or another guidance differ."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import config
import digits_classifier
import evaluate
import sample
import sample_ddp
import train
from models import DiT
from recipe_helpers import DIGITS, TINY, TINY_VAE, load, make_image_folder, run_script, write_tiny_vae
from recipe_reference import dtr_masks, flow_sample, routed_forward, to_uint8_digits
from recipe_reference import sample as reference_sample
from recipe_reference import sample_ddp as sample_ddp_reference

# Trained with a high lr and a low EMA decay, so that the EMA is far from both zero and the last weights.
TRAIN_KEYS = [
    *DIGITS,
    "general.iterations=4",
    "general.global_batch_size=8",
    "logs.results_dir=res",
    "optim.lr=0.01",
    "optim.ema_decay=0.5",
    "models.routing.alpha=2.0",
    "models.routing.taskcount=1200",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny trained digits checkpoint and a quickly trained digits classifier."""
    root = tmp_path_factory.mktemp("recipe")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        out = train.main(config.load(TRAIN_KEYS))
    finally:
        os.chdir(cwd)
    classifier = root / "digits_classifier.pt"
    digits_classifier.train_classifier(str(classifier), epochs=1, log=lambda *_: None)
    return {"root": root, "ckpt": str(root / out["checkpoint"]), "classifier": str(classifier)}


def digits_model(state, sharing_ratio=0.8, alpha=2.0, num_tasks=1200):
    """TRAIN_KEYS' DiT (built here) with these weights, and its DTR masks."""
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=2,
        num_heads=4,
        class_dropout_prob=0.1,
        num_classes=10,
        learn_sigma=True,
    )
    model.load_state_dict(state)
    return model.eval(), dtr_masks(num_tasks, 32, sharing_ratio, alpha)


def assert_same_images(ours, reference):
    """uint8 images equal up to a rounding flip: at most 1 apart, and almost all exactly equal."""
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95, f"max {diff.max()}, equal {(diff == 0).mean():.3f}"


def reference_digits(workdir, n, world_size, batch, sampler, steps, cfg_scale=1.5):
    """The reference's uint8 samples and labels of the workdir checkpoint's EMA, as sample_ddp.py draws them."""
    model, masks = digits_model(load(workdir["ckpt"])["ema"])
    x, labels = sample_ddp_reference(
        model,
        (1, 8, 8),
        n,
        world_size,
        batch,
        seed=0,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        num_classes=10,
        masks=masks,
    )
    return to_uint8_digits(x), labels


def sampling_args(workdir, n):
    return [
        *DIGITS,
        "models.routing.alpha=2.0",
        "models.routing.taskcount=1200",
        f"eval.ckpt={workdir['ckpt']}",
        f"eval.num_fid_samples={n}",
        "eval.per_proc_batch_size=2",
        "eval.num_sampling_steps=4",
        f"eval.samples_dir={workdir['root'] / 'samples'}",
        f"eval.feature_extractor_weights={workdir['classifier']}",
    ]


def check_npz(path, n):
    with np.load(path) as f:
        assert f["arr_0"].shape == (n, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].shape == (n,) and ((f["arr_1"] >= 0) & (f["arr_1"] < 10)).all()
        return f["arr_0"].copy(), f["arr_1"].copy()


def test_sampling_uses_the_ema_routed_as_trained(workdir):
    """The model sample.py and sample_ddp.py build holds the checkpoint's EMA (or, with eval.use_ema=false, its
    last weights) and routes with the trained alpha and task count: its output is the reference's."""
    ckpt = load(workdir["ckpt"])
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["ema"])
    assert all(ckpt["ema"][k].abs().max() > 0 for k in ckpt["ema"] if k.endswith("adaLN_modulation.1.weight"))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 150, 400, 650, 900, 999]), torch.arange(6)
    for use_ema, part in ((True, "ema"), (False, "model")):
        cfg = config.load([*sampling_args(workdir, 1), f"eval.use_ema={use_ema}"])
        ours = common.load_model_for_sampling(cfg, torch.device("cpu"), log=lambda *_: None)
        assert all(torch.equal(v, ckpt[part][k]) for k, v in ours.state_dict().items())
        model, masks = digits_model(ckpt[part])
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t, y), routed_forward(model, x, t, y, masks), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sample_ddp_two_ranks_gives_exactly_n(workdir):
    """DDPM (the default sampler) over 2 processes: exactly n samples, each the reference's."""
    n = 5  # not a multiple of the 2 ranks, nor of the per-process batch of 2
    args = [*sampling_args(workdir, n), "eval.save_png=true"]
    run_script("sample_ddp.py", args, workdir["root"], nproc=2)
    folder = sample_ddp.sample_folder(config.load(args))
    images, labels = check_npz(folder + ".npz", n)
    reference, reference_labels = reference_digits(workdir, n, world_size=2, batch=2, sampler="ddpm", steps=4)
    assert np.array_equal(labels, reference_labels)
    assert_same_images(images, reference)
    pngs = sorted(os.listdir(folder))
    assert pngs == [f"{i:06d}.png" for i in range(n)]
    for i in range(n):  # the PNGs are the .npz's samples, in the same order
        assert np.array_equal(np.asarray(Image.open(os.path.join(folder, pngs[i]))), images[i])


def test_sample_ddp_one_process_and_evaluate(workdir):
    """DDIM in one process, in batches of 2: each sample the reference's; then the metrics of these samples."""
    n = 7
    args = [*sampling_args(workdir, n), "eval.sampler=ddim"]
    path = sample_ddp.main(config.load(args))
    assert path == evaluate.sample_batch_path(config.load(args))
    images, labels = check_npz(path, n)
    reference, reference_labels = reference_digits(workdir, n, world_size=1, batch=2, sampler="ddim", steps=4)
    assert np.array_equal(labels, reference_labels)
    assert_same_images(images, reference)
    assert not os.path.exists(path[: -len(".npz")])  # no PNGs asked for: no folder left behind

    metrics = evaluate.main(config.load(args))
    for key in ("fid", "is", "precision", "recall", "class_accuracy"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["class_accuracy"] <= 1 and 0 <= metrics["precision"] <= 1
    assert metrics["num_samples"] == n and metrics["num_reference"] == 1797
    assert metrics["feature_extractor"] == "digits-classifier"
    with open(path[: -len(".npz")] + "-metrics.json") as f:
        assert json.load(f)["fid"] == metrics["fid"]


@pytest.mark.parametrize("sampler", ["euler", "heun2"])
def test_flow_sample_ddp_is_the_reference_ode(workdir, tmp_path, monkeypatch, sampler):
    """A general.path=flow checkpoint sampled with SiT's Euler or Heun on 4 grid points, cfg 1.5, routed by task
    round((1 - t)(T - 1)): the recipe's samples (floats) are the reference's (flow_sample), and so are
    sample_ddp.py's (uint8), with the labels it draws."""
    monkeypatch.chdir(tmp_path)
    flow_keys = ["general.path=flow", f"eval.sampler={sampler}"]
    ckpt = train.main(config.load([*TRAIN_KEYS, *flow_keys]))["checkpoint"]
    n, args = 5, [*sampling_args(workdir, 5), *flow_keys, f"eval.ckpt={ckpt}"]
    model, masks = digits_model(load(ckpt)["ema"])
    cfg = config.load(args)
    ours = common.load_model_for_sampling(cfg, torch.device("cpu"), log=lambda *_: None)
    z, y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(6)
    with torch.no_grad():
        x = common.sample(ours, common.sampling_diffusion(cfg), z, y, cfg, generator=None)
    kwargs = dict(sampler=sampler, steps=4, cfg_scale=1.5, num_classes=10, masks=masks, num_tasks=1200)
    torch.testing.assert_close(x, flow_sample(model, z, y, None, **kwargs), rtol=0, atol=1e-5)

    images, labels = check_npz(sample_ddp.main(cfg), n)
    x, reference_labels = sample_ddp_reference(model, (1, 8, 8), n, 1, 2, seed=0, draw=flow_sample, **kwargs)
    assert np.array_equal(labels, reference_labels)
    assert_same_images(images, to_uint8_digits(x))
    with pytest.raises(config.ConfigError, match="general.path=flow"):  # a flow checkpoint is no DDPM model
        sample_ddp.main(config.load([*sampling_args(workdir, 5), f"eval.ckpt={ckpt}"]))


def test_sampling_refuses_other_routing(workdir):
    with pytest.raises(config.ConfigError, match="models.routing.sharing_ratio=0.8"):
        sample_ddp.main(config.load([*sampling_args(workdir, 2), "models.routing.sharing_ratio=0.5"]))


def test_sample_grid(workdir):
    """sample.py's grid: classes 0, 1, 2 twice, each tile the reference's sample (noise from global_seed) at 8x."""
    out = workdir["root"] / "grid.png"
    path = sample.main(
        config.load([*sampling_args(workdir, 1), "eval.class_labels=[0,1,2]", f"eval.grid={out}"]), per_class=2
    )
    assert path == str(out)
    grid = np.asarray(Image.open(out))
    model, masks = digits_model(load(workdir["ckpt"])["ema"])
    generator = torch.Generator().manual_seed(0)
    z, y = torch.randn((6, 1, 8, 8), generator=generator), torch.tensor([0, 1, 2] * 2)
    x = reference_sample(model, z, y, generator, sampler="ddpm", steps=4, cfg_scale=1.5, num_classes=10, masks=masks)
    tiles = np.stack(
        [grid[2 + r * 66 : 2 + r * 66 + 64 : 8, 2 + c * 66 : 2 + c * 66 + 64 : 8] for r in range(2) for c in range(3)]
    )
    assert_same_images(tiles, to_uint8_digits(x))
    assert grid.shape == (2 + 2 * (64 + 2), 2 + 3 * (64 + 2), 3)  # 2 rows x 3 classes of 64x64 tiles
    gaps = np.ones(grid.shape[:2], dtype=bool)
    for r in range(2):
        for c in range(3):
            top, left = 2 + r * 66, 2 + c * 66
            gaps[top : top + 64, left : left + 64] = False
            tile = grid[top : top + 64, left : left + 64, 0].reshape(8, 8, 8, 8)  # 8x8 digit pixels, each 8x8
            assert (tile == tile[:, :1, :, :1]).all() and (
                grid[top : top + 64, left : left + 64] == tile.reshape(64, 64)[..., None]
            ).all()
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
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
            )

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
    base = [
        f"eval.sample_batch={tmp_path / 'samples.npz'}",
        "eval.feature_extractor=test-random",
        f"eval.metrics_file={tmp_path / 'm.json'}",
    ]
    same = evaluate.main(config.load([*base, f"eval.ref_batch={tmp_path / 'ref'}"]))
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8))
    other = evaluate.main(config.load([*base, f"eval.ref_batch={tmp_path / 'ref.npz'}"]))
    assert other["fid"] > 1e-3 and "class_accuracy" not in other
    with pytest.raises(config.ConfigError, match="eval.ref_batch"):
        evaluate.main(config.load(base))
    with pytest.raises(config.ConfigError, match="eval.feature_extractor"):
        evaluate.main(config.load([*base, "eval.feature_extractor=nope", f"eval.ref_batch={tmp_path / 'ref'}"]))


@pytest.mark.parametrize("path", ["ddpm", "flow"])
def test_demo_end_to_end_at_toy_size(workdir, tmp_path, monkeypatch, capsys, path):
    """The demo trains, samples, evaluates and prints; its samples are the reference's from its checkpoint's EMA
    (DDPM's sampler, or the flow's Heun)."""
    import demo

    monkeypatch.chdir(tmp_path)
    sampler = "heun2" if path == "flow" else "ddpm"
    metrics = demo.main(
        [
            f"general.path={path}",
            f"eval.sampler={sampler}",
            "models.depth=2",
            "models.hidden_size=32",
            "general.iterations=2",
            "optim.lr=0.01",
            "optim.ema_decay=0.5",
            "eval.num_fid_samples=12",
            "eval.num_sampling_steps=2",
            f"eval.feature_extractor_weights={workdir['classifier']}",
        ]
    )
    out = capsys.readouterr().out
    assert "Digits demo done" in out and "FID" in out and "class accuracy" in out
    model_dir = tmp_path / "samples" / "digits" / "linear_scheduling" / "DTR_0.8_constant" / "DiT-T-2"
    assert (model_dir / "grid.png").exists() and (model_dir / "masks.png").exists()
    assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 12
    ckpt = load(
        tmp_path
        / "results"
        / "digits"
        / "linear_scheduling"
        / "DTR_0.8_constant"
        / "DiT-T-2"
        / "000"
        / "checkpoints"
        / "0000002.pt"
    )
    model, masks = digits_model(ckpt["ema"], alpha=4.0, num_tasks=1000)
    draw = flow_sample if path == "flow" else reference_sample
    x, labels = sample_ddp_reference(
        model, (1, 8, 8), 12, 1, 500, 0, draw, sampler=sampler, steps=2, cfg_scale=1.5, num_classes=10, masks=masks
    )
    (npz,) = model_dir.glob("*.npz")
    images, sampled_labels = check_npz(npz, 12)
    assert np.array_equal(sampled_labels, labels)
    assert_same_images(images, to_uint8_digits(x))


def test_latent_model_samples_through_the_vae(tmp_path, monkeypatch):
    """ImageNet path: a DiT on VAE latents (tiny AutoencoderKL from its config) samples decoded RGB images: the
    reference's latents from the checkpoint's EMA, decoded by the same VAE (built here from its config, seed 0)."""
    from diffusers.models import AutoencoderKL

    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "imgs"), per_class=2)
    write_tiny_vae(tmp_path)
    keys = [
        "general.vae_config=vae.json",
        "general.image_size=32",
        "data.num_classes=2",
        *TINY,
        "logs.results_dir=res",
        "eval.samples_dir=samples",
        "general.iterations=2",
    ]
    train.main(
        config.load(
            ["general.data_path=imgs", "general.global_batch_size=2", "optim.lr=0.01", "optim.ema_decay=0.5", *keys]
        )
    )
    ev = [*keys, "eval.num_fid_samples=3", "eval.num_sampling_steps=2", "eval.sampler=ddim", "eval.class_labels=[0,1]"]
    path = sample_ddp.main(config.load(ev))  # finds res/DiT-T-2/000/checkpoints/0000002.pt from the keys
    assert path == "samples/DiT-T-2/0000002-size-32-vae-ema-samples-3-cfg-1.5-seed-0.npz"
    with np.load(path) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8

    model = DiT(
        input_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=4,
        class_dropout_prob=0.1,
        num_classes=2,
        learn_sigma=True,
    )
    model.load_state_dict(load("res/DiT-T-2/000/checkpoints/0000002.pt")["ema"])
    latents, reference_labels = sample_ddp_reference(
        model.eval(),
        (4, 4, 4),
        3,
        1,
        200,
        seed=0,
        sampler="ddim",
        steps=2,
        cfg_scale=1.5,
        num_classes=2,
        masks=dtr_masks(1000, 32, 0.8, 4.0),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(TINY_VAE).eval()
    with torch.no_grad():
        decoded = vae.decode(latents / TINY_VAE["scaling_factor"]).sample
    reference = torch.clamp(127.5 * decoded + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(labels, reference_labels)
    assert_same_images(images, reference)
    grid = np.asarray(Image.open(sample.main(config.load(ev))))
    assert grid.shape == (2 + 64 + 2, 2 + 2 * (64 + 2), 3)  # 32x32 images shown at 2x
