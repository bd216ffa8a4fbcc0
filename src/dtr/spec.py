"""What a routing is, as plain data: its numbers (``RoutingConfig``), where it acts (``RoutingSpec``) and how a
routed block's stream enters and leaves it (``BlockIO``).

Adapters build these and nothing else, so they import only this module; the router reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .validation import check_alpha, check_choice, check_int, check_seed, check_sharing_ratio

METHODS = ("dtr", "random")
PLACEMENTS = ("residual", "gate")
TIMESTEP_KINDS = ("index", "index_reversed", "unit", "unit_reversed")
# Parameter names read as the timestep of a model that no adapter knows (declared by name, never by position).
TIMESTEP_NAMES = ("t", "timestep", "timesteps")


@dataclass(frozen=True)
class RoutingConfig:
    """The numbers of a routing, validated once: beta, alpha, the method, the number of tasks T and the R-TR seed.

    ``dtr.wrap``, ``Routing.config``, ``dtr.wrap_from_config`` and the recipe all build and read this one object.
    """

    sharing_ratio: float = 0.8
    alpha: float = 4.0
    method: str = "dtr"
    num_tasks: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: store each value in its canonical type
        set_(self, "sharing_ratio", check_sharing_ratio(self.sharing_ratio))
        set_(self, "alpha", check_alpha(self.alpha))
        set_(self, "method", check_choice(self.method, "method", METHODS))
        set_(self, "num_tasks", check_int(self.num_tasks, "num_tasks", minimum=1))
        set_(self, "seed", check_seed(self.seed))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> RoutingConfig:
        """The config in ``data`` (extra keys ignored); a missing key is named with ``where``."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise KeyError(f"{where} has no {missing[0]!r} (a routing config needs {', '.join(cls._names())})")
        return cls(**{name: data[name] for name in cls._names()})

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class BlockIO:
    """Where a routed module's stream enters and leaves: declared per block class by adapters, never guessed.

    ``input``: the argument carrying the stream, a keyword name (also found at its position in ``forward``'s
    signature) or a position. ``output``: the element of a tuple output carrying the stream back (``None``: the
    output is the stream). ``channel_axis``: the axis the mask acts on (``None``: the placement's default, the
    last axis for residual blocks on (B, N, C) tokens, axis 1 for gates).

    Residual blocks whose stream is not simply their input say so:
    ``joined``: the stream is a joined [text; image] token sequence (single-stream blocks of MMDiTs); only its
    image tokens, the last ``RoutingSpec.image_tokens`` of each sample's valid tokens, are routed, and text rows
    come out as the block computes them. ``valid``: with ``joined``, the block's (B, L) boolean argument that
    marks each sample's valid tokens when samples are padded to one length (``None``, or the argument ``None``:
    all tokens). ``source``: a child module whose output is the stream, where the block has that child
    (HunyuanDiT's long-skip ``skip_linear``): the block computes ``h + F(h)`` on it, so routing gives
    ``h + F(m * h)``.
    """

    input: str | int = 0
    output: int | None = None
    channel_axis: int | None = None
    joined: bool = False
    valid: str | int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.input, bool) or not isinstance(self.input, (str, int)):
            raise TypeError(f"BlockIO.input must be an argument name or a position, got {self.input!r}")
        if isinstance(self.input, int):
            check_int(self.input, "BlockIO.input", minimum=0)
        if self.output is not None:
            check_int(self.output, "BlockIO.output", minimum=0)
        if self.channel_axis is not None and check_int(self.channel_axis, "BlockIO.channel_axis") == 0:
            raise ValueError("BlockIO.channel_axis must not be 0 (the batch axis); 1 = channels first, -1 = last")
        if not isinstance(self.joined, bool):
            raise TypeError(f"BlockIO.joined must be True or False, got {self.joined!r}")
        if self.valid is not None and not self.joined:
            raise ValueError("BlockIO.valid marks the valid tokens of a joined stream: it needs joined=True")
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            raise TypeError(f"BlockIO.source must be the name of a child module, got {self.source!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ImageTokens:
    """How many image tokens a model call has, for blocks on a joined [text; image] stream (``BlockIO.joined``).

    Read off the model's argument ``arg``: with ``patch=()`` it holds tokens (B, N, ...) and the count is N; with a
    patch size (p, p) it holds latents (B, C, H, W) and the count is (H / p) * (W / p).
    """

    arg: str | int
    patch: tuple[int, ...] = ()

    def count(self, x: Any) -> int:
        """The image token count of the argument's value ``x``."""
        shape = getattr(x, "shape", None)
        if shape is None or (len(shape) != 2 + len(self.patch) if self.patch else len(shape) < 2):
            want = f"(batch, channels, {len(self.patch)} grid axes)" if self.patch else "(batch, tokens, ...)"
            got = f"of shape {tuple(shape)}" if shape is not None else f"a {type(x).__name__}"
            raise ValueError(
                f"dtr counts the image tokens of a joined stream from argument {self.arg!r}, which is "
                f"{got}; it must be {want}"
            )
        if not self.patch:
            return x.shape[1]
        n = 1
        for size, p in zip(x.shape[2:], self.patch, strict=True):
            n = n * (size // p)
        return n


@dataclass(frozen=True)
class RoutingSpec:
    """Where routing acts and where the timestep enters: the part of a wrap an adapter decides.

    Adapters return one; ``dtr.wrap``'s arguments override its fields with ``dataclasses.replace``.
    """

    blocks: tuple[str, ...]
    placement: str = "residual"  # "residual": block(m*x) + (1-m)*x | "gate": m * module(x)
    io: Mapping[str, BlockIO] = field(default_factory=dict)  # block class name -> BlockIO (others: BlockIO())
    timestep_module: str = ""  # dotted name of the module whose call receives the timestep; "" = the model
    timestep_arg: str | int | None = None  # its parameter name or position; None: the first of TIMESTEP_NAMES
    timestep_kind: str | None = "index"  # see dtr.timesteps_to_tasks: "index" (DDPM steps, sigma*1000),
    # "index_reversed" ([0, T], T = data), "unit" (t in [0, 1], 0 = data: flow sigma), "unit_reversed" (1 = data)
    # (None: the adapter cannot tell what the timestep means; wrap asks for timestep_kind=)
    adapter: str = "custom"
    note: str = ""  # what the summary should tell a user (e.g. which pipeline's timestep convention was chosen)
    image_tokens: ImageTokens | None = None  # where joined blocks (BlockIO.joined) find the image token count

    def io_for(self, module: Any) -> BlockIO:
        """The declared BlockIO of ``module``'s class (or of a base class), else the default."""
        for cls in type(module).__mro__:
            if cls.__name__ in self.io:
                return self.io[cls.__name__]
        return BlockIO()


@dataclass(eq=False)
class RoutedModule:
    """A module a routing acts on: its dotted name, the module, its placement and its index (the R-TR draw)."""

    name: str
    module: Any = field(repr=False)
    placement: str
    index: int
