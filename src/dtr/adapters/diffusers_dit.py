"""diffusers transformers with one image (or video) token stream: every block is ``x + F(x)`` on it.

DiT, PixArt-alpha/sigma, Sana (and Sana-Sprint), HunyuanDiT, Lumina-Next, LTX-Video and Wan: residual placement
on each block's ``hidden_states``, the output is the stream.  Text enters by cross-attention, never through the
stream.  HunyuanDiT's long-skip blocks (index > num_layers // 2) first mix the stream with the skip,
``h = skip_linear(skip_norm(cat(x, skip)))``, and then compute ``h + F(h)``: their residual is routed on h.
LTX-Video and Wan (2.2 TI2V) pipelines may pass one timestep per token, (B, N): each token is routed by its own.
"""

from __future__ import annotations

from torch import nn

from ..spec import BlockIO, RoutingSpec
from .diffusers import Family, family_spec

STREAM = BlockIO("hidden_states")

FAMILIES = {
    "DiTTransformer2DModel": Family(
        (r"transformer_blocks\.\d+",), {"BasicTransformerBlock": STREAM}, "index", "DiTPipeline"
    ),
    "PixArtTransformer2DModel": Family(
        (r"transformer_blocks\.\d+",),
        {"BasicTransformerBlock": STREAM},
        "index",
        "PixArtAlphaPipeline/PixArtSigmaPipeline",
    ),
    "SanaTransformer2DModel": Family(
        (r"transformer_blocks\.\d+",),
        {"SanaTransformerBlock": STREAM},
        "index",
        "SanaPipeline",
        variants=(("guidance_embeds", True, "unit", "SanaSprintPipeline"),),
        note="one class serves both pipelines: SanaPipeline passes sigma * 1000, SanaSprintPipeline (the only one "
        "that drives config.guidance_embeds=True models) passes sigma; a custom sampler may need timestep_kind=",
    ),
    "HunyuanDiT2DModel": Family(
        (r"blocks\.\d+",),
        {"HunyuanDiTBlock": BlockIO("hidden_states", source="skip_linear")},
        "index",
        "HunyuanDiTPipeline",
        note="long-skip blocks route h + F(m * h) with h = skip_linear(skip_norm(cat(x, skip)))",
    ),
    "LuminaNextDiT2DModel": Family(
        (r"layers\.\d+",), {"LuminaNextDiTBlock": STREAM}, "unit_reversed", "LuminaPipeline"
    ),
    "LTXVideoTransformer3DModel": Family(
        (r"transformer_blocks\.\d+",),
        {"LTXVideoTransformerBlock": STREAM},
        "index",
        "LTXPipeline/LTXImageToVideoPipeline",
    ),
    "WanTransformer3DModel": Family(
        (r"blocks\.\d+",), {"WanTransformerBlock": STREAM}, "index", "WanPipeline/WanImageToVideoPipeline"
    ),
}


# diffusers transformers dtr does not route by default, and why (dtr.wrap says so by name).
UNSUPPORTED = {
    "SanaWMTransformer3DModel": "its pipeline passes one timestep per frame, (batch, 1, frames), and its blocks take "
    "the stream with a dozen positional arguments for camera control and chunked causal attention: no adapter reads "
    "that yet. Route it yourself with blocks=r'blocks\\.\\d+', timestep_kind= and, for per-frame timesteps, a "
    "timestep_module that receives one per token",
}


def diffusers_dit_spec(model: nn.Module) -> RoutingSpec | None:
    """A diffusers transformer with one image token stream (``FAMILIES``), routed on every block."""
    for cls in type(model).__mro__:
        if cls.__name__ in UNSUPPORTED and cls.__module__.startswith("diffusers."):
            raise ValueError(f"dtr does not route a {cls.__name__} by default: {UNSUPPORTED[cls.__name__]}")
    return family_spec(model, FAMILIES)
