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

The package, by concept (imports point down this list): ``weights`` (SNRs and per-sample weights),
``intervals`` (intervals, clustering, each timestep's interval), ``samplers`` (the stratified sampler)
and ``uncertainty`` (ANT-UW).
"""

from .intervals import (
    _snr_cost_by_end,  # noqa: F401  (tests check the SNR cost table directly)
    cluster_intervals,
    interval_index,
    snr_intervals,
    uniform_intervals,
)
from .samplers import StratifiedTimestepSampler
from .uncertainty import UncertaintyWeighting
from .weights import (
    LossWeighting,
    flow_snr,
    min_snr_weight,
    p2_weight,
    parse_loss_weight_type,
    snr_from_alphas_cumprod,
)

__all__ = [
    "LossWeighting",
    "StratifiedTimestepSampler",
    "UncertaintyWeighting",
    "cluster_intervals",
    "flow_snr",
    "interval_index",
    "min_snr_weight",
    "p2_weight",
    "parse_loss_weight_type",
    "snr_from_alphas_cumprod",
    "snr_intervals",
    "uniform_intervals",
]
