"""Loss weightings for diffusion training, ANT uncertainty weighting and interval clustering.

The weightings the DTR paper combines with routing (`general.loss_weight_type` in its code):

- ``constant``: every timestep weighs 1 (the DiT default).
- ``min_snr_<gamma>``: Min-SNR-gamma (Hang et al., 2023), ``min(SNR, gamma) / SNR`` for epsilon
  prediction, ``min(SNR, gamma) / (SNR + 1)`` for v prediction and ``min(SNR, gamma)`` for x0.
- ``p2weight_<gamma>_<k>``: P2 weighting (Choi et al., 2022), ``1 / (k + SNR) ** gamma``.
- ``uw``: ANT-UW (Go et al., 2023): timesteps are split into k contiguous intervals, each batch
  takes an equal share from every interval (:class:`StratifiedTimestepSampler`) and the interval
  losses are combined with learned log-variances (:class:`UncertaintyWeighting`).

Flow matching (``x_s = (1 - s) x0 + s eps``, velocity target ``eps - x0``, noise level s in [0, 1]):
:func:`flow_snr` gives the SNR ``((1 - s) / s) ** 2`` and ``prediction="flow"`` writes Min-SNR and P2 as the same
epsilon objective for the velocity (``w_eps * (1 - s) ** 2``). ANT-UW takes float intervals tiling [0, 1], whose
stratified sampler follows the densities flow models train with (uniform, logit-normal, SD3's mode, shifted), and
:class:`ContinuousUncertaintyWeighting` learns EDM2's smooth per-level log-variance instead of one per interval.

Integer intervals are half-open ``(start, end)`` pairs that tile ``[0, T)`` in order; float intervals tile
``[0, 1]``, half-open but for the last, which holds s = 1. ANT's interval clustering is :func:`cluster_intervals`,
an exact dynamic program over any interval cost (on timesteps or on a grid of noise levels), with
:func:`snr_intervals` for its SNR-based cost. Everything runs in O(k * T^2) vectorised numpy.

The package, by concept (each module imports only ones before it here): ``weights`` (SNRs and per-sample weights),
``intervals`` (intervals, clustering, each timestep's interval), ``densities`` (noise-level densities truncated
to an interval), ``samplers`` (the stratified sampler) and ``uncertainty`` (ANT-UW and EDM2's continuous weight).
"""

from .densities import quantile_intervals
from .intervals import (
    _snr_cost_by_end,  # noqa: F401  (tests check the SNR cost table directly)
    cluster_intervals,
    interval_index,
    snr_intervals,
    uniform_intervals,
    unit_intervals,
)
from .samplers import StratifiedTimestepSampler
from .uncertainty import ContinuousUncertaintyWeighting, FourierFeatures, UncertaintyWeighting
from .weights import (
    LossWeighting,
    flow_snr,
    min_snr_weight,
    p2_weight,
    parse_loss_weight_type,
    snr_from_alphas_cumprod,
)

__all__ = [
    "ContinuousUncertaintyWeighting",
    "FourierFeatures",
    "LossWeighting",
    "StratifiedTimestepSampler",
    "UncertaintyWeighting",
    "cluster_intervals",
    "flow_snr",
    "interval_index",
    "min_snr_weight",
    "p2_weight",
    "parse_loss_weight_type",
    "quantile_intervals",
    "snr_from_alphas_cumprod",
    "snr_intervals",
    "uniform_intervals",
    "unit_intervals",
]
