"""The routing record a diffusers model's own config carries, so that every diffusers save writes it.

``dtr.wrap`` adds ``config["dtr_routing"]`` to a model that has a diffusers config (``ConfigMixin``), and
``unwrap`` takes it away again.  diffusers writes the whole config into ``config.json`` at every save: the
model's ``save_pretrained``, a pipeline's (component by component), ``EMAModel.save_pretrained`` (which
rebuilds the model ``from_config`` of the config it was given), ``push_to_hub``.  Loading keeps config keys
the class's ``__init__`` does not take, and warns about them, so a plain ``from_pretrained`` of a routed save
prints the record, whose first entry says to load it with ``dtr.from_pretrained``.  Every save rewrites
``config.json``, so a folder never holds the routing of an earlier save.

This module builds, attaches, removes and checks records; it knows nothing of files (``pretrained`` reads them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._version import __version__
from .spec import PLACEMENTS, TIMESTEP_KINDS, BlockIO, RoutingConfig

KEY = "dtr_routing"
FORMAT_VERSION = 3  # the record in config.json; bump when a field changes meaning
FILE_FORMATS = (1, 2)  # dtr_config.json beside the weights: dtr 0.2 (1) and the 0.3 development line (2)
LOAD_WITH = (
    "dtr.from_pretrained(ModelOrPipelineClass, path_or_repo_id) of denoising-task-routing: these weights "
    "were trained with Denoising Task Routing, and plain from_pretrained gives them without it"
)

# The keys of a saved routing (Routing.config; format 1 had no io and put channel_axis at the top).
_REQUIRED = (
    "sharing_ratio",
    "alpha",
    "method",
    "num_tasks",
    "seed",
    "blocks",
    "placement",
    "timestep_module",
    "timestep_arg",
    "timestep_kind",
)
_OPTIONAL = ("io", "channel_axis", "adapter")


def has_config(model: Any) -> bool:
    """Whether ``model`` has a diffusers config a record can live in (``ConfigMixin``, recognised without
    importing diffusers)."""
    return (
        isinstance(getattr(model, "_internal_dict", None), Mapping)
        and callable(getattr(model, "register_to_config", None))
        and getattr(model, "config_name", None) is not None
    )


def make_record(routing_config: Mapping) -> dict:
    """The record of a routing (``Routing.config``): the hint for plain loaders first, then versions and the routing."""
    return {
        "load_with": LOAD_WITH,
        "format_version": FORMAT_VERSION,
        "dtr_version": __version__,
        "routing": dict(routing_config),
    }


def attach_record(model: nn.Module, routing_config: Mapping) -> None:
    """Put the record of ``routing_config`` into ``model``'s diffusers config (nothing for other models)."""
    if has_config(model):
        model.register_to_config(**{KEY: make_record(routing_config)})


def detach_record(model: nn.Module) -> None:
    """Take the record out of ``model``'s config (``register_to_config`` only adds, so the frozen dict is rebuilt)."""
    config = getattr(model, "_internal_dict", None) if has_config(model) else None
    if config is not None and KEY in config:
        model._internal_dict = type(config)({k: v for k, v in config.items() if k != KEY})


@dataclass(frozen=True)
class SavedRouting:
    """A saved routing, checked: the numbers and what ``wrap_with`` needs to route a model the same way."""

    config: RoutingConfig
    blocks: tuple[str, ...]
    placement: str
    io: Mapping[str, BlockIO]
    timestep_module: str
    timestep_arg: str | int | tuple | None  # a tuple only from format 1: names and positions tried in order
    timestep_kind: str
    channel_axis: int | None = None
    adapter: str = "custom"
    prefix: str | None = None  # where the routing sits in its file, for errors ("dtr_routing.routing")

    def key(self, name: str) -> str:
        """The dotted key of one of the routing's fields in its file."""
        return _dotted(self.prefix, name)


def read_record(record: Any, where: str) -> SavedRouting:
    """The routing in a config's ``dtr_routing`` record; ``where`` names the file in every error."""
    _check_object(record, where, KEY)
    _check_keys(record, where, KEY, required=("format_version", "routing"), optional=("load_with", "dtr_version"))
    version = record["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: key '{KEY}.format_version' is {version!r}, and this dtr reads format_version "
            f"{FORMAT_VERSION} (written by dtr {record.get('dtr_version', '?')}): install a dtr that "
            "reads it"
        )
    return read_routing(record["routing"], where, f"{KEY}.routing")


def read_file(data: Any, where: str) -> SavedRouting:
    """The routing in a ``dtr_config.json`` of an earlier dtr (the routing's keys beside the format's)."""
    _check_object(data, where, None)
    version = data.get("format_version")
    if version not in FILE_FORMATS:
        raise ValueError(
            f"{where}: key 'format_version' is {version!r}, and this dtr reads format_version "
            f"{' or '.join(map(str, FILE_FORMATS))} in dtr_config.json (written by dtr "
            f"{data.get('dtr_version', '?')}): install a dtr that reads it"
        )
    routing = {k: v for k, v in data.items() if k not in ("format_version", "dtr_version")}
    return read_routing(routing, where, None, format1=version == 1)


def read_routing(data: Any, where: str, prefix: str | None, format1: bool = False) -> SavedRouting:
    """A ``Routing.config`` (or a format 1 routing), checked key by key: one-line errors naming ``where`` and
    the key (``prefix`` is where the routing sits in the file)."""
    _check_object(data, where, prefix)
    _check_keys(data, where, prefix, required=_REQUIRED, optional=_OPTIONAL)

    def bad(key: str, problem: Any) -> ValueError:
        return ValueError(f"{where}: key {_dotted(prefix, key)!r}: {problem}")

    for name in RoutingConfig._names():  # each number alone, so that the error names its key
        try:
            RoutingConfig(**{name: data[name]})
        except (TypeError, ValueError) as e:
            raise bad(name, e) from None
    config = RoutingConfig.from_dict(data)
    blocks = data["blocks"]
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) and b for b in blocks):
        raise bad("blocks", f"must be a non-empty list of module names, got {blocks!r}")
    if data["placement"] not in PLACEMENTS:
        raise bad("placement", f"must be one of {', '.join(map(repr, PLACEMENTS))}, got {data['placement']!r}")
    if data["timestep_kind"] not in TIMESTEP_KINDS:
        raise bad(
            "timestep_kind", f"must be one of {', '.join(map(repr, TIMESTEP_KINDS))}, got {data['timestep_kind']!r}"
        )
    module = data["timestep_module"]
    if module is not None and not isinstance(module, str):
        raise bad("timestep_module", f'must be a dotted module name or "" (the model), got {module!r}')
    arg = data["timestep_arg"]
    if format1 and isinstance(arg, list):
        if not all(_is_arg(a) for a in arg):
            raise bad("timestep_arg", f"must list argument names or positions, got {arg!r}")
        arg = tuple(arg)
    elif arg is not None and not _is_arg(arg):
        raise bad("timestep_arg", f"must be an argument name, a position >= 0 or null, got {arg!r}")
    axis = data.get("channel_axis")
    if axis is not None and (not _is_int(axis) or axis == 0):
        raise bad("channel_axis", f"must be a non-zero int (an axis other than the batch axis) or null, got {axis!r}")
    io = data.get("io") or {}
    if not isinstance(io, dict):
        raise bad("io", f"must map block class names to {{input, output, channel_axis}}, got {io!r}")
    block_io = {}
    for name, fields in io.items():
        try:
            block_io[name] = BlockIO(**fields)
        except (TypeError, ValueError) as e:
            raise bad(
                f"io.{name}",
                f"must be an object with keys among {', '.join(f.name for f in dataclasses.fields(BlockIO))}: {e}",
            ) from None
    adapter = data.get("adapter", "custom")
    return SavedRouting(
        config,
        tuple(blocks),
        data["placement"],
        block_io,
        module or "",
        arg,
        data["timestep_kind"],
        axis,
        adapter if isinstance(adapter, str) else "custom",
        prefix,
    )


#################################################################################
#                                    Helpers                                     #
#################################################################################


def _dotted(prefix: str | None, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_object(data: Any, where: str, prefix: str | None) -> None:
    if not isinstance(data, dict):
        what = f"key {prefix!r}" if prefix else "the file"
        raise ValueError(f"{where}: {what} must be a JSON object, got {type(data).__name__} {data!r:.80}")


def _check_keys(data: dict, where: str, prefix: str | None, required: tuple, optional: tuple) -> None:
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(
            f"{where}: key {_dotted(prefix, missing[0])!r} is missing (a saved routing has {', '.join(required)})"
        )
    unknown = sorted(k for k in data if k not in required + optional)
    if unknown:
        raise ValueError(
            f"{where}: key {_dotted(prefix, unknown[0])!r} is not one this dtr knows (it reads "
            f"{', '.join(required + optional)}): a newer dtr wrote it, or it was edited"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_arg(value: Any) -> bool:
    return (isinstance(value, str) and bool(value)) or (_is_int(value) and value >= 0)
