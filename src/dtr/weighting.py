"""Loss weightings for diffusion training, ANT uncertainty weighting and interval clustering.

The weightings the DTR paper combines with routing (`general.loss_weight_type` in its code):

- ``constant``: every timestep weighs 1 (the DiT default).
- ``min_snr_<gamma>``: Min-SNR-gamma (Hang et al., 2023), ``min(SNR, gamma) / SNR`` for epsilon
  prediction, ``min(SNR, gamma) / (SNR + 1)`` for v prediction and ``min(SNR, gamma)`` for x0.
- ``p2weight_<gamma>_<k>``: P2 weighting (Choi et al., 2022), ``1 / (k + SNR) ** gamma``.
- ``uw``: ANT-UW (Go et al., 2023): timesteps are split into k contiguous intervals, each batch
  takes an equal share from every interval (:class:`StratifiedTimestepSampler`) and the interval
  losses are combined with learned log-variances (:class:`UncertaintyWeighting`).

Intervals are half-open ``(start, end)`` pairs that tile ``[0, T)`` in order. ANT's interval
clustering is :func:`cluster_intervals`, an exact dynamic program over any interval cost, with
:func:`snr_intervals` for its SNR-based cost. Everything runs in O(k * T^2) vectorised numpy.
"""

from __future__ import annotations

import numbers
import operator
import re
from dataclasses import dataclass

import numpy as np
import torch

from .validation import check_choice, check_float, check_int

__all__ = [
    "LossWeighting",
    "StratifiedTimestepSampler",
    "UncertaintyWeighting",
    "cluster_intervals",
    "interval_index",
    "min_snr_weight",
    "p2_weight",
    "parse_loss_weight_type",
    "snr_from_alphas_cumprod",
    "snr_intervals",
    "uniform_intervals",
]

_PREDICTIONS = ("epsilon", "v", "x0")
_KINDS = ("constant", "min_snr", "p2", "uw")
_VALID_NAMES = '"constant", "min_snr_<gamma>" (e.g. "min_snr_5"), "p2weight_<gamma>_<k>" (e.g. "p2weight_1_1"), "uw"'
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_MIN_SNR_RE = re.compile(rf"min_snr_{_NUMBER}")
_P2_RE = re.compile(rf"p2weight_{_NUMBER}_{_NUMBER}")


# --------------------------------------------------------------------------- checks of tensors and intervals


def _snr_tensor(snr):
    """Check that ``snr`` is a floating-point torch tensor."""
    if not isinstance(snr, torch.Tensor):
        raise TypeError(f"snr must be a torch.Tensor, got {type(snr).__name__}")
    if not snr.is_floating_point():
        raise TypeError(f"snr must be a floating-point tensor, got dtype {snr.dtype}")
    return snr


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


# --------------------------------------------------------------------------- ANT-UW


class UncertaintyWeighting(torch.nn.Module):
    """ANT-UW: ``sum_i 0.5 * (exp(-s_i) * L_i + s_i)`` over the intervals present in a batch,
    with ``L_i`` interval i's mean loss divided by k and ``s_i`` a learned log-variance."""

    def __init__(self, num_intervals: int):
        super().__init__()
        self.num_intervals = check_int(num_intervals, "num_intervals", minimum=1)
        self.log_vars = torch.nn.Parameter(torch.zeros(self.num_intervals))

    def forward(self, per_sample_loss: torch.Tensor, interval_index: torch.Tensor) -> torch.Tensor:
        """Combine a (B,) per-sample loss into one scalar, grouping samples by interval index."""
        k = self.num_intervals
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
        return f"num_intervals={self.num_intervals}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The paper code (ANT / DTR, models/UW.py) names the parameter `loss_scale`.
        if prefix + "loss_scale" in state_dict and prefix + "log_vars" not in state_dict:
            state_dict[prefix + "log_vars"] = state_dict.pop(prefix + "loss_scale")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
