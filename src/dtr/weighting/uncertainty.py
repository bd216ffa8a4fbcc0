"""Uncertainty weighting: learned log-variances that weigh the loss of each noise level.

ANT-UW learns one per interval of timesteps or noise levels (:class:`UncertaintyWeighting`); EDM2 learns a smooth
function of the noise level (:class:`ContinuousUncertaintyWeighting`, on :class:`FourierFeatures`).
"""

from __future__ import annotations

import math

import torch

from ..validation import check_float, check_int, check_seed
from .intervals import _validate_intervals
from .intervals import interval_index as _interval_index

# --------------------------------------------------------------------------- ANT-UW


class UncertaintyWeighting(torch.nn.Module):
    """ANT-UW: ``sum_i 0.5 * (exp(-s_i) * L_i + s_i)`` over the intervals present in a batch,
    with ``L_i`` interval i's mean loss divided by k and ``s_i`` a learned log-variance.

    Built from ``num_intervals`` it takes each sample's interval index; built from ``intervals`` (integer timesteps
    or float noise levels tiling [0, 1]) it can also take the timesteps or noise levels themselves (``t=``)."""

    def __init__(self, num_intervals: int | None = None, *, intervals=None):
        super().__init__()
        self.intervals = None if intervals is None else _validate_intervals(intervals)
        if self.intervals is not None:
            if num_intervals is not None and check_int(num_intervals, "num_intervals") != len(self.intervals):
                raise ValueError(f"num_intervals={num_intervals} does not match the {len(self.intervals)} intervals")
            num_intervals = len(self.intervals)
        elif num_intervals is None:
            raise TypeError("UncertaintyWeighting needs num_intervals or intervals")
        self.num_intervals = check_int(num_intervals, "num_intervals", minimum=1)
        self.log_vars = torch.nn.Parameter(torch.zeros(self.num_intervals))

    def forward(
        self,
        per_sample_loss: torch.Tensor,
        interval_index: torch.Tensor | None = None,
        *,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Combine a (B,) per-sample loss into one scalar, grouping samples by interval index (given, or found
        from the (B,) timesteps or noise levels ``t`` when the module was built from ``intervals``)."""
        k = self.num_intervals
        if t is not None:
            if interval_index is not None:
                raise ValueError("give interval_index or t, not both")
            if self.intervals is None:
                raise ValueError("t= needs the intervals: build the module as UncertaintyWeighting(intervals=...)")
            interval_index = _interval_index(t, self.intervals)
        if not isinstance(per_sample_loss, torch.Tensor) or not per_sample_loss.is_floating_point():
            raise TypeError("per_sample_loss must be a floating-point torch.Tensor of shape (B,)")
        integer = isinstance(interval_index, torch.Tensor) and not (
            interval_index.is_floating_point() or interval_index.is_complex() or interval_index.dtype == torch.bool
        )
        if not integer:
            raise TypeError("interval_index must be an integer torch.Tensor of shape (B,)")
        if per_sample_loss.ndim != 1 or per_sample_loss.numel() == 0:
            raise ValueError(f"per_sample_loss must have shape (B,) with B >= 1, got {tuple(per_sample_loss.shape)}")
        if interval_index.shape != per_sample_loss.shape:
            raise ValueError(
                f"interval_index must have the shape of per_sample_loss {tuple(per_sample_loss.shape)}, "
                f"got {tuple(interval_index.shape)}"
            )
        if bool(((interval_index < 0) | (interval_index >= k)).any()):
            raise ValueError(f"interval_index values must be in [0, {k}) (num_intervals={k})")
        dtype = torch.promote_types(per_sample_loss.dtype, self.log_vars.dtype)
        index = interval_index.to(device=per_sample_loss.device, dtype=torch.long)
        sums = per_sample_loss.new_zeros(k, dtype=dtype).index_add_(0, index, per_sample_loss.to(dtype))
        counts = torch.bincount(index, minlength=k)
        interval_loss = sums / counts.clamp(min=1).to(dtype) / k
        s = self.log_vars.to(device=per_sample_loss.device, dtype=dtype)
        terms = 0.5 * (torch.exp(-s) * interval_loss + s)
        return torch.where(counts > 0, terms, torch.zeros_like(terms)).sum()

    def weights(self) -> torch.Tensor:
        """Current per-interval weights ``exp(-s)``, detached, for logging."""
        return torch.exp(-self.log_vars.detach())

    def param_group(self, lr: float = 0.025) -> dict:
        """Optimizer parameter group for the log-variances: own learning rate, no weight decay."""
        return {"params": [self.log_vars], "lr": check_float(lr, "lr", low=0.0, low_open=True), "weight_decay": 0.0}

    def extra_repr(self):
        intervals = f", intervals={self.intervals}" if self.intervals is not None else ""
        return f"num_intervals={self.num_intervals}{intervals}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The paper code (ANT / DTR, models/UW.py) names the parameter `loss_scale`.
        if prefix + "loss_scale" in state_dict and prefix + "log_vars" not in state_dict:
            state_dict[prefix + "log_vars"] = state_dict.pop(prefix + "loss_scale")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --------------------------------------------------------------------------- EDM2's continuous log-variance


class FourierFeatures(torch.nn.Module):
    """Random Fourier features ``sqrt(2) * cos(2 pi (f * x + phi))`` of a scalar, f ~ N(0, bandwidth^2) and
    phi ~ U[0, 1) per channel (EDM2's MPFourier: each feature has mean square 1 over a uniform phase).

    The frequencies and phases are buffers drawn from ``seed`` (not the global RNG), saved in the state dict."""

    def __init__(self, num_channels: int = 128, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        self.num_channels = check_int(num_channels, "num_channels", minimum=1)
        self.bandwidth = check_float(bandwidth, "bandwidth", low=0.0, low_open=True)
        gen = torch.Generator().manual_seed(check_seed(seed) & 0xFFFFFFFF)
        freqs = torch.randn(self.num_channels, generator=gen, dtype=torch.float64) * self.bandwidth
        phases = torch.rand(self.num_channels, generator=gen, dtype=torch.float64)
        self.register_buffer("freqs", freqs.to(torch.float32))
        self.register_buffer("phases", phases.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) scalars to (B, num_channels) features, in the buffers' dtype."""
        x = x.to(self.freqs.dtype)
        return math.sqrt(2) * torch.cos(2 * math.pi * (torch.outer(x, self.freqs) + self.phases))

    def extra_repr(self):
        return f"num_channels={self.num_channels}, bandwidth={self.bandwidth}"


class ContinuousUncertaintyWeighting(torch.nn.Module):
    """EDM2's learned per-noise-level log-variance (Karras et al., 2024): ``u(s) = Linear(FourierFeatures(s))`` and
    the loss ``mean_b(L_b / exp(u(s_b)) + u(s_b))``, whose optimum is ``u(s) = log E[L | s]``: every noise level's
    loss is brought to weight 1 by a smooth learned function, where ANT-UW learns one constant per interval.

    ``s`` is the noise level in [0, 1] itself (bounded and finite at both ends), where EDM2 feeds ``log(sigma) / 4``;
    the linear layer starts at zero, so ``u = 0`` (plain loss) at the start, as ANT-UW's log-variances."""

    def __init__(self, num_channels: int = 128, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        self.fourier = FourierFeatures(num_channels, bandwidth, seed)
        self.linear = torch.nn.Linear(self.fourier.num_channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def log_var(self, s: torch.Tensor) -> torch.Tensor:
        """The learned log-variance ``u(s)`` of each (B,) noise level in [0, 1]."""
        if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.ndim != 1:
            raise TypeError("s must be a floating-point torch.Tensor of shape (B,) (noise levels in [0, 1])")
        if s.numel() and not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError("s must be noise levels in [0, 1]; got values outside it or NaN")
        return self.linear(self.fourier(s)).squeeze(-1)

    def forward(self, per_sample_loss: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Combine a (B,) per-sample loss at noise levels s into one scalar, ``mean(L / exp(u(s)) + u(s))``."""
        if not isinstance(per_sample_loss, torch.Tensor) or not per_sample_loss.is_floating_point():
            raise TypeError("per_sample_loss must be a floating-point torch.Tensor of shape (B,)")
        if per_sample_loss.ndim != 1 or per_sample_loss.numel() == 0:
            raise ValueError(f"per_sample_loss must have shape (B,) with B >= 1, got {tuple(per_sample_loss.shape)}")
        if not isinstance(s, torch.Tensor) or s.shape != per_sample_loss.shape:
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"s must have the shape of per_sample_loss {tuple(per_sample_loss.shape)}, got {shape}")
        u = self.log_var(s)
        dtype = torch.promote_types(per_sample_loss.dtype, u.dtype)
        u = u.to(device=per_sample_loss.device, dtype=dtype)
        return (per_sample_loss.to(dtype) * torch.exp(-u) + u).mean()

    @torch.no_grad()
    def weights(self, s: torch.Tensor) -> torch.Tensor:
        """Current weights ``exp(-u(s))`` at the noise levels s, detached, for logging."""
        return torch.exp(-self.log_var(s))

    def param_group(self, lr: float = 0.01) -> dict:
        """Optimizer parameter group for the linear layer: own learning rate, no weight decay."""
        lr = check_float(lr, "lr", low=0.0, low_open=True)
        return {"params": list(self.linear.parameters()), "lr": lr, "weight_decay": 0.0}
