"""Saving and loading routed diffusers-style models: the weights as diffusers writes them, plus ``dtr_config.json``.

Routing adds no parameter, so a saved folder loads into the plain class as an unrouted model; the small
``dtr_config.json`` beside the weights is what lets ``dtr.from_pretrained`` route it again the same way.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .adapters import find_adapter
from .api import inner_model, routing_of, wrap_with
from .spec import BlockIO, RoutingConfig

CONFIG_NAME = "dtr_config.json"
FORMAT_VERSION = 2  # bump when a field changes meaning; from_pretrained refuses versions it does not know


def routing_config(model: nn.Module) -> dict:
    """What ``dtr_config.json`` holds for a routed model: the routing's config, the format and library versions."""
    from . import __version__  # the package's, set before its submodules are imported

    routing = routing_of(model)
    if routing is None:
        raise ValueError(f"{type(model).__name__} is not routed by dtr: use its own save_pretrained, or dtr.wrap it first")
    return dict(format_version=FORMAT_VERSION, dtr_version=__version__, **routing.config)


def write_config(model: nn.Module, folder: str) -> str:
    """Write ``folder/dtr_config.json`` for a routed model (atomically: a crash leaves the old file or none)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CONFIG_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(routing_config(model), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def save_pretrained(model: nn.Module, folder: str, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, **kwargs)`` with the routing: diffusers' files, and ``dtr_config.json``.

    A routed diffusers model's own ``save_pretrained`` does the same; this spelling also takes a
    DDP/compiled wrapper of it.
    """
    inner = inner_model(model)
    routing_config(inner)  # refuses an unrouted model before anything is written
    if not hasattr(inner, "save_pretrained"):
        raise TypeError(f"{type(inner).__name__} has no save_pretrained (not a diffusers/transformers-style model): "
                        "save its state_dict with torch.save and the routing with dtr.routing_of(model).config")
    inner.save_pretrained(folder, **kwargs)
    if kwargs.get("is_main_process", True):
        write_config(inner, folder)


def read_config(folder: str) -> dict:
    """The routing config saved in ``folder``, checked: a clear error for a missing file or an unknown format."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {folder}: it was saved without routing (load it with the model class's own "
            "from_pretrained for an unrouted model, then dtr.wrap it with the settings it was trained with)")
    with open(path) as f:
        config = json.load(f)
    version = config.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{path} has format_version {version!r}; this dtr reads format_version {FORMAT_VERSION} "
                         f"(written by dtr {config.get('dtr_version', '?')}): install a dtr that matches it")
    return config


def wrap_from_config(model: nn.Module, config: dict):
    """Route ``model`` as ``config`` (a ``Routing.config`` or a ``dtr_config.json``) says; returns the handle."""
    numbers = RoutingConfig.from_dict(config)
    blocks = tuple(config["blocks"])
    spec = find_adapter(inner_model(model))
    if spec is not None and spec.blocks == blocks:
        blocks = None  # what the model's adapter chooses anyway: keep its name in the summary
    arg = config["timestep_arg"]
    if isinstance(arg, list):  # format 1 (dtr 0.2): positions and names tried in order
        arg = next((a for a in arg if isinstance(a, str)), arg[0] if arg else None)
    io = {name: BlockIO(**v) for name, v in config.get("io", {}).items()}
    return wrap_with(model, numbers, blocks=blocks and list(blocks), placement=config["placement"],
                     block_io=io or None, timestep_module=config["timestep_module"] or None, timestep_arg=arg,
                     timestep_kind=config["timestep_kind"], channel_axis=config.get("channel_axis"))


def from_pretrained(model_class: type, folder: str, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(folder, **kwargs)``, routed again as ``folder/dtr_config.json`` says."""
    config = read_config(folder)  # before loading weights: a folder without routing fails at once
    model = model_class.from_pretrained(folder, **kwargs)
    wrap_from_config(model, config)
    return model
