"""Task masks: which channels each denoising task activates.

DTR (Park et al., ICLR 2024) gives task t the contiguous window ``[start[t], start[t] + C_b)`` of
``C_b = int(C * sharing_ratio)`` channels, with ``start[t] = round((t / (T-1)) ** alpha * (C - C_b))``.
Random routing (the paper's R-TR baseline) gives each task a seeded random subset of C_b channels per
routed block.  ``task_masks`` builds whole (T, C) tables for inspection; the router builds only the
rows of the tasks in a batch, with the same functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .spec import METHODS
from .validation import check_alpha, check_choice, check_int, check_seed, check_sharing_ratio

#################################################################################
#                               The DTR window                                  #
#################################################################################


def active_channels(channels: int, sharing_ratio: float) -> int:
    """C_b = int(C * sharing_ratio), the number of channels each task activates (floor, as the paper)."""
    channels = check_int(channels, "channels", minimum=1)
    c_b = int(channels * check_sharing_ratio(sharing_ratio))
    if c_b < 1:
        raise ValueError(
            f"sharing_ratio={sharing_ratio} leaves no active channel for width {channels} "
            f"(int({channels} * {sharing_ratio}) = 0); use sharing_ratio >= {smallest_ratio(channels)}"
        )
    return c_b


def smallest_ratio(channels: int) -> float:
    """The shortest decimal ratio r with int(channels * r) == 1: what the error above can safely suggest."""
    for digits in range(1, 18):
        r = math.ceil(10**digits / channels) / 10**digits
        if int(channels * r) == 1:
            return r
    return 1.0 / channels


def window_starts(num_tasks: int, channels: int, sharing_ratio: float = 0.8, alpha: float = 4.0) -> np.ndarray:
    """First active channel of each task: round((t / (T-1)) ** alpha * (C - C_b)), float64, half to even.

    Written as the paper code writes it (``np.round(np.linspace(0, 1, T) ** alpha * (C - C_b))``)
    so that masks agree channel for channel with models trained by that code.
    """
    num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
    c_b = active_channels(channels, sharing_ratio)
    alpha = check_alpha(alpha)
    return np.round(np.linspace(0, 1, num_tasks) ** alpha * (channels - c_b)).astype(np.int64)


def window_rows(starts: torch.Tensor, channels: int, c_b: int) -> torch.Tensor:
    """(N, C) bool rows: row i activates channels [starts[i], starts[i] + c_b)."""
    c = torch.arange(channels, device=starts.device)
    s = starts[:, None]
    return (c >= s) & (c < s + c_b)


#################################################################################
#                        Random routing (the R-TR baseline)                     #
#################################################################################


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values, without int64 overflow."""

    def mul32(v: torch.Tensor, c: int) -> torch.Tensor:  # (v * c) mod 2**32, split so no product exceeds 2**48
        return (((v >> 16) * c & 0xFFFF) << 16) + (v & 0xFFFF) * c & 0xFFFFFFFF

    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_rows(tasks: torch.Tensor, channels: int, c_b: int, seed: int, block: int) -> torch.Tensor:
    """(N, C) bool R-TR rows: the C_b channels with the highest hash of (seed, block, task, channel).

    A pure function of its arguments, so every machine draws the same masks for the same seed.
    """
    base = _hash32(torch.tensor([seed & 0xFFFFFFFF], dtype=torch.int64, device=tasks.device))
    base = _hash32((base + block) & 0xFFFFFFFF)
    per_task = _hash32((base + tasks.long()) & 0xFFFFFFFF)  # (N,)
    c = torch.arange(channels, device=tasks.device, dtype=torch.int64)
    h = _hash32((per_task[:, None] * 65599 + _hash32(c)[None, :]) & 0xFFFFFFFF)
    scores = (h << 16) | c  # the channel index in the low bits makes every score unique: no ties
    top = torch.topk(scores, c_b, dim=-1).indices
    mask = torch.zeros(tasks.shape[0], channels, dtype=torch.bool, device=tasks.device)
    return mask.scatter_(1, top, True)


#################################################################################
#                               Whole tables                                    #
#################################################################################


def task_masks(
    num_tasks: int,
    channels: int,
    sharing_ratio: float = 0.8,
    alpha: float = 4.0,
    method: str = "dtr",
    seed: int | None = None,
    block: int = 0,
) -> torch.Tensor:
    """The (num_tasks, channels) boolean mask table: row t is the channels task t activates.

    ``method="dtr"``: task t activates the contiguous window ``[start[t], start[t] + C_b)``.
    ``method="random"``: task t activates a random subset of exactly C_b channels, a pure
    function of ``(seed, block, t)``: every routed block (``block`` = its index) gets its own
    draw, and the same seed gives the same masks on every machine.  ``seed=None`` draws a seed
    from torch's default generator.
    """
    check_choice(method, "method", METHODS)
    num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
    c_b = active_channels(channels, sharing_ratio)
    if method == "dtr":
        return window_rows(torch.from_numpy(window_starts(num_tasks, channels, sharing_ratio, alpha)), channels, c_b)
    return random_rows(torch.arange(num_tasks), channels, c_b, resolve_seed(seed), block)


def resolve_seed(seed: int | None) -> int:
    """An explicit seed, or one drawn from torch's default generator for ``seed=None``."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return check_seed(seed)
