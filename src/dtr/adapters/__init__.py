"""Adapters: for a family of models, which modules to route and where the timestep enters.

An adapter is a function ``model -> RoutingSpec | None``.  ``find_adapter`` asks them in order and the
first that recognises the model wins; ``register_adapter`` adds one (by default before the built-in
ones, or just before a named adapter), so routing a new family with no argument is one function.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..spec import RoutingSpec
from .diffusers import diffusers_unet_spec
from .diffusers_dit import diffusers_dit_spec
from .diffusers_mmdit import diffusers_mmdit_spec
from .dit import dit_spec
from .sit import sit_spec
from .unet import adm_unet_spec

Adapter = Callable[[nn.Module], "RoutingSpec | None"]

# Most specific first: SiT is DiT-shaped but runs on continuous time.
_adapters: list[Adapter] = [
    sit_spec,
    dit_spec,
    diffusers_unet_spec,
    diffusers_dit_spec,
    diffusers_mmdit_spec,
    adm_unet_spec,
]


def register_adapter(adapter: Adapter, *, before: Adapter | str | None = None) -> Adapter:
    """Let ``dtr.wrap`` recognise a model family: ``adapter(model)`` returns a ``RoutingSpec`` or None.

    It is asked before every adapter already registered, or just before ``before`` (an adapter or
    its function name, e.g. ``"dit_spec"``).  Registering the same function again moves it.
    Usable as a decorator; returns ``adapter``.
    """
    if not callable(adapter):
        raise TypeError(f"adapter must be a function model -> RoutingSpec | None, got {type(adapter).__name__}")
    if adapter in _adapters:
        _adapters.remove(adapter)
    if before is None:
        _adapters.insert(0, adapter)
        return adapter
    names = [a.__name__ for a in _adapters]
    if before in _adapters:
        index = _adapters.index(before)
    elif isinstance(before, str) and before in names:
        index = names.index(before)
    else:
        raise ValueError(
            f"before={getattr(before, '__name__', before)!r} is not a registered adapter; registered: {names}"
        )
    _adapters.insert(index, adapter)
    return adapter


def adapters() -> tuple[Adapter, ...]:
    """The registered adapters, in the order ``dtr.wrap`` asks them."""
    return tuple(_adapters)


def find_adapter(model: nn.Module) -> RoutingSpec | None:
    """The routing spec of the first adapter that recognises ``model``, else None."""
    for adapter in _adapters:
        spec = adapter(model)
        if spec is not None:
            return spec
    return None


__all__ = [
    "adapters",
    "find_adapter",
    "register_adapter",
    "adm_unet_spec",
    "diffusers_dit_spec",
    "diffusers_mmdit_spec",
    "diffusers_unet_spec",
    "dit_spec",
    "sit_spec",
]
