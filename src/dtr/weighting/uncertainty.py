"""ANT-UW: learned per-interval log-variances that weigh each interval's loss (uncertainty weighting)."""

from __future__ import annotations

import torch

from ..validation import check_float, check_int

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
