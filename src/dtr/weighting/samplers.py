"""ANT's stratified batch sampler: an equal share of every batch from every interval."""

from __future__ import annotations

import torch

from ..validation import check_int
from .intervals import _validate_intervals


class StratifiedTimestepSampler:
    """ANT's batch sampler: an equal share of timesteps from every interval, uniform inside it.

    The B % k leftover samples go to distinct intervals drawn at random, so counts differ by at most
    1 and the batch keeps its size. The output is laid out interval by interval (not shuffled), like
    the paper code's ``sample_t_batch``; :class:`UncertaintyWeighting` does not depend on the order."""

    def __init__(self, intervals: list[tuple[int, int]]):
        self.intervals = _validate_intervals(intervals)

    @property
    def num_intervals(self) -> int:
        """Number of intervals k."""
        return len(self.intervals)

    @property
    def num_timesteps(self) -> int:
        """Number of timesteps T covered by the intervals."""
        return self.intervals[-1][1]

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a (B,) LongTensor of timesteps; reproducible when given a seeded generator."""
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        k = self.num_intervals
        home = generator.device if generator is not None else torch.device("cpu")
        starts = torch.tensor([s for s, _ in self.intervals], device=home)
        sizes = torch.tensor([e - s for s, e in self.intervals], device=home)
        counts = torch.full((k,), batch_size // k, dtype=torch.long, device=home)
        if batch_size % k:
            extra = torch.randperm(k, generator=generator, device=home)[: batch_size % k]
            counts[extra] += 1
        which = torch.repeat_interleave(torch.arange(k, device=home), counts)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=home)
        offset = torch.minimum((u * sizes[which]).long(), sizes[which] - 1)
        return (starts[which] + offset).to(device if device is not None else home)

    def __repr__(self):
        return f"StratifiedTimestepSampler(intervals={self.intervals})"
