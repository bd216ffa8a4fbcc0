"""Checkpoints of the paper's code: strip its per-block mask tables and check they are ours.

The official DTR code stores a (T, C) ``_unit_mapping`` buffer in every block
(``blocks.N.routing._unit_mapping``).  Our models carry no such state, so those keys are
removed; before that they are compared with ``dtr.task_masks`` so that a checkpoint is only
accepted with the routing arguments that reproduce its masks channel for channel.
"""

from __future__ import annotations

import re

import torch

from .masks import task_masks

_MASK_KEY = re.compile(r"(.*\.)?routing\._unit_mapping$")


def convert_paper_state_dict(state_dict: dict, alpha: float = 4.0) -> tuple[dict, dict]:
    """Split a paper-code state_dict into (model weights, ``dtr.wrap`` keyword arguments).

    Raises ValueError when the stored masks are not the DTR masks of any sharing ratio at this
    ``alpha`` (e.g. random routing, whose draw cannot be reproduced: route such a model with
    the stored tables by hand), or when blocks disagree.
    """
    tables = {k: v for k, v in state_dict.items() if _MASK_KEY.match(k)}
    weights = {k: v for k, v in state_dict.items() if k not in tables}
    if not tables:
        return weights, {}
    first_key, first = next(iter(tables.items()))
    T, C = first.shape
    c_b = int(first[0].sum().item())
    ratio = _ratio_for(c_b, C)
    expected = task_masks(T, C, ratio, alpha).to(first.dtype)
    for key, table in tables.items():
        if tuple(table.shape) != (T, C):
            raise ValueError(f"{key} has shape {tuple(table.shape)}, {first_key} has {(T, C)}: mixed widths")
        if not torch.equal(table.cpu(), expected):
            rows = (table.cpu() != expected).any(1).nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"{key} is not the DTR mask table for sharing_ratio={ratio}, alpha={alpha} "
                f"(first differing tasks: {rows}); pass the alpha it was trained with"
            )
    return weights, dict(sharing_ratio=ratio, alpha=alpha, num_tasks=T, method="dtr")


def _ratio_for(c_b: int, channels: int) -> float:
    """The shortest decimal sharing ratio r with int(channels * r) == c_b (what a config would say)."""
    for digits in range(1, 7):
        r = round(c_b / channels, digits)
        for cand in (r, round(r + 10**-digits, digits)):
            if 0 < cand <= 1 and int(channels * cand) == c_b:
                return cand
    return (c_b + 0.5) / channels
