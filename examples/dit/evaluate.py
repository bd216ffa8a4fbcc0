"""
FID, Inception Score, precision and recall of sample_ddp.py's samples, computed by torch-fidelity.

ImageNet (the paper's table): samples against the ADM reference batch, Inception-v3 features
(torch-fidelity's port of the TF-FID network; precision/recall on its 2048-d pool features, k = 3):

    python evaluate.py models.name=DiT-L/2 general.loss_weight_type=uw models.routing.sharing_ratio=0.8 \
        eval.cfg_scale=1.5 eval.num_fid_samples=50000 eval.ref_batch=VIRTUAL_imagenet256_labeled.npz

The paper's numbers come from the ADM evaluator (guided-diffusion/evaluations/evaluator.py), which
reads the same .npz; torch-fidelity's FID agrees with it closely but not to every digit, so quote
the ADM evaluator when comparing with the paper. Offline machines pass
eval.feature_extractor_weights=<weights-inception-2015-12-05-6726825d.pth>.

Digits (data=digits): the same code with a small digits classifier as the feature extractor
(digits_classifier.py, trained once and cached), against the 1797 real digits, plus the classifier's
accuracy on the class-conditional samples.
"""

import json
import os
from glob import glob

import numpy as np
import torch
from torch.utils.data import Dataset

import config
from data import center_crop_arr, load_image
from sample_ddp import sample_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPEG", ".PNG", ".JPG")


def load_images(path, image_size=None):
    """(N, H, W, 3) uint8 images and (N,) labels or None, from an .npz (arr_0[, arr_1]) or an image folder."""
    if os.path.isdir(path):
        files = sorted(f for f in glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(IMAGE_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"no images (*.png, *.jpg) in {path}")
        images = [load_image(f) for f in files]
        if image_size is not None:
            images = [center_crop_arr(im, image_size) for im in images]
        return np.stack([np.asarray(im, dtype=np.uint8) for im in images]), None
    if not os.path.isfile(path):
        raise config.ConfigError(
            f"no such file: {path} (run sample_ddp.py with the same keys, or set eval.sample_batch / eval.ref_batch)"
        )
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} has no arr_0 (the ADM format: arr_0 = (N, H, W, 3) uint8 images)")
        images = f["arr_0"]
        labels = f["arr_1"] if "arr_1" in f.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    return images, labels


class ImagesDataset(Dataset):
    """(N, H, W, 3) uint8 array -> (3, H, W) uint8 tensors, what torch-fidelity's extractors take."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def fidelity_metrics(samples, reference, extractor, weights=None, batch_size=64):
    """FID, IS, precision and recall of samples against reference with one torch-fidelity feature extractor."""
    import torch_fidelity

    cuda = torch.cuda.is_available()
    kwargs = dict(
        input1=ImagesDataset(samples),
        input2=ImagesDataset(reference),
        cuda=cuda,
        batch_size=batch_size,
        isc=True,
        fid=True,
        prc=True,
        feature_extractor=extractor,
        isc_splits=min(10, len(samples)),
        cache=False,
        save_cpu_ram=not cuda,
        verbose=False,
    )
    if weights is not None:
        kwargs["feature_extractor_weights_path"] = weights
    try:
        m = torch_fidelity.calculate_metrics(**kwargs)
    except OSError as err:  # no internet for the Inception weights
        raise RuntimeError(
            f"could not load the {extractor} weights ({err}); on an offline machine pass "
            "eval.feature_extractor_weights=<path to weights-inception-2015-12-05-6726825d.pth>"
        ) from err
    return {
        "fid": m["frechet_inception_distance"],
        "is": m["inception_score_mean"],
        "is_std": m["inception_score_std"],
        "precision": m["precision"],
        "recall": m["recall"],
    }


def sample_batch_path(cfg):
    """The samples to evaluate: eval.sample_batch, else sample_ddp.py's .npz for the same keys."""
    return cfg.eval.sample_batch if cfg.eval.sample_batch is not None else sample_folder(cfg) + ".npz"


def metrics_path(cfg, sample_batch):
    if cfg.eval.metrics_file is not None:
        return cfg.eval.metrics_file
    root = sample_batch[: -len(".npz")] if sample_batch.endswith(".npz") else sample_batch.rstrip("/")
    return f"{root}-metrics.json"


def main(cfg):
    """Compute the metrics, print them, write them as JSON; returns the dict."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    import digits_classifier

    digits_classifier.register()
    sample_batch = sample_batch_path(cfg)
    samples, labels = load_images(sample_batch)
    digits = cfg.data.name == "digits"
    extractor = cfg.eval.feature_extractor or (digits_classifier.NAME if digits else "inception-v3-compat")
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise config.ConfigError(
            f"eval.feature_extractor={extractor!r} is not valid; "
            f"choose one of: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}"
        )
    weights = cfg.eval.feature_extractor_weights
    if extractor == digits_classifier.NAME:
        weights = weights or digits_classifier.default_path()
        classifier, held_out_accuracy = digits_classifier.load_classifier(weights)

    if cfg.eval.ref_batch is not None:
        reference, _ = load_images(cfg.eval.ref_batch, image_size=samples.shape[1])
    elif digits:
        from data import real_digits_uint8

        reference, _ = real_digits_uint8()
    else:
        raise config.ConfigError(
            "eval.ref_batch is required: the ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or an image folder"
        )
    if reference.shape[1:] != samples.shape[1:]:
        raise ValueError(f"samples are {samples.shape[1:]} but the reference images are {reference.shape[1:]}")

    metrics = {"num_samples": len(samples), "num_reference": len(reference), "feature_extractor": extractor}
    metrics.update(fidelity_metrics(samples, reference, extractor, weights))
    if extractor == digits_classifier.NAME:
        metrics["classifier_held_out_accuracy"] = held_out_accuracy
        if labels is not None:
            metrics["class_accuracy"] = digits_classifier.accuracy(classifier, samples, labels)

    out = metrics_path(cfg, sample_batch)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    print(format_metrics(metrics))
    print(f"Saved metrics to {out}")
    return metrics


def format_metrics(m):
    lines = [f"{m['num_samples']} samples vs {m['num_reference']} reference images, features: {m['feature_extractor']}"]
    fid_is = f"FID {m['fid']:.3f} | IS {m['is']:.3f} (+- {m['is_std']:.3f})"
    lines.append(f"  {fid_is} | Precision {m['precision']:.3f} | Recall {m['recall']:.3f}")
    if "class_accuracy" in m:
        accuracy, held_out = m["class_accuracy"], m["classifier_held_out_accuracy"]
        lines.append(f"  class accuracy of samples {accuracy:.2%} (classifier on held-out real digits: {held_out:.2%})")
    return "\n".join(lines)


if __name__ == "__main__":
    config.run(main)
