"""The recipe's data (examples/dit/data.py, extract_latents.py): ADM crop, corrupt files, latents, order."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
from data import ImageFolderDataset, LatentsDataset, ResumableSampler, center_crop_arr
from recipe_helpers import make_image_folder, write_tiny_vae


def test_center_crop_is_adms():
    image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(200, 300, 3) % 251)
    out = center_crop_arr(image, 64)
    assert out.size == (64, 64)
    # ADM: box-halve while the short side >= 2S (200 -> 100), bicubic to short side S, then center crop.
    half = image.resize((150, 100), resample=Image.BOX)
    scaled = np.array(half.resize((96, 64), resample=Image.BICUBIC))
    assert np.array_equal(np.array(out), scaled[:, 16:80])


def test_image_folder_dataset(tmp_path):
    root = make_image_folder(str(tmp_path / "imgs"))
    ds = ImageFolderDataset(root, 32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.min() >= -1.0 and x.max() <= 1.0 and y == 0
    assert ds.kind == "images" and len(ds) == 10 and ds.classes == ["class0", "class1"]


def test_corrupt_image_stops_with_its_path(tmp_path):
    root = make_image_folder(str(tmp_path / "imgs"))
    bad = os.path.join(root, "class1", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ImageFolderDataset(root, 32)
    index = ds.folder.samples.index((bad, 1))
    with pytest.raises(RuntimeError, match="broken.png"):
        ds[index]
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    with pytest.raises(RuntimeError, match="cannot read image .*broken.png"):
        next(iter(loader))


def test_resumable_sampler_skips_exactly():
    ds = list(range(23))
    for rank in range(2):
        full, resumed = ResumableSampler(ds, 2, rank, seed=3), ResumableSampler(ds, 2, rank, seed=3)
        full.set_epoch(4)
        resumed.set_epoch(4, skip=6)
        assert list(resumed) == list(full)[6:] and len(resumed) == len(full) - 6 == 5
    assert data.steps_per_epoch(23, 2, 4) == 2


def test_digits_dataset():
    ds = data.DigitsDataset()
    x, y = ds[0]
    assert len(ds) == 1797 and x.shape == (1, 8, 8) and ds.kind == "pixels" and y == 0
    assert x.min() >= -1 and x.max() <= 1
    images, labels = data.real_digits_uint8()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (1797,)
    # the evaluator's uint8 digits are the model-space digits mapped by digits_to_uint8
    assert np.array_equal(images[0, ..., 0], data.digits_to_uint8(ds[0][0][0]).numpy())


def test_extract_latents_matches_the_vae(tmp_path):
    import common
    import extract_latents

    root = make_image_folder(str(tmp_path / "imgs"), classes=2, per_class=3)
    vae_json = write_tiny_vae(tmp_path)
    cfg = config.load(
        [
            f"general.data_path={root}",
            f"general.vae_config={vae_json}",
            "general.image_size=32",
            "general.num_workers=0",
            "general.global_batch_size=4",
            "data.num_classes=2",
            "general.device=cpu",
        ]
    )
    out = extract_latents.main(cfg)
    assert out == f"{root}-latents-32-ema" and data.is_latents_dir(out)
    ds = LatentsDataset(out)
    assert len(ds) == 6 and ds.meta["latent_size"] == 4 and ds.meta["latent_channels"] == 4
    assert ds.meta["scaling_factor"] == pytest.approx(0.18215)

    # Each entry holds the posterior of the image and of its mirror image, in float16.
    images = ImageFolderDataset(root, 32)
    vae = common.load_vae(cfg, torch.device("cpu"))
    x, y = images[0]
    moments, label = ds[0]
    assert moments.shape == (2, 2, 4, 4, 4) and label == y
    with torch.no_grad():
        for flip, img in enumerate((x, x.flip(-1))):
            post = vae.encode(img[None]).latent_dist
            torch.testing.assert_close(moments[flip, 0].float(), post.mean[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(moments[flip, 1].float(), post.std[0], atol=2e-3, rtol=2e-3)

    # A mismatched image size is refused by name.
    cfg.general.data_path = out
    cfg.general.image_size = 64
    with pytest.raises(config.ConfigError, match="general.image_size"):
        data.build_dataset(cfg)
