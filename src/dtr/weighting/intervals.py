"""ANT's intervals: validation, uniform splits, the clustering dynamic program and each timestep's interval."""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..validation import check_int

# --------------------------------------------------------------------------- checks of intervals


def _validate_intervals(intervals):
    """Return ``intervals`` as a list of int pairs, checking they tile ``[0, T)`` in order."""
    if isinstance(intervals, (str, bytes)) or not hasattr(intervals, "__iter__"):
        raise TypeError(f"intervals must be a sequence of (start, end) pairs, got {intervals!r}")
    out = []
    for i, pair in enumerate(intervals):
        try:
            start, end = pair
            start, end = operator.index(start), operator.index(end)
        except (TypeError, ValueError):
            raise TypeError(f"intervals[{i}] must be a (start, end) pair of ints, got {pair!r}") from None
        expected = out[-1][1] if out else 0
        if start != expected:
            where = (
                "the first interval must start at 0"
                if not out
                else (
                    f"intervals must be sorted, contiguous and non-overlapping: intervals[{i}] "
                    f"starts at {start} but the previous one ends at {expected}"
                )
            )
            raise ValueError(f"intervals are half-open (start, end) pairs tiling [0, T); {where}")
        if end <= start:
            raise ValueError(f"intervals[{i}] = {pair!r} is empty: each needs start < end")
        out.append((start, end))
    if not out:
        raise ValueError("intervals must contain at least one (start, end) pair")
    return out


# --------------------------------------------------------------------------- intervals


def uniform_intervals(num_timesteps: int, k: int) -> list[tuple[int, int]]:
    """Split ``[0, T)`` into k contiguous intervals whose sizes differ by at most 1."""
    num_timesteps = check_int(num_timesteps, "num_timesteps", minimum=1)
    k = check_int(k, "k", minimum=1, maximum=num_timesteps)
    bounds = [i * num_timesteps // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _cost_by_end(cost, num_timesteps):
    """(T, T) float64 table ``table[r, l] = cost(l, r)`` for l <= r and +inf for l > r.

    Rows are indexed by the interval's end so that the dynamic program reduces along contiguous rows."""
    if callable(cost):
        if num_timesteps is None:
            raise ValueError("num_timesteps is required when cost is a callable cost(l, r)")
        T = check_int(num_timesteps, "num_timesteps", minimum=1)
        right, left = np.tril_indices(T)
        values = np.asarray(cost(left, right), dtype=np.float64)
        try:
            values = np.broadcast_to(values, left.shape)
        except ValueError:
            raise ValueError(
                f"cost(l, r) must return one value per (l, r) pair ({left.size}), got shape {values.shape}"
            ) from None
    else:
        if isinstance(cost, torch.Tensor):
            cost = cost.detach().cpu().numpy()
        if not isinstance(cost, np.ndarray):
            raise TypeError(
                f"cost must be a (T, T) numpy array / torch tensor or a callable, got {type(cost).__name__}"
            )
        if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 1:
            raise ValueError(f"cost matrix must have shape (T, T) with T >= 1, got {cost.shape}")
        T = cost.shape[0]
        if num_timesteps is not None and check_int(num_timesteps, "num_timesteps", minimum=1) != T:
            raise ValueError(f"num_timesteps={num_timesteps} does not match the cost matrix size {T}")
        right, left = np.tril_indices(T)
        values = cost[left, right].astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("cost must be finite for every interval [l, r] with l <= r")
    table = np.full((T, T), np.inf)
    table[right, left] = values
    return table


def _cluster_by_end(table, k):
    """Exact dynamic program over a cost table from :func:`_cost_by_end`; O(k T^2) vectorised."""
    T = table.shape[0]
    k = check_int(k, "k", minimum=1, maximum=T)
    best = table[:, 0].copy()  # best[r]: cheapest split of [0, r] into j + 1 intervals
    choice = np.empty((k - 1, T), dtype=np.int64)  # choice[j - 1, r]: start of the last interval
    total, before, rows = np.empty_like(table), np.empty(T), np.arange(T)
    for j in range(1, k):
        before[0], before[1:] = np.inf, best[:-1]  # before[l]: cheapest split of [0, l - 1]
        np.add(table, before, out=total)  # total[r, l]: last interval is [l, r]
        choice[j - 1] = total.argmin(axis=1)
        best = total[rows, choice[j - 1]]
    bounds, r = [T], T - 1
    for j in range(k - 1, 0, -1):
        bounds.append(int(choice[j - 1, r]))
        r = bounds[-1] - 1
    bounds.append(0)
    bounds.reverse()
    return list(zip(bounds[:-1], bounds[1:]))


def cluster_intervals(cost, k: int, num_timesteps: int | None = None) -> list[tuple[int, int]]:
    """Optimal split of ``[0, T)`` into k contiguous intervals minimising the summed cost(l, r)
    of the inclusive intervals [l, r] (exact dynamic program, O(k T^2) vectorised time)."""
    return _cluster_by_end(_cost_by_end(cost, num_timesteps), k)


def _snr_cost_by_end(snr):
    """ANT's SNR cost as ``table[r, l] = sum_{t=l..r} |snr[t] - snr[c]|``, c = (l + r + 1) // 2.

    Partial sums run outwards from the centre: no sorting, no monotonicity assumed, no cancellation."""
    if isinstance(snr, torch.Tensor):
        snr = snr.detach().cpu().numpy()
    snr = np.asarray(snr, dtype=np.float64)
    if snr.ndim != 1 or snr.size < 1:
        raise ValueError(f"snr must be a 1-D array with at least one value, got shape {snr.shape}")
    if not np.isfinite(snr).all():
        raise ValueError("snr must be finite")
    T = snr.size
    idx = np.arange(T)
    dist = np.abs(snr[:, None] - snr)  # dist[c, t]
    after = idx >= idx[:, None]  # t >= c
    right = np.where(after, dist, 0.0)
    np.cumsum(right, axis=1, out=right)  # right[c, r] = sum_{t=c..r} dist[c, t]
    left = np.where(after[:, ::-1], 0.0, dist[:, ::-1])
    np.cumsum(left, axis=1, out=left)  # left[c, T-1-l] = sum_{t=l..c-1} dist[c, t]
    r, lo = idx[:, None], idx
    row = (lo + r + 1) // 2 * T  # flat offset of row c
    table = left.ravel()[row + (T - 1 - lo)] + right.ravel()[row + r]
    return np.where(lo <= r, table, np.inf)


def snr_intervals(snr: np.ndarray | torch.Tensor, k: int) -> list[tuple[int, int]]:
    """ANT's SNR-based interval clustering of the timesteps with the given per-timestep SNRs."""
    return _cluster_by_end(_snr_cost_by_end(snr), k)


def interval_index(t: torch.Tensor, intervals) -> torch.Tensor:
    """Index of the interval holding each timestep (vectorised); t must be integers in [0, T)."""
    intervals = _validate_intervals(intervals)
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
    T = intervals[-1][1]
    if t.numel() and bool(((t < 0) | (t >= T)).any()):
        raise ValueError(f"t must be in [0, {T}) (num_timesteps={T})")
    boundaries = torch.tensor([end for _, end in intervals[:-1]], dtype=t.dtype, device=t.device)
    return torch.bucketize(t, boundaries, right=True)
