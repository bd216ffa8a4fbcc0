"""The routing handle: what is routed and how, attached to a model (all modules or none) and detached again.

``Routing`` builds one ``Runtime`` for the model and one small behaviour per module it touches (the model's
call, the timestep module, each routed block), and attaches them with ``mechanism.attach_all``.  A model with a
diffusers config also gets the routing's record in it (``record``), so that its own saves write it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .entry import ModelCall, TimestepCapture, leave_compiled, locate_timestep, plant
from .legacy import V01_HOOKS, unpickle_hooks_01
from .masks import active_channels, task_masks
from .mechanism import attach_all, behaviour_of, check_attachable, detach_all
from .placements import Gate, Residual, declared_width
from .record import attach_record, detach_record
from .runtime import Runtime
from .spec import RoutedModule, RoutingConfig, RoutingSpec


class Routing:
    """The handle ``dtr.wrap`` returns: the routing's ``config`` and ``spec``, its modules, ``summary()`` and
    ``remove()``.

    Copies of the model (``copy.deepcopy`` for an EMA, ``torch.save``) carry a copy of the handle and
    route by their own inputs.
    """

    def __init__(self, model: nn.Module, spec: RoutingSpec, config: RoutingConfig):
        self.model = model
        self.spec = spec
        self.runtime = Runtime(config, spec.timestep_kind)
        modules = dict(model.named_modules())
        placement = Residual if spec.placement == "residual" else Gate
        self.routed = [RoutedModule(n, modules[n], spec.placement, i) for i, n in enumerate(spec.blocks)]
        _check_io(spec, self.routed)
        parts = [
            (r.name, r.module, placement(self.runtime, r.name, r.index, spec.io_for(r.module), r.module))
            for r in self.routed
        ]
        sources = [p[2].source for p in parts if getattr(p[2], "source", None) is not None]
        parts += [(s.name, modules[s.name], s) for s in sources]  # the children a block's stream starts from
        if spec.timestep_module:
            parts.append((spec.timestep_module, modules[spec.timestep_module], None))
        _check_roles(parts)
        image = _image_arg(model, spec)
        if spec.timestep_module:
            capture = modules[spec.timestep_module]
            where = locate_timestep(capture, spec.timestep_arg, "(timestep_module)")
            parts[-1] = (spec.timestep_module, capture, TimestepCapture(self.runtime, spec.timestep_module, where))
            entry = ModelCall(self.runtime, self, None, {}, image)
        else:
            entry = ModelCall(self.runtime, self, locate_timestep(model, spec.timestep_arg, ""), {}, image)
        for name, _, behaviour in parts:
            plant(entry.tree, name, behaviour)
        parts.insert(0, ("", model, entry))
        for name, module, _ in parts:
            check_attachable(module, name)
        attach_all([(module, behaviour) for _, module, behaviour in parts])
        self._modules = [module for _, module, _ in parts]
        try:
            attach_record(model, self)
        except BaseException:  # all or nothing: the modules go back, the config is as it was
            detach_all(self._modules)
            self._modules = []
            raise

    # -- per call ---------------------------------------------------------------------------
    def current_tasks(self) -> torch.Tensor | None:
        """Task indices of the innermost call in progress in this thread (for hooks and debugging), or None."""
        call = self.runtime.calls.current()
        return None if call is None else call.tasks

    # -- public ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every module: the model computes exactly what it computed before ``wrap``, and its config (a
        diffusers model's) no longer carries the routing, so that its next save is an unrouted one."""
        if not self._modules:
            return  # removed already: the model may be routed again by another handle, whose record stays
        detach_all(self._modules)
        leave_compiled(self.model.modules())
        self._modules = []
        detach_record(self.model)

    @property
    def active(self) -> bool:
        """Whether the routing is still attached (``remove`` not called)."""
        return bool(self._modules)

    @property
    def config(self) -> RoutingConfig:
        """The routing's numbers (sharing ratio, alpha, method, tasks, seed, task axis)."""
        return self.runtime.config

    def to_dict(self) -> dict:
        """Everything needed to route an unrouted copy of the model the same way (JSON-serialisable):
        ``{"config": RoutingConfig.to_dict(), "spec": RoutingSpec.to_dict()}``, for ``dtr.wrap_from_config``."""
        return {"config": self.config.to_dict(), "spec": self.spec.to_dict()}

    # the numbers, one by one
    sharing_ratio = property(lambda self: self.runtime.config.sharing_ratio)
    alpha = property(lambda self: self.runtime.config.alpha)
    method = property(lambda self: self.runtime.config.method)
    num_tasks = property(lambda self: self.runtime.config.num_tasks)
    seed = property(lambda self: self.runtime.config.seed)
    task_axis = property(lambda self: self.runtime.config.task_axis)

    def masks(self, channels: int, block: int = 0) -> torch.Tensor:
        """The (T, C) mask table this routing applies at width ``channels`` (for inspection and plots)."""
        c = self.runtime.config
        return task_masks(c.num_tasks, channels, c.sharing_ratio, c.alpha, c.method, c.seed, block)

    def widths(self) -> list[int]:
        """Distinct channel widths of the routed modules, as far as the modules declare them."""
        return sorted({w for w in (declared_width(r.module) for r in self.routed) if w is not None})

    def state_bytes(self) -> int:
        """Bytes of tensors routing keeps between calls (window starts per width and device)."""
        return self.runtime.state_bytes()

    def summary(self) -> str:
        """A few lines saying what is routed, how, and where the timestep is read."""
        c, s = self.runtime.config, self.spec
        where = getattr(behaviour_of(self.model), "timestep", None)
        reads = where.describe() if where is not None else f"the call of {s.timestep_module!r}"
        axis = "" if c.task_axis == "linear" else f", task_axis={c.task_axis}"
        lines = [
            f"DTR routing ({s.adapter} adapter): method={c.method}, sharing_ratio={c.sharing_ratio}, "
            f"alpha={c.alpha}, num_tasks={c.num_tasks}" + (f", seed={c.seed}" if c.method == "random" else "") + axis,
            f"  timestep: {reads} ({s.timestep_kind})",
            f"  {len(self.routed)} {s.placement} modules: {_abbreviate([r.name for r in self.routed])}",
        ]
        if s.io:
            lines.append("  streams: " + "; ".join(f"{k}: {_describe_io(v)}" for k, v in s.io.items()))
        if s.image_tokens is not None:
            lines.append(
                f"  image tokens of joined streams: counted from argument {s.image_tokens.arg!r}"
                + (f" (patch {s.image_tokens.patch})" if s.image_tokens.patch else "")
            )
        for w in self.widths():
            lines.append(f"  width {w}: {active_channels(w, c.sharing_ratio)} active channels per task")
        if s.note:
            lines.append(f"  note: {s.note}")
        if not self.active:
            lines.append("  (removed)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.runtime.config
        return (
            f"Routing(method={c.method!r}, sharing_ratio={c.sharing_ratio}, alpha={c.alpha}, blocks={len(self.routed)})"
        )

    def __getattr__(self, name: str):
        if name in V01_HOOKS:  # unpickling a whole model saved by dtr 0.1, whose hooks were bound methods
            unpickle_hooks_01()
        raise AttributeError(name)


#################################################################################
#                                    Helpers                                     #
#################################################################################


def _check_io(spec: RoutingSpec, routed: list[RoutedModule]) -> None:
    """Joined streams need the model's image token count; joined and source streams need residual placement."""
    for r in routed:
        io = spec.io_for(r.module)
        if (io.joined or io.source) and spec.placement != "residual":
            raise ValueError(f"dtr: BlockIO joined/source of {type(r.module).__name__} needs placement='residual'")
        if io.joined and spec.image_tokens is None:
            raise ValueError(
                f"dtr: {r.name!r} is declared joined ([text; image] tokens) but the spec says nowhere how many image "
                "tokens a call has: set RoutingSpec.image_tokens=dtr.ImageTokens(<model argument>, <patch>)"
            )


def _image_arg(model: nn.Module, spec: RoutingSpec):
    """(located argument, ImageTokens) of the model call that gives the image token count, or None."""
    if spec.image_tokens is None:
        return None
    where = locate_timestep(model, spec.image_tokens.arg, "(image tokens)")
    return dataclasses.replace(where, role="image tokens"), spec.image_tokens


def _check_roles(parts: list) -> None:
    """Each module has one role: the timestep module is not a routed block (nor the model), and no module is
    routed twice."""
    seen: dict[int, tuple[str, str]] = {}
    for name, module, behaviour in parts:
        role = "the timestep module" if behaviour is None else f"a {type(behaviour).__name__.lower()} module"
        if id(module) in seen:
            other, other_role = seen[id(module)]
            raise ValueError(
                f"dtr: module {name or '<model>'!r} would be both {other_role} and {role}; the timestep module "
                "cannot be a routed block or the model itself, and each module is routed once"
            )
        seen[id(module)] = (name, role)


def _describe_io(io) -> str:
    text = f"input {io.input!r}, output {io.output!r}"
    if io.joined:
        text += ", joined [text; image] (image tokens routed" + (f", valid tokens {io.valid!r})" if io.valid else ")")
    if io.source:
        text += f", stream from {io.source!r} where present"
    return text


def _abbreviate(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"


#################################################################################
#                              Selecting modules                                #
#################################################################################


def select_modules(model: nn.Module, blocks: str | Iterable[str] | Callable) -> tuple[str, ...]:
    """Dotted names of the modules ``blocks`` picks: a full-match regex, a list of names, or a predicate."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(blocks, str):
        pattern = re.compile(blocks)
        chosen = [n for n in names if pattern.fullmatch(n)]
        what = f"blocks pattern {blocks!r}"
    elif callable(blocks):
        modules = dict(model.named_modules())
        chosen = [n for n in names if blocks(n, modules[n])]
        what = "blocks predicate"
    elif isinstance(blocks, Iterable):
        wanted = list(blocks)
        if not all(isinstance(b, str) for b in wanted):
            raise TypeError(
                "blocks must be a regex string, a list of module names, or a predicate (name, module) -> bool"
            )
        missing = [b for b in wanted if b not in set(names)]
        if missing:
            raise ValueError(f"blocks names not found in the model: {missing}; some names: {_abbreviate(names)}")
        chosen, what = wanted, "blocks list"
    else:
        raise TypeError("blocks must be a regex string, a list of module names, or a predicate (name, module) -> bool")
    if not chosen:
        raise ValueError(
            f"{what} matches no module of {type(model).__name__}; module names look like: {_abbreviate(names[:50])}"
        )
    return tuple(chosen)
