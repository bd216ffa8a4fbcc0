"""diffusers transformers with a text stream beside the image stream (MMDiT and relatives).

Dual-stream blocks take ``hidden_states`` (image) and ``encoder_hidden_states`` (text) and return both, image
second (SD3, Flux, AuraFlow, Chroma) or first (CogVideoX, CogView4, Mochi): the image stream is routed as DiT's
residual, the text stream goes in and comes out as the block computes it.  Single-stream blocks that run on the
joined [text; image] sequence (AuraFlow, Chroma, Lumina 2, and Flux before diffusers 0.35) route only its image
tokens, the same routing as Flux's single blocks, which take the two streams apart.  The text is one prompt
for every task: a task's pathway is the image stream's channels.
"""

from __future__ import annotations

from torch import nn

from ..spec import BlockIO, RoutingSpec
from .diffusers import Family, family_spec

IMAGE_FIRST = BlockIO("hidden_states", output=0)  # returns (hidden_states, encoder_hidden_states)
IMAGE_SECOND = BlockIO("hidden_states", output=1)  # returns (encoder_hidden_states, hidden_states)
JOINED = BlockIO("hidden_states", joined=True)  # one [text; image] tensor in and out

FAMILIES = {
    "SD3Transformer2DModel": Family(
        (r"transformer_blocks\.\d+",), {"JointTransformerBlock": IMAGE_SECOND}, "index", "StableDiffusion3Pipeline"
    ),
    "FluxTransformer2DModel": Family(
        (r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"),
        {"FluxTransformerBlock": IMAGE_SECOND, "FluxSingleTransformerBlock": IMAGE_SECOND},
        "unit",
        "FluxPipeline",
        image_tokens="tokens",
        older={"FluxSingleTransformerBlock": ("encoder_hidden_states", JOINED)},
    ),
    "AuraFlowTransformer2DModel": Family(
        (r"joint_transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"),
        {"AuraFlowJointTransformerBlock": IMAGE_SECOND, "AuraFlowSingleTransformerBlock": JOINED},
        "unit",
        "AuraFlowPipeline",
        image_tokens="latents",
    ),
    "ChromaTransformer2DModel": Family(
        (r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"),
        {"ChromaTransformerBlock": IMAGE_SECOND, "ChromaSingleTransformerBlock": JOINED},
        "unit",
        "ChromaPipeline",
        image_tokens="tokens",
    ),
    "Lumina2Transformer2DModel": Family(
        (r"noise_refiner\.\d+", r"layers\.\d+"),
        # noise_refiner runs on the image tokens alone, layers on [caption; image] padded per sample
        {"Lumina2TransformerBlock": BlockIO("hidden_states", joined=True, valid="attention_mask")},
        "unit_reversed",
        "Lumina2Pipeline",
        image_tokens="latents",
    ),
    "CogVideoXTransformer3DModel": Family(
        (r"transformer_blocks\.\d+",), {"CogVideoXBlock": IMAGE_FIRST}, "index", "CogVideoXPipeline"
    ),
    "CogView4Transformer2DModel": Family(
        (r"transformer_blocks\.\d+",), {"CogView4TransformerBlock": IMAGE_FIRST}, "index", "CogView4Pipeline"
    ),
    "MochiTransformer3DModel": Family(
        (r"transformer_blocks\.\d+",), {"MochiTransformerBlock": IMAGE_FIRST}, "index_reversed", "MochiPipeline"
    ),
}


def diffusers_mmdit_spec(model: nn.Module) -> RoutingSpec | None:
    """A diffusers transformer with text and image streams (``FAMILIES``): the image stream routed."""
    return family_spec(model, FAMILIES)
