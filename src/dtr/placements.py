"""Where the mask acts: the behaviours of routed modules, one per placement.

- ``Residual``: a block ``y = x + F(x)`` on a stream x becomes ``block(m * x) + (1 - m) * x``: the block sees
  its task's channels, its output is added to all of them, inactive channels pass through.
- ``Gate``: a module's output is multiplied by the mask, ``m * module(x)`` (a norm before a zero-initialised
  layer, the paper's U-Net placement).

Each behaviour runs in the module's ``forward`` (``mechanism.py``): hooks on the module see the input the model
passed and the output the model passes on (``block(m * x) + (1 - m) * x``); what the module's forward runs, its
children and their hooks, sees the masked input.  ``BlockIO`` (``spec.py``) says which argument and which output
element carry the routed stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import policy
from .arguments import Argument, locate, replaced
from .mechanism import Behaviour
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
    ``jvp`` serves forward-mode AD; under torch.func transforms ``_TransformableIn`` runs instead.
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
# and such Functions cost about 4x more per call in plain autograd: policy.RESIDUAL_OPS picks them only then.
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


_FUNCTIONS = {policy.FUSED: (_RouteIn, _RouteOut), policy.TRANSFORMABLE: (_TransformableIn, _TransformableOut)}


#################################################################################
#                                 Behaviours                                     #
#################################################################################


class _Placement(Behaviour):
    """What both placements share: the routed module's name, its R-TR index, its declared stream and layout."""

    def __init__(self, runtime: Runtime, name: str, index: int, io: BlockIO, module: nn.Module):
        self.runtime = runtime
        self.name = name
        self.index = index  # the block's own draw for method="random"
        self.io = io
        owner = f"{type(module).__name__}.forward"
        self.input = locate(type(module).forward, io.input, owner, "stream")
        self.valid = None if io.valid is None else locate(type(module).forward, io.valid, owner, "valid-token")
        self.width = declared_width(module)
        self.layout = channel_layout(module)  # "first" | "last" | None, read from the module's layers
        self.batch_axis = 1 if getattr(module, "batch_first", None) is False else 0  # (N, B, C) sequence-first

    @property
    def live(self) -> bool:
        return self.runtime.owned

    def forward(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        runtime = self.runtime
        if not runtime.owned:  # saved or copied without its model: the plain module
            return forward(*args, **kwargs)
        mode = policy.mode()
        local = runtime.calls.local
        outer = getattr(local, "call", None)
        try:  # in a checkpoint recomputation call_for pushes a call with the tasks the region recorded
            return self.route(forward, runtime.call_for(self.name, outer, mode), mode, args, kwargs)
        finally:
            if getattr(local, "call", None) is not outer:  # only a replayed recomputation pushes (no write compiling)
                local.call = outer

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

    def channel_axis(self, x: torch.Tensor, default: int | None) -> int:
        """The axis of ``x`` the mask acts on: declared (``channel_axis=``), else read from the module's layers,
        else ``default``; refused, naming ``channel_axis=``, where neither says and the layout is ambiguous."""
        axis = self.io.channel_axis
        if axis is not None:
            return _check_axis(axis, x, self.name)
        if self.layout == "first" and x.ndim >= 3:
            return 1
        if self.layout == "last" or x.ndim == 2:
            return x.ndim - 1
        if default is not None:
            return default
        raise ValueError(
            f"dtr: routed module {self.name!r} takes a {x.ndim}-d input {tuple(x.shape)} and none of its layers says "
            "which axis holds its channels: pass dtr.wrap(..., channel_axis=1) for channels first (B, C, ...) or "
            "channel_axis=-1 for channels last"
        )


class Residual(_Placement):
    """``block(m * x) + (1 - m) * x``, each sample (or token) masked by its own task."""

    def __init__(self, runtime: Runtime, name: str, index: int, io: BlockIO, module: nn.Module):
        super().__init__(runtime, name, index, io, module)
        child = getattr(module, io.source, None) if io.source else None
        self.source = Source(self, f"{name}.{io.source}") if isinstance(child, nn.Module) else None

    def route(self, forward: Callable, call, mode: str, args: tuple, kwargs: dict) -> Any:
        if self.source is not None:
            return self.route_source(forward, mode, args, kwargs)
        x, where = self.find_input(args, kwargs)
        axis = self.residual_axis(x)
        if self.io.joined and call.tasks.ndim == 2:
            raise ValueError(
                f"dtr: per-token timesteps {tuple(call.tasks.shape)} cannot route {self.name!r}, whose stream joins "
                "text and image tokens: pass one timestep per sample"
            )
        m, inactive = self.runtime.masks(call, x, axis, self.index, self.name, self.batch_axis, mode)
        if self.io.joined:
            m, inactive = self.image_rows(call, x, m, inactive, args, kwargs)
        ops = policy.RESIDUAL_OPS[mode]
        if ops == policy.PLAIN:  # no autograd graph to build, or inductor fuses and differentiates it
            box, x_res = [x * m], x
        else:
            route_in = _FUNCTIONS[ops][0]
            z, x_res = route_in.apply(x, m)
            box = [z]
        if where == 0 and not kwargs and mode in policy.EAGER and len(args) <= 3:
            # a plain positional call hands the masked input over without keeping a reference: a block that rebinds
            # its input (x = x + ..., as DiT's does) frees it early, so under no_grad it costs no peak memory
            if len(args) == 1:
                output = forward(box.pop())
            elif len(args) == 2:
                output = forward(box.pop(), args[1])
            else:
                output = forward(box.pop(), args[1], args[2])
        else:
            args, kwargs = replaced(args, kwargs, where, box.pop())
            output = forward(*args, **kwargs)
        out = output if self.io.output is None and output.__class__ is torch.Tensor else self.stream(output)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            self._shape_error(x, out)
        if ops == policy.PLAIN:
            return self.with_stream(output, torch.addcmul(out, x_res, inactive))
        return self.with_stream(output, _FUNCTIONS[ops][1].apply(out, x_res, inactive))

    def residual_axis(self, x: torch.Tensor) -> int:
        """The channel axis of the stream: declared, else read from the module's layers, else the last axis of
        tokens (B, N, C) and (B, C), checked against the module's width; 4-d and larger inputs are never guessed."""
        if self.layout == "last" and self.io.channel_axis is None:
            return x.ndim - 1
        axis = self.channel_axis(x, default=x.ndim - 1 if x.ndim <= 3 else None)
        if (
            self.io.channel_axis is None
            and self.layout is None
            and x.ndim == 3
            and self.width is not None
            and x.shape[-1] != self.width
            and x.shape[1] == self.width
        ):
            raise ValueError(
                f"dtr: residual placement masks the last axis of {self.name!r}'s input {tuple(x.shape)}, of size "
                f"{x.shape[-1]}, but the module's width {self.width} is axis 1: for a channels-first block pass "
                "channel_axis=1 to dtr.wrap (or channel_axis=-1 if the last axis is the right one)"
            )
        return axis

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
        valid, _ = self.valid.find(args, kwargs)
        if valid is None:
            return None
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != tuple(x.shape[:2]):
            got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(
                f"dtr: the valid-token argument {self.io.valid!r} of {self.name!r} must be None or a bool "
                f"(batch, tokens) = {tuple(x.shape[:2])} tensor, got {got}"
            )
        return valid

    def route_source(self, forward: Callable, mode: str, args: tuple, kwargs: dict) -> Any:
        """``G(m * h) + (1 - m) * h`` for a block that computes ``G(h) = h + F(h)`` on its child's output h."""
        frame = self.source.open()
        try:
            output = forward(*args, **kwargs)
        finally:
            self.source.close(frame)
        if not frame[1]:
            raise RuntimeError(f"dtr: {self.name!r} takes its stream from {self.source.name!r}, which did not run")
        h, inactive = frame[1][-1]
        out = self._same_shape(h, output)
        ops = policy.RESIDUAL_OPS[mode]
        if ops == policy.PLAIN:
            return self.with_stream(output, torch.addcmul(out, h, inactive))
        return self.with_stream(output, _FUNCTIONS[ops][1].apply(out, h, inactive))  # h: the view _RouteIn gave

    def find_input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int | str]:
        """The stream tensor and where it was (a position or a keyword)."""
        name, position = self.input.name, self.input.position
        if name is not None and name in kwargs:
            x, where = kwargs[name], name
        elif position is not None and position < len(args):
            x, where = args[position], position
        else:
            x, where = None, None
        if where is None:
            raise ValueError(
                f"dtr: routed module {self.name!r} was called without its stream argument "
                f"{self.input.name or self.input.position!r} (got {len(args)} positional arguments and keywords "
                f"{sorted(kwargs)}); declare it with block_io=dtr.BlockIO(input=<name or position>)"
            )
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"dtr: the stream argument {where!r} of routed module {self.name!r} is a "
                f"{type(x).__name__}, not a tensor; declare it with block_io=dtr.BlockIO(input=...)"
            )
        return x, where

    def _same_shape(self, x: torch.Tensor, output: Any) -> torch.Tensor:
        out = self.stream(output)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            self._shape_error(x, out)
        return out

    def _shape_error(self, x: torch.Tensor, out: Any) -> None:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"dtr: residual placement needs a block whose output stream has its input's shape; "
            f"{self.name!r} maps {tuple(x.shape)} to {got}. Route it with placement='gate', declare the stream "
            "with block_io=, or choose other blocks"
        )


class Source(Behaviour):
    """The child module whose output h is a routed block's stream (``BlockIO.source``): inside its block's routed
    call it returns ``m * h`` and hands ``h`` and ``1 - m`` to the block, which adds ``(1 - m) * h`` to its output.
    Called on its own, it is the plain module."""

    def __init__(self, block: Residual, name: str):
        self.block = block
        self.runtime = block.runtime
        self.name = name
        self._local = threading.local()  # this thread's open frame (the block call in progress)

    @property
    def live(self) -> bool:
        return self.runtime.owned

    def open(self) -> tuple:
        frame = (getattr(self._local, "frame", None), [])
        self._local.frame = frame
        return frame

    def close(self, frame: tuple) -> None:
        self._local.frame = frame[0]

    def forward(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        h = forward(*args, **kwargs)
        frame = getattr(self._local, "frame", None)
        if frame is None or not self.runtime.owned:
            return h
        mode = policy.mode()
        calls = self.runtime.calls
        outer = calls.current()
        try:
            call = self.runtime.call_for(self.name, outer, mode)
            axis = self.block.residual_axis(h)
            m, inactive = self.runtime.masks(call, h, axis, self.block.index, self.name, self.block.batch_axis, mode)
        finally:
            if calls.current() is not outer:  # only a replayed recomputation pushes (no write while compiling)
                calls.restore(outer)
        ops = policy.RESIDUAL_OPS[mode]
        if ops == policy.PLAIN:
            z = h * m
        else:
            z, h = _FUNCTIONS[ops][0].apply(h, m)  # as Residual: both paths of h meet in one backward
        frame[1].append((h, inactive))
        return z

    def __getstate__(self) -> dict:  # copies never carry a call in progress
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


class Gate(_Placement):
    """``m * module(x)`` on the channel axis (1 unless declared): each sample's output masked by its own task."""

    def route(self, forward: Callable, call, mode: str, args: tuple, kwargs: dict) -> Any:
        output = forward(*args, **kwargs)
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
        m, _ = self.runtime.masks(call, out, axis, self.index, self.name, 0, mode)
        return self.with_stream(output, out * m)


#################################################################################
#                                   Helpers                                      #
#################################################################################


def _check_axis(axis: int, x: torch.Tensor, name: str) -> int:
    """``axis`` as a non-negative channel axis of ``x`` (not the batch axis)."""
    if not -x.ndim < axis < x.ndim or axis % x.ndim == 0:
        raise ValueError(
            f"dtr: channel_axis={axis} is not a channel axis of {name!r}'s {x.ndim}-d tensor "
            f"{tuple(x.shape)} (allowed: 1 to {x.ndim - 1}, or -1 to {1 - x.ndim})"
        )
    return axis % x.ndim


_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, getattr(nn, "RMSNorm", nn.LayerNorm))


def channel_layout(module: nn.Module) -> str | None:
    """Where the module's channels are, read off the first of its layers that says: ``"first"`` (convolutions,
    group and batch norms: (B, C, ...)), ``"last"`` (linear layers, layer norms, attention: (..., C)), or None."""
    for layer in module.modules():
        if isinstance(layer, _CHANNELS_FIRST):
            return "first"
        if isinstance(layer, _CHANNELS_LAST):
            return "last"
    return None


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


# Whole-model pickles of dtr 0.2 name this function.
def _new_routed(*args):
    from .legacy import unpickle_routed_02

    return unpickle_routed_02(*args)


__all__ = ["Argument", "Gate", "Residual", "Source", "channel_layout", "declared_width"]
