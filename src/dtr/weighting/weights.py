"""Per-sample loss weights of the noise level: SNRs, Min-SNR-gamma, P2 and the paper code's ``loss_weight_type``."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..validation import check_choice, check_float

_PREDICTIONS = ("epsilon", "v", "x0")
_KINDS = ("constant", "min_snr", "p2", "uw")
_VALID_NAMES = '"constant", "min_snr_<gamma>" (e.g. "min_snr_5"), "p2weight_<gamma>_<k>" (e.g. "p2weight_1_1"), "uw"'
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_MIN_SNR_RE = re.compile(rf"min_snr_{_NUMBER}")
_P2_RE = re.compile(rf"p2weight_{_NUMBER}_{_NUMBER}")


# --------------------------------------------------------------------------- checks of tensors


def _snr_tensor(snr):
    """Check that ``snr`` is a floating-point torch tensor."""
    if not isinstance(snr, torch.Tensor):
        raise TypeError(f"snr must be a torch.Tensor, got {type(snr).__name__}")
    if not snr.is_floating_point():
        raise TypeError(f"snr must be a floating-point tensor, got dtype {snr.dtype}")
    return snr


# --------------------------------------------------------------------------- weightings


def snr_from_alphas_cumprod(alphas_cumprod: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Signal-to-noise ratio ``a / (1 - a)`` of each timestep; numpy in, float64 numpy out; torch
    in, torch out in the same dtype (keep schedules in float64: float32 rounds ``a`` near 1)."""
    if isinstance(alphas_cumprod, torch.Tensor):
        if not alphas_cumprod.is_floating_point():
            raise TypeError(f"alphas_cumprod must be floating point, got {alphas_cumprod.dtype}")
        return alphas_cumprod / (1 - alphas_cumprod)
    if isinstance(alphas_cumprod, (np.ndarray, list, tuple, numbers.Real)):
        a = np.asarray(alphas_cumprod, dtype=np.float64)
        return a / (1.0 - a)
    raise TypeError(f"alphas_cumprod must be a numpy array or torch tensor, got {type(alphas_cumprod).__name__}")


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, prediction: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weights for a loss on the given prediction target (epsilon, v or x0).

    The epsilon form is computed as ``min(gamma / SNR, 1)`` so that it stays finite at SNR = 0."""
    snr = _snr_tensor(snr)
    gamma = check_float(gamma, "gamma", low=0.0, low_open=True)
    prediction = check_choice(prediction, "prediction", _PREDICTIONS)
    if prediction == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped


def p2_weight(snr: torch.Tensor, gamma: float = 1.0, k: float = 1.0) -> torch.Tensor:
    """P2 weights ``1 / (k + SNR) ** gamma`` (as in the paper code, independent of the target)."""
    snr = _snr_tensor(snr)
    gamma = check_float(gamma, "gamma", low=0.0, low_open=True)
    k = check_float(k, "k", low=0.0, low_open=True)
    return torch.pow(k + snr, -gamma)


def _format_number(x):
    """Shortest spelling of a float that parses back to it: 5.0 -> "5", 0.5 -> "0.5"."""
    return str(int(x)) if x.is_integer() else repr(x)


@dataclass(frozen=True)
class LossWeighting:
    """A parsed ``loss_weight_type``: which per-sample weighting to apply and its parameters.

    ``gamma`` defaults to 5 for ``min_snr`` and 1 for ``p2``; ``k`` (P2 only) defaults to 1."""

    kind: str
    gamma: float | None = None
    k: float | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        gamma, k = self.gamma, self.k
        if self.kind in ("constant", "uw"):
            if gamma is not None or k is not None:
                raise ValueError(f"kind={self.kind!r} takes no gamma or k")
        elif self.kind == "min_snr":
            if k is not None:
                raise ValueError("kind='min_snr' takes no k")
            gamma = check_float(5.0 if gamma is None else gamma, "gamma", low=0.0, low_open=True)
        else:
            gamma = check_float(1.0 if gamma is None else gamma, "gamma", low=0.0, low_open=True)
            k = check_float(1.0 if k is None else k, "k", low=0.0, low_open=True)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "k", k)

    def weight(self, snr: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
        """Per-sample loss weights for the given SNRs (ones for ``constant`` and ``uw``)."""
        snr = _snr_tensor(snr)
        prediction = check_choice(prediction, "prediction", _PREDICTIONS)
        if self.kind == "min_snr":
            return min_snr_weight(snr, self.gamma, prediction)
        if self.kind == "p2":
            return p2_weight(snr, self.gamma, self.k)
        return torch.ones_like(snr)

    @property
    def name(self) -> str:
        """Canonical ``loss_weight_type`` spelling; ``parse_loss_weight_type(w.name) == w``."""
        if self.kind == "min_snr":
            return f"min_snr_{_format_number(self.gamma)}"
        if self.kind == "p2":
            return f"p2weight_{_format_number(self.gamma)}_{_format_number(self.k)}"
        return self.kind


def parse_loss_weight_type(name: str) -> LossWeighting:
    """Parse the paper code's ``general.loss_weight_type`` string into a :class:`LossWeighting`."""
    if not isinstance(name, str):
        raise TypeError(f"loss_weight_type must be a str, got {type(name).__name__}")
    if name in ("constant", "uw"):
        return LossWeighting(name)
    match = _MIN_SNR_RE.fullmatch(name)
    if match:
        return LossWeighting("min_snr", gamma=float(match.group(1)))
    match = _P2_RE.fullmatch(name)
    if match:
        return LossWeighting("p2", gamma=float(match.group(1)), k=float(match.group(2)))
    raise ValueError(f"loss_weight_type must be one of {_VALID_NAMES}, got {name!r}")
