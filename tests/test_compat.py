"""Loading checkpoints of the paper's code: its per-block mask tables must be ours, channel for channel."""

import numpy as np
import pytest
import torch
from helpers import DiT

import dtr
from dtr.paper import convert_paper_state_dict


def paper_tables(T, C, beta, alpha, method="DTR"):
    """The paper code's create_mask_tasks, written out (float tables, a loop over tasks)."""
    table = torch.zeros(T, C)
    n = int(C * beta)
    if method == "DTR":
        index = np.round(np.linspace(0, 1, T) ** alpha * (C - n)).astype(np.int64)
        for t in range(T):
            table[t, index[t] : index[t] + n] = 1
    else:
        order = np.random.default_rng(0).random((T, C)).argsort(1)[:, :n]
        table[np.arange(T)[:, None], order] = 1
    return table


def paper_state_dict(model, beta, alpha=4.0, method="DTR"):
    sd = dict(model.state_dict())
    for i in range(len(model.blocks)):
        sd[f"blocks.{i}.routing._unit_mapping"] = paper_tables(1000, 32, beta, alpha, method)
    return sd


@pytest.mark.parametrize("beta", [0.8, 0.5, 0.9, 0.7])
def test_paper_checkpoint_loads_and_routes_the_same(beta):
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    weights, kwargs = convert_paper_state_dict(paper_state_dict(model, beta))
    assert kwargs == dict(sharing_ratio=beta, alpha=4.0, num_tasks=1000, method="dtr")
    fresh = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    fresh.load_state_dict(weights, strict=True)
    routing = dtr.wrap(fresh, **kwargs)
    assert torch.equal(routing.masks(32).float(), paper_tables(1000, 32, beta, 4.0))


def test_paper_checkpoint_with_other_alpha_or_random_masks_is_refused():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match="pass the alpha it was trained with"):
        convert_paper_state_dict(paper_state_dict(model, 0.5, alpha=2.0))
    _, kwargs = convert_paper_state_dict(paper_state_dict(model, 0.5, alpha=2.0), alpha=2.0)
    assert kwargs["alpha"] == 2.0
    with pytest.raises(ValueError, match="not the DTR mask table"):
        convert_paper_state_dict(paper_state_dict(model, 0.8, method="random"))


def test_plain_state_dict_passes_through():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    weights, kwargs = convert_paper_state_dict(model.state_dict())
    assert kwargs == {} and weights.keys() == model.state_dict().keys()
