"""Denoising Task Routing (DTR, ICLR 2024) for any PyTorch diffusion model.

routing = dtr.wrap(model, sharing_ratio=0.8)   # in place; no parameter or state_dict key added
out = model(x, t, y)                           # each sample routed by its own timestep
routing.remove()                               # or dtr.unwrap(model)
"""

from ._version import __version__
from .adapters import register_adapter
from .api import routing_of, unwrap, wrap, wrap_with
from .masks import active_channels, task_masks, window_starts
from .paper import convert_paper_state_dict
from .pretrained import from_pretrained, save_pretrained, wrap_from_config
from .routing import Routing
from .spec import BlockIO, ImageTokens, RoutingConfig, RoutingSpec
from .timesteps import timesteps_to_tasks

__all__ = [
    "__version__",
    "wrap",
    "wrap_with",
    "unwrap",
    "routing_of",
    "register_adapter",
    "task_masks",
    "window_starts",
    "active_channels",
    "timesteps_to_tasks",
    "Routing",
    "RoutingSpec",
    "RoutingConfig",
    "BlockIO",
    "ImageTokens",
    "convert_paper_state_dict",
    "save_pretrained",
    "from_pretrained",
    "wrap_from_config",
]
