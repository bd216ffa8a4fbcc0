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
import inspect
import json
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any

from torch import nn

from .adapters import find_adapter
from .api import inner_model, routing_of, wrap_with
from .record import KEY, SavedRouting, has_config, read_file, read_record, read_routing

CONFIG_NAME = "dtr_config.json"  # where dtr 0.2 kept the routing, beside the weights
# What from_pretrained takes to find the files (the rest is for building the model).
_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "force_download", "proxies", "token", "local_files_only")
# dtr 0.2 tried these in order, by position or name, when nothing else was said (a saved format 1 list).
_V02_DEFAULT_TIMESTEP_ARG = (1, "t", "timestep", "timesteps")


def save_pretrained(model: nn.Module, folder: str, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, **kwargs)`` of a routed diffusers model (also through DDP, ``torch.compile``
    or ``PeftModel``), refusing an unrouted one; removes a ``dtr_config.json`` an earlier dtr left in ``folder``.

    The routing is in the model's config, so the model's own ``save_pretrained`` writes it as well.
    """
    inner = inner_model(model)
    if routing_of(inner) is None:
        raise ValueError(
            f"{type(inner).__name__} is not routed by dtr: use its own save_pretrained, or dtr.wrap it first"
        )
    if not has_config(inner) or not callable(getattr(inner, "save_pretrained", None)):
        raise TypeError(
            f"{type(inner).__name__} has no diffusers config to carry its routing (not a diffusers "
            "model): save its state_dict with torch.save and dtr.routing_of(model).config beside it, "
            "and route the loaded model with dtr.wrap_from_config"
        )
    if kwargs.get("is_main_process", True):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, CONFIG_NAME))  # before the save: push_to_hub uploads the folder
    inner.save_pretrained(folder, **kwargs)


def from_pretrained(model_class: type, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(path_or_repo_id, **kwargs)``, routed again as it was saved.

    ``model_class`` is a diffusers model class (the routing comes from the saved ``config.json``, checked before
    the weights load) or a pipeline class (every component whose config carries a routing is routed again; the
    others, and components passed in ``kwargs``, are as diffusers gives them; a pipeline with no routed component
    is refused).  ``kwargs`` are the class's own:
    ``subfolder``, ``revision``, ``cache_dir``, ``local_files_only``, ``torch_dtype``, ...
    """
    if _is_pipeline_class(model_class):
        return _pipeline_from_pretrained(model_class, path_or_repo_id, kwargs)
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
            "settings it was trained with (an EMAModel made before dtr.wrap saves its config without "
            "the routing: make it after)"
        )
    with _without_record_warning():
        model = model_class.from_pretrained(path_or_repo_id, **kwargs)
    _route(model, saved, where)
    return model


def wrap_from_config(model: nn.Module, config: dict):
    """Route ``model`` as ``config`` says: a ``Routing.config``, a model config's ``dtr_routing`` record, or the
    contents of a ``dtr_config.json``; returns the handle."""
    if isinstance(config, dict) and "routing" in config and "format_version" in config:
        saved = read_record(config, "config")
    elif isinstance(config, dict) and "format_version" in config:
        saved = read_file(config, "config")
    else:
        saved = read_routing(config, "config", None)
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
        where = _where(path_or_repo_id, name, kwargs.get("revision"), component.config_name)
        saved = _saved_routing(component.config, path_or_repo_id, name, hub, where)
        if saved is not None:
            _route(component, saved, where)
    if not any(isinstance(c, nn.Module) and routing_of(c) is not None for c in pipeline.components.values()):
        raise ValueError(
            f"no component of the pipeline {path_or_repo_id} is routed: none was saved routed (no "
            f"{KEY!r} key in their config.json, no {CONFIG_NAME}) and none passed in is. Load it with "
            f"{pipeline_class.__name__}.from_pretrained"
        )
    return pipeline


def _saved_routing(config, path_or_repo_id, subfolder: str | None, hub: dict, where: str) -> SavedRouting | None:
    """The routing a saved config carries, or that a ``dtr_config.json`` of an earlier dtr beside it holds, or None."""
    if KEY in config:
        return read_record(config[KEY], where)
    path = _earlier_file(path_or_repo_id, subfolder, hub)
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    saved = read_file(data, path)
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


def _route(model: nn.Module, saved: SavedRouting, where: str):
    """Route ``model`` as ``saved`` says; an error names where the routing came from."""
    names = {n for n, _ in inner_model(model).named_modules()}
    missing = [b for b in saved.blocks if b not in names]
    if missing:
        raise ValueError(
            f"{where}: key {saved.key('blocks')!r} names modules a {type(inner_model(model)).__name__} "
            f"of this config does not have: {missing[:3]} (saved from another model?)"
        )
    spec = find_adapter(inner_model(model))
    blocks = None if spec is not None and spec.blocks == saved.blocks else list(saved.blocks)  # keep the adapter's name
    arg = saved.timestep_arg
    if isinstance(arg, tuple):  # format 1: the first name the model's forward takes, else the first position
        arg = _first_accepted(model, saved.timestep_module, arg)
    try:
        return wrap_with(
            model,
            saved.config,
            blocks=blocks,
            placement=saved.placement,
            block_io=dict(saved.io) or None,
            timestep_module=saved.timestep_module or None,
            timestep_arg=arg,
            timestep_kind=saved.timestep_kind,
            channel_axis=saved.channel_axis,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e


def _first_accepted(model: nn.Module, timestep_module: str, candidates: tuple):
    """dtr 0.2's timestep_arg list, as one argument: None for its default list (the adapter knows), else the
    first name the timestep module's forward takes, else the first position."""
    if candidates == _V02_DEFAULT_TIMESTEP_ARG or not candidates:
        return None
    module = dict(inner_model(model).named_modules())[timestep_module] if timestep_module else inner_model(model)
    names = inspect.signature(module.forward).parameters
    return next(
        (a for a in candidates if isinstance(a, str) and a in names),
        next((a for a in candidates if isinstance(a, int)), candidates[0]),
    )


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
