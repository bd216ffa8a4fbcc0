"""Where the mask acts: the behaviours of routed modules, one per placement.

- ``Residual``: a block ``y = x + F(x)`` on a stream x becomes ``block(m * x) + (1 - m) * x``: the block sees
  its task's channels, its output is added to all of them, inactive channels pass through.
- ``Gate``: a module's output is multiplied by the mask, ``m * module(x)`` (a norm before a zero-initialised
  layer, the paper's U-Net placement).

Each behaviour wraps the module's whole call (``mechanism.py``), so ``block`` in the formulas is the module as
its caller sees it: with its hooks, casts and patches.  ``BlockIO`` (``spec.py``) says which argument and which
output element carry the routed stream.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _hooks  # the global hook dicts nn.Module._call_impl reads

from ._compat import is_compiling
from .runtime import Runtime
from .spec import BlockIO

#################################################################################
#                   The fused residual: y = F(m * x) + (1 - m) * x              #
#################################################################################


class _RouteIn(torch.autograd.Function):
    """z = m * x for the block, and x again (a view) for the residual add.

    Both paths of x meet here in the backward, so their gradients combine in one pass:
    g_x = m * g_z + (1 - m) * g_y = lerp(g_y, g_z, m), exact for a 0/1 mask (lerp's two-branch formula
    returns its end points exactly).  Unfused, autograd spends three passes and an accumulation.
    ``jvp`` serves forward-mode AD; under torch.func transforms ``_Transformable`` runs instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor):
        _RouteIn.save(ctx, m)
        return x * m, x.view_as(x)

    @staticmethod
    def save(ctx, m: torch.Tensor) -> None:
        ctx.save_for_backward(m)
        ctx.m = m  # for jvp, which cannot read saved tensors
        ctx.set_materialize_grads(False)

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

    @staticmethod
    def jvp(ctx, dx: torch.Tensor, dm: torch.Tensor | None):
        return dx * ctx.m, dx.view_as(dx)


class _RouteOut(torch.autograd.Function):
    """y = o + (1 - m) * x in one pass; the incoming gradient goes to o and, untouched, to _RouteIn."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, x: torch.Tensor, inactive: torch.Tensor):
        ctx.inactive = inactive
        return torch.addcmul(o, x, inactive)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, g, None

    @staticmethod
    def jvp(ctx, do: torch.Tensor, dx: torch.Tensor, dinactive: torch.Tensor | None):
        return do + dx * ctx.inactive


# torch.func (grad, vjp, jvp, vmap, jacrev) runs only Functions whose forward takes no ctx (and, for vmap, a rule),
# and such Functions cost about 4x more per call in plain autograd: the fast classes above run unless a
# transform is active.
class _TransformableIn(_RouteIn):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, m: torch.Tensor):
        return x * m, x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _RouteIn.save(ctx, inputs[1])


class _TransformableOut(_RouteOut):
    generate_vmap_rule = True

    @staticmethod
    def forward(o: torch.Tensor, x: torch.Tensor, inactive: torch.Tensor):
        return torch.addcmul(o, x, inactive)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.inactive = inputs[2]


def _fused() -> tuple[type, type]:
    if torch._C._are_functorch_transforms_active():
        return _TransformableIn, _TransformableOut
    return _RouteIn, _RouteOut


#################################################################################
#                                 Behaviours                                     #
#################################################################################


class _Placement:
    """What both placements share: the routed module's name, its R-TR index, its declared stream and width."""

    intercepts_forward = False

    def __init__(self, runtime: Runtime, name: str, index: int, io: BlockIO, module: nn.Module):
        self.runtime = runtime
        self.name = name
        self.index = index  # the block's own draw for method="random"
        self.io = io
        self.input_name, self.input_position = _locate(type(module).forward, io.input)
        self.valid = None if io.valid is None else _locate(type(module).forward, io.valid)
        self.width = declared_width(module)

    def copies_with(self, memo: dict) -> bool:
        """A block keeps its routing in a copy of the whole model; copied on its own it is a plain module."""
        return id(self.runtime) in memo

    def call(self, module: nn.Module, call_impl: Callable, args: tuple, kwargs: dict, compiled=None) -> Any:
        calls = self.runtime.calls
        outer = calls.current()
        try:  # in a checkpoint recomputation call_for pushes a call with the tasks the region recorded
            call = self.runtime.call_for(self.name, outer)
            if call is None:  # recomputing a region opened inside this module's own call: what ran there
                return call_impl(module, *args, **kwargs)
            if compiled is not None:  # the compiled code routes, reading the call found here
                return compiled(*args, **kwargs)
            return self.route(module, call_impl, call, args, kwargs)
        finally:
            if calls.current() is not outer:
                calls.restore(outer)

    def call_compiled(self, module: nn.Module, compiled: Callable, call_impl: Callable, args: tuple, kwargs: dict):
        """A call of a block compiled on its own (``block.compile()``): its call is found eagerly, where an eager
        checkpoint region around the block can be seen (recorded, or replayed while it is recomputed)."""
        return self.call(module, call_impl, args, kwargs, compiled)

    def stream(self, output: Any) -> torch.Tensor:
        """The routed stream in a module's output (``BlockIO.output``)."""
        k = self.io.output
        if k is None:
            if isinstance(output, (tuple, list)):
                raise ValueError(
                    f"dtr: {self.name!r} returns a {type(output).__name__} of {len(output)}; say which element carries "
                    f"the routed stream: dtr.wrap(..., block_io=dtr.BlockIO(input={self.io.input!r}, output=<index>))"
                )
            return output
        if not isinstance(output, (tuple, list)) or k >= len(output):
            got = type(output).__name__ + (f" of {len(output)}" if isinstance(output, (tuple, list)) else "")
            raise ValueError(
                f"dtr: {self.name!r} was declared to return its stream as element {k}, but returned a {got}"
            )
        return output[k]

    def with_stream(self, output: Any, value: torch.Tensor) -> Any:
        """``output`` with its stream replaced by ``value`` (the other elements untouched)."""
        if self.io.output is None:
            return value
        items = list(output)
        items[self.io.output] = value
        return tuple(items) if isinstance(output, tuple) else items


class Residual(_Placement):
    """``block(m * x) + (1 - m) * x``, each sample (or token) masked by its own task."""

    def __init__(self, runtime: Runtime, name: str, index: int, io: BlockIO, module: nn.Module):
        super().__init__(runtime, name, index, io, module)
        child = getattr(module, io.source, None) if io.source else None
        self.source = Source(self, f"{name}.{io.source}") if isinstance(child, nn.Module) else None

    def route(self, module, call_impl, call, args, kwargs):
        if self.source is not None:
            return self.route_source(module, call_impl, args, kwargs)
        x, where = self.find_input(args, kwargs)
        axis = self.channel_axis(x)
        if self.io.joined and call.tasks.ndim == 2:
            raise ValueError(
                f"dtr: per-token timesteps {tuple(call.tasks.shape)} cannot route {self.name!r}, whose stream joins "
                "text and image tokens: pass one timestep per sample"
            )
        m, inactive = self.runtime.masks(call, x, axis, self.index, self.name)
        if self.io.joined:
            m, inactive = self.image_rows(call, x, m, inactive, args, kwargs)
        if is_compiling():  # inductor fuses the mask into neighbouring kernels and derives the backward itself
            output = _call_with_input(call_impl, module, [x * m], where, args, kwargs)
            return self.with_stream(output, torch.addcmul(self._same_shape(x, output), x, inactive))
        if torch.is_grad_enabled():
            route_in, route_out = _fused()
            z, x_res = route_in.apply(x, m)
            output = _call_with_input(call_impl, module, [z], where, args, kwargs)
            return self.with_stream(output, route_out.apply(self._same_shape(x, output), x_res, inactive))
        output = _call_with_input(call_impl, module, [x * m], where, args, kwargs)  # no_grad: no autograd graph
        return self.with_stream(output, torch.addcmul(self._same_shape(x, output), x, inactive))

    def image_rows(self, call, x: torch.Tensor, m: torch.Tensor, inactive: torch.Tensor, args: tuple, kwargs: dict):
        """(mask, 1 - mask) for a joined [text; image] stream (B, L, C): each sample's image tokens, the last n of
        its valid tokens, take the sample's mask; the other rows take 1 and 0, so text passes as the block makes it."""
        n, length = call.image_tokens, x.shape[1]
        if n is None or n > length:
            raise ValueError(
                f"dtr: {self.name!r} routes the last {n} (image) tokens of a joined stream, but it "
                f"received {tuple(x.shape)}; the image token count comes from RoutingSpec.image_tokens"
            )
        valid = self._valid_mask(args, kwargs, x)
        end = length if valid is None else valid.sum(1, keepdim=True)  # (B, 1): each sample's valid tokens
        j = torch.arange(length, device=x.device)
        image = ((j >= end - n) & (j < end))[..., None]  # (L, 1) or (B, L, 1)
        return torch.where(image, m, 1.0), torch.where(image, inactive, 0.0)

    def _valid_mask(self, args: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor | None:
        """The (B, L) boolean mask of valid tokens (``BlockIO.valid``), or None when every token is valid."""
        if self.valid is None:
            return None
        name, position = self.valid
        if name is not None and name in kwargs:
            valid = kwargs[name]
        else:
            valid = args[position] if position is not None and position < len(args) else None
        if valid is None:
            return None
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != tuple(x.shape[:2]):
            got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(
                f"dtr: the valid-token argument {self.io.valid!r} of {self.name!r} must be None or a bool "
                f"(batch, tokens) = {tuple(x.shape[:2])} tensor, got {got}"
            )
        return valid

    def route_source(self, module, call_impl, args, kwargs):
        """``G(m * h) + (1 - m) * h`` for a block that computes ``G(h) = h + F(h)`` on its child's output h."""
        frame = self.source.open()
        try:
            output = call_impl(module, *args, **kwargs)
        finally:
            self.source.close(frame)
        if not frame[1]:
            raise RuntimeError(f"dtr: {self.name!r} takes its stream from {self.source.name!r}, which did not run")
        h, inactive = frame[1][-1]
        out = self._same_shape(h, output)
        if torch.is_grad_enabled() and not is_compiling():  # h is the residual view _RouteIn gave back
            return self.with_stream(output, _fused()[1].apply(out, h, inactive))
        return self.with_stream(output, torch.addcmul(out, h, inactive))

    def find_input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int | str]:
        """The stream tensor and where it was (a position or a keyword)."""
        if self.input_name is not None and self.input_name in kwargs:
            x, where = kwargs[self.input_name], self.input_name
        elif self.input_position is not None and self.input_position < len(args):
            x, where = args[self.input_position], self.input_position
        else:
            raise ValueError(
                f"dtr: routed module {self.name!r} was called without its stream argument "
                f"{self.input_name or self.input_position!r} (got {len(args)} positional arguments and keywords "
                f"{sorted(kwargs)}); declare it with block_io=dtr.BlockIO(input=<name or position>)"
            )
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"dtr: the stream argument {where!r} of routed module {self.name!r} is a "
                f"{type(x).__name__}, not a tensor; declare it with block_io=dtr.BlockIO(input=...)"
            )
        return x, where

    def channel_axis(self, x: torch.Tensor) -> int:
        """The axis of ``x`` to mask: declared, or the last axis of (B, C) / (B, N, C) input; never guessed for 4-d+."""
        axis = self.io.channel_axis
        if axis is None:
            if x.ndim >= 4:
                raise ValueError(
                    f"dtr: routed module {self.name!r} takes a {x.ndim}-d input {tuple(x.shape)}: say which axis "
                    "holds its channels, dtr.wrap(..., channel_axis=1) for channels first (B, C, H, W) or -1 for "
                    "channels last"
                )
            if self.width is not None and x.ndim == 3 and x.shape[-1] != self.width and x.shape[1] == self.width:
                raise ValueError(
                    f"dtr: residual placement masks the last axis of {self.name!r}'s input {tuple(x.shape)}, of size "
                    f"{x.shape[-1]}, but the module's width {self.width} is axis 1: for a channels-first block pass "
                    "channel_axis=1 to dtr.wrap (or channel_axis=-1 if the last axis is the right one)"
                )
            return x.ndim - 1
        return _check_axis(axis, x, self.name)

    def _same_shape(self, x: torch.Tensor, output: Any) -> torch.Tensor:
        out = self.stream(output)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"dtr: residual placement needs a block whose output stream has its input's shape; "
                f"{self.name!r} maps {tuple(x.shape)} to {got}. Route it with placement='gate', declare the stream "
                "with block_io=, or choose other blocks"
            )
        return out


class Source:
    """The child module whose output h is a routed block's stream (``BlockIO.source``): inside its block's routed
    call it returns ``m * h`` and hands ``h`` and ``1 - m`` to the block, which adds ``(1 - m) * h`` to its output.
    Called on its own, it is the plain module."""

    intercepts_forward = False

    def __init__(self, block: Residual, name: str):
        self.block = block
        self.runtime = block.runtime
        self.name = name
        self._local = threading.local()  # this thread's open frame (the block call in progress)

    def copies_with(self, memo: dict) -> bool:
        return id(self.runtime) in memo

    def open(self) -> tuple:
        frame = (getattr(self._local, "frame", None), [])
        self._local.frame = frame
        return frame

    def close(self, frame: tuple) -> None:
        self._local.frame = frame[0]

    def call(self, module: nn.Module, call_impl: Callable, args: tuple, kwargs: dict) -> Any:
        h = call_impl(module, *args, **kwargs)
        frame = getattr(self._local, "frame", None)
        if frame is None:
            return h
        calls = self.runtime.calls
        outer = calls.current()
        try:
            call = self.runtime.call_for(self.name, outer)
            if call is None:  # recomputing a region opened inside this module's call: what ran there, unrouted
                return h
            m, inactive = self.runtime.masks(call, h, self.block.channel_axis(h), self.block.index, self.name)
        finally:
            if calls.current() is not outer:
                calls.restore(outer)
        if torch.is_grad_enabled() and not is_compiling():
            z, h = _fused()[0].apply(h, m)  # as Residual: both paths of h meet in one backward
        else:
            z = h * m
        frame[1].append((h, inactive))
        return z

    def __getstate__(self) -> dict:  # copies never carry a call in progress
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


class Gate(_Placement):
    """``m * module(x)`` on the channel axis (1 unless declared): each sample's output masked by its own task."""

    def route(self, module, call_impl, call, args, kwargs):
        output = call_impl(module, *args, **kwargs)
        out = self.stream(output)
        if not isinstance(out, torch.Tensor) or out.ndim < 2:
            raise ValueError(f"dtr: gate placement needs a tensor output with channels on an axis from {self.name!r}")
        axis = 1 if self.io.channel_axis is None else _check_axis(self.io.channel_axis, out, self.name)
        if self.width is not None and out.shape[axis] != self.width:
            axes = [i for i, size in enumerate(out.shape) if size == self.width and i > 0]
            hint = "choose another module"
            if axes:
                hint = f"pass channel_axis={-1 if axes[-1] == out.ndim - 1 else axes[-1]}"
            raise ValueError(
                f"dtr: gate placement masks axis {axis} of {self.name!r}'s output {tuple(out.shape)}, of size "
                f"{out.shape[axis]}, but the module's width is {self.width}: {hint}"
            )
        m, _ = self.runtime.masks(call, out, axis, self.index, self.name)
        return self.with_stream(output, out * m)


#################################################################################
#                                   Helpers                                      #
#################################################################################


def _locate(forward: Callable, arg: str | int) -> tuple[str | None, int | None]:
    """(keyword, position) of a ``forward`` argument given by name or position, read off its signature."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):  # no signature (a builtin): take the argument as given
        return (arg, None) if isinstance(arg, str) else (None, arg)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    if isinstance(arg, int):
        keyword = arg < len(positional) and positional[arg].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        return (positional[arg].name if keyword else None), arg
    names = [p.name for p in positional]
    return arg, (names.index(arg) if arg in names else None)


def _check_axis(axis: int, x: torch.Tensor, name: str) -> int:
    """``axis`` as a non-negative channel axis of ``x`` (not the batch axis)."""
    if not -x.ndim < axis < x.ndim or axis % x.ndim == 0:
        raise ValueError(
            f"dtr: channel_axis={axis} is not a channel axis of {name!r}'s {x.ndim}-d tensor "
            f"{tuple(x.shape)} (allowed: 1 to {x.ndim - 1}, or -1 to {1 - x.ndim})"
        )
    return axis % x.ndim


def _call_with_input(call_impl, module: nn.Module, box: list, where: int | str, args: tuple, kwargs: dict):
    """``call_impl(module, *args, **kwargs)`` with the stream argument replaced by the tensor in ``box``.

    A module without hooks is called as ``nn.Module._call_impl`` would call it, ``module.forward(...)``, and a
    plain positional call hands the masked input over without keeping a reference: a block that rebinds its
    input (``x = x + ...``, as DiT's does) frees it early, so under no_grad the masked copy costs no peak
    memory.  Other calls keep it alive until the block returns.
    """
    if where == 0 and not kwargs and not is_compiling() and _hook_free(module):
        forward, rest = module.forward, args[1:]
        if len(rest) == 0:
            return forward(box.pop())
        if len(rest) == 1:
            return forward(box.pop(), rest[0])
        if len(rest) == 2:
            return forward(box.pop(), rest[0], rest[1])
    if isinstance(where, str):
        return call_impl(module, *args, **{**kwargs, where: box.pop()})
    return call_impl(module, *args[:where], box.pop(), *args[where + 1 :], **kwargs)


def _hook_free(module: nn.Module) -> bool:
    """No forward or backward hook on ``module`` or global: ``_call_impl`` would just call ``forward``."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _hooks._global_forward_hooks
        or _hooks._global_forward_pre_hooks
        or _hooks._global_backward_hooks
        or _hooks._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def declared_width(module: nn.Module) -> int | None:
    """The channel width a module declares (norms, linear layers, common attribute names), or None."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    for attr in ("num_channels", "normalized_shape", "hidden_size", "out_features", "out_channels", "dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, (tuple, list)) and v and isinstance(v[-1], int):
            return v[-1]
    for child in module.modules():
        if isinstance(child, nn.LayerNorm) and child.normalized_shape:
            return child.normalized_shape[-1]
    return None


def _new_routed(*args):
    """A whole-model pickle written by dtr 0.2 names this function: say how to carry such a model over."""
    raise RuntimeError(
        "this model was pickled whole by dtr 0.2, whose routing objects this dtr cannot rebuild: load it with "
        "dtr 0.2, save model.state_dict() (routing adds no keys), then build the model, load_state_dict and dtr.wrap it"
    )
