"""Per-call routing state: each model call owns its tasks, whatever else runs at the same time.

A call of the routed model pushes a ``Call`` onto a thread-local stack kept by its ``Routing`` and pops
it when the call ends, also when the call raises or is interrupted (``try/finally`` in the routed
forward).  Routed modules read the innermost call of their own thread, so concurrent calls from several
threads (inference servers, ``nn.DataParallel`` replicas), re-entrant calls (a model called inside a hook
of another call) and interrupted calls never see another call's timesteps.  TorchDynamo traces the
thread-local reads and writes, so the same code runs under ``torch.compile`` with no graph break.

Gradient checkpointing recomputes a block after its call has ended (in the backward pass, possibly on
autograd's own thread).  ``Replay`` remembers the tasks of each routed (or enclosing) module's input
tensor while gradients are recorded, and a recomputation finds them again by that same tensor.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ._compat import is_compiling

INPUT_KEYWORDS = ("hidden_states", "x", "input", "h", "sample")


class Call:
    """The routing state of one model call: its task indices and, in eager mode, the masks built from them."""

    def __init__(self, outer: "Call | None", tasks: torch.Tensor | None = None):
        self.outer = outer  # the call this one runs inside (same thread), or None
        self.tasks = tasks  # (B,) or 0-d long task indices; None until the timestep is read
        self.masks: dict = {}  # (width, dtype, device, block) -> (mask, 1 - mask), built once per call
        # A call made inside a compiled graph lives only in the trace, so caching in it costs no guard;
        # a real call read by a compiled block (regional compilation) must not be written by the graph.
        self.traced = is_compiling()


class CallStack:
    """The calls in progress, per thread, innermost first (a linked list through ``Call.outer``)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> Call | None:
        return getattr(self._local, "call", None)

    def push(self, tasks: torch.Tensor | None = None) -> Call:
        call = Call(self.current(), tasks)
        self._local.call = call
        return call

    def pop(self, call: Call) -> None:
        self._local.call = call.outer

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) never carry a call in progress
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


class Replay:
    """Tasks by module input, kept while autograd may recompute the module (gradient checkpointing)."""

    def __init__(self) -> None:
        self._saved = WeakTensorKeyDictionary()

    def remember(self, x: torch.Tensor | None, tasks: torch.Tensor) -> None:
        # Only eager forwards that record gradients can be recomputed; compiled graphs recompute by themselves.
        if x is not None and torch.is_grad_enabled() and not is_compiling():
            self._saved[x] = tasks

    def recall(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or is_compiling() else self._saved.get(x)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._saved = WeakTensorKeyDictionary()


def find_timestep(args: tuple, kwargs: dict, where: tuple, module_name: str) -> Any:
    """The timestep argument of a call: the first of ``where`` (positional indices or keywords) present."""
    for a in where:
        if isinstance(a, str) and a in kwargs:
            return kwargs[a]
        if isinstance(a, int) and a < len(args):
            return args[a]
    raise ValueError(
        f"dtr: no timestep found in the call of {module_name or 'the model'!r} (timestep_arg={where!r}); "
        f"got {len(args)} positional and keyword arguments {sorted(kwargs)}"
    )


def find_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module's main input: its first positional tensor, or hidden_states= (x=, input=, h=, sample=)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in INPUT_KEYWORDS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def replace_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    """``args, kwargs`` with the main input (as ``find_input`` finds it) replaced by ``value``."""
    if args and isinstance(args[0], torch.Tensor):
        return (value, *args[1:]), kwargs
    for key in INPUT_KEYWORDS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: value}
    raise ValueError("dtr: the module call has no input tensor to replace")
