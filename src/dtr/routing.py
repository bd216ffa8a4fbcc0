"""The routing handle: what is routed and how, attached to a model and detached again.

``Routing`` owns the configuration (sharing ratio, alpha, method, tasks), the modules it routes and the
classes it gave them, the per-thread calls in progress (``calls.py``) and the masks it builds from them.
Nothing here adds a parameter or a buffer: masks are built per call from ``T`` window starts per width
(a few KiB in all), so checkpoints of routed and unrouted models are interchangeable.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ._compat import is_compiling
from .calls import CallStack, Replay
from .masks import (
    active_channels,
    random_rows,
    task_masks,
    timesteps_to_tasks,
    window_rows,
    window_starts,
    window_starts_tuple,
)
from .placements import routed_class

PLACEMENTS = ("residual", "gate")
DEFAULT_TIMESTEP_ARG = (1, "t", "timestep", "timesteps")


@dataclass(frozen=True)
class RoutingSpec:
    """What to route and where the timestep enters: the part of a wrap an adapter decides.

    Adapters return one; ``dtr.wrap``'s arguments override its fields with ``dataclasses.replace``.
    """

    blocks: tuple[str, ...]
    placement: str  # "residual" (y = F(m*x) + (1-m)*x, channels last) | "gate" (m * module(x), channels on axis 1)
    timestep_module: str = ""  # dotted name of the module whose call receives the timestep, "" = the model
    timestep_arg: int | str | tuple = DEFAULT_TIMESTEP_ARG  # positional index or keyword, tried in order
    timestep_kind: str | None = "index"  # "index" (DDPM steps) | "unit" (t in [0, 1], 0 = data) | "unit_reversed"
    # (None: the adapter cannot tell what the timestep means; wrap asks for timestep_kind=)
    adapter: str = "custom"
    channel_axis: int | None = None  # the axis the mask acts on; None: the placement's (residual -1, gate 1)


@dataclass(eq=False)
class RoutedModule:
    """A module routing touches: its dotted name, placement (or "anchor"), index (the R-TR draw) and routing."""

    name: str
    module: nn.Module = field(repr=False)
    placement: str
    index: int
    routing: "Routing" = field(repr=False)
    width: int | None = None  # the module's declared width, checked against its input (residual, default axis)


class Routing:
    """The handle ``dtr.wrap`` returns: the routing configuration, its modules, and ``remove()``.

    Copies of the model (``copy.deepcopy`` for an EMA, ``torch.save``) carry a copy of the handle and
    route by their own inputs.
    """

    def __init__(self, model: nn.Module, spec: RoutingSpec, sharing_ratio: float, alpha: float, method: str,
                 num_tasks: int, seed: int):
        self.model = model
        self.spec = spec
        self.sharing_ratio = sharing_ratio
        self.alpha = alpha
        self.method = method
        self.num_tasks = num_tasks
        self.seed = seed
        arg = spec.timestep_arg
        self.timestep_args = arg if isinstance(arg, tuple) else (arg,)
        self.calls = CallStack()
        self.replay = Replay()
        self._starts: dict = {}  # (width, device) -> window starts, int32, one per width and device
        modules = dict(model.named_modules())
        check_width = spec.placement == "residual" and spec.channel_axis is None
        self.routed = [RoutedModule(n, modules[n], spec.placement, i, self, _width(modules[n]) if check_width else None)
                       for i, n in enumerate(spec.blocks)]
        self._units = [RoutedModule("", model, "call", -1, self), *self.routed]
        if spec.timestep_module:
            self._units.append(RoutedModule(spec.timestep_module, modules[spec.timestep_module], "capture", -1, self))
        if spec.placement == "gate":
            self._units += [RoutedModule(n, modules[n], "anchor", -1, self) for n in _anchors(modules, spec)]
        _check_roles(self._units)
        for unit in self._units:
            _attach(unit)

    # -- per call -------------------------------------------------------------------------
    def tasks_from(self, t: Any) -> torch.Tensor:
        """The task indices of a call's timestep argument."""
        return timesteps_to_tasks(t, self.num_tasks, self.spec.timestep_kind)

    def current_tasks(self) -> torch.Tensor | None:
        """Task indices of the innermost call in progress in this thread (for hooks and debugging), or None."""
        call = self.calls.current()
        return None if call is None else call.tasks

    def mask(self, call, unit: RoutedModule, like: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, 1 - mask) of ``call``'s tasks at the width of ``like``'s ``axis``: (B, C), or (1, C) for one timestep.

        In ``like``'s dtype and device, built once per call and width (inline in the blocks of a
        regional compilation, which must not write into the eager call they read).
        """
        tasks, channels, batch = call.tasks, like.shape[axis], like.shape[0]
        if tasks.ndim == 1 and tasks.shape[0] not in (1, batch):  # (1,) broadcasts, as diffusers models do
            raise ValueError(
                f"dtr: timesteps have batch size {tasks.shape[0]} but routed module {unit.name!r} "
                f"received batch size {batch}; pass one timestep per sample (or a scalar)"
            )
        random = self.method == "random"
        key = (channels, like.dtype, like.device, unit.index if random else -1)
        cache = not is_compiling() or call.traced
        if cache and key in call.masks:
            return call.masks[key]
        c_b = active_channels(channels, self.sharing_ratio)
        flat = tasks.to(like.device).reshape(-1)
        if random:
            rows = random_rows(flat, channels, c_b, self.seed, unit.index)
        else:
            rows = window_rows(self._window_starts(channels, like.device)[flat], channels, c_b)
        m = rows.to(like.dtype)
        pair = (m, 1 - m)
        if cache:
            call.masks[key] = pair
        return pair

    def _window_starts(self, channels: int, device: torch.device) -> torch.Tensor:
        if is_compiling():  # a constant of the graph, computed by numpy at trace time
            return torch.tensor(window_starts_tuple(self.num_tasks, channels, self.sharing_ratio, self.alpha), device=device)
        starts = self._starts.get((channels, device))
        if starts is None:
            starts = torch.from_numpy(window_starts(self.num_tasks, channels, self.sharing_ratio, self.alpha).astype(np.int32))
            self._starts[(channels, device)] = starts = starts.to(device)
        return starts

    # -- copies ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Copies carry the configuration and the modules, not the per-device caches."""
        return {k: v for k, v in self.__dict__.items() if k != "_starts"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._starts = {}

    # -- public ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Give every module its own class back: the model computes exactly what it computed before ``wrap``."""
        for unit in self._units:
            _detach(unit)
        self._units = []
        self._starts = {}

    @property
    def config(self) -> dict:
        """Everything needed to route an unrouted copy of the model the same way (JSON-serialisable)."""
        spec = asdict(self.spec)
        spec["blocks"] = list(spec["blocks"])
        spec["timestep_arg"] = list(self.timestep_args)
        return dict(method=self.method, sharing_ratio=self.sharing_ratio, alpha=self.alpha,
                    num_tasks=self.num_tasks, seed=self.seed, **spec)

    def masks(self, channels: int, block: int = 0) -> torch.Tensor:
        """The (T, C) mask table this routing applies at width ``channels`` (for inspection and plots)."""
        return task_masks(self.num_tasks, channels, self.sharing_ratio, self.alpha, self.method, self.seed, block)

    def widths(self) -> list[int]:
        """Distinct channel widths of the routed modules, as far as the modules declare them."""
        return sorted({w for w in (_width(r.module) for r in self.routed) if w is not None})

    def state_bytes(self) -> int:
        """Bytes of tensors routing keeps between calls (window starts per width and device)."""
        return sum(t.numel() * t.element_size() for t in self._starts.values())

    def summary(self) -> str:
        """A few lines saying what is routed, how, and where the timestep is read."""
        lines = [
            f"DTR routing ({self.spec.adapter} adapter): method={self.method}, sharing_ratio={self.sharing_ratio}, "
            f"alpha={self.alpha}, num_tasks={self.num_tasks}" + (f", seed={self.seed}" if self.method == "random" else ""),
            f"  timestep: argument {self.spec.timestep_arg!r} of {self.spec.timestep_module or '<model>'!r} "
            f"({self.spec.timestep_kind})",
            f"  {len(self.routed)} {self.spec.placement} modules: {_abbreviate([r.name for r in self.routed])}",
        ]
        for w in self.widths():
            lines.append(f"  width {w}: {active_channels(w, self.sharing_ratio)} active channels per task")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Routing(method={self.method!r}, sharing_ratio={self.sharing_ratio}, alpha={self.alpha}, "
                f"blocks={len(self.routed)})")


#################################################################################
#                           Attaching and detaching                             #
#################################################################################


def _attach(unit: RoutedModule) -> None:
    """Give the module the routed subclass of its class for its role, and a pointer to its unit."""
    module = unit.module
    module.__class__ = routed_class(type(module), unit.placement)
    module.__dict__["_dtr_unit"] = unit


def _detach(unit: RoutedModule) -> None:
    module = unit.module
    if module.__dict__.get("_dtr_unit") is not unit:
        return  # already detached
    cls = type(module)
    if getattr(cls, "_dtr_role", None) != unit.placement or cls is not routed_class(cls._dtr_base, unit.placement):
        raise RuntimeError(
            f"dtr: the class of {unit.name or 'the model'!r} was changed after dtr.wrap (now {cls.__qualname__}, "
            "e.g. by torch.nn.utils.parametrize or FSDP): undo that change before dtr.unwrap"
        )
    module.__class__ = cls._dtr_base
    del module.__dict__["_dtr_unit"]


def _anchors(modules: dict[str, nn.Module], spec: RoutingSpec) -> list[str]:
    """Modules enclosing gated ones: gradient checkpointing recomputes such a unit from its own input."""
    names = {n.rsplit(".", k)[0] for n in spec.blocks for k in range(1, n.count(".") + 1)}
    names -= {*spec.blocks, spec.timestep_module, ""}
    return sorted(n for n in names if not isinstance(modules[n], (nn.ModuleList, nn.ModuleDict)))


def _check_roles(units: list[RoutedModule]) -> None:
    seen: dict[int, RoutedModule] = {}
    for unit in units:
        other = seen.setdefault(id(unit.module), unit)
        if other is not unit and not (other.placement == "anchor" or unit.placement == "anchor"):
            raise ValueError(
                f"dtr: module {unit.name or '<model>'!r} would be both {other.placement} and {unit.placement}; "
                "the timestep module cannot be a routed block or the model itself with timestep_module set"
            )


def _width(module: nn.Module) -> int | None:
    """Best-effort channel width of a module, for summaries (the router itself reads it from tensors)."""
    for attr in ("num_channels", "normalized_shape", "hidden_size", "out_features", "out_channels", "dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list)) and v and isinstance(v[-1], int):
            return v[-1]
    for child in module.modules():
        if isinstance(child, nn.LayerNorm):
            return child.normalized_shape[-1]
    return None


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
            raise TypeError("blocks must be a regex string, a list of module names, or a predicate (name, module) -> bool")
        missing = [b for b in wanted if b not in set(names)]
        if missing:
            raise ValueError(f"blocks names not found in the model: {missing}; some names: {_abbreviate(names)}")
        chosen, what = wanted, "blocks list"
    else:
        raise TypeError("blocks must be a regex string, a list of module names, or a predicate (name, module) -> bool")
    if not chosen:
        raise ValueError(f"{what} matches no module of {type(model).__name__}; module names look like: {_abbreviate(names[:50])}")
    return tuple(chosen)
