"""Densities of noise levels s in [0, 1] that flow models train with, restricted (truncated) to an interval.

Each density is the law of ``s = shift(g(p))`` with p uniform on [0, 1] and g increasing (its inverse CDF):

- ``uniform``: ``g(p) = p``.
- ``logit_normal`` (SD3's default): ``g(p) = sigmoid(logit_mean + logit_std * Phi^-1(p))``.
- ``mode`` (SD3's mode sampling, with its scale c in [-1, 2 / (pi - 2)]): ``g(p) = (1 + c) p - c sin^2(pi p / 2)``,
  which is diffusers' ``1 - u - c (cos^2(pi u / 2) - 1 + u)`` at ``u = 1 - p``.
- ``shift`` (the timestep shift of SD3 / Flux schedulers, 1 = none): ``s' = shift s / (1 + (shift - 1) s)``.

Truncating to ``[a, b]`` is drawing p uniformly between ``F(a)`` and ``F(b)`` (F = g^-1, the CDF). The logit-normal
works in the normal's lower tail (mirrored where the interval lies above the mean) so that narrow intervals far in a
tail keep their precision.
"""

from __future__ import annotations

import math

import torch

from ..validation import check_choice, check_float, check_int

DENSITIES = ("uniform", "logit_normal", "mode")
_MODE_SCALE_MAX = 2 / (math.pi - 2)  # beyond it (or below -1) SD3's mode map is not monotone: not a density
_BISECTION_STEPS = 80  # halves [0, 1] below float64 resolution


class TruncatedDensity:
    """A noise-level density with its parameters, and the means to sample it restricted to intervals of [0, 1]."""

    def __init__(self, density="uniform", *, logit_mean=None, logit_std=None, mode_scale=None, shift=1.0):
        self.density = check_choice(density, "density", DENSITIES)
        for name, value, owner in (
            ("logit_mean", logit_mean, "logit_normal"),
            ("logit_std", logit_std, "logit_normal"),
            ("mode_scale", mode_scale, "mode"),
        ):
            if value is not None and density != owner:
                raise ValueError(f"{name} applies to density={owner!r} only, got density={density!r}")
        self.logit_mean = check_float(0.0 if logit_mean is None else logit_mean, "logit_mean")
        self.logit_std = check_float(1.0 if logit_std is None else logit_std, "logit_std", low=0.0, low_open=True)
        self.mode_scale = check_float(
            1.29 if mode_scale is None else mode_scale, "mode_scale", low=-1.0, high=_MODE_SCALE_MAX
        )
        self.shift = check_float(shift, "shift", low=0.0, low_open=True)

    # ----------------------------------------------------------------------- the maps (float64 tensors)

    def _mode(self, p):
        """SD3's mode map as an increasing function of p in [0, 1]."""
        c = self.mode_scale
        return (1 + c) * p - c * torch.sin(math.pi * p / 2) ** 2

    def _mode_inverse(self, s):
        """p with ``_mode(p) = s``, by bisection (the map is increasing, with no closed-form inverse)."""
        lo, hi = torch.zeros_like(s), torch.ones_like(s)
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            below = self._mode(mid) < s
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return torch.where(s <= 0, 0.0, torch.where(s >= 1, 1.0, hi))

    def _shift(self, s):
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _unshift(self, s):
        return s / (self.shift - (self.shift - 1) * s)

    def _z(self, s):
        """The standard-normal variable of the logit-normal at s (inf at s = 1, -inf at s = 0)."""
        return (torch.logit(s) - self.logit_mean) / self.logit_std

    # ----------------------------------------------------------------------- truncation

    def bounds(self, starts, ends):
        """Per interval ``[a, b]``: the range ``(lo, hi)`` of p to draw uniformly, and whether p is mirrored
        (``z = -Phi^-1(p)``, for logit-normal intervals above the mean). Raises where an interval has no mass."""
        a, b = self._unshift(starts), self._unshift(ends)
        mirrored = torch.zeros_like(a, dtype=torch.bool)
        if self.density == "uniform":
            lo, hi = a, b
        elif self.density == "mode":
            lo, hi = self._mode_inverse(a), self._mode_inverse(b)
        else:
            za, zb = self._z(a), self._z(b)
            mirrored = za > 0
            lo = _ndtr(torch.where(mirrored, -zb, za))
            hi = _ndtr(torch.where(mirrored, -za, zb))
        empty = ~(hi > lo)
        if bool(empty.any()):
            i = int(empty.nonzero()[0])
            raise ValueError(
                f"intervals[{i}] = ({float(starts[i])!r}, {float(ends[i])!r}) has probability 0 in float64 under "
                f"{self!r}: no noise level can be drawn from it"
            )
        return lo, hi, mirrored

    def draw(self, p, mirrored):
        """Noise levels ``s = shift(g(p))`` for probabilities p drawn within :meth:`bounds`."""
        if self.density == "uniform":
            s = p
        elif self.density == "mode":
            s = self._mode(p)
        else:
            z = torch.special.ndtri(p)
            s = torch.sigmoid(self.logit_mean + self.logit_std * torch.where(mirrored, -z, z))
        return self._shift(s)

    def __repr__(self):
        params = {
            "uniform": "",
            "logit_normal": f", logit_mean={self.logit_mean!r}, logit_std={self.logit_std!r}",
            "mode": f", mode_scale={self.mode_scale!r}",
        }[self.density]
        shift = f", shift={self.shift!r}" if self.shift != 1.0 else ""
        return f"density={self.density!r}{params}{shift}"


def quantile_intervals(
    k: int,
    density: str = "uniform",
    *,
    logit_mean: float | None = None,
    logit_std: float | None = None,
    mode_scale: float | None = None,
    shift: float = 1.0,
) -> list[tuple[float, float]]:
    """k float intervals of equal probability under a density (its quantiles ``F^-1(i / k)``): with them, ANT's
    equal share per interval keeps the density itself, where equal-width intervals flatten it across intervals."""
    k = check_int(k, "k", minimum=1)
    law = TruncatedDensity(density, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, shift=shift)
    p = torch.arange(k + 1, dtype=torch.float64) / k
    bounds = [0.0, *law.draw(p, torch.zeros_like(p, dtype=torch.bool))[1:-1].tolist(), 1.0]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"k={k} quantiles of {law!r} are not distinct in float64: use fewer intervals")
    return list(zip(bounds[:-1], bounds[1:]))


def _ndtr(z):
    """Standard normal CDF, accurate in the lower tail (``torch.special.ndtr`` underflows to 0 below z = -10 on
    CPU; ``exp(log_ndtr)`` keeps 14 digits down to z = -37)."""
    return torch.exp(torch.special.log_ndtr(z))
