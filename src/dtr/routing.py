"""Task masks and the router: forward hooks that activate a timestep-dependent channel window.

DTR (Park et al., ICLR 2024) gives each denoising task t its own pathway by activating a
window of ``int(C * sharing_ratio)`` channels in every routed block.  Nothing here adds a
parameter or a buffer: the masks are recomputed per batch from ``T`` start indices per
channel width (a few KiB in all), so checkpoints of wrapped and unwrapped models are
interchangeable.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

METHODS = ("dtr", "random")
PLACEMENTS = ("residual", "gate")
TIMESTEP_KINDS = ("index", "unit", "unit_reversed")


#################################################################################
#                               Argument checks                                 #
#################################################################################


def _check_sharing_ratio(sharing_ratio: float) -> float:
    if isinstance(sharing_ratio, bool) or not isinstance(sharing_ratio, (int, float)):
        raise TypeError(f"sharing_ratio must be a float in (0, 1], got {type(sharing_ratio).__name__}")
    if not (0.0 < sharing_ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"sharing_ratio must be in (0, 1], got {sharing_ratio}")
    return float(sharing_ratio)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a positive float, got {type(alpha).__name__}")
    if not (alpha > 0.0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return float(alpha)


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def active_channels(channels: int, sharing_ratio: float) -> int:
    """C_b = int(C * sharing_ratio), the number of channels each task activates (floor, as the paper)."""
    channels = _check_positive_int(channels, "channels")
    c_b = int(channels * _check_sharing_ratio(sharing_ratio))
    if c_b < 1:
        raise ValueError(
            f"sharing_ratio={sharing_ratio} leaves no active channel for width {channels} "
            f"(int({channels} * {sharing_ratio}) = 0); use sharing_ratio >= {1 / channels:.4g}"
        )
    return c_b


#################################################################################
#                                  Task masks                                   #
#################################################################################


def window_starts(num_tasks: int, channels: int, sharing_ratio: float = 0.8, alpha: float = 4.0) -> np.ndarray:
    """First active channel of each task: round((t / (T-1)) ** alpha * (C - C_b)), float64, half to even.

    Written as the paper code writes it (``np.round(np.linspace(0, 1, T) ** alpha * (C - C_b))``)
    so that masks agree channel for channel with models trained by that code.
    """
    num_tasks = _check_positive_int(num_tasks, "num_tasks")
    c_b = active_channels(channels, sharing_ratio)
    alpha = _check_alpha(alpha)
    return np.round(np.linspace(0, 1, num_tasks) ** alpha * (channels - c_b)).astype(np.int64)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values, without int64 overflow."""

    def mul32(v: torch.Tensor, c: int) -> torch.Tensor:  # (v * c) mod 2**32, split so no product exceeds 2**48
        return (((v >> 16) * c & 0xFFFF) << 16) + (v & 0xFFFF) * c & 0xFFFFFFFF

    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _random_scores(tasks: torch.Tensor, channels: int, seed: int, block: int) -> torch.Tensor:
    """A unique int64 score per (task, channel), a pure function of (seed, block, task, channel)."""
    base = _hash32(torch.tensor([seed & 0xFFFFFFFF], dtype=torch.int64, device=tasks.device))
    base = _hash32((base + block) & 0xFFFFFFFF)
    per_task = _hash32((base + tasks.long()) & 0xFFFFFFFF)  # (B,)
    c = torch.arange(channels, device=tasks.device, dtype=torch.int64)
    h = _hash32((per_task[:, None] * 65599 + _hash32(c)[None, :]) & 0xFFFFFFFF)
    return (h << 16) | c  # the channel index in the low bits makes every score unique: no ties


def _random_masks(tasks: torch.Tensor, channels: int, c_b: int, seed: int, block: int) -> torch.Tensor:
    """R-TR masks for the given tasks: the C_b channels with the highest hash score, (B, C) bool."""
    top = torch.topk(_random_scores(tasks, channels, seed, block), c_b, dim=-1).indices
    mask = torch.zeros(tasks.shape[0], channels, dtype=torch.bool, device=tasks.device)
    return mask.scatter_(1, top, True)


def task_masks(
    num_tasks: int,
    channels: int,
    sharing_ratio: float = 0.8,
    alpha: float = 4.0,
    method: str = "dtr",
    seed: int | None = None,
    block: int = 0,
) -> torch.Tensor:
    """The (num_tasks, channels) boolean mask table of DESIGN §1.

    ``method="dtr"``: task t activates the contiguous window ``[start[t], start[t] + C_b)``.
    ``method="random"``: task t activates a random subset of exactly C_b channels, a pure
    function of ``(seed, block, t)``: every routed block (``block`` = its index) gets its own
    draw, and the same seed gives the same masks on every machine.  ``seed=None`` draws a seed
    from torch's default generator.
    """
    _check_choice(method, "method", METHODS)
    if method == "dtr":
        starts = torch.from_numpy(window_starts(num_tasks, channels, sharing_ratio, alpha))
        c_b = active_channels(channels, sharing_ratio)
        c = torch.arange(channels)
        return (c[None, :] >= starts[:, None]) & (c[None, :] < starts[:, None] + c_b)
    num_tasks = _check_positive_int(num_tasks, "num_tasks")
    c_b = active_channels(channels, sharing_ratio)
    seed = _resolve_seed(seed)
    return _random_masks(torch.arange(num_tasks), channels, c_b, seed, block)


def _resolve_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return int(seed)


#################################################################################
#                               Timestep → task                                 #
#################################################################################


def timesteps_to_tasks(t: Any, num_tasks: int, kind: str = "index") -> torch.Tensor:
    """Map the timesteps a model receives to task indices in [0, T), checking the range.

    ``"index"``: DDPM timesteps, ints or floats in [0, T] (floats from Euler/Karras schedulers are
    rounded to the nearest task; flow matching's ``T`` itself is task T-1).
    ``"unit"``: continuous t in [0, 1], 0 = data; ``"unit_reversed"``: 1 = data (SiT).
    Returns a 0-d or (B,) long tensor.
    """
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (torch.Tensor, int, float, np.integer, np.floating)):
        raise TypeError(f"timestep must be a tensor, an int or a float, got {type(t).__name__}")
    t = torch.as_tensor(t)
    if t.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or a 1-D tensor of shape (batch,), got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"timesteps must be integer or floating point, got {t.dtype}")
    hi = num_tasks if kind == "index" else 1
    _check_range(t, hi, kind)
    if kind == "index":
        if t.is_floating_point():
            return torch.round(t).long().clamp_(max=num_tasks - 1)  # only t in (T - 0.5, T] moves: it is task T-1
        return t.long()
    u = t.double() if t.device.type != "mps" else t.float()
    if kind == "unit_reversed":
        u = 1.0 - u
    return torch.round(u * (num_tasks - 1)).long()


def _check_range(t: torch.Tensor, hi: float, kind: str) -> None:
    """Fail on timesteps outside [0, hi] (integers: [0, hi)); asynchronously on accelerators."""
    if kind == "index" and not t.is_floating_point():
        ok = (t >= 0) & (t < hi)
        allowed = f"[0, {hi}) (integer DDPM timesteps)"
    else:
        ok = (t >= 0) & (t <= hi)  # NaN fails too
        allowed = f"[0, {hi}]" + (" (float DDPM timesteps)" if kind == "index" else f" (timestep_kind={kind!r})")
    if torch.compiler.is_compiling() or t.device.type not in ("cpu", "meta"):
        torch._assert_async(ok.all(), f"dtr: timesteps outside {allowed}")  # no host sync on the hot path
    elif t.device.type == "cpu" and not bool(ok.all()):
        bad = t[~ok].flatten()[:5].tolist()
        raise ValueError(f"timesteps must be in {allowed}; got {bad}")


#################################################################################
#                                   Router                                      #
#################################################################################


@dataclass
class RoutedModule:
    """One routed module: its dotted name, placement and index (the R-TR draw of random routing)."""

    name: str
    module: nn.Module
    placement: str
    index: int


@dataclass
class RoutingSpec:
    """What to route and where the timestep enters: the part of a wrap an adapter decides."""

    blocks: list[str]
    placement: str  # "residual" | "gate"
    timestep_module: str = ""  # dotted name, "" = the model itself
    timestep_arg: int | str | tuple = (1, "t", "timestep", "timesteps")  # positional index or keyword, tried in order
    timestep_kind: str = "index"
    exit_modules: list[str] = field(default_factory=list)  # after these, the timestep is forgotten
    adapter: str = "custom"


class Routing:
    """The handle ``dtr.wrap`` returns: owns the hooks, the routing hyper-parameters and the current tasks.

    The hooks are bound methods of this object, so ``copy.deepcopy(model)`` copies one
    Routing with the model and the copy routes by its own inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: RoutingSpec,
        sharing_ratio: float,
        alpha: float,
        method: str,
        num_tasks: int,
        seed: int,
    ):
        self.sharing_ratio = sharing_ratio
        self.alpha = alpha
        self.method = method
        self.num_tasks = num_tasks
        self.seed = seed
        self.spec = spec
        self.model = model
        modules = dict(model.named_modules())
        self.routed = [RoutedModule(n, modules[n], spec.placement, i) for i, n in enumerate(spec.blocks)]
        self._tasks: torch.Tensor | None = None  # (B,) or 0-d task indices of the forward in progress
        self._masks: dict[tuple, torch.Tensor] = {}  # per-forward cache, one entry per (width, device, dtype[, block])
        self._starts: dict[tuple, torch.Tensor] = {}  # window starts per (width, device): T int32 each
        self._saved = WeakTensorKeyDictionary()  # block input -> tasks, for checkpoint recomputation
        self._stash: dict[int, list] = {}  # residual placement: (input, masked input) between pre- and post-hook
        self._replay: list = []  # tasks of the enclosing modules a checkpoint is recomputing (gate placement)
        self._handles: list = []
        self._attach(modules)

    # -- hooks ---------------------------------------------------------------------------
    def _attach(self, modules: dict[str, nn.Module]) -> None:
        entry = modules[self.spec.timestep_module]
        self._handles.append(entry.register_forward_pre_hook(self._capture, with_kwargs=True))
        exits = {"", *self.spec.exit_modules}
        for name in exits:
            self._handles.append(modules[name].register_forward_hook(self._release, always_call=True))
        for r in self.routed:
            if r.placement == "residual":
                pre, post = functools.partial(self._residual_pre, r), functools.partial(self._residual_post, r)
                self._handles.append(r.module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(r.module.register_forward_hook(post, always_call=True))
            else:
                self._handles.append(r.module.register_forward_hook(functools.partial(self._gate, r)))
        # A gated module (a norm) sits inside the unit that gradient checkpointing recomputes (a ResBlock, an
        # attention block): its own input is then a new tensor, but the enclosing modules' inputs are not.
        gated = [r.name for r in self.routed if r.placement == "gate"]
        for name in sorted({n.rsplit(".", k)[0] for n in gated for k in range(1, n.count(".") + 1)}):
            self._handles.append(modules[name].register_forward_pre_hook(self._anchor_pre, with_kwargs=True))
            self._handles.append(modules[name].register_forward_hook(self._anchor_post, always_call=True))

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook where the timestep enters: remember this forward's task indices."""
        arg = self.spec.timestep_arg
        for a in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(a, str) and a in kwargs:
                t = kwargs[a]
                break
            if isinstance(a, int) and a < len(args):
                t = args[a]
                break
        else:
            where = self.spec.timestep_module or type(module).__name__
            raise ValueError(
                f"dtr: no timestep found in the call of {where!r} (timestep_arg={arg!r}); "
                f"got {len(args)} positional and keyword arguments {sorted(kwargs)}"
            )
        self._tasks = timesteps_to_tasks(t, self.num_tasks, self.spec.timestep_kind)
        self._masks = {}
        self._stash = {}

    def _release(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Post-hook on the model's exits: a later call must bring its own timestep."""
        self._tasks = None
        self._masks = {}

    def _anchor_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Module enclosing gated ones: key the tasks by its input, or find them again when recomputed."""
        if torch.compiler.is_compiling():
            return
        x = _find_input(args, kwargs)
        if self._tasks is not None:
            if x is not None and torch.is_grad_enabled():
                self._saved[x] = self._tasks
            self._replay.append(None)
        else:
            self._replay.append(None if x is None else self._saved.get(x))

    def _anchor_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._replay and not torch.compiler.is_compiling():
            self._replay.pop()

    def _tasks_for(self, r: RoutedModule, x: torch.Tensor) -> torch.Tensor:
        """Tasks of the current forward, or of the forward a checkpointed block is recomputing."""
        tasks = self._tasks
        if tasks is None:
            tasks = self._saved.get(x)
            if tasks is None:
                tasks = next((t for t in reversed(self._replay) if t is not None), None)
            if tasks is None:
                raise RuntimeError(
                    f"dtr: routed module {r.name!r} ran without a timestep: call the model itself "
                    f"(the timestep is read at {self.spec.timestep_module or 'the model call'!r}); "
                    "gradient checkpointing must use torch.utils.checkpoint(..., use_reentrant=False)"
                )
        elif torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._saved[x] = tasks
        batch = x.shape[0]
        if tasks.ndim == 1 and tasks.shape[0] not in (1, batch):  # (1,) broadcasts, as diffusers models do
            raise ValueError(
                f"dtr: timesteps have batch size {tasks.shape[0]} but routed module {r.name!r} "
                f"received batch size {batch}; pass one timestep per sample (or a scalar)"
            )
        return tasks

    def _mask(self, r: RoutedModule, tasks: torch.Tensor, channels: int, like: torch.Tensor) -> torch.Tensor:
        """(B, C) mask ((1, C) for a scalar timestep) in the dtype of ``like``, cached for this forward."""
        key = (channels, like.device, like.dtype, r.index if self.method == "random" else -1)
        cached = self._masks.get(key)
        if cached is not None and cached[0] is tasks:
            return cached[1]
        c_b = active_channels(channels, self.sharing_ratio)
        flat = tasks.to(like.device).reshape(-1)
        if self.method == "random":
            mask = _random_masks(flat, channels, c_b, self.seed, r.index)
        else:
            start = self._starts_for(channels, like.device)[flat][:, None]
            c = torch.arange(channels, device=like.device)
            mask = (c >= start) & (c < start + c_b)
        mask = mask.to(like.dtype)
        self._masks[key] = (tasks, mask)
        return mask

    def _starts_for(self, channels: int, device: torch.device) -> torch.Tensor:
        key = (channels, device)
        if key not in self._starts:
            starts = window_starts(self.num_tasks, channels, self.sharing_ratio, self.alpha)
            self._starts[key] = torch.from_numpy(starts.astype(np.int32)).to(device)
        return self._starts[key]

    # The hooks are methods bound through functools.partial (not closures) so that deepcopy and
    # pickle carry them over to the copy's Routing and modules.
    def _residual_pre(self, r: RoutedModule, module: nn.Module, args: tuple, kwargs: dict):
        """Feed the block m * x and keep x for the post-hook."""
        x, args, kwargs = _first_tensor(r.name, args, kwargs)
        tasks = self._tasks_for(r, x)
        m = self._mask(r, tasks, x.shape[-1], x)
        shape = (m.shape[0], *([1] * (x.ndim - 2)), m.shape[1])
        self._stash.setdefault(r.index, []).append((x, (1 - m).view(shape)))
        return _replace_first_tensor(args, kwargs, x * m.view(shape))

    def _residual_post(self, r: RoutedModule, module: nn.Module, args: tuple, output: Any):
        """Add the inactive channels back: block(m * x) + (1 - m) * x."""
        stack = self._stash.get(r.index)
        if not stack:  # the pre-hook never ran (it raised)
            return None
        x, inactive = stack.pop()
        if output is None:  # the block raised, or checkpoint recomputation stopped early: nothing to add
            return None
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"dtr: residual placement needs a block whose output has its input's shape; "
                f"{r.name!r} maps {tuple(x.shape)} to {got}. Route it with placement='gate' "
                "or choose other blocks"
            )
        out = torch.addcmul(out, x, inactive)  # out + (1 - m) * x in one pass, exact for a 0/1 mask
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _gate(self, r: RoutedModule, module: nn.Module, args: tuple, output: Any):
        """Multiply the module's output by the mask on channel axis 1."""
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or out.ndim < 2:
            raise ValueError(f"dtr: gate placement needs a tensor output with channels on axis 1 from {r.name!r}")
        tasks = self._tasks_for(r, args[0] if args and isinstance(args[0], torch.Tensor) else out)
        m = self._mask(r, tasks, out.shape[1], out)
        out = out * m.view(*m.shape, *([1] * (out.ndim - 2)))
        return (out, *output[1:]) if isinstance(output, tuple) else out

    # -- copies --------------------------------------------------------------------------
    _TRANSIENT = ("_tasks", "_masks", "_saved", "_stash", "_replay")

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) carry the configuration and hooks, never an in-flight forward."""
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tasks, self._masks, self._saved, self._stash, self._replay = None, {}, WeakTensorKeyDictionary(), {}, []

    # -- public --------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook: the model computes exactly what it computed before ``wrap``."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.model, "_dtr_routing", None) is self:
            del self.model._dtr_routing
        self._tasks, self._masks, self._stash, self._replay = None, {}, {}, []

    def masks(self, channels: int, block: int = 0) -> torch.Tensor:
        """The (T, C) mask table this routing applies at width ``channels`` (for inspection and plots)."""
        return task_masks(self.num_tasks, channels, self.sharing_ratio, self.alpha, self.method, self.seed, block)

    def widths(self) -> list[int]:
        """Distinct channel widths of the routed modules (known after one forward or from the modules)."""
        return sorted({w for w in (_width(r.module, r.placement) for r in self.routed) if w is not None})

    def state_bytes(self) -> int:
        """Bytes of tensors routing keeps between forwards (window starts per width and device)."""
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
        return f"Routing(method={self.method!r}, sharing_ratio={self.sharing_ratio}, alpha={self.alpha}, blocks={len(self.routed)})"


def _find_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module's main input: its first positional tensor, or hidden_states= (x=, input=, h=)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "h"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def _first_tensor(name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    x = _find_input(args, kwargs)
    if x is not None:
        return x, args, kwargs
    raise ValueError(f"dtr: cannot find the input tensor of routed module {name!r} (first positional or hidden_states=)")


def _replace_first_tensor(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (value, *args[1:]), kwargs
    for key in ("hidden_states", "x", "input", "h"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: value}
    raise AssertionError("unreachable")


def _width(module: nn.Module, placement: str) -> int | None:
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


def select_modules(model: nn.Module, blocks: str | Iterable[str] | Callable) -> list[str]:
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
    return chosen
