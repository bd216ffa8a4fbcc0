"""Where the mask acts: the forwards that routed modules run instead of their own.

``dtr.wrap`` gives each module it touches a subclass of that module's class whose ``forward`` wraps the
original one (as ``torch.nn.utils.parametrize`` does), rather than forward hooks:

- TorchDynamo guards on a module's class and on the attributes a forward reads, but deliberately not on
  hook dicts, so a compiled graph of an unrouted model could run a routed one (and the reverse).  With
  a class of its own, a routed module can never match an unrouted module's compiled code.
- The model's forward runs inside ``try/finally``, so a call's state is popped even when the call is
  interrupted, and every path into the model (``forward_with_cfg`` calling ``self.forward`` included)
  reads its timestep.
- The residual placement is one function around the block, so its backward can be fused (below).

Roles: ``call`` (the model: one ``Call`` per forward, reading the timestep there unless the timestep
enters elsewhere), ``capture`` (the module the timestep enters), ``residual`` and ``gate`` (the routed
modules), ``anchor`` (modules enclosing gated ones, where checkpoint recomputation starts).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from ._compat import is_compiling
from .calls import find_input, find_timestep, replace_input

#################################################################################
#                    Residual placement: y = F(m * x) + (1 - m) * x             #
#################################################################################


class _RouteIn(torch.autograd.Function):
    """z = m * x for the block, and x again (a view) for the residual add.

    Both paths of x meet here in the backward, so their gradients combine in one pass:
    g_x = m * g_z + (1 - m) * g_y = lerp(g_y, g_z, m), exact for a 0/1 mask (lerp's two-branch formula
    returns its end points exactly).  Unfused, autograd spends three passes and an accumulation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor):
        ctx.save_for_backward(m)
        ctx.set_materialize_grads(False)
        return x * m, x.view_as(x)

    @staticmethod
    def backward(ctx, g_z: torch.Tensor | None, g_y: torch.Tensor | None):
        (m,) = ctx.saved_tensors
        if g_z is None and g_y is None:
            return None, None
        if g_y is None:
            return g_z * m, None
        if g_z is None:
            return g_y * (1 - m), None
        return torch.lerp(g_y, g_z, m), None


class _RouteOut(torch.autograd.Function):
    """y = o + (1 - m) * x in one pass; the incoming gradient goes to o and, untouched, to _RouteIn."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, x: torch.Tensor, inactive: torch.Tensor):
        return torch.addcmul(o, x, inactive)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, g, None


def _residual(module: nn.Module, unit, call, x: torch.Tensor, args: tuple, kwargs: dict):
    """block(m * x) + (1 - m) * x, each sample masked by its own task."""
    axis = _channel_axis(unit, x, default=-1)
    if unit.width is not None and x.shape[axis] != unit.width and unit.width in x.shape[1:axis]:
        # the module's declared width on an inner axis: a channels-first block, which the mask would cut across
        raise ValueError(
            f"dtr: residual placement masks the last axis of {unit.name!r}'s input {tuple(x.shape)}, of size "
            f"{x.shape[axis]}, but the module's width {unit.width} is an inner axis: for a channels-first block "
            "pass channel_axis=1 to dtr.wrap (or channel_axis=-1 if the last axis is the right one)"
        )
    m, inactive = (_along(mask, x.ndim, axis) for mask in unit.routing.mask(call, unit, x, axis=axis))
    base = type(module)._dtr_forward
    if is_compiling():  # inductor fuses the mask into neighbouring kernels and derives the backward itself
        output = _call_with_input(base, module, [x * m], args, kwargs)
        return _with_first(output, lambda out: torch.addcmul(_same_shape(unit, x, out), x, inactive))
    if torch.is_grad_enabled():
        z, x_res = _RouteIn.apply(x, m)
        output = _call_with_input(base, module, [z], args, kwargs)
        return _with_first(output, lambda out: _RouteOut.apply(_same_shape(unit, x, out), x_res, inactive))
    output = _call_with_input(base, module, [x * m], args, kwargs)  # no_grad: no autograd graph
    return _with_first(output, lambda out: torch.addcmul(_same_shape(unit, x, out), x, inactive))


def _channel_axis(unit, x: torch.Tensor, default: int) -> int:
    """The non-negative axis of ``x`` the mask acts on: wrap's channel_axis, else the placement's default."""
    axis = unit.routing.spec.channel_axis
    axis = default if axis is None else axis
    if not -x.ndim < axis < x.ndim or axis % x.ndim == 0:
        raise ValueError(f"dtr: channel_axis={axis} is not a channel axis of {unit.name!r}'s {x.ndim}-d tensor "
                         f"{tuple(x.shape)} (allowed: 1 to {x.ndim - 1}, or -1 to {1 - x.ndim})")
    return axis % x.ndim


def _along(m: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A (B, C) mask viewed to broadcast over an ``ndim``-d tensor with its channels on ``axis``."""
    shape = [1] * ndim
    shape[0], shape[axis] = m.shape
    return m.view(shape)


def _call_with_input(base, module: nn.Module, box: list, args: tuple, kwargs: dict):
    """``base(module, *args, **kwargs)`` with the main input replaced by the tensor in ``box``.

    A plain positional call hands the masked input over to the block without keeping a reference,
    so a block that rebinds its input (``x = x + ...``, as DiT's does) frees it early: under no_grad
    the masked copy costs no peak memory.  Calls with keywords keep it alive until the block returns.
    """
    if args and isinstance(args[0], torch.Tensor) and not kwargs:
        rest = args[1:]
        if len(rest) == 0:
            return base(module, box.pop())
        if len(rest) == 1:
            return base(module, box.pop(), rest[0])
        if len(rest) == 2:
            return base(module, box.pop(), rest[0], rest[1])
    a, k = replace_input(args, kwargs, box.pop())
    return base(module, *a, **k)


def _same_shape(unit, x: torch.Tensor, out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"dtr: residual placement needs a block whose output has its input's shape; "
            f"{unit.name!r} maps {tuple(x.shape)} to {got}. Route it with placement='gate' or choose other blocks"
        )
    return out


#################################################################################
#                       Gate placement: out = m * module(x)                     #
#################################################################################


def _gate(module: nn.Module, unit, call, x: torch.Tensor | None, args: tuple, kwargs: dict):
    """The module's output multiplied by the mask on channel axis 1 (a norm before a zero-initialised layer)."""
    output = type(module)._dtr_forward(module, *args, **kwargs)

    def gate(out):
        if not isinstance(out, torch.Tensor) or out.ndim < 2:
            raise ValueError(f"dtr: gate placement needs a tensor output with channels on axis 1 from {unit.name!r}")
        axis = _channel_axis(unit, out, default=1)
        m, _ = unit.routing.mask(call, unit, out, axis=axis)
        return out * _along(m, out.ndim, axis)

    return _with_first(output, gate)


def _with_first(output: Any, fn) -> Any:
    """Apply ``fn`` to a module's output, or to the first element of a tuple output (diffusers blocks)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


#################################################################################
#                            The routed forwards                                #
#################################################################################


def _call_forward(self, *args, **kwargs):
    """The routed model's forward: its original forward inside one ``Call`` of its own."""
    unit = getattr(self, "_dtr_unit", None)
    if unit is None:  # a new instance the module made of its own class (a slice of a Sequential): not routed
        return type(self)._dtr_forward(self, *args, **kwargs)
    routing = unit.routing
    tasks = None
    if routing.spec.timestep_module == "":
        tasks = routing.tasks_from(find_timestep(args, kwargs, routing.timestep_args, ""))
    call = routing.calls.push(tasks)
    try:
        return type(self)._dtr_forward(self, *args, **kwargs)
    finally:
        routing.calls.pop(call)


def _capture_forward(self, *args, **kwargs):
    """The module the timestep enters: record this call's tasks, then run as usual."""
    unit = getattr(self, "_dtr_unit", None)
    call = None if unit is None else unit.routing.calls.current()
    if call is not None:
        routing = unit.routing
        call.tasks = routing.tasks_from(find_timestep(args, kwargs, routing.timestep_args, routing.spec.timestep_module))
        call.masks = {}
    return type(self)._dtr_forward(self, *args, **kwargs)


def _routed_forward(self, *args, **kwargs):
    """A routed (or enclosing) module: route by the current call, or by the call a checkpoint is recomputing."""
    unit = getattr(self, "_dtr_unit", None)
    if unit is None:
        return type(self)._dtr_forward(self, *args, **kwargs)
    routing = unit.routing
    x = find_input(args, kwargs)
    call = routing.calls.current()
    if call is not None and call.tasks is not None:
        routing.replay.remember(x, call.tasks)
        return _apply(self, unit, call, x, args, kwargs)
    tasks = routing.replay.recall(x)
    if tasks is None:
        if unit.placement == "anchor":  # a routed module inside will say what is missing
            return type(self)._dtr_forward(self, *args, **kwargs)
        raise RuntimeError(
            f"dtr: routed module {unit.name!r} ran without a timestep: call the model itself "
            f"(the timestep is read at {routing.spec.timestep_module or 'the model call'!r}); "
            "gradient checkpointing must use torch.utils.checkpoint(..., use_reentrant=False)"
        )
    call = routing.calls.push(tasks)  # a recomputation: route as the original call did
    try:
        return _apply(self, unit, call, x, args, kwargs)
    finally:
        routing.calls.pop(call)


def _apply(module: nn.Module, unit, call, x, args: tuple, kwargs: dict):
    if unit.placement == "residual":
        if x is None:
            raise ValueError(f"dtr: cannot find the input tensor of routed module {unit.name!r} (first positional or hidden_states=)")
        return _residual(module, unit, call, x, args, kwargs)
    if unit.placement == "gate":
        return _gate(module, unit, call, x, args, kwargs)
    return type(module)._dtr_forward(module, *args, **kwargs)


FORWARDS = {"call": _call_forward, "capture": _capture_forward, "residual": _routed_forward, "gate": _routed_forward,
            "anchor": _routed_forward}


@functools.lru_cache(maxsize=None)
def routed_class(base: type, role: str) -> type:
    """The subclass of ``base`` a module of that class becomes in ``role`` (one class per (base, role)).

    It keeps the base's name, so reprs and diffusers' saved configs are unchanged.  Its forward gets a
    code object of its own: TorchDynamo keeps one compile cache (and recompile budget) per code object,
    so each routed class compiles as independently as the unrouted classes do.
    """
    template = FORWARDS[role]
    code = template.__code__.replace(co_name=f"{template.__name__}_{base.__name__}")
    forward = types.FunctionType(code, template.__globals__, code.co_name, template.__defaults__, template.__closure__)
    forward.__doc__, forward.__wrapped__ = template.__doc__, base.forward
    # _dtr_forward: the base's forward read off the routed class, not off the base: diffusers marks some block
    # classes allow_in_graph, and TorchDynamo cannot trace `Base.forward` read off such a class (a graph break)
    namespace = {"forward": forward, "__reduce_ex__": _reduce_routed, "_dtr_base": base, "_dtr_role": role,
                 "_dtr_forward": base.forward,
                 "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__}
    if role == "call" and callable(getattr(base, "save_pretrained", None)):
        namespace["save_pretrained"] = _save_pretrained
    return type(base.__name__, (base,), namespace)


def _save_pretrained(self, save_directory, *args, **kwargs):
    """The model class's own save_pretrained, then ``dtr_config.json``: a routed model saves its routing too."""
    type(self)._dtr_base.save_pretrained(self, save_directory, *args, **kwargs)
    if getattr(self, "_dtr_unit", None) is not None and kwargs.get("is_main_process", True):
        from .pretrained import write_config  # pretrained imports api, which imports this module

        write_config(self, save_directory)


def _reduce_routed(self, protocol: int):
    """Pickle and deepcopy a routed module as an instance of its (importable) base class, re-routed on load."""
    cls = type(self)
    return _new_routed, (cls._dtr_base, cls._dtr_role), self.__getstate__()


def _new_routed(base: type, role: str) -> nn.Module:
    cls = routed_class(base, role)
    return cls.__new__(cls)
