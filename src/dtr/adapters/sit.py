"""SiT (Ma et al., 2024): a DiT-shaped transformer trained on continuous time t in [0, 1].

willisma/SiT interpolates x_t = alpha_t * x_data + sigma_t * noise with alpha_1 = 1: t = 1 is data,
so t maps to task round((1 - t) * (T - 1)) (``timestep_kind="unit_reversed"``).  REPA-family SiTs
(a ``path_type`` attribute) use alpha_t = 1 - t: t = 0 is data (``"unit"``).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..spec import RoutingSpec
from .dit import dit_spec


def sit_spec(model: nn.Module) -> RoutingSpec | None:
    """A DiT-shaped model whose class (or a base) is named ``SiT``: the DiT placement, continuous time."""
    if not any(c.__name__ == "SiT" for c in type(model).__mro__):
        return None
    spec = dit_spec(model)
    if spec is None:
        return None
    repa = hasattr(model, "path_type")
    return replace(
        spec,
        timestep_kind="unit" if repa else "unit_reversed",
        adapter="SiT (REPA: t = 0 is data)" if repa else "SiT (t = 1 is data)",
    )
