"""Attach a behaviour to a module's forward and detach it again: a thin mechanism that knows no behaviour.

``attach(module, behaviour)`` puts a ``RoutedForward`` in the module's instance ``forward``, as accelerate's and
diffusers' hooks do: ``module(...)`` runs ``nn.Module.__call__`` as before (pre-hooks, then ``forward``, then
hooks), and ``forward`` hands the call to ``behaviour.forward(module, forward, args, kwargs)`` with the forward the
module had (a class patch of ``forward`` made later applies; an instance ``forward`` found at attach is kept
inside).  Nothing else about the module changes: its class (code that keys on the exact class, registries,
``torch.ao`` mappings, parametrize and FSDP2's own class swaps), its ``forward`` signature (``RoutedForward`` shows
the signature of the forward it wraps: pipelines and ``torch.export`` read it), its hooks, which see the stream the
module passes on, and its copies and pickles, which carry the behaviour along with everything else in ``__dict__``.
TorchDynamo guards the instance ``forward`` it calls, so a graph compiled with or without routing never runs for
the other.

``detach`` takes the ``RoutedForward`` out again (and puts back the forward it found) when it is still the
module's ``forward``.  When another system has since wrapped it (accelerate adds a hook after ``wrap``), ours stays
inside that wrapper, inert: without its behaviour it calls straight through.  So detaching always finishes and never
leaves a module half routed, and a later attach does not revive an inert one.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from . import policy
from .legacy import unpickle_routed_03

ATTR = "_dtr_behaviour"


class Behaviour:
    """The contract of what ``attach`` carries: ``forward(module, forward, args, kwargs)`` runs in place of the
    module's forward (``forward`` is the one it had, bound), and ``live`` says whether it still applies: False
    for a behaviour no model owns any more (a block saved or copied without its model), whose ``forward`` then
    calls ``forward`` as it is, and which a new attach replaces."""

    live = True

    def forward(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a Behaviour: it must define forward()")  # the contract


class RoutedForward:
    """A routed module's instance ``forward``: its behaviour around the forward the module had.  Detached, it has no
    behaviour and calls straight through (it may stay inside a wrapper another system put around it)."""

    __slots__ = ("module", "behaviour", "inner", "func")
    __name__ = "forward"

    def __init__(self, module: nn.Module, behaviour: Behaviour, inner: Callable | None):
        self.module = module
        self.behaviour: Behaviour | None = behaviour
        self.inner = inner  # an instance forward found at attach, or None: the class's forward
        # The class's forward, read at attach and again before each eager model call (entry.check_places), so that a
        # class patch of ``forward`` applies; not read off the class in the call, which TorchDynamo cannot do for
        # classes marked allow_in_graph (diffusers' blocks).
        self.func = type(module).forward

    def __call__(self, *args, **kwargs):
        behaviour = self.behaviour
        if behaviour is not None:
            forward = self.inner if self.inner is not None else policy.bind(self.func, self.module)
            return behaviour.forward(self.module, forward, args, kwargs)
        if self.inner is not None:  # detached: what the module did before
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # inspect.signature(module.forward): as without routing
        return inspect.signature(self._wrapped())

    @property
    def __code__(self) -> types.CodeType:  # torch.export names its fake mode after the forward's code
        wrapped = self._wrapped()
        return getattr(wrapped, "__code__", None) or wrapped.__func__.__code__

    def _wrapped(self) -> Callable:
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    def __repr__(self) -> str:
        return f"<dtr routed forward of {type(self.module).__name__}>"


def routed_forward(module: nn.Module) -> RoutedForward | None:
    """The ``RoutedForward`` attached to ``module`` (whether or not something has wrapped it since), or None."""
    return module.__dict__.get(ATTR)


def behaviour_of(module: nn.Module) -> Any:
    """The behaviour attached to ``module``, or None."""
    found = module.__dict__.get(ATTR)
    return None if found is None else found.behaviour


def attached(module: nn.Module) -> bool:
    """Whether ``module`` carries a behaviour that still applies (not one of a model it was saved without)."""
    behaviour = behaviour_of(module)
    return behaviour is not None and behaviour.live


def check_attachable(module: nn.Module, name: str) -> None:
    """Raise, changing nothing, if a behaviour cannot be attached to ``module``."""
    if attached(module):
        where = f"submodule {name!r}" if name else "the model"
        raise ValueError(f"{where} is already routed by dtr; call dtr.unwrap(...) before wrapping again")


def attach_all(plan: Iterable[tuple[nn.Module, Behaviour]]) -> None:
    """Attach each behaviour to its module: all of them, or (if one fails) none."""
    done = []
    try:
        for module, behaviour in plan:
            _attach(module, behaviour)
            done.append(module)
    except BaseException:
        detach_all(done)
        raise


def detach_all(modules: Iterable[nn.Module]) -> None:
    """Detach every module (each step only removes what ``attach`` added, so it cannot fail half-way)."""
    for module in modules:
        state = module.__dict__
        attached_forward = state.pop(ATTR, None)
        if attached_forward is None:
            continue
        attached_forward.behaviour = None  # inert wherever it is, also inside another system's wrapper
        if state.get("forward") is attached_forward:
            inner = attached_forward.inner
            if inner is None or is_class_forward(inner, module):
                del state["forward"]
            else:
                state["forward"] = inner


def _attach(module: nn.Module, behaviour: Behaviour) -> None:
    state = module.__dict__  # not setattr: a class whose __setattr__ forbids new attributes must not stop routing
    found = state.get("forward")
    while isinstance(found, RoutedForward) and (
        found.behaviour is None or not found.behaviour.live or found.module is not module
    ):  # ours, inert: detached while wrapped (the wrapper since removed), of a model this module was saved
        # without, or of the module a shallow copy copied
        found = found.inner if found.module is module else None
    previous = state.get(ATTR)
    if previous is not None:  # a leftover that no model owns (a block saved without its model): replaced
        previous.behaviour = None
    forward = RoutedForward(module, behaviour, found)
    state[ATTR] = forward
    state["forward"] = forward


def is_class_forward(fn: Any, module: nn.Module) -> bool:
    """Whether ``fn`` is ``module``'s class forward bound to it (what a hook removed after wrap may leave behind)."""
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


# Whole-model pickles of dtr 0.3 name this function (its routed classes were rebuilt by it on load).
_new_routed = unpickle_routed_03
