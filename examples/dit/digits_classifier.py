"""A small CNN trained on scikit-learn's digits: the feature extractor of evaluate.py for data=digits.

Inception features mean nothing for 8x8 digits, so the digits metrics use this classifier instead:
FID and precision/recall on its 128-d penultimate features, Inception Score on its logits, and its
accuracy on class-conditional samples (does a sample of class c look like a c?). It is trained once
(about 10 s on a CPU core, fixed seed, 80/20 split) and cached; it is registered with torch-fidelity
as the feature extractor "digits-classifier", so the metrics code is torch-fidelity's own.
"""

import os

import numpy as np
import torch
from torch import nn

from data import digits_arrays

NAME = "digits-classifier"
VERSION = 1


def default_path():
    """Cache file: $XDG_CACHE_HOME/dtr (or ~/.cache/dtr)/digits_classifier-v1.pt."""
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "dtr", f"digits_classifier-v{VERSION}.pt")


class DigitsNet(nn.Module):
    """(B, 1, 8, 8) in [-1, 1] -> (128-d features, 10 logits)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        features = self.fc(self.conv(x))
        return features, self.head(features)


def uint8_to_input(images):
    """(B, 3, H, W) or (B, H, W, 3) uint8 -> (B, 1, 8, 8) floats in [-1, 1] (channel mean)."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0


def train_classifier(path, seed=0, epochs=40, log=print):
    """Train on 80% of the digits, report accuracy on the other 20%, save {state_dict, test_accuracy}."""
    images, labels = digits_arrays()
    x = torch.from_numpy(images / 8.0 - 1.0).float().unsqueeze(1)
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            net.train()
            for idx in train[torch.randperm(len(train), generator=g)].split(64):
                _, logits = net(x[idx])
                loss = nn.functional.cross_entropy(logits, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[test])[1].argmax(1) == y[test]).float().mean().item()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"state_dict": net.state_dict(), "test_accuracy": accuracy, "version": VERSION}, tmp)
    os.replace(tmp, path)
    log(f"Trained the digits classifier: {accuracy:.2%} accuracy on held-out digits; saved to {path}")
    return net, accuracy


def load_classifier(path=None, log=print):
    """The cached classifier (trained now if the cache file does not exist) and its held-out accuracy."""
    path = path or default_path()
    if not os.path.isfile(path):
        return train_classifier(path, log=log)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsNet()
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), ckpt["test_accuracy"]


@torch.no_grad()
def accuracy(net, images, labels, batch_size=1000):
    """Fraction of (N, H, W, 3) uint8 images the classifier assigns to their label."""
    hits = 0
    for i in range(0, len(images), batch_size):
        logits = net(uint8_to_input(images[i : i + batch_size]))[1]
        hits += (logits.argmax(1).numpy() == np.asarray(labels[i : i + batch_size])).sum()
    return float(hits) / len(images)


def register():
    """Register DigitsFeatureExtractor with torch-fidelity as "digits-classifier" (once)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if NAME in FEATURE_EXTRACTORS_REGISTRY:
        return

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor: uint8 (B, 3, H, W) -> features "features" (128) and "logits" (10)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net, _ = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            features, logits = self.net(uint8_to_input(x).to(next(self.net.parameters()).device))
            out = {"features": features, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    register_feature_extractor(NAME, DigitsFeatureExtractor)
