"""Data for the DiT recipe: ImageNet-style folders, precomputed VAE latents, and scikit-learn's digits.

Every dataset yields (x, label). What x is depends on the dataset's `kind`, and train.py turns a
batch of any kind into model inputs (random horizontal flip, VAE encoding) with its own generator,
so that data augmentation is reproducible and an interrupted run resumes exactly:

- "images":  (3, S, S) floats in [-1, 1], ADM's center crop of an image file (ImageFolderDataset);
- "latents": (2, 2, C, s, s): [unflipped, flipped] x [mean, std] of the VAE posterior, written
             once by extract_latents.py (LatentsDataset); a flip picks a row, then z ~ N(mean, std);
- "pixels":  (1, 8, 8) floats in [-1, 1], the digits themselves (DigitsDataset; no VAE, no flip).
"""

import json
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from config import ConfigError

LATENTS_INDEX = "latents.json"
LATENTS_FORMAT = "dtr-latents-v1"


#################################################################################
#                                   Images                                      #
#################################################################################


def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with a box filter while the short side is >= 2S, bicubic resize to S, crop.

    As in guided-diffusion's image_datasets.py (and DiT): the crop is the same for training here and for
    the ADM reference batch, so FID compares like with like.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def load_image(path):
    """An RGB PIL image; a corrupt or unreadable file stops training with its path in the message."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image.convert("RGB")
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise RuntimeError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


class ImageFolderDataset(Dataset):
    """torchvision's ImageFolder (root/<class>/<image>), center-cropped to image_size, in [-1, 1]."""

    kind = "images"

    def __init__(self, root, image_size):
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        transform = transforms.Compose(
            [
                transforms.Lambda(lambda image: center_crop_arr(image, image_size)),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
            ]
        )
        self.folder = ImageFolder(root, transform=transform, loader=load_image)
        self.classes = self.folder.classes

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        return self.folder[index]


#################################################################################
#                           Precomputed VAE latents                             #
#################################################################################


class LatentsDataset(Dataset):
    """Latents written by extract_latents.py: an index (latents.json) and safetensors shards.

    Each shard holds "moments" (n, 2, 2, C, s, s) float16 and "labels" (n,) int64. Shards are
    memory-mapped (safetensors.safe_open) and read one sample at a time, so the data set may be
    much larger than RAM.
    """

    kind = "latents"

    def __init__(self, root):
        with open(os.path.join(root, LATENTS_INDEX)) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != LATENTS_FORMAT:
            raise ValueError(f"{root}/{LATENTS_INDEX} is not a {LATENTS_FORMAT} index (written by extract_latents.py)")
        self.root = root
        self.files = [s["file"] for s in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.meta["shards"]])
        self.classes = self.meta["classes"]
        self._open = {}

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        row = index - int(self.offsets[shard])
        f = self._shard(shard)
        moments = f.get_slice("moments")[row : row + 1][0].float()
        label = int(f.get_slice("labels")[row : row + 1][0])
        return moments, label

    def _shard(self, i):
        if i not in self._open:
            from safetensors import safe_open

            self._open[i] = safe_open(os.path.join(self.root, self.files[i]), framework="pt")
        return self._open[i]

    def __getstate__(self):  # DataLoader workers open their own memory maps
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


def is_latents_dir(path):
    return path is not None and os.path.isfile(os.path.join(path, LATENTS_INDEX))


def write_latents_shard(path, moments, labels):
    """One shard: moments (n, 2, 2, C, s, s) stored as float16, labels (n,) int64."""
    from safetensors.torch import save_file

    save_file({"moments": moments.to(torch.float16).contiguous(), "labels": labels.to(torch.int64).contiguous()}, path)


def write_latents_index(root, shards, meta):
    """The index of a latents folder, written last (atomically) so that a half-written folder is never read."""
    index = dict(meta, format=LATENTS_FORMAT, shards=shards, count=sum(s["count"] for s in shards))
    tmp = os.path.join(root, LATENTS_INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(root, LATENTS_INDEX))


#################################################################################
#                          scikit-learn's digits                                 #
#################################################################################


def digits_arrays():
    """The 1797 digits as (N, 8, 8) float64 in [0, 16] and (N,) int64 labels (bundled with scikit-learn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def digits_to_uint8(x):
    """Model-space digits in [-1, 1] (any shape) to uint8 pixels 0..255 (the inverse of DigitsDataset's scaling)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def real_digits_uint8():
    """The real digits as the evaluator sees them: (N, 8, 8, 3) uint8 and labels."""
    images, labels = digits_arrays()
    x = torch.from_numpy(images / 8.0 - 1.0)
    gray = digits_to_uint8(x).numpy()
    return np.repeat(gray[..., None], 3, axis=-1), labels


class DigitsDataset(Dataset):
    """The digits in pixel space: (1, 8, 8) floats in [-1, 1] (value v in 0..16 maps to v / 8 - 1)."""

    kind = "pixels"

    def __init__(self):
        images, labels = digits_arrays()
        self.x = torch.from_numpy(images / 8.0 - 1.0).float().unsqueeze(1)
        self.y = torch.from_numpy(labels)
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return self.x[index], int(self.y[index])


#################################################################################
#                                 From the config                               #
#################################################################################


def build_dataset(cfg):
    """The training set the config asks for; errors name the key to fix."""
    if cfg.data.name == "digits":
        return DigitsDataset()
    path = cfg.general.data_path
    if path is None:
        raise ConfigError(
            "general.data_path is required for data=ImageNet: an ImageFolder root or an extract_latents.py folder"
        )
    if not os.path.isdir(path):
        raise ConfigError(f"general.data_path={path!r} is not a folder")
    if is_latents_dir(path):
        dataset = LatentsDataset(path)
        meta = dataset.meta
        vae = os.path.basename(os.path.normpath(cfg.general.vae))
        for key, ours, theirs in (
            ("general.image_size", cfg.general.image_size, meta["image_size"]),
            ("general.vae", vae, meta["vae"]),
        ):
            if ours != theirs:
                raise ConfigError(
                    f"{key}={ours!r} but the latents in {path} were extracted with {theirs!r}: set {key}={theirs}"
                )
    else:
        dataset = ImageFolderDataset(path, cfg.general.image_size)
    if len(dataset.classes) > cfg.data.num_classes:
        raise ConfigError(
            f"{path} has {len(dataset.classes)} classes but data.num_classes={cfg.data.num_classes}: "
            f"set data.num_classes={len(dataset.classes)}"
        )
    return dataset


#################################################################################
#                           Resumable distributed order                         #
#################################################################################


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed and epoch, drop_last) that can start an epoch mid-way.

    set_epoch(epoch, skip) makes the next pass yield the epoch's order without its first `skip`
    indices, so a run resumed at step s sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self):
        return self.num_samples - self.skip


def steps_per_epoch(dataset_len, world_size, local_batch_size):
    """Full local batches per epoch (DistributedSampler with drop_last, DataLoader with drop_last)."""
    return math.floor(dataset_len / world_size) // local_batch_size
