"""DiT-style transformers: this project's reference DiT and facebookresearch/DiT code.

Residual placement on every ``blocks.N`` (not the final layer): each block's stream is its first argument
``x`` and its output (``BlockIO()``).  The timestep is the model's argument ``t``; ``forward_with_cfg`` (ours
calls ``self(...)``, DiT's original calls ``self.forward``) routes too, since routing sees direct
``forward`` calls of the model.
"""

from __future__ import annotations

from torch import nn

from ..spec import RoutingSpec


def dit_spec(model: nn.Module) -> RoutingSpec | None:
    """Recognise a DiT by its parts (``x_embedder``, ``t_embedder``, ``blocks``, ``final_layer``)."""
    parts = ("x_embedder", "t_embedder", "blocks", "final_layer")
    if not all(hasattr(model, p) for p in parts) or not isinstance(model.blocks, nn.ModuleList):
        return None
    if type(model).__module__.startswith("diffusers."):  # diffusers' classes have adapters of their own
        return None
    return RoutingSpec(
        blocks=tuple(f"blocks.{i}" for i in range(len(model.blocks))),
        placement="residual",
        timestep_arg="t",
        timestep_kind="index",
        adapter="DiT",
    )
