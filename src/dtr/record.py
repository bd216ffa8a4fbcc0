"""The routing record a routed diffusers model saves in its own ``config.json``, and only a routed model.

``dtr.wrap`` puts the record (``config["dtr_routing"]``: the routing's ``RoutingConfig`` and ``RoutingSpec``) in the
in-memory config of a model that has a diffusers config (``ConfigMixin``), and gives the model a ``to_json_string``
of its own that writes, at each save, the record of its live routing and beside it a seal (``dtr_routing_seal``,
the record's SHA-256).  Every diffusers save goes through ``to_json_string``: the model's ``save_pretrained``, a
pipeline's (component by component), ``push_to_hub``.

Why the seal: diffusers copies unknown config keys into any model built from a config, so a record rides into
models that were never routed (``Model.from_config(routed.config)``, ``EMAModel.save_pretrained``, a plain
``from_pretrained`` of a routed save that is then trained and saved) and their saves write it again.  The seal is
listed in ``_use_default_values``, the keys diffusers' loader drops (it keeps the record itself, and warns about
it, which tells a plain load to use ``dtr.from_pretrained``): no loaded or copied model ever holds a seal, so only
a routed model's save writes one, and ``dtr.from_pretrained`` routes only what carries a matching seal.

This module builds, attaches, seals and checks records; it knows nothing of files (``pretrained`` reads them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from ._version import __version__
from .legacy import RECORD_FORMATS, upgrade
from .spec import RoutingConfig, RoutingSpec

KEY = "dtr_routing"
SEAL = "dtr_routing_seal"
FORMAT_VERSION = 4  # the record in config.json; bump when a field changes meaning
LOAD_WITH = (
    "dtr.from_pretrained(ModelOrPipelineClass, path_or_repo_id) of denoising-task-routing: these weights "
    "were trained with Denoising Task Routing, and plain from_pretrained gives them without it"
)
_DROPPED_ON_LOAD = "_use_default_values"  # diffusers' loader drops the keys listed here, and this key


def has_config(model: Any) -> bool:
    """Whether ``model`` has a diffusers config a record can live in (``ConfigMixin``, recognised without
    importing diffusers)."""
    return (
        isinstance(getattr(model, "_internal_dict", None), Mapping)
        and callable(getattr(model, "register_to_config", None))
        and getattr(model, "config_name", None) is not None
    )


def make_record(config: RoutingConfig, spec: RoutingSpec) -> dict:
    """The record of a routing: the hint for plain loaders first, then versions and the routing's two values."""
    return {
        "load_with": LOAD_WITH,
        "format_version": FORMAT_VERSION,
        "dtr_version": __version__,
        "config": config.to_dict(),
        "spec": spec.to_dict(),
    }


def seal_of(record: Mapping) -> str:
    """The SHA-256 of the record's canonical JSON."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#################################################################################
#                         On the routed model (in memory)                        #
#################################################################################


class SealedConfig:
    """A routed model's ``to_json_string``: its class's, with the record of the live routing and its seal."""

    __slots__ = ("model", "routing")

    def __init__(self, model: nn.Module, routing: Any):
        self.model = model
        self.routing = routing

    def __call__(self) -> str:
        config = json.loads(type(self.model).to_json_string(self.model))
        record = make_record(self.routing.config, self.routing.spec)
        config[KEY] = record
        config[SEAL] = seal_of(record)
        config[_DROPPED_ON_LOAD] = [SEAL]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def attach_record(model: nn.Module, routing: Any) -> None:
    """Put the record of ``routing`` into ``model``'s diffusers config and seal its saves (nothing for other models)."""
    if has_config(model):
        model.register_to_config(**{KEY: make_record(routing.config, routing.spec)})
        model.__dict__["to_json_string"] = SealedConfig(model, routing)


def detach_record(model: nn.Module) -> None:
    """Take the record out of ``model``'s config (``register_to_config`` only adds, so the frozen dict is rebuilt)
    and its saves back to diffusers' own."""
    if isinstance(model.__dict__.get("to_json_string"), SealedConfig):
        del model.__dict__["to_json_string"]
    config = getattr(model, "_internal_dict", None) if has_config(model) else None
    if config is not None and KEY in config:
        model._internal_dict = type(config)({k: v for k, v in config.items() if k != KEY})


#################################################################################
#                                    Reading                                     #
#################################################################################


class Unsealed(ValueError):
    """A record that no routed model's save wrote (it rode into a model built from a routed one's config)."""


def read_saved(config: Mapping, where: str) -> tuple[RoutingConfig, RoutingSpec, dict] | None:
    """The routing a saved config carries, checked: (config, spec, what an older format left to the model), or None
    for an unrouted save.  ``config`` is the file's whole config (with its seal); errors name ``where`` and the key."""
    if KEY not in config:
        return None
    record = config[KEY]
    if _version(record, where) == FORMAT_VERSION and config.get(SEAL) != seal_of(record):
        problem = "its seal does not match (edited after the save?)" if SEAL in config else f"no {SEAL!r} beside it"
        raise Unsealed(
            f"{where}: the {KEY!r} record was not written by a routed model ({problem}): the model saved was built "
            "from a routed model's config (from_config, EMAModel.save_pretrained) or loaded with plain "
            "from_pretrained, and was not routed itself. Load it with plain from_pretrained; save an EMAModel of a "
            "routed model with dtr.save_pretrained(ema_model, path)"
        )
    return read_record(record, where)


def read_record(record: Any, where: str) -> tuple[RoutingConfig, RoutingSpec, dict]:
    """The routing in a ``dtr_routing`` record of any format (older ones upgraded), checked key by key; the dict
    holds what an older format left for the model to resolve (``legacy.upgrade``)."""
    version = _version(record, where)
    if version != FORMAT_VERSION:
        return upgrade(record, version, where)
    unknown = sorted(set(record) - {"load_with", "format_version", "dtr_version", "config", "spec"})
    if unknown:
        raise ValueError(f"{where}: key '{KEY}.{unknown[0]}' is not one this dtr knows (newer dtr, or edited)")
    return read_routing({"config": record.get("config"), "spec": record.get("spec")}, where, KEY) + ({},)


def read_routing(data: Any, where: str, prefix: str | None = None) -> tuple[RoutingConfig, RoutingSpec]:
    """``{"config": ..., "spec": ...}`` (``Routing.to_dict()``) as its two values."""
    if not isinstance(data, Mapping) or set(data) != {"config", "spec"}:
        raise ValueError(f"{where}: a routing is a JSON object with keys 'config' and 'spec', got {data!r:.120}")
    p = f"{prefix}." if prefix else ""
    return (
        RoutingConfig.from_dict(data["config"], f"{where}: key '{p}config'"),
        RoutingSpec.from_dict(data["spec"], f"{where}: key '{p}spec'"),
    )


def _version(record: Any, where: str) -> int:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: key {KEY!r} must be a JSON object, got {type(record).__name__} {record!r:.80}")
    version = record.get("format_version")
    if version != FORMAT_VERSION and version not in RECORD_FORMATS:
        known = ", ".join(map(str, (*RECORD_FORMATS, FORMAT_VERSION)))
        raise ValueError(
            f"{where}: key '{KEY}.format_version' is {version!r}, and this dtr reads format_version {known} "
            f"(written by dtr {record.get('dtr_version', '?')}): install a dtr that reads it"
        )
    return version
