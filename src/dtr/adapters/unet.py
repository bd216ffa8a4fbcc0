"""ADM-style U-Nets (guided-diffusion, latent-diffusion's openaimodel, examples/adm_unet.py): gate placement.

The paper routes a U-Net between each group normalization and the zero-initialised layer after it:
``h = m_t * GroupNorm(h)`` for the last norm of every ResBlock (``out_layers[0]``) and the norm of every
attention block, at every resolution (each width gets its own mask).  The timestep is the model's
second argument (``timesteps``).
"""

from __future__ import annotations

from torch import nn

from ..spec import RoutingSpec


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def adm_gate_modules(model: nn.Module) -> list[str]:
    """Dotted names of the norms ADM routes: ``*.out_layers.0`` of ResBlocks, ``*.norm`` of attention blocks."""
    names = []
    for name, m in model.named_modules():
        out = getattr(m, "out_layers", None)
        norm = getattr(m, "norm", None)
        if isinstance(out, nn.Sequential) and len(out) and isinstance(out[0], nn.GroupNorm):
            names.append(_join(name, "out_layers.0"))  # ResBlock: GroupNorm, SiLU, Dropout, zero conv
        elif isinstance(norm, nn.GroupNorm) and hasattr(m, "proj_out"):
            names.append(_join(name, "norm"))  # AttentionBlock / SpatialTransformer: norm ... zero proj_out
    return names


def adm_unet_spec(model: nn.Module) -> RoutingSpec | None:
    """Recognise the ADM layout: ``input_blocks``, ``middle_block``, ``output_blocks`` and ResBlock ``out_layers``."""
    if not all(
        isinstance(getattr(model, a, None), nn.Module) for a in ("input_blocks", "middle_block", "output_blocks")
    ):
        return None
    blocks = adm_gate_modules(model)
    if not blocks:
        return None
    return RoutingSpec(
        blocks=tuple(blocks),
        placement="gate",
        timestep_arg=1,
        timestep_kind="index",
        adapter="ADM U-Net",
    )
