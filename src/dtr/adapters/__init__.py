"""Adapters: for a family of models, which modules to route and where the timestep enters.

Each adapter is a function ``model -> RoutingSpec | None``; ``find_adapter`` asks them in order
and the first that recognises the model wins (SiT before DiT: same layout, continuous time).
Adding a family is adding one function here.
"""

from __future__ import annotations

from torch import nn

from ..routing import RoutingSpec
from .diffusers import diffusers_dit_spec, diffusers_unet_spec
from .dit import dit_spec
from .sit import sit_spec
from .unet import adm_unet_spec

ADAPTERS = [sit_spec, dit_spec, diffusers_unet_spec, diffusers_dit_spec, adm_unet_spec]


def find_adapter(model: nn.Module) -> RoutingSpec | None:
    """The routing spec of the first adapter that recognises ``model``, else None."""
    for adapter in ADAPTERS:
        spec = adapter(model)
        if spec is not None:
            return spec
    return None


__all__ = ["ADAPTERS", "find_adapter", "adm_unet_spec", "diffusers_dit_spec", "diffusers_unet_spec", "dit_spec", "sit_spec"]
