"""Where a call's timestep enters: the behaviours of the model (one ``Call`` per model call) and of the module
the timestep enters, when that is not the model (``timestep_module=``).

The timestep argument is declared by name (or position) and located in the ``forward`` signature once, at
wrap; every error about it names the argument that was read.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._compat import is_compiling
from .calls import Call, checkpoint_region
from .mechanism import ATTR
from .runtime import Runtime
from .spec import TIMESTEP_NAMES, ImageTokens


@dataclass(frozen=True)
class TimestepArg:
    """A timestep argument of a module's ``forward``: its keyword and its position (either may be None)."""

    name: str | None
    position: int | None
    owner: str  # "DiT.forward", for messages
    role: str = "timestep"  # what the argument is, for messages ("timestep", or "image tokens" for ImageTokens.arg)

    def describe(self) -> str:
        parts = [repr(self.name)] if self.name is not None else []
        if self.position is not None:
            parts.append(f"position {self.position}")
        return f"argument {' at '.join(parts)} of {self.owner}"

    def read(self, args: tuple, kwargs: dict) -> Any:
        if self.name is not None and self.name in kwargs:
            return kwargs[self.name]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        hint = "; pass timestep_arg= (a name or position)" if self.role == "timestep" else ""
        raise ValueError(
            f"dtr: no {self.role} argument in this call of {self.owner}: dtr reads {self.describe()}, and the call "
            f"had {len(args)} positional arguments and keywords {sorted(kwargs)}{hint}"
        )


def locate_timestep(module: nn.Module, arg: str | int | None, where: str) -> TimestepArg:
    """The timestep argument of ``module``'s forward: ``arg`` (a name or position), or the first parameter named
    like a timestep (``t``, ``timestep``, ``timesteps``); refused at wrap when there is none."""
    forward = type(module).forward
    owner = f"{type(module).__name__}.forward"
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = None
    if params is None:
        if arg is None:
            raise ValueError(f"dtr cannot read the signature of {owner}: pass timestep_arg= (a name or position)")
        return TimestepArg(arg if isinstance(arg, str) else None, arg if isinstance(arg, int) else None, owner)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in params if p.kind in kinds]
    keywords = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    shown = f"{owner}({', '.join(p.name for p in params)})"
    if arg is None:
        found = [n for n in TIMESTEP_NAMES if n in keywords]
        if not found:
            raise ValueError(
                f"dtr cannot tell which argument of {shown} {where} is the timestep (none is named "
                f"{' or '.join(TIMESTEP_NAMES)}): pass timestep_arg= (its name or position)"
            )
        arg = found[0]
    if isinstance(arg, str):
        if arg not in keywords and not open_kwargs:
            raise ValueError(f"timestep_arg {arg!r} is not an argument of {shown}")
        return TimestepArg(arg, positional.index(arg) if arg in positional else None, owner)
    if isinstance(arg, bool) or not isinstance(arg, int) or arg < 0:
        raise TypeError(f"timestep_arg must be an argument name or a position >= 0, got {arg!r}")
    if arg >= len(positional) and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        raise ValueError(f"timestep_arg {arg} is not a position of {shown} (it takes {len(positional)})")
    return TimestepArg(positional[arg] if arg < len(positional) else None, arg, owner)


def read_tasks(runtime: Runtime, timestep: TimestepArg, args: tuple, kwargs: dict) -> torch.Tensor:
    """The task indices of the timestep argument of a call; errors say which argument was read."""
    value = timestep.read(args, kwargs)
    try:
        return runtime.tasks_from(value)
    except (TypeError, ValueError) as e:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise type(e)(
            f"{e} (dtr read the timestep from {timestep.describe()}: {got}; if that is not the "
            "timestep, pass timestep_arg=)"
        ) from None


class ModelCall:
    """The routed model: each of its calls owns a ``Call`` holding that call's tasks.

    Both ``model(...)`` and a direct ``model.forward(...)`` (facebookresearch/DiT's ``forward_with_cfg``) open a
    call; the forward that ``model(...)`` runs joins the call it opened.  Before each eager call it checks that
    every routed module is still in the model (a module replaced after wrap would run unrouted).
    """

    intercepts_forward = True

    def __init__(
        self,
        runtime: Runtime,
        routing: Any,
        timestep: TimestepArg | None,
        tree: dict,
        image: tuple[TimestepArg, ImageTokens] | None = None,
    ):
        self.runtime = runtime  # first: a deepcopy copies it before the routing (see __deepcopy__)
        self.routing = routing  # the user's handle, for dtr.routing_of
        self.timestep = timestep  # None: the timestep module gives the tasks
        self.tree = tree  # {child name: subtree or the routed module's behaviour}, the routed modules' places
        self.image = image  # where a call's image token count is read (RoutingSpec.image_tokens), or None

    def copies_with(self, memo: dict) -> bool:
        return True  # a copy of the model is a routed model (an EMA made with copy.deepcopy routes by its own inputs)

    def __deepcopy__(self, memo: dict) -> ModelCall:
        new = ModelCall.__new__(ModelCall)
        memo[id(self)] = new
        for key, value in self.__dict__.items():  # runtime first: the blocks copied below look for it in memo
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def call(self, module: nn.Module, call_impl: Callable, args: tuple, kwargs: dict) -> Any:
        return self._run(module, call_impl, args, kwargs, entered=False)

    def forward(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        call = self.runtime.calls.current()
        if call is not None and call.owner is module and not call.entered:
            call.entered = True  # the forward of the call opened by module(...)
            return forward(module, *args, **kwargs)
        return self._run(module, forward, args, kwargs, entered=True)  # forward() called directly: a call of its own

    def _run(self, module: nn.Module, fn: Callable, args: tuple, kwargs: dict, entered: bool) -> Any:
        if torch._C._get_tracing_state() is not None:
            raise TypeError("dtr routing cannot be traced by torch.jit.trace: use torch.compile or torch.export")
        if isinstance(args, torch.fx.Proxy) or any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            raise TypeError("dtr routing cannot be traced symbolically by torch.fx: use torch.compile or torch.export")
        check_places(module, self.tree)
        tasks = None if self.timestep is None else read_tasks(self.runtime, self.timestep, args, kwargs)
        image_tokens = None if self.image is None else self.image[1].count(self.image[0].read(args, kwargs))
        calls = self.runtime.calls
        outer = calls.current()
        try:
            calls.push(tasks, owner=module, entered=entered).image_tokens = image_tokens
            return fn(module, *args, **kwargs)
        finally:
            calls.restore(outer)


class TimestepCapture:
    """The module the timestep enters (``timestep_module=``): its call gives the model's call its tasks, once."""

    intercepts_forward = False

    def __init__(self, runtime: Runtime, name: str, timestep: TimestepArg):
        self.runtime = runtime
        self.name = name
        self.timestep = timestep

    def copies_with(self, memo: dict) -> bool:
        return id(self.runtime) in memo

    def call(self, module: nn.Module, call_impl: Callable, args: tuple, kwargs: dict) -> Any:
        call = self.runtime.calls.current()
        if call is not None and call.owner is not None and not _recomputing():
            self._capture(call, args, kwargs)
        return call_impl(module, *args, **kwargs)

    def _capture(self, call: Call, args: tuple, kwargs: dict) -> None:
        if call.captured:
            raise RuntimeError(
                f"dtr: timestep_module {self.name!r} was called twice in one call of the model, so dtr cannot tell "
                "which call carries the timestep: point timestep_module at a module called once per model call"
            )
        call.tasks = read_tasks(self.runtime, self.timestep, args, kwargs)
        call.masks = {}
        call.captured = True


def _recomputing() -> bool:
    """Whether an eager checkpoint region is being recomputed in this thread (its timestep was read already)."""
    return not is_compiling() and torch.is_grad_enabled() and checkpoint_region()[1]


def plant(tree: dict, name: str, behaviour: Any) -> None:
    """Record ``behaviour`` at the dotted ``name`` in a tree of child names (``ModelCall.tree``; key "" = here)."""
    for key in name.split("."):
        tree = tree.setdefault(key, {})
    tree[""] = behaviour


def check_places(module: nn.Module, tree: dict, prefix: str = "") -> None:
    """Raise if a routed module is no longer where it was wrapped: a module put in its place would run unrouted.

    One dict lookup per routed module and level.  A wrapper put around a routed module (a checkpoint wrapper,
    FSDP1, torch.compile's OptimizedModule) still runs it routed: the tree then follows the path inside it.
    """
    children = module._modules
    for key, node in tree.items():
        if key == "":
            continue
        child = children.get(key)
        behaviour = node.get("")
        if child is None or (behaviour is not None and getattr(child, ATTR, None) is not behaviour):
            inside = None if behaviour is None else _path_inside(child, node)
            if inside is None:
                _replaced(prefix + key, child)
            tree[key] = inside
        elif len(node) > (behaviour is not None):
            check_places(child, node, f"{prefix}{key}.")


def _path_inside(wrapper: nn.Module | None, node: dict) -> dict | None:
    """A tree leading from ``wrapper`` to the module that holds ``node``'s behaviour (with ``node``'s routed
    children below it, e.g. a block's ``BlockIO.source``), or None."""
    for name, module in () if wrapper is None else wrapper.named_modules():
        if name and module.__dict__.get(ATTR) is node[""]:
            tree: dict = {}
            *parents, last = name.split(".")
            branch = tree
            for key in parents:
                branch = branch.setdefault(key, {})
            branch[last] = node
            return tree
    return None


def _replaced(name: str, child: nn.Module | None) -> None:
    now = "removed" if child is None else f"replaced by a {type(child).__name__} that does not hold it"
    raise RuntimeError(
        f"dtr: routed module {name!r} was {now} after dtr.wrap, so that part of the model would run unrouted: "
        "call dtr.unwrap(model) and dtr.wrap(model) again after changing the model's modules"
    )
