"""Saving and loading routed diffusers models: ``dtr.from_pretrained`` for a model or a pipeline class, from a
folder or a Hub repo id, and ``dtr.save_pretrained``.

The routing travels in the model's own ``config.json`` (the ``dtr_routing`` record ``dtr.wrap`` puts in the
config, see ``record``), so diffusers' saves write it and its loaders fetch it: from a subfolder, a Hub repo
id, a revision, the cache or offline, exactly as they fetch the config.  ``dtr.from_pretrained`` calls the
class's own ``from_pretrained`` and routes what was saved routed.  ``dtr_config.json`` files that earlier
versions wrote beside the weights are still read (with a warning) where ``config.json`` has no record.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from .adapters import find_adapter
from .api import inner_model, routing_of, wrap_with
from .legacy import V02_DEFAULT_TIMESTEP_ARG, upgrade_file, upgrade_flat
from .record import KEY, has_config, read_record, read_routing, read_saved
from .routing import Routing
from .spec import BlockIO, RoutingConfig, RoutingSpec

CONFIG_NAME = "dtr_config.json"  # where dtr 0.2 kept the routing, beside the weights
# What from_pretrained takes to find the files (the rest is for building the model).
_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "force_download", "proxies", "token", "local_files_only")


def save_pretrained(model: Any, folder: str, **kwargs: Any) -> None:
    """Save a routed diffusers model with its routing: ``model.save_pretrained(folder, **kwargs)`` of a routed model
    (also through DDP, ``torch.compile`` or ``PeftModel``), refusing an unrouted one; or, for a diffusers
    ``EMAModel`` of a routed model, the averaged weights routed as that model was (``EMAModel.save_pretrained``
    builds an unrouted model, whose save carries no routing).  Removes a ``dtr_config.json`` an earlier dtr left.
    """
    if _is_ema(model):
        return _save_ema(model, folder, **kwargs)
    inner = inner_model(model)
    if routing_of(inner) is None:
        raise ValueError(
            f"{type(inner).__name__} is not routed by dtr: use its own save_pretrained, or dtr.wrap it first"
        )
    if not has_config(inner) or not callable(getattr(inner, "save_pretrained", None)):
        raise TypeError(
            f"{type(inner).__name__} has no diffusers config to carry its routing (not a diffusers "
            "model): save its state_dict with torch.save and dtr.routing_of(model).to_dict() beside it, "
            "and route the loaded model with dtr.wrap_from_config"
        )
    if kwargs.get("is_main_process", True):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, CONFIG_NAME))  # before the save: push_to_hub uploads the folder
    inner.save_pretrained(folder, **kwargs)


def from_pretrained(model_class: type, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(path_or_repo_id, **kwargs)``, routed again as it was saved.

    ``model_class`` is a diffusers model class (the routing comes from the saved ``config.json``, checked before
    the weights load), a pipeline class (every component whose config carries a routing is routed again; the
    others, and components passed in ``kwargs``, are as diffusers gives them; a pipeline with no routed component
    is refused), or diffusers' ``EMAModel`` with ``model_cls=`` (what ``dtr.save_pretrained(ema_model, path)``
    wrote: the averaged weights and the EMA's state, its ``model_config`` carrying the routing).  ``kwargs`` are the
    class's own: ``subfolder``, ``revision``, ``cache_dir``, ``local_files_only``, ``torch_dtype``, ...
    """
    if _is_pipeline_class(model_class):
        return _pipeline_from_pretrained(model_class, path_or_repo_id, kwargs)
    if _is_ema(model_class):
        return _load_ema(model_class, path_or_repo_id, **kwargs)
    if not callable(getattr(model_class, "load_config", None)):
        raise TypeError(
            f"dtr.from_pretrained takes a diffusers model or pipeline class, got {model_class!r}: load "
            "other models yourself and route them with dtr.wrap_from_config"
        )
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    where = _where(path_or_repo_id, kwargs.get("subfolder"), kwargs.get("revision"), model_class.config_name)
    config = model_class.load_config(path_or_repo_id, **hub)  # config.json only: no routing fails before the weights
    saved = _saved_routing(config, path_or_repo_id, kwargs.get("subfolder"), hub, where)
    if saved is None:
        raise ValueError(
            f"{where} carries no routing (no {KEY!r} key, no {CONFIG_NAME} beside it): it was saved "
            f"unrouted. Load it with {model_class.__name__}.from_pretrained and dtr.wrap it with the "
            "settings it was trained with (an EMAModel is saved routed with dtr.save_pretrained(ema_model, path))"
        )
    with _without_record_warning():
        model = model_class.from_pretrained(path_or_repo_id, **kwargs)
    _route(model, saved, where)
    return model


def wrap_from_config(model: nn.Module, config: Mapping) -> Routing:
    """Route ``model`` as ``config`` says: a ``Routing.to_dict()``, a model config's ``dtr_routing`` record, the
    contents of a ``dtr_config.json``, or a dtr 0.3 ``Routing.config``; returns the handle."""
    if isinstance(config, RoutingConfig):
        raise TypeError(
            "wrap_from_config needs where to route as well as the numbers: pass routing.to_dict() (a RoutingConfig "
            "holds only the numbers; dtr.wrap_with(model, config) routes with the adapter's choice of modules)"
        )
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (Routing.to_dict() or a saved record), got {type(config).__name__}")
    if "format_version" in config and "dtr_version" in config and ("routing" in config or "spec" in config):
        saved = read_record(config, "config")
    elif "format_version" in config:
        saved = upgrade_file(dict(config), "config")
    elif "config" in config or "spec" in config:
        saved = read_routing(config, "config") + ({},)
    else:
        saved = upgrade_flat(dict(config), "config")
    return _route(model, saved, "config")


#################################################################################
#                                   Loading                                      #
#################################################################################


def _pipeline_from_pretrained(pipeline_class: type, path_or_repo_id, kwargs: dict) -> Any:
    """The pipeline as diffusers loads it, with each component that was saved routed routed again."""
    with _without_record_warning():
        pipeline = pipeline_class.from_pretrained(path_or_repo_id, **kwargs)
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS and k != "subfolder"}
    for name, component in pipeline.components.items():
        if name in kwargs or not isinstance(component, nn.Module) or not has_config(component):
            continue  # passed in by the caller, or not a diffusers model (schedulers, text encoders)
        if KEY not in component.config and not _earlier_file(path_or_repo_id, name, hub):
            continue
        where = _where(path_or_repo_id, name, kwargs.get("revision"), component.config_name)
        config = type(component).load_config(path_or_repo_id, subfolder=name, **hub)  # with its seal
        saved = _saved_routing(config, path_or_repo_id, name, hub, where)
        if saved is not None:
            _route(component, saved, where)
    if not any(isinstance(c, nn.Module) and routing_of(c) is not None for c in pipeline.components.values()):
        raise ValueError(
            f"no component of the pipeline {path_or_repo_id} is routed: none was saved routed (no "
            f"{KEY!r} key in their config.json, no {CONFIG_NAME}) and none passed in is. Load it with "
            f"{pipeline_class.__name__}.from_pretrained"
        )
    return pipeline


def _saved_routing(config, path_or_repo_id, subfolder: str | None, hub: dict, where: str):
    """The routing a saved config carries, or that a ``dtr_config.json`` of an earlier dtr beside it holds, or None."""
    if KEY in config:
        return read_saved(config, where)
    path = _earlier_file(path_or_repo_id, subfolder, hub)
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    saved = upgrade_file(data, path)
    warnings.warn(
        f"{path}: routing read from the {CONFIG_NAME} an earlier dtr wrote beside the weights. This dtr keeps the "
        f"routing in config.json ({KEY!r}), where no later save can leave it behind; a {CONFIG_NAME} left by a "
        "routed save beside weights saved unrouted later would route those wrongly. Save the routed model again "
        "(model.save_pretrained) to move the routing into its config.json",
        UserWarning,
        stacklevel=3,
    )
    return saved


def _earlier_file(path_or_repo_id, subfolder: str | None, hub: dict) -> str | None:
    """The local path of ``dtr_config.json`` beside the config (fetched like it from a Hub repo), or None."""
    if os.path.isdir(path_or_repo_id):
        path = os.path.join(path_or_repo_id, subfolder or "", CONFIG_NAME)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:  # offline, a file the cache does not hold is "not found" too, as for diffusers' optional files
        return hf_hub_download(
            str(path_or_repo_id),
            CONFIG_NAME,
            subfolder=subfolder or None,
            **{k: v for k, v in hub.items() if k != "proxies"},
        )
    except EntryNotFoundError:
        return None


def _route(model: nn.Module, saved: tuple[RoutingConfig, RoutingSpec, dict], where: str) -> Routing:
    """Route ``model`` as ``saved`` says; an error names where the routing came from."""
    config, spec, extra = saved
    inner = inner_model(model)
    names = {n for n, _ in inner.named_modules()}
    missing = [b for b in spec.blocks if b not in names]
    if missing:
        raise ValueError(
            f"{where}: key 'spec.blocks' names modules a {type(inner).__name__} of this config does not have: "
            f"{missing[:3]} (saved from another model?)"
        )
    spec = _resolve_extra(inner, spec, extra)
    adapter = find_adapter(inner)
    if adapter is not None and adapter.adapter == spec.adapter:  # the adapter's words for the summary
        spec = dataclasses.replace(spec, note=adapter.note)
    if adapter is not None and spec.timestep_arg is None and spec.timestep_module == adapter.timestep_module:
        spec = dataclasses.replace(spec, timestep_arg=adapter.timestep_arg)  # dtr 0.2: "the adapter's default"
    try:
        return wrap_with(model, config, spec)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e


def _resolve_extra(model: nn.Module, spec: RoutingSpec, extra: dict) -> RoutingSpec:
    """What an older format left to the model at hand: a channel axis for every routed block class, and the first
    of dtr 0.2's candidate timestep arguments the timestep module's forward takes."""
    io = dict(spec.io)
    if "channel_axis" in extra:
        modules = dict(model.named_modules())
        for cls in {type(modules[b]).__name__ for b in spec.blocks}:
            base = io.get(cls, BlockIO())
            io[cls] = BlockIO(**{**base.to_dict(), "channel_axis": extra["channel_axis"]})
    arg = spec.timestep_arg
    candidates = extra.get("timestep_args")
    if candidates and candidates != V02_DEFAULT_TIMESTEP_ARG:
        module = model.get_submodule(spec.timestep_module) if spec.timestep_module else model
        names = inspect.signature(module.forward).parameters
        arg = next(
            (a for a in candidates if isinstance(a, str) and a in names),
            next((a for a in candidates if isinstance(a, int)), candidates[0]),
        )
    return dataclasses.replace(spec, io=io, timestep_arg=arg)


def _where(path_or_repo_id, subfolder: str | None, revision: str | None, filename: str) -> str:
    """How errors name a saved config: its local path, or the Hub file and revision."""
    if os.path.isdir(path_or_repo_id):
        return os.path.join(path_or_repo_id, subfolder or "", filename)
    return (
        "/".join(p for p in (str(path_or_repo_id), subfolder, filename) if p) + f" (Hub, revision {revision or 'main'})"
    )


def _is_pipeline_class(cls: Any) -> bool:
    """A diffusers pipeline class (diffusers is imported wherever one exists: nothing is imported here)."""
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)


#################################################################################
#                        EMAModel: the averaged weights, routed                  #
#################################################################################


def _is_ema(obj: Any) -> bool:
    """A diffusers ``EMAModel`` or its class (recognised without importing diffusers)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return any(c.__name__ == "EMAModel" and c.__module__.startswith("diffusers.") for c in cls.__mro__)


def _load_ema(ema_class: type, path_or_repo_id, model_cls: type | None = None, **kwargs: Any) -> Any:
    """``EMAModel.from_pretrained`` of a routed EMA save: the model loaded routed (without the plain-load warning),
    the EMA made of its parameters and config, its state read back from the config."""
    if model_cls is None:
        raise TypeError("dtr.from_pretrained(EMAModel, path, model_cls=<the model class>) needs model_cls=")
    model = from_pretrained(model_cls, path_or_repo_id, **kwargs)
    ema = ema_class(model.parameters(), model_cls=model_cls, model_config=model.config)
    state = ema.state_dict()
    ema.load_state_dict({k: model.config.get(k, v) for k, v in state.items()})
    return ema


def _save_ema(ema: Any, folder: str, **kwargs: Any) -> None:
    """What ``EMAModel.save_pretrained`` does (a model from its config, its state in the config, the averaged weights),
    with the model routed as the record in the EMA's config says, so that its save carries the routing."""
    if ema.model_cls is None or ema.model_config is None:
        raise ValueError("dtr.save_pretrained of an EMAModel needs model_cls= and model_config= given to EMAModel")
    record = ema.model_config.get(KEY)
    if record is None:
        raise ValueError(
            "this EMAModel's model_config carries no routing: it was made before dtr.wrap (make it after, with "
            "model_config=model.config of the routed model), or from an unrouted model"
        )
    with _without_record_warning():
        model = ema.model_cls.from_config(ema.model_config)
    wrap_from_config(model, record)
    state = ema.state_dict()
    state.pop("shadow_params", None)
    model.register_to_config(**state)
    ema.copy_to(model.parameters())
    save_pretrained(model, folder, **kwargs)


#################################################################################
#              diffusers' warning about the record, while dtr loads it            #
#################################################################################

_UNEXPECTED = re.compile(r"The config attributes (\{.*\}) were passed to (.*)", re.S)


class _RecordWarningFilter(logging.Filter):
    """Takes the ``dtr_routing`` entry out of diffusers' "config attributes ... are not expected" warning (the
    one that tells a plain ``from_pretrained`` to use ``dtr.from_pretrained``), for records of one thread; the
    other entries still warn."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or KEY not in str(record.msg):
            return True
        match = _UNEXPECTED.match(record.getMessage())
        try:
            attributes = ast.literal_eval(match.group(1)) if match else None
        except (ValueError, SyntaxError):
            attributes = None
        if not isinstance(attributes, dict) or KEY not in attributes:
            return True  # not the message this filter knows: leave it as it is
        del attributes[KEY]
        if not attributes:
            return False
        record.msg, record.args = f"The config attributes {attributes} were passed to {match.group(2)}", ()
        return True


@contextlib.contextmanager
def _without_record_warning():
    """While ``dtr.from_pretrained`` loads (in this thread), diffusers does not tell it to use dtr.from_pretrained."""
    logger = logging.getLogger("diffusers.configuration_utils")  # diffusers' logger.warning in extract_init_dict
    quiet = _RecordWarningFilter(threading.get_ident())
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
