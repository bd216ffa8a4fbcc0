"""ANT's stratified batch sampler: an equal share of every batch from every interval."""

from __future__ import annotations

import math

import torch

from ..validation import check_int
from .densities import TruncatedDensity
from .intervals import _is_continuous, _validate_intervals


class StratifiedTimestepSampler:
    """ANT's batch sampler: an equal share of timesteps from every interval, uniform inside it.

    The B % k leftover samples go to distinct intervals drawn at random, so counts differ by at most
    1 and the batch keeps its size. The output is laid out interval by interval (not shuffled), like
    the paper code's ``sample_t_batch``; :class:`UncertaintyWeighting` does not depend on the order.

    With float intervals (noise levels tiling [0, 1]) each interval's share follows ``density`` restricted to the
    interval: ``"uniform"``, ``"logit_normal"`` (``logit_mean`` 0, ``logit_std`` 1 by default) or SD3's ``"mode"``
    (``mode_scale`` 1.29 by default, in [-1, 2 / (pi - 2)]), each optionally shifted by ``shift`` (the flow
    schedulers' ``shift * s / (1 + (shift - 1) * s)``; 1 = no shift). With one interval ``[(0.0, 1.0)]`` that is
    the plain density. Integer intervals take none of these (their timesteps are uniform in each interval)."""

    def __init__(
        self,
        intervals: list[tuple[int, int]] | list[tuple[float, float]],
        density: str = "uniform",
        *,
        logit_mean: float | None = None,
        logit_std: float | None = None,
        mode_scale: float | None = None,
        shift: float = 1.0,
    ):
        self.intervals = _validate_intervals(intervals)
        if not _is_continuous(self.intervals):
            given = [name for name, v in (("logit_mean", logit_mean), ("logit_std", logit_std)) if v is not None]
            given += ["mode_scale"] if mode_scale is not None else []
            given += [f"density={density!r}"] if density != "uniform" else []
            given += [f"shift={shift!r}"] if shift != 1.0 else []
            if given:
                raise ValueError(
                    f"{', '.join(given)}: densities apply to float intervals (noise levels tiling [0, 1]); these "
                    "intervals are integer timesteps, sampled uniformly within each interval"
                )
            self.density = None
            return
        self.density = TruncatedDensity(
            density, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, shift=shift
        )
        starts = torch.tensor([s for s, _ in self.intervals], dtype=torch.float64)
        ends = torch.tensor([e for _, e in self.intervals], dtype=torch.float64)
        self._lo, self._hi, self._mirrored = self.density.bounds(starts, ends)
        self._bounds_by_dtype = {}

    @property
    def num_intervals(self) -> int:
        """Number of intervals k."""
        return len(self.intervals)

    @property
    def num_timesteps(self) -> int | None:
        """Number of timesteps T covered by integer intervals; None for float intervals (noise levels)."""
        return None if self.density is not None else self.intervals[-1][1]

    def sample(
        self, batch_size: int, device=None, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Draw a (B,) tensor: integer timesteps (int64) or noise levels (``dtype``, float32 by default), each
        inside its interval in that dtype; reproducible when given a seeded generator."""
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        dtype = self._check_dtype(dtype)
        k = self.num_intervals
        home = generator.device if generator is not None else torch.device("cpu")
        counts = torch.full((k,), batch_size // k, dtype=torch.long, device=home)
        if batch_size % k:
            extra = torch.randperm(k, generator=generator, device=home)[: batch_size % k]
            counts[extra] += 1
        which = torch.repeat_interleave(torch.arange(k, device=home), counts)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=home)
        if self.density is not None:
            return self._noise_levels(u, which, dtype).to(device if device is not None else home)
        starts = torch.tensor([s for s, _ in self.intervals], device=home)
        sizes = torch.tensor([e - s for s, e in self.intervals], device=home)
        offset = torch.minimum((u * sizes[which]).long(), sizes[which] - 1)
        return (starts[which] + offset).to(device if device is not None else home)

    def _check_dtype(self, dtype):
        """The output dtype: int64 for integer intervals, a float dtype (float32 by default) for noise levels."""
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if self.density is None:
            if dtype not in (None, torch.int64):
                raise ValueError(f"dtype must be None or torch.int64 for integer intervals (timesteps), got {dtype}")
            return torch.int64
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype for float intervals (noise levels), got {dtype}")
        return dtype

    def _noise_levels(self, u, which, dtype):
        """Inverse-CDF draws of the truncated density, rounded into each sample's interval in ``dtype``."""
        lo, hi, mirrored = (x.to(u.device)[which] for x in (self._lo, self._hi, self._mirrored))
        s = self.density.draw(lo + u * (hi - lo), mirrored)
        low, high = (x.to(u.device)[which] for x in self._representable_bounds(dtype))
        return torch.minimum(torch.maximum(s.to(dtype), low), high)

    def _representable_bounds(self, dtype):
        """Per interval, the smallest value of ``dtype`` >= its start and the largest < its end (<= 1 for the last):
        rounding a float64 draw to ``dtype`` then keeps it in its own interval (it moves by at most one ulp)."""
        if dtype not in self._bounds_by_dtype:
            starts = torch.tensor([s for s, _ in self.intervals], dtype=torch.float64)
            ends = torch.tensor([e for _, e in self.intervals], dtype=torch.float64)
            low, high = starts.to(dtype), ends.to(dtype)
            low = torch.where(low.double() < starts, torch.nextafter(low, torch.full_like(low, math.inf)), low)
            high = torch.where(high.double() >= ends, torch.nextafter(high, torch.full_like(high, -math.inf)), high)
            high[-1] = 1.0
            empty = (low > high).nonzero()
            if len(empty):
                i = int(empty[0])
                raise ValueError(
                    f"intervals[{i}] = {self.intervals[i]} holds no {dtype} value: sample in a wider dtype"
                )
            self._bounds_by_dtype[dtype] = (low, high)
        return self._bounds_by_dtype[dtype]

    def __repr__(self):
        density = f", {self.density!r}" if self.density is not None else ""
        return f"StratifiedTimestepSampler(intervals={self.intervals}{density})"
