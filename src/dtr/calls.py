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
recomputed.  A model call opened *inside* a region being recomputed reads its own timesteps again, so a region
around several model calls (CFG-style, consistency training, self-conditioning) replays each call exactly.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils.checkpoint import _CheckpointFrame  # the record torch keeps per checkpointed region


class Call:
    """The routing state of one model call: its task indices and, in eager mode, the masks built from them."""

    __slots__ = ("tasks", "masks", "owner", "captured", "image_tokens", "region")

    def __init__(self, tasks: torch.Tensor | None = None, owner: object = None):
        self.tasks = tasks  # (B,), (B, N) or 0-d long task indices; None until the timestep is read
        self.masks: dict = {}  # (width, dtype, device, block) -> (mask, 1 - mask), built once per call
        self.owner = owner  # the model whose call this is (None: a replayed checkpoint recomputation)
        self.captured = False  # the timestep module has given the tasks
        self.image_tokens: int | None = None  # image tokens of this call, for joined streams (BlockIO.joined)
        self.region: _CheckpointFrame | None = None  # the checkpoint region being recomputed when it was opened


class CallStack:
    """The calls in progress, per thread (``local.call``, the innermost): ``push`` remembers nothing, callers keep the
    call that was current before and ``restore`` it in a ``finally`` (routed modules read ``local`` directly: it is
    their hot path)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def current(self) -> Call | None:
        return getattr(self.local, "call", None)

    def push(self, tasks: torch.Tensor | None = None, owner: object = None) -> Call:
        call = Call(tasks, owner)
        self.local.call = call
        return call

    def restore(self, outer: Call | None) -> None:
        """End every call pushed since ``outer`` was current (callers read ``outer`` before they push, so that an
        interrupt anywhere before the ``finally`` leaves no call behind)."""
        self.local.call = outer

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) never carry a call in progress
        return {}

    def __setstate__(self, state: dict) -> None:
        self.local = threading.local()


#################################################################################
#                           Activation checkpointing                            #
#################################################################################


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
    """The tasks (and image token count) of the call each checkpoint region ran in, kept while autograd may
    recompute the region."""

    def __init__(self) -> None:
        self._saved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def record(self, region: _CheckpointFrame, call: Call) -> None:
        self._saved[region] = (call.tasks, call.image_tokens)

    def recorded(self, region: _CheckpointFrame) -> tuple | None:
        return self._saved.get(region)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._saved = weakref.WeakKeyDictionary()
