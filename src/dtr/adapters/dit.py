"""DiT-style transformers: this project's reference DiT and facebookresearch/DiT code.

Residual placement on every ``blocks.N`` (not the final layer).  The timestep is read where
it enters the model, the first argument of ``t_embedder``: DiT's original ``forward_with_cfg``
calls ``self.forward`` directly, so hooks on the model itself would not fire there.
"""

from __future__ import annotations

from torch import nn

from ..routing import RoutingSpec


def dit_spec(model: nn.Module) -> RoutingSpec | None:
    """Recognise a DiT by its parts (``x_embedder``, ``t_embedder``, ``blocks``, ``final_layer``)."""
    parts = ("x_embedder", "t_embedder", "blocks", "final_layer")
    if not all(hasattr(model, p) for p in parts) or not isinstance(model.blocks, nn.ModuleList):
        return None
    return RoutingSpec(
        blocks=[f"blocks.{i}" for i in range(len(model.blocks))],
        placement="residual",
        timestep_module="t_embedder",
        timestep_arg=(0, "t"),
        timestep_kind="index",
        exit_modules=["final_layer"],
        adapter="DiT",
    )
