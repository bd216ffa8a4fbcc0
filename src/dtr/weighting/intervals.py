"""ANT's intervals: validation, uniform splits, the clustering dynamic program and each timestep's interval."""

from __future__ import annotations

import numbers
import operator

import numpy as np
import torch

from ..validation import check_int

# --------------------------------------------------------------------------- checks of intervals


def _validate_intervals(intervals):
    """Return ``intervals`` as a list of pairs: ints tiling ``[0, T)`` (timesteps) or floats tiling ``[0, 1]`` (noise
    levels), checked to be sorted, contiguous and non-empty. Every pair has the kind of the first one."""
    if isinstance(intervals, (str, bytes)) or not hasattr(intervals, "__iter__"):
        raise TypeError(f"intervals must be a sequence of (start, end) pairs, got {intervals!r}")
    out, continuous = [], None
    for i, pair in enumerate(intervals):
        start, end, is_float = _pair(pair, i)
        if continuous is None:
            continuous = is_float
        elif is_float != continuous:
            first = "floats (noise levels)" if continuous else "ints (timesteps)"
            raise TypeError(f"intervals[{i}] = {pair!r} must be a pair of {first}, like intervals[0]")
        _check_next(out, start, end, i, pair, continuous)
        out.append((start, end))
    if not out:
        raise ValueError("intervals must contain at least one (start, end) pair")
    if continuous and out[-1][1] != 1.0:
        raise ValueError(
            f"intervals of floats are noise levels tiling [0, 1]: the last one must end at 1.0, got {out[-1][1]!r} "
            "(give integer timesteps as ints)"
        )
    return out


def _pair(pair, i):
    """``(start, end, is_float)`` of ``intervals[i]``: two ints (numpy ints too) or two finite floats."""
    try:
        start, end = pair
    except (TypeError, ValueError):
        start = end = None
    if all(isinstance(v, float | np.floating) for v in (start, end)):
        if not (np.isfinite(start) and np.isfinite(end)):
            raise ValueError(f"intervals[{i}] = {pair!r} must be finite")
        return float(start), float(end), True
    try:
        return operator.index(start), operator.index(end), False
    except TypeError:
        raise TypeError(
            f"intervals[{i}] must be a (start, end) pair of ints (timesteps) or of floats (noise levels in [0, 1]), "
            f"got {pair!r}"
        ) from None


def _check_next(out, start, end, i, pair, continuous):
    """Check that ``(start, end)`` continues the tiling ``out``: starts where it ends (at 0 first), is non-empty."""
    expected = out[-1][1] if out else (0.0 if continuous else 0)
    if start != expected:
        where = (
            f"the first interval must start at {expected!r}"
            if not out
            else (
                f"intervals must be sorted, contiguous and non-overlapping: intervals[{i}] "
                f"starts at {start} but the previous one ends at {expected}"
            )
        )
        tiling = "[0, 1] (noise levels)" if continuous else "[0, T)"
        raise ValueError(f"intervals are half-open (start, end) pairs tiling {tiling}; {where}")
    if end <= start:
        raise ValueError(f"intervals[{i}] = {pair!r} is empty: each needs start < end")


def _is_continuous(intervals):
    """Whether validated ``intervals`` are noise levels (floats on [0, 1]) rather than integer timesteps."""
    return isinstance(intervals[0][0], float)


# --------------------------------------------------------------------------- intervals


def uniform_intervals(num_timesteps: int, k: int) -> list[tuple[int, int]]:
    """Split ``[0, T)`` into k contiguous intervals whose sizes differ by at most 1."""
    num_timesteps = check_int(num_timesteps, "num_timesteps", minimum=1)
    k = check_int(k, "k", minimum=1, maximum=num_timesteps)
    bounds = [i * num_timesteps // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def unit_intervals(k: int) -> list[tuple[float, float]]:
    """Split the noise levels ``[0, 1]`` into k equal contiguous intervals ``(i / k, (i + 1) / k)``."""
    k = check_int(k, "k", minimum=1)
    bounds = [i / k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _grid(grid):
    """A clustering grid as a list of N + 1 floats: ``i / N`` for an int N, else the given increasing boundaries
    from 0.0 to 1.0 (a 1-D sequence, numpy array or tensor)."""
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        n = check_int(grid, "grid", minimum=1)
        return [i / n for i in range(n + 1)]
    if isinstance(grid, torch.Tensor):
        grid = grid.detach().cpu().numpy()
    try:
        bounds = np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"grid must be an int (number of cells) or 1-D boundaries, got {type(grid).__name__}") from None
    if bounds.ndim != 1 or bounds.size < 2:
        raise ValueError(f"grid must be 1-D with at least 2 boundaries, got shape {bounds.shape}")
    if bounds[0] != 0.0 or bounds[-1] != 1.0 or not (np.diff(bounds) > 0).all():
        raise ValueError("grid boundaries must increase strictly from 0.0 to 1.0")
    return bounds.tolist()


def _on_grid(intervals, grid):
    """Integer intervals over grid cells as the float intervals they cover on [0, 1]."""
    if grid is None:
        return intervals
    return [(grid[start], grid[end]) for start, end in intervals]


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


def cluster_intervals(cost, k: int, num_timesteps: int | None = None, *, grid=None) -> list[tuple]:
    """Optimal split of ``[0, T)`` into k contiguous intervals minimising the summed cost(l, r)
    of the inclusive intervals [l, r] (exact dynamic program, O(k T^2) vectorised time).

    With ``grid`` (an int N for N equal cells of [0, 1], or N + 1 increasing boundaries from 0.0 to 1.0) the T = N
    indices are the grid's cells and the result is the float intervals of noise levels they cover."""
    if grid is not None:
        grid = _grid(grid)
        cells = len(grid) - 1
        if num_timesteps is not None and check_int(num_timesteps, "num_timesteps", minimum=1) != cells:
            raise ValueError(f"num_timesteps={num_timesteps} does not match the grid's {cells} cells")
        num_timesteps = cells if callable(cost) else num_timesteps
    table = _cost_by_end(cost, num_timesteps)
    if grid is not None and table.shape[0] != len(grid) - 1:
        raise ValueError(f"the cost matrix size {table.shape[0]} does not match the grid's {len(grid) - 1} cells")
    return _on_grid(_cluster_by_end(table, k), grid)


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


def snr_intervals(snr: np.ndarray | torch.Tensor, k: int, *, grid=None) -> list[tuple]:
    """ANT's SNR-based interval clustering of the timesteps with the given per-timestep SNRs.

    With ``grid`` (see :func:`cluster_intervals`), ``snr`` holds one SNR per grid cell (e.g. :func:`flow_snr` at the
    cells' midpoints) and the result is float intervals of noise levels."""
    table = _snr_cost_by_end(snr)
    if grid is not None:
        grid = _grid(grid)
        if table.shape[0] != len(grid) - 1:
            raise ValueError(f"snr has {table.shape[0]} values but the grid has {len(grid) - 1} cells")
    return _on_grid(_cluster_by_end(table, k), grid)


def interval_index(t: torch.Tensor, intervals) -> torch.Tensor:
    """Index of the interval holding each timestep (vectorised): integer t in [0, T) for integer intervals, noise
    levels t in [0, 1] (any float dtype, compared exactly) for float intervals, where ``t = 1`` is in the last."""
    intervals = _validate_intervals(intervals)
    t = torch.as_tensor(t)
    if _is_continuous(intervals):
        if not t.is_floating_point():
            raise TypeError(f"t must hold noise levels in [0, 1] (a float dtype) for float intervals, got {t.dtype}")
        if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("t must be noise levels in [0, 1] for float intervals; got values outside it or NaN")
        boundaries = torch.tensor([end for _, end in intervals[:-1]], dtype=torch.float64, device=t.device)
        return torch.bucketize(t.double(), boundaries, right=True)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer timesteps for integer intervals, got dtype {t.dtype}")
    T = intervals[-1][1]
    if t.numel() and bool(((t < 0) | (t >= T)).any()):
        raise ValueError(f"t must be in [0, {T}) (num_timesteps={T})")
    boundaries = torch.tensor([end for _, end in intervals[:-1]], dtype=t.dtype, device=t.device)
    return torch.bucketize(t, boundaries, right=True)
