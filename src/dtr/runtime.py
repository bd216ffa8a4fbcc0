"""The state every routed module of one model shares: the routing's numbers, the calls in progress, the checkpoint
replay and the window starts per width.  One object per wrapped model, reached by its behaviours directly.

Nothing here is a parameter or a buffer: masks are built per call from ``T`` window starts per width (a few
KiB in all), so checkpoints of routed and unrouted models are interchangeable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._compat import is_compiling
from .calls import Call, CallStack, Replay
from .masks import active_channels, random_rows, timesteps_to_tasks, window_rows, window_starts, window_starts_tuple
from .spec import RoutingConfig


class Runtime:
    """What the behaviours of one routed model share (copied with the model, never with a call in progress)."""

    def __init__(self, config: RoutingConfig, timestep_kind: str):
        self.config = config
        self.timestep_kind = timestep_kind
        self.calls = CallStack()
        self.replay = Replay()
        self._starts: dict = {}  # (width, device) -> window starts, int32

    def tasks_from(self, t: Any) -> torch.Tensor:
        """The task indices of a call's timestep argument (range and shape checked)."""
        return timesteps_to_tasks(t, self.config.num_tasks, self.timestep_kind)

    def call_for(self, name: str, current: Call | None) -> Call | None:
        """The call a routed module runs in: ``current`` (the innermost call of this thread), or, while a
        checkpointed region is recomputed, a new call with the tasks (and image-token count) that region recorded.
        None: the region being recomputed recorded nothing because it was opened inside this module's own call
        (composable ``checkpoint(module)`` opens it in a forward pre-hook), so its inputs are masked already and
        the module must recompute exactly what ran in the region: its call, unrouted."""
        state = None if current is None or current.tasks is None else (current.tasks, current.image_tokens)
        state, replayed = self.replay.tasks(state)
        if replayed:
            if state is None:
                return None
            call = self.calls.push(state[0])
            call.image_tokens = state[1]
            return call
        if state is None:
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
        self, call: Call, like: torch.Tensor, axis: int, block: int, name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, 1 - mask) of ``call``'s tasks for ``like`` with channels on ``axis``, shaped to broadcast over it.

        In ``like``'s dtype and device, built once per eager call and width.  Compiled code builds them inline and
        caches nothing: a cache write inside a checkpointed region is a side effect TorchDynamo cannot trace, and
        AOTAutograd's common-subexpression pass merges the identical masks of all blocks anyway.
        """
        tasks = call.tasks
        channels = like.shape[axis]
        _check_tasks_fit(tasks, like, axis, name)
        random = self.config.method == "random"
        key = (channels, like.dtype, like.device, block if random else -1)
        cache = not is_compiling()
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
        shape = _mask_shape(tasks, like, axis)
        return pair[0].view(shape), pair[1].view(shape)

    def _window_starts(self, channels: int, device: torch.device) -> torch.Tensor:
        c = self.config
        if is_compiling():  # a constant of the graph, computed by numpy at trace time
            return torch.tensor(window_starts_tuple(c.num_tasks, channels, c.sharing_ratio, c.alpha), device=device)
        starts = self._starts.get((channels, device))
        if starts is None:
            host = window_starts(c.num_tasks, channels, c.sharing_ratio, c.alpha).astype(np.int32)
            self._starts[(channels, device)] = starts = torch.from_numpy(host).to(device)
        return starts

    def state_bytes(self) -> int:
        """Bytes of tensors kept between calls (window starts per width and device)."""
        return sum(t.numel() * t.element_size() for t in self._starts.values())

    def __getstate__(self) -> dict:
        """Copies carry the configuration, not the per-device caches."""
        return {k: v for k, v in self.__dict__.items() if k != "_starts"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._starts = {}


def _check_tasks_fit(tasks: torch.Tensor, like: torch.Tensor, axis: int, name: str) -> None:
    """Tasks of shape (), (1,), (B,) or, for (B, N, C) tokens, (B, N) must fit the tensor they route."""
    if tasks.ndim == 2:
        if like.ndim != 3 or axis != 2 or tasks.shape[0] not in (1, like.shape[0]) or tasks.shape[1] != like.shape[1]:
            raise ValueError(
                f"dtr: per-token timesteps of shape {tuple(tasks.shape)} need (batch, tokens, channels) input with "
                f"channels last at routed module {name!r}, which received {tuple(like.shape)} (channel axis {axis})"
            )
    elif tasks.ndim == 1 and tasks.shape[0] not in (1, like.shape[0]):  # (1,) broadcasts, as diffusers models do
        raise ValueError(
            f"dtr: timesteps have batch size {tasks.shape[0]} but routed module {name!r} "
            f"received batch size {like.shape[0]}; pass one timestep per sample (or a scalar)"
        )


def _mask_shape(tasks: torch.Tensor, like: torch.Tensor, axis: int) -> list[int]:
    """The view of a (rows, C) mask that broadcasts over ``like``: rows on the batch (and token) axes, C on ``axis``."""
    shape = [1] * like.ndim
    shape[axis] = like.shape[axis]
    if tasks.ndim == 2:
        shape[0], shape[1] = tasks.shape
    elif tasks.ndim == 1:
        shape[0] = tasks.shape[0]
    return shape
