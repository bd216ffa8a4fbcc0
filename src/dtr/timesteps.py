"""Timestep conventions: what the timestep a model receives means, and which of the T tasks it is.

Models pass their timestep in one of four conventions (``timestep_kind``): DDPM step indices or ``sigma * 1000``
(``"index"``), the same reversed (``"index_reversed"``, T = data), a noise level in [0, 1] (``"unit"``, 0 = data:
flow matching's sigma) or its reverse (``"unit_reversed"``, SiT's t, 1 = data).  ``task_axis`` says how a
timestep becomes one of the T tasks: ``"linear"`` in the timestep (the paper's DDPM tasks, and the default for
every kind), or ``"logsnr"``: a flow noise level s goes to the DDPM task of equal log-SNR, so that a flow model's
s = 0.5 (SNR 1) uses the channels a DDPM model uses at SNR 1.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from . import policy
from ._compat import assume_constant_result

# Floats a scheduler's rounding puts just outside the range (Sana-Sprint's first sigma is 1.0000037) count as its
# end: a relative slack this small never moves a timestep by a task.
FLOAT_SLACK = 1e-4


def timesteps_to_tasks(t: Any, num_tasks: int, kind: str = "index", task_axis: str = "linear") -> torch.Tensor:
    """Map the timesteps a model receives to task indices in [0, T), checking the range.

    ``"index"``: DDPM timesteps, ints or floats in [0, T] (floats from Euler/Karras schedulers and sigma*1000
    are rounded to the nearest task; flow matching's ``T`` itself is task T-1); ``"index_reversed"``: floats
    or ints in [0, T] with T = data (Mochi's (1 - sigma) * 1000).
    ``"unit"``: continuous t in [0, 1], 0 = data (flow matching's sigma); ``"unit_reversed"``: 1 = data (SiT,
    Lumina's 1 - sigma).  Floats within ``FLOAT_SLACK`` of the range count as its end.
    ``task_axis="logsnr"`` reads the timestep as a flow noise level s (s = t / T for the index kinds) and
    returns the task of the DDPM linear schedule (DiT's, over T steps) whose log-SNR is nearest to
    log(((1 - s) / s) ** 2).
    Accepts a scalar, one timestep per sample (B,), or one per token (B, N); returns long task indices of
    the same shape.
    """
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (torch.Tensor, int, float, np.integer, np.floating)):
        raise TypeError(f"timestep must be a tensor, an int or a float, got {type(t).__name__}")
    t = torch.as_tensor(t)
    if t.ndim > 2:
        raise ValueError(
            f"timesteps must be a scalar, one per sample (batch,) or one per token (batch, tokens), "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"timesteps must be integer or floating point, got {t.dtype}")
    if not t.dtype.is_floating_point:
        t = t.long()  # uint8/int16 timesteps: compare and index in int64, where T fits
    unit = kind in ("unit", "unit_reversed")
    hi = 1 if unit else num_tasks
    _check_range(t, hi, kind)
    if t.dtype.is_floating_point:
        t = t.clamp(0, hi)  # only the slack moves
    if task_axis == "logsnr":
        return _logsnr_tasks(_noise_level(t, num_tasks, kind), num_tasks)
    if kind == "index":
        if t.dtype.is_floating_point:
            return torch.round(t).long().clamp_(max=num_tasks - 1)  # only t in (T - 0.5, T] moves: it is task T-1
        return t
    if kind == "index_reversed":  # T - t is an "index" timestep
        return torch.round(num_tasks - t).long().clamp_(max=num_tasks - 1)
    u = _wide(t)
    if kind == "unit_reversed":
        u = 1.0 - u
    return torch.round(u * (num_tasks - 1)).long()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 (float32 on MPS, which has no float64)."""
    return t.double() if t.device.type != "mps" else t.float()


def _check_range(t: torch.Tensor, hi: float, kind: str) -> None:
    """Fail on timesteps outside [0, hi] (integer DDPM indices: [0, hi)); asynchronously on accelerators.

    On CUDA the check is a device-side assert (no host sync on the hot path): it fails the next
    synchronising call and ends the CUDA context, as any device assert does.  Under torch.func transforms the
    values are checked on the tensor the transforms wrap (vmap: all samples at once).
    """
    if t.device.type == "meta":  # no values to check
        return
    values = policy.plain_values(t)
    if kind == "index" and not t.dtype.is_floating_point:
        ok = (values >= 0) & (values < hi)
        allowed = f"[0, {hi}) (integer DDPM timesteps)"
    elif not t.dtype.is_floating_point:
        ok = (values >= 0) & (values <= hi)
        allowed = f"[0, {hi}] (timestep_kind={kind!r})"
    else:
        slack = FLOAT_SLACK * hi
        ok = (values >= -slack) & (values <= hi + slack)  # NaN fails too
        allowed = f"[0, {hi}]" + (" (float DDPM timesteps)" if kind == "index" else f" (timestep_kind={kind!r})")
    if not policy.checks_values_now(values):
        torch._assert_async(ok.all(), f"dtr: timesteps outside {allowed}")
    elif not bool(ok.all()):
        bad = values[~ok].flatten()[:5].tolist()
        hint = ""
        if kind == "index" and any(v >= hi for v in bad):
            hint = "; a schedule with more training steps needs dtr.wrap(..., num_tasks=<its num_train_timesteps>)"
        raise ValueError(f"timesteps must be in {allowed}; got {bad}{hint}")


#################################################################################
#                        The log-SNR axis (flow noise levels)                    #
#################################################################################


def _noise_level(t: torch.Tensor, num_tasks: int, kind: str) -> torch.Tensor:
    """The flow noise level s in [0, 1] (0 = data) a timestep of ``kind`` stands for, in float64."""
    u = _wide(t)
    if kind in ("index", "index_reversed"):
        u = u / num_tasks
    return 1.0 - u if kind in ("index_reversed", "unit_reversed") else u


def _logsnr_tasks(s: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """The DDPM task whose log-SNR is nearest to that of noise level s: a search among the T - 1 boundaries,
    written in s (so that s = 0 and s = 1, log-SNR +-inf, need no special case)."""
    if policy.compiling():  # a constant of the graph, computed by numpy at trace time
        bounds = torch.tensor(_bounds_tuple(num_tasks), dtype=s.dtype, device=s.device)
    else:
        bounds = torch.from_numpy(logsnr_boundaries(num_tasks)).to(s.device, s.dtype)
    return torch.searchsorted(bounds, s.contiguous(), right=False)


@functools.lru_cache(maxsize=8)
def logsnr_boundaries(num_tasks: int) -> np.ndarray:
    """Noise levels s where the nearest DDPM task (by log-SNR) changes from t to t + 1, ascending (T - 1 values).

    The DDPM schedule is DiT's linear one over T steps: betas from 1e-4 to 0.02 scaled by 1000 / T, SNR_t =
    abar_t / (1 - abar_t); a flow path x_s = (1 - s) x0 + s eps has SNR ((1 - s) / s) ** 2.
    """
    scale = 1000 / num_tasks
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_tasks, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    logsnr = np.log(abar) - np.log1p(-abar)  # decreasing in t
    mid = (logsnr[:-1] + logsnr[1:]) / 2
    bounds = 1.0 / (1.0 + np.exp(mid / 2))  # log-SNR = 2 log((1 - s) / s)  <=>  s = 1 / (1 + exp(logsnr / 2))
    bounds.setflags(write=False)
    return bounds


@assume_constant_result
def _bounds_tuple(num_tasks: int) -> tuple:
    return tuple(logsnr_boundaries(num_tasks).tolist())
