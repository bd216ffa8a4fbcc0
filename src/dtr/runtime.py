"""The state every routed module of one model shares: the routing's numbers, the calls in progress, the checkpoint
replay and the window starts per width.  One object per wrapped model, reached by its behaviours directly.

Nothing here is a parameter or a buffer: masks are built per call from ``T`` window starts per width (a few
KiB in all), so checkpoints of routed and unrouted models are interchangeable.

A runtime is *owned* while a model's entry behaviour holds it.  Copies drop the mark and the entry of a copied
model sets it again; a block saved or copied without its model keeps a runtime no model owns, and runs as the
plain block it is (routing belongs to the model's wrap).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import policy
from ._compat import assume_constant_result
from .calls import Call, CallStack, Replay, checkpoint_region
from .masks import active_channels, random_rows, window_rows, window_starts
from .spec import RoutingConfig
from .timesteps import timesteps_to_tasks


class Runtime:
    """What the behaviours of one routed model share (copied with the model, never with a call in progress)."""

    owned = False  # set by the model's entry (ModelCall) on wrap, copy and load

    def __init__(self, config: RoutingConfig, timestep_kind: str):
        self.config = config
        self.timestep_kind = timestep_kind
        self.calls = CallStack()
        self.replay = Replay()
        self._starts: dict = {}  # (width, device) -> window starts, int32

    def tasks_from(self, t: Any) -> torch.Tensor:
        """The task indices of a call's timestep argument (range and shape checked)."""
        c = self.config
        return timesteps_to_tasks(t, c.num_tasks, self.timestep_kind, c.task_axis)

    def call_for(self, name: str, current: Call | None, mode: str) -> Call:
        """The call a routed module runs in: ``current`` (the innermost call of this thread), or, while a
        checkpointed region is recomputed after its call ended, a new call with the tasks the region recorded
        (pushed: the caller restores ``current`` when it is done).  ``mode`` is ``policy.mode()``."""
        if mode in (policy.CHECKPOINT_ALWAYS if current is not None else policy.CHECKPOINT_WITHOUT_CALL):
            region, recomputing = checkpoint_region()
            if region is not None:
                if not recomputing:
                    if current is not None and current.tasks is not None:
                        self.replay.record(region, current)
                elif current is None or current.region is not region:  # else: a call opened inside this recompute
                    recorded = self.replay.recorded(region)
                    if recorded is not None:
                        call = self.calls.push(recorded[0])
                        call.image_tokens = recorded[1]
                        return call
        if current is None or current.tasks is None:
            if torch.fx._symbolic_trace.is_fx_tracing():
                raise TypeError(
                    "dtr routing cannot be traced symbolically by torch.fx: use torch.compile or torch.export"
                )
            why = (
                "it was called outside a call of the model (call the model itself, not one of its blocks)"
                if current is None
                else "the model's timestep was not read yet (timestep_module runs after it)"
            )
            raise RuntimeError(
                f"dtr: routed module {name!r} ran without a timestep: {why}. Activation checkpointing must be "
                "non-reentrant: torch.utils.checkpoint(..., use_reentrant=False), diffusers' "
                "enable_gradient_checkpointing or checkpoint_wrapper"
            )
        return current

    def masks(
        self, call: Call, like: torch.Tensor, axis: int, block: int, name: str, batch_axis: int, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, 1 - mask) of ``call``'s tasks for ``like`` with channels on ``axis`` and samples on ``batch_axis``
        (1 for sequence-first (N, B, C) blocks), shaped to broadcast over it.

        In ``like``'s dtype and device, built once per call and width in eager modes (``policy.EAGER``).
        """
        tasks = call.tasks
        channels = like.shape[axis]
        if tasks.ndim == 2 or (tasks.ndim == 1 and tasks.shape[0] != 1 and tasks.shape[0] != like.shape[batch_axis]):
            _check_tasks_fit(tasks, like, axis, name, batch_axis)
        random = self.config.method == "random"
        key = (channels, like.dtype, like.device, block if random else -1)
        cache = mode in policy.EAGER
        pair = call.masks.get(key) if cache else None
        if pair is None:
            c_b = active_channels(channels, self.config.sharing_ratio)
            flat = tasks.to(like.device).reshape(-1)
            if random:
                rows = random_rows(flat, channels, c_b, self.config.seed, block)
            else:
                rows = window_rows(self._window_starts(channels, like.device)[flat], channels, c_b)
            m = rows.to(like.dtype)
            pair = (m, 1 - m)
            if cache:
                call.masks[key] = pair
        shape = [1] * like.ndim
        shape[axis] = channels
        if tasks.ndim == 2:
            shape[0], shape[1] = tasks.shape
        elif tasks.ndim == 1:
            shape[batch_axis] = tasks.shape[0]
        return pair[0].view(shape), pair[1].view(shape)

    def _window_starts(self, channels: int, device: torch.device) -> torch.Tensor:
        c = self.config
        if policy.compiling():  # a constant of the graph, computed by numpy at trace time (cache misses only)
            return torch.tensor(_starts_tuple(c.num_tasks, channels, c.sharing_ratio, c.alpha), device=device)
        starts = self._starts.get((channels, device))
        if starts is None:
            host = window_starts(c.num_tasks, channels, c.sharing_ratio, c.alpha).astype(np.int32)
            self._starts[(channels, device)] = starts = torch.from_numpy(host).to(device)
        return starts

    def state_bytes(self) -> int:
        """Bytes of tensors kept between calls (window starts per width and device)."""
        return sum(t.numel() * t.element_size() for t in self._starts.values())

    def __getstate__(self) -> dict:
        """Copies carry the configuration, not the per-device caches nor the mark of an owner."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_starts", "owned")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._starts = {}


@assume_constant_result
def _starts_tuple(num_tasks: int, channels: int, sharing_ratio: float, alpha: float) -> tuple:
    """``window_starts`` as a tuple of ints: under torch.compile it runs once at trace time and is a constant."""
    return tuple(window_starts(num_tasks, channels, sharing_ratio, alpha).tolist())


def _check_tasks_fit(tasks: torch.Tensor, like: torch.Tensor, axis: int, name: str, batch_axis: int) -> None:
    """Tasks of shape (), (1,), (B,) or, for (B, N, C) tokens, (B, N) must fit the tensor they route."""
    if tasks.ndim == 2:
        if (
            like.ndim != 3
            or axis != 2
            or batch_axis != 0
            or tasks.shape[0] not in (1, like.shape[0])
            or tasks.shape[1] != like.shape[1]
        ):
            raise ValueError(
                f"dtr: per-token timesteps of shape {tuple(tasks.shape)} need (batch, tokens, channels) input with "
                f"channels last at routed module {name!r}, which received {tuple(like.shape)} (channel axis {axis})"
            )
    elif tasks.ndim == 1 and tasks.shape[0] != 1 and tasks.shape[0] != like.shape[batch_axis]:
        layout = " (sequence first: batch on axis 1)" if batch_axis else ""
        raise ValueError(
            f"dtr: timesteps have batch size {tasks.shape[0]} but routed module {name!r} received batch size "
            f"{like.shape[batch_axis]}{layout}, input {tuple(like.shape)}; pass one timestep per sample (or a scalar)"
        )
