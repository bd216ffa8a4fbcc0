"""diffusers models: ``UNet2DModel`` / ``UNet2DConditionModel`` (gate placement) and ``DiTTransformer2DModel``
(residual placement).  Recognised by class, subclasses included, without importing diffusers.

The timestep is the model call's ``timestep`` argument (positional 1 or keyword), as pipelines
and training loops pass it: a (B,) or (1,) tensor, a 0-d tensor, an int or a float.
"""

from __future__ import annotations

from torch import nn

from ..spec import RoutingSpec

UNETS = ("UNet2DModel", "UNet2DConditionModel")
RESNETS = ("ResnetBlock2D", "ResnetBlockCondNorm2D")


def _is(obj: object, *names: str) -> bool:
    """True if the class of ``obj`` or one of its bases is the diffusers class of one of ``names``."""
    return any(c.__name__ in names and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unet_gate_modules(model: nn.Module) -> list[str]:
    """The ADM placement in diffusers' modules: ``ResnetBlock2D.norm2`` (-> dropout -> ``conv2``), the
    ``group_norm`` of ``Attention`` blocks, and the GroupNorm ``norm`` of ``Transformer2DModel`` blocks."""
    names = []
    for name, m in model.named_modules():
        if _is(m, *RESNETS):
            names.append(_join(name, "norm2"))
        elif _is(m, "Attention") and getattr(m, "group_norm", None) is not None:
            names.append(_join(name, "group_norm"))  # called on (B, C, H*W) inside the processor
        elif _is(m, "Transformer2DModel") and isinstance(getattr(m, "norm", None), nn.GroupNorm):
            names.append(_join(name, "norm"))  # spatial transformer: norm -> proj_in -> blocks -> proj_out
    return names


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
        "or to [0, 1] yourself" if fourier else "",
    )


def diffusers_dit_spec(model: nn.Module) -> RoutingSpec | None:
    """diffusers ``DiTTransformer2DModel``: residual placement on every ``transformer_blocks.N``."""
    if not _is(model, "DiTTransformer2DModel"):
        return None
    return RoutingSpec(
        blocks=tuple(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))),
        placement="residual",
        timestep_arg="timestep",
        timestep_kind="index",
        adapter="diffusers DiTTransformer2DModel",
    )
