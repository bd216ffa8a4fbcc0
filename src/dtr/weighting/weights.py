"""Per-sample loss weights of the noise level: SNRs, Min-SNR-gamma, P2 and the paper code's ``loss_weight_type``."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..validation import check_choice, check_float

_PREDICTIONS = ("epsilon", "v", "x0", "flow")
_P2_PREDICTIONS = ("epsilon", "flow")
_KINDS = ("constant", "min_snr", "p2", "uw")
_VALID_NAMES = '"constant", "min_snr_<gamma>" (e.g. "min_snr_5"), "p2weight_<gamma>_<k>" (e.g. "p2weight_1_1"), "uw"'
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_MIN_SNR_RE = re.compile(rf"min_snr_{_NUMBER}")
_P2_RE = re.compile(rf"p2weight_{_NUMBER}_{_NUMBER}")


# --------------------------------------------------------------------------- checks of tensors


def _float_tensor(value, name):
    """Check that ``value`` is a floating-point torch tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _snr_tensor(snr):
    """Check that ``snr`` is a floating-point torch tensor of SNRs in [0, inf] (no NaN, nothing negative)."""
    snr = _float_tensor(snr, "snr")
    if snr.numel() and not bool((snr >= 0).all()):
        raise ValueError("snr must be >= 0 (inf allowed, NaN not); got negative or NaN values")
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


def flow_snr(s: torch.Tensor) -> torch.Tensor:
    """SNR ``((1 - s) / s) ** 2`` of the flow-matching path ``x_s = (1 - s) * x0 + s * eps`` at noise levels s.

    ``s = 0`` (clean data) gives inf and ``s = 1`` (pure noise) gives 0; same dtype and device as ``s``."""
    s = _float_tensor(s, "s")
    if s.numel() and not bool(((s >= 0) & (s <= 1)).all()):
        raise ValueError("s must hold noise levels in [0, 1] (0 = data, 1 = noise); got values outside it or NaN")
    return ((1 - s) / s) ** 2


def _flow_factor(snr):
    """``(1 - s) ** 2`` from the flow SNR, as ``1 / (1 + 1 / sqrt(SNR)) ** 2``: 1 at SNR = inf, 0 at SNR = 0.

    It converts an epsilon-loss weight into the velocity-loss weight of the same objective:
    ``eps - eps_hat = (1 - s) * (v - v_hat)`` on the linear path, since ``eps = x_s + (1 - s) * v``."""
    return (1 + torch.rsqrt(snr)) ** -2


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, prediction: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weights for a loss on the given prediction target (epsilon, v, x0 or flow velocity).

    epsilon: ``min(SNR, gamma) / SNR``, computed as ``min(gamma / SNR, 1)`` so that it stays finite at SNR = 0;
    v: ``min(SNR, gamma) / (SNR + 1)``; x0: ``min(SNR, gamma)``.
    flow (the velocity ``eps - x0`` of ``x_s = (1 - s) x0 + s eps``, SNR from :func:`flow_snr`): the epsilon
    objective written for velocity, ``w_flow = w_eps * (1 - s) ** 2 = min(SNR, gamma) / (1 + sqrt(SNR)) ** 2``
    (``= min(SNR, gamma) * s ** 2``); it is 0 at both ends: at s = 0 (SNR = inf) because ``w_eps = gamma / SNR``
    vanishes, at s = 1 (SNR = 0) because the epsilon error ``(1 - s) * (v - v_hat)`` vanishes."""
    snr = _snr_tensor(snr)
    gamma = check_float(gamma, "gamma", low=0.0, low_open=True)
    prediction = check_choice(prediction, "prediction", _PREDICTIONS)
    if prediction in ("epsilon", "flow"):
        weight = torch.clamp(gamma / snr, max=1.0)
        return weight * _flow_factor(snr) if prediction == "flow" else weight
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped


def p2_weight(snr: torch.Tensor, gamma: float = 1.0, k: float = 1.0, prediction: str = "epsilon") -> torch.Tensor:
    """P2 weights ``1 / (k + SNR) ** gamma`` on the epsilon loss (as in the paper code), or the same objective
    written for the flow velocity: ``(1 - s) ** 2 / (k + SNR) ** gamma = 1 / ((1 + 1 / sqrt(SNR)) ** 2 * (k + SNR)
    ** gamma)``, 0 at both ends of [0, 1] (s = 0: SNR = inf; s = 1: the epsilon error vanishes)."""
    snr = _snr_tensor(snr)
    gamma = check_float(gamma, "gamma", low=0.0, low_open=True)
    k = check_float(k, "k", low=0.0, low_open=True)
    prediction = check_choice(prediction, "prediction", _P2_PREDICTIONS)
    weight = torch.pow(k + snr, -gamma)
    return weight * _flow_factor(snr) if prediction == "flow" else weight


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
        """Per-sample loss weights for the given SNRs and prediction target (ones for ``constant`` and ``uw``).

        ``min_snr`` follows the target (:func:`min_snr_weight`). ``p2`` is the paper code's target-independent
        weight for epsilon, v and x0, and the epsilon objective written for velocity for ``"flow"``
        (:func:`p2_weight`). For ``"flow"`` pass ``flow_snr(s)``."""
        snr = _snr_tensor(snr)
        prediction = check_choice(prediction, "prediction", _PREDICTIONS)
        if self.kind == "min_snr":
            return min_snr_weight(snr, self.gamma, prediction)
        if self.kind == "p2":
            return p2_weight(snr, self.gamma, self.k, "flow" if prediction == "flow" else "epsilon")
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
