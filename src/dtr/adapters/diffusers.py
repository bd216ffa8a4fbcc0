"""diffusers models, recognised by class (subclasses included) without importing diffusers.

U-Nets (``UNet2DModel``, ``UNet2DConditionModel``): gate placement, here.  Transformers: residual placement,
declared per class as a ``Family`` (blocks, each block class's stream, what the timestep means) in
``diffusers_dit.py`` (one image stream) and ``diffusers_mmdit.py`` (text and image streams); ``family_spec``
turns a declaration into the model's ``RoutingSpec``.

The timestep is the model call's ``timestep`` argument (by keyword or at its position), as pipelines and
training loops pass it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..spec import BlockIO, ImageTokens, RoutingSpec

UNETS = ("UNet2DModel", "UNet2DConditionModel")
RESNETS = ("ResnetBlock2D", "ResnetBlockCondNorm2D")


def _is(obj: object, *names: str) -> bool:
    """True if the class of ``obj`` or one of its bases is the diffusers class of one of ``names``."""
    return any(c.__name__ in names and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


#################################################################################
#                                    U-Nets                                      #
#################################################################################


def unet_gate_modules(model: nn.Module) -> list[str]:
    """The ADM placement in diffusers' modules, found by the role of each module rather than its exact class (a
    U-Net subclass with ResNet classes of its own, as DreamLite's, routes the same): the ``norm2`` of every ResNet
    block (``norm1 -> conv1 -> norm2 -> dropout -> conv2``), the ``group_norm`` of attention blocks, and the GroupNorm
    ``norm`` of spatial transformers (``norm -> proj_in -> blocks -> proj_out``)."""
    names = []
    for name, m in model.named_modules():
        if _is(m, *RESNETS) or _is_resnet(m):
            names.append(_join(name, "norm2"))
        elif isinstance(getattr(m, "group_norm", None), nn.GroupNorm) and hasattr(m, "to_out"):
            names.append(_join(name, "group_norm"))  # called on (B, C, H*W) inside the processor
        elif isinstance(getattr(m, "norm", None), nn.GroupNorm) and all(hasattr(m, a) for a in ("proj_in", "proj_out")):
            names.append(_join(name, "norm"))
    return names


def _is_resnet(m: nn.Module) -> bool:
    """A ResNet block by its parts: two norms and two convolutions, the second norm a module of its own."""
    parts = [getattr(m, a, None) for a in ("norm1", "conv1", "norm2", "conv2")]
    return all(isinstance(p, nn.Module) for p in parts) and isinstance(parts[0], nn.GroupNorm)


def diffusers_unet_spec(model: nn.Module) -> RoutingSpec | None:
    """diffusers ``UNet2DModel`` and ``UNet2DConditionModel``: gate every routed norm's output on channel axis 1."""
    if not _is(model, *UNETS):
        return None
    # score-SDE UNets (Fourier time embedding) take a noise level sigma, not a step index: the kind is the user's
    fourier = getattr(getattr(model, "config", None), "time_embedding_type", "positional") == "fourier"
    return RoutingSpec(
        blocks=tuple(unet_gate_modules(model)),
        placement="gate",
        timestep_arg="timestep",
        timestep_kind=None if fourier else "index",
        adapter=f"diffusers {type(model).__name__}",
        note="a Fourier time embedding takes a noise level sigma, not a step index: convert sigma to a step index "
        "or to [0, 1] yourself"
        if fourier
        else "",
    )


#################################################################################
#                                 Transformers                                   #
#################################################################################


@dataclass(frozen=True)
class Family:
    """A diffusers transformer class as dtr routes it: residual blocks, their streams, the timestep's meaning.

    ``blocks``: full-match regexes of the routed module names. ``io``: each block class's stream (which argument,
    which output element; joined [text; image] streams; a stream that starts at a child module).
    ``timestep_kind``: what the timestep that ``pipeline`` passes means (``dtr.timesteps_to_tasks``).
    ``image_tokens``: for joined streams, where a call's image token count is read: ``"tokens"`` (the model's
    ``hidden_states`` is (B, N, C)) or ``"latents"`` ((B, C, H, W), patches of ``config.patch_size``).
    ``variants``: (config key, value, timestep_kind, pipeline) for classes that serve pipelines passing
    different timesteps, told apart by their config.  ``older``: a block class's stream in older diffusers,
    recognised by a ``forward`` without the argument named in the pair.
    """

    blocks: tuple[str, ...]
    io: Mapping[str, BlockIO]
    timestep_kind: str
    pipeline: str
    image_tokens: str | None = None
    variants: tuple[tuple[str, object, str, str], ...] = ()
    older: Mapping[str, tuple[str, BlockIO]] = field(default_factory=dict)
    note: str = ""


# What each timestep kind means, as a pipeline passes it (for the summary's note).
READS = {
    "index": "step indices or sigma * 1000 in [0, 1000]",
    "index_reversed": "(1 - sigma) * 1000, 1000 = data",
    "unit": "sigma in [0, 1], 1 = noise",
    "unit_reversed": "1 - sigma in [0, 1], 1 = data",
}


def family_spec(model: nn.Module, families: Mapping[str, Family]) -> RoutingSpec | None:
    """The RoutingSpec of ``model`` if its class (or a base) is one of ``families``, else None."""
    name = next(
        (c.__name__ for c in type(model).__mro__ if c.__name__ in families and c.__module__.startswith("diffusers.")),
        None,
    )
    if name is None:
        return None
    family = families[name]
    config = getattr(model, "config", {})
    kind, pipeline = family.timestep_kind, family.pipeline
    for key, value, variant_kind, variant_pipeline in family.variants:
        if config.get(key) == value:
            kind, pipeline = variant_kind, variant_pipeline
    patterns = [re.compile(p) for p in family.blocks]
    blocks = tuple(n for n, _ in model.named_modules() if any(p.fullmatch(n) for p in patterns))
    io = dict(family.io)
    for n in blocks:  # a block class whose forward predates the declared stream (older diffusers)
        cls = type(model.get_submodule(n))
        if cls.__name__ in family.older:
            argument, older_io = family.older[cls.__name__]
            if argument not in inspect.signature(cls.forward).parameters:
                io[cls.__name__] = older_io
    image_tokens = None
    if any(v.joined for v in io.values()):
        patch = () if family.image_tokens == "tokens" else (config["patch_size"],) * 2
        image_tokens = ImageTokens("hidden_states", patch)
    note = f"timestep read as {pipeline} passes it: {READS[kind]}"
    return RoutingSpec(
        blocks=blocks,
        placement="residual",
        io=io,
        timestep_arg="timestep",
        timestep_kind=kind,
        adapter=f"diffusers {name}",
        note=note + (f"; {family.note}" if family.note else ""),
        image_tokens=image_tokens,
    )
