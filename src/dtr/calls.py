"""Per-call routing state: each model call owns its tasks, whatever else runs at the same time.

A call of the routed model pushes a ``Call`` onto a thread-local stack kept by its runtime and pops it
when the call ends, also when the call raises or is interrupted.  Routed modules read the innermost call
of their own thread, so concurrent calls from several threads (inference servers, ``nn.DataParallel``
replicas), re-entrant calls (a model called inside a hook of another call) and interrupted calls never
see another call's timesteps.  TorchDynamo traces the thread-local reads and writes, so the same code
runs under ``torch.compile`` with no graph break.

Activation checkpointing recomputes a region after its call has ended (in the backward pass, possibly on
autograd's own thread).  ``Replay`` remembers the tasks of each checkpoint *region* (the frame
``torch.utils.checkpoint`` keeps for it) while it records, and finds them again while that same region is
recomputed.  Nothing depends on which tensors enter the region, so casts (FSDP2 mixed precision), hooks
that return new tensors, regions around several blocks and one tensor fed to two calls all replay exactly.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils.checkpoint import _CheckpointFrame  # the record torch keeps per checkpointed region

from ._compat import is_compiling


class Call:
    """The routing state of one model call: its task indices and, in eager mode, the masks built from them."""

    __slots__ = ("outer", "tasks", "masks", "owner", "entered", "captured", "image_tokens")

    def __init__(self, outer: Call | None, tasks: torch.Tensor | None = None, owner: object = None):
        self.outer = outer  # the call this one runs inside (same thread), or None
        self.tasks = tasks  # (B,), (B, N) or 0-d long task indices; None until the timestep is read
        self.masks: dict = {}  # (width, dtype, device, block) -> (mask, 1 - mask), built once per call
        self.owner = owner  # the model whose call this is (None: a checkpoint recomputation)
        self.entered = False  # the owner's forward has started (a direct forward() call is a call of its own)
        self.captured = False  # the timestep module has given the tasks
        self.image_tokens: int | None = None  # image tokens of this call, for joined streams (BlockIO.joined)


class CallStack:
    """The calls in progress, per thread, innermost first (a linked list through ``Call.outer``)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> Call | None:
        return getattr(self._local, "call", None)

    def push(self, tasks: torch.Tensor | None = None, owner: object = None, entered: bool = False) -> Call:
        call = Call(self.current(), tasks, owner)
        call.entered = entered
        self._local.call = call
        return call

    def restore(self, outer: Call | None) -> None:
        """End every call pushed since ``outer`` was current (callers read ``outer`` before they push, so that an
        interrupt anywhere, even inside ``push``, leaves no call behind)."""
        self._local.call = outer

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) never carry a call in progress
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


def checkpoint_region() -> tuple[_CheckpointFrame | None, bool]:
    """The ``torch.utils.checkpoint`` region running now in this thread, and whether it is being recomputed.

    torch keeps no public handle on it: the saved-tensor hooks it pushes for a region close over the
    region's frame while it records (``_checkpoint_hook``) and over a weak reference to it while it is
    recomputed (``_recomputation_hook``, whose hook newer torch wraps once more), and the hooks on top of
    the stack are readable.  tests/test_composition.py checks this against every form of checkpointing.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return (None, False) if hooks is None else _frame_in(hooks[0], depth=3)


def _frame_in(fn: object, depth: int) -> tuple[_CheckpointFrame | None, bool]:
    """The checkpoint frame a hook function closes over (directly, by weak reference, or through a wrapper)."""
    inner = [getattr(fn, "__wrapped__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _CheckpointFrame):
            return value, False
        if isinstance(value, weakref.ref) and isinstance(value(), _CheckpointFrame):
            return value(), True
        inner.append(value)
    if depth > 0:
        for value in inner:
            if callable(value) and not isinstance(value, type):
                found = _frame_in(value, depth - 1)
                if found[0] is not None:
                    return found
    return None, False


class Replay:
    """Tasks by checkpoint region, kept while autograd may recompute the region."""

    def __init__(self) -> None:
        self._saved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def tasks(self, current: tuple | None) -> tuple[tuple | None, bool]:
        """What a routed module must use (the tasks and image token count of a call), and whether it comes from a
        recomputed region.

        Outside checkpointing: ``current`` (the call in progress).  Recording a region: ``current``, remembered
        for the region.  Recomputing a region: what it remembered, whatever call is in progress now.
        """
        if not torch.is_grad_enabled() or is_compiling():  # only eager autograd recomputes; graphs do it themselves
            return current, False
        frame, recomputing = checkpoint_region()
        if frame is None:
            return current, False
        if recomputing:
            return self._saved.get(frame), True
        if current is not None:
            self._saved[frame] = current
        return current, False

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._saved = weakref.WeakKeyDictionary()
