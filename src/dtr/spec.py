"""What a routing is, as plain data: its numbers (``RoutingConfig``), where it acts (``RoutingSpec``) and how a
routed block's stream enters and leaves it (``BlockIO``, ``ImageTokens``).

Adapters build these and nothing else, so they import only this module; the router reads them.  Each value
round-trips through ``to_dict`` / ``from_dict`` (JSON types only), which is all a saved routing is: ``from_dict``
checks every key and names it in its error, with ``where`` saying where the dict came from.
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
TASK_AXES = ("linear", "logsnr")
# Parameter names read as the timestep of a model that no adapter knows (declared by name, never by position).
TIMESTEP_NAMES = ("t", "timestep", "timesteps")


#################################################################################
#                                 The numbers                                    #
#################################################################################


@dataclass(frozen=True)
class RoutingConfig:
    """The numbers of a routing, validated once: beta, alpha, the method, the number of tasks T, the R-TR seed, and
    how a timestep becomes a task (``task_axis``: ``"linear"`` in the timestep, or ``"logsnr"``: the DDPM task of
    equal log-SNR, for flow-matching noise levels).

    ``dtr.wrap``, ``Routing.config``, ``dtr.wrap_from_config`` and the recipe all build and read this one object.
    """

    sharing_ratio: float = 0.8
    alpha: float = 4.0
    method: str = "dtr"
    num_tasks: int = 1000
    seed: int = 0
    task_axis: str = "linear"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: store each value in its canonical type
        set_(self, "sharing_ratio", check_sharing_ratio(self.sharing_ratio))
        set_(self, "alpha", check_alpha(self.alpha))
        set_(self, "method", check_choice(self.method, "method", METHODS))
        set_(self, "num_tasks", check_int(self.num_tasks, "num_tasks", minimum=1))
        set_(self, "seed", check_seed(self.seed))
        set_(self, "task_axis", check_choice(self.task_axis, "task_axis", TASK_AXES))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> RoutingConfig:
        """The config in ``data``; ``task_axis`` may be absent (routings saved before it existed are linear)."""
        _check_keys(data, where, cls, optional=("task_axis",))
        return _build(cls, data, where)


#################################################################################
#                               Streams of blocks                                #
#################################################################################


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

    @classmethod
    def from_dict(cls, data: Any, where: str = "block_io") -> BlockIO:
        _check_keys(data, where, cls, optional=tuple(f.name for f in dataclasses.fields(cls)))
        return _build(cls, data, where)


@dataclass(frozen=True)
class ImageTokens:
    """How many image tokens a model call has, for blocks on a joined [text; image] stream (``BlockIO.joined``).

    Read off the model's argument ``arg``: with ``patch=()`` it holds tokens (B, N, ...) and the count is N; with a
    patch size (p, p) it holds latents (B, C, H, W) and the count is (H / p) * (W / p).
    """

    arg: str | int
    patch: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.arg, bool) or not isinstance(self.arg, (str, int)):
            raise TypeError(f"ImageTokens.arg must be an argument name or a position, got {self.arg!r}")
        patch = tuple(self.patch) if isinstance(self.patch, (tuple, list)) else self.patch
        if not isinstance(patch, tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch
        ):
            raise TypeError(f"ImageTokens.patch must be a tuple of positive ints, got {self.patch!r}")
        object.__setattr__(self, "patch", patch)

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

    def to_dict(self) -> dict:
        return {"arg": self.arg, "patch": list(self.patch)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "image_tokens") -> ImageTokens:
        _check_keys(data, where, cls, optional=("patch",))
        return _build(cls, data, where)


#################################################################################
#                            Where a routing acts                                #
#################################################################################


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

    def to_dict(self) -> dict:
        """Everything but ``note`` (the adapter's words for the summary, not part of where routing acts)."""
        return {
            "blocks": list(self.blocks),
            "placement": self.placement,
            "io": {name: io.to_dict() for name, io in sorted(self.io.items())},
            "timestep_module": self.timestep_module,
            "timestep_arg": self.timestep_arg,
            "timestep_kind": self.timestep_kind,
            "adapter": self.adapter,
            "image_tokens": None if self.image_tokens is None else self.image_tokens.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "spec") -> RoutingSpec:
        """The spec in ``data``, every key checked (a saved routing needs at least one block)."""
        _check_keys(data, where, cls, optional=("io", "adapter", "image_tokens", "timestep_module"), skip=("note",))

        def bad(key: str, problem: str) -> ValueError:
            return ValueError(f"{where}: key {key!r}: {problem}")

        blocks = data["blocks"]
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) and b for b in blocks):
            raise bad("blocks", f"must be a non-empty list of module names, got {blocks!r}")
        if data["placement"] not in PLACEMENTS:
            raise bad("placement", f"must be one of {', '.join(map(repr, PLACEMENTS))}, got {data['placement']!r}")
        if data["timestep_kind"] not in TIMESTEP_KINDS:
            kinds = ", ".join(map(repr, TIMESTEP_KINDS))
            raise bad("timestep_kind", f"must be one of {kinds}, got {data['timestep_kind']!r}")
        module = data.get("timestep_module") or ""
        if not isinstance(module, str):
            raise bad("timestep_module", f'must be a dotted module name or "" (the model), got {module!r}')
        arg = data["timestep_arg"]
        if arg is not None and not (
            (isinstance(arg, str) and arg) or (isinstance(arg, int) and not isinstance(arg, bool) and arg >= 0)
        ):
            raise bad("timestep_arg", f"must be an argument name, a position >= 0 or null, got {arg!r}")
        io = data.get("io") or {}
        if not isinstance(io, dict):
            raise bad("io", f"must map block class names to BlockIO fields, got {io!r}")
        adapter = data.get("adapter", "custom")
        if not isinstance(adapter, str):
            raise bad("adapter", f"must be a string, got {adapter!r}")
        image = data.get("image_tokens")
        return cls(
            blocks=tuple(blocks),
            placement=data["placement"],
            io={name: BlockIO.from_dict(fields, f"{where}: key 'io.{name}'") for name, fields in io.items()},
            timestep_module=module,
            timestep_arg=arg,
            timestep_kind=data["timestep_kind"],
            adapter=adapter,
            image_tokens=None if image is None else ImageTokens.from_dict(image, f"{where}: key 'image_tokens'"),
        )


@dataclass(eq=False)
class RoutedModule:
    """A module a routing acts on: its dotted name, the module, its placement and its index (the R-TR draw)."""

    name: str
    module: Any = field(repr=False)
    placement: str
    index: int


#################################################################################
#                                  from_dict                                     #
#################################################################################


def _check_keys(data: Any, where: str, cls: type, optional: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    """``data`` is a dict with every field of ``cls`` but the optional ones, and no other key."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: must be a JSON object with keys {', '.join(names)}, got {type(data).__name__}")
    missing = [n for n in names if n not in data and n not in optional]
    if missing:
        raise ValueError(f"{where}: key {missing[0]!r} is missing (a {cls.__name__} has {', '.join(names)})")
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ValueError(
            f"{where}: key {unknown[0]!r} is not a field of {cls.__name__} ({', '.join(names)}): a newer dtr wrote "
            "it, or it was edited"
        )


def _build(cls: type, data: Mapping, where: str):
    """``cls(**data)``; on an error, the key whose value alone is refused is named (else the error as it is)."""
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        for name, value in data.items():
            try:
                dataclasses.replace(_DEFAULTS[cls], **{name: value})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: key {name!r}: {e}") from None
        raise ValueError(f"{where}: {error}") from None


# Valid instances to vary one key of at a time (classes whose fields all have defaults but ImageTokens.arg).
_DEFAULTS: dict[type, Any] = {RoutingConfig: RoutingConfig(), BlockIO: BlockIO(), ImageTokens: ImageTokens("x")}
