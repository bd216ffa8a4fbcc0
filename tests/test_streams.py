"""Declared streams that are not simply a block's input: joined [text; image] sequences (``BlockIO.joined``,
``valid``, ``RoutingSpec.image_tokens``) and streams that start at a child module (``BlockIO.source``).

Plain torch models (no diffusers), each against the formula written out here: a joined block sees
``cat(text, m * image)`` and adds ``(1 - m) * image`` to its image rows only; a block computing ``h + F(h)`` on its
child's output h gives ``h + F(m * h)``.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import dtr
from dtr import BlockIO, ImageTokens, RoutingSpec

T, C = 1000, 16


def window(tasks: torch.Tensor, channels: int = C, ratio: float = 0.8, alpha: float = 4.0) -> torch.Tensor:
    """The paper's window masks of `tasks` (any shape) as float rows (..., C)."""
    c_b = int(channels * ratio)
    start = torch.from_numpy(np.round(np.linspace(0, 1, T) ** alpha * (channels - c_b)).astype(np.int64))[tasks]
    c = torch.arange(channels)
    return ((c >= start[..., None]) & (c < start[..., None] + c_b)).float()


class Block(nn.Module):
    """x + F(x) on (B, L, C); an optional `mask` (B, L) bool argument lets the attention skip padding."""

    def __init__(self):
        super().__init__()
        self.norm, self.mix, self.mlp = nn.LayerNorm(C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x, mask=None):
        weights = torch.softmax(self.mix(self.norm(x)) @ x.transpose(1, 2) / 4, -1)
        if mask is not None:
            weights = weights * mask[:, None, :]
        return x + weights @ self.mlp(x)


class Joined(nn.Module):
    """A single-stream model: text (B, L, C) and image tokens (B, N, C) joined per sample as [text_i; image; pad]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t_embed = nn.Embedding(T, C)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, image, text, timestep, text_lengths=None):
        b, n, _ = image.shape
        lengths = text_lengths if text_lengths is not None else torch.full((b,), text.shape[1])
        total = int(lengths.max()) + n
        h = image.new_zeros(b, total, C)
        for i in range(b):
            h[i, : lengths[i]] = text[i, : lengths[i]]
            h[i, lengths[i] : lengths[i] + n] = image[i]
        h = h + self.t_embed(timestep if timestep.ndim == 1 else timestep[:, 0])[:, None]
        valid = torch.arange(total)[None] < (lengths + n)[:, None]
        for block in self.blocks:
            h = block(h, valid if text_lengths is not None else None)
        return torch.stack([h[i, lengths[i] : lengths[i] + n] for i in range(b)])


class Skip(nn.Module):
    """A block that merges a long skip first when it has `merge`: h = merge(cat(x, skip)), then h + F(h)."""

    def __init__(self, merge: bool):
        super().__init__()
        self.merge = nn.Linear(2 * C, C) if merge else None
        self.mlp = nn.Linear(C, C)

    def forward(self, x, skip=None):
        h = self.merge(torch.cat([x, skip], -1)) if self.merge is not None else x
        return h + self.mlp(torch.tanh(h))


class UViT(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t_embed = nn.Embedding(T, C)
        self.blocks = nn.ModuleList([Skip(False), Skip(False), Skip(True)])

    def forward(self, x, t):
        x = x + self.t_embed(t)[:, None]
        first = self.blocks[0](x)
        return self.blocks[2](self.blocks[1](first), skip=first)


def joined_spec(model):
    if not isinstance(model, Joined):
        return None
    return RoutingSpec(
        blocks=("blocks.0", "blocks.1"),
        io={"Block": BlockIO("x", joined=True, valid="mask")},
        timestep_arg="timestep",
        image_tokens=ImageTokens("image"),
        adapter="joined toy",
    )


def skip_spec(model):
    if not isinstance(model, UViT):
        return None
    return RoutingSpec(
        blocks=("blocks.0", "blocks.1", "blocks.2"),
        io={"Skip": BlockIO("x", source="merge")},
        timestep_arg="t",
        adapter="uvit toy",
    )


@pytest.fixture(autouse=True, scope="module")
def toy_adapters():
    for adapter in (joined_spec, skip_spec):
        dtr.register_adapter(adapter)
    yield
    for adapter in (joined_spec, skip_spec):
        dtr.adapters._adapters.remove(adapter)


# ---- joined [text; image] streams


def joined_reference(plain, image, text, t, lengths, padded):
    """Joined.forward with its blocks routed by hand: image rows of sample i, [text_i, text_i + N), see m * h and
    get (1 - m) * h back; text rows (and padding) pass through each block unmasked."""
    b, n, _ = image.shape
    total = int(lengths.max()) + n
    h = torch.zeros(b, total, C)
    for i in range(b):
        h[i, : lengths[i]], h[i, lengths[i] : lengths[i] + n] = text[i, : lengths[i]], image[i]
    h = h + plain.t_embed(t)[:, None]
    j = torch.arange(total)[None]
    valid = j < (lengths + n)[:, None]
    rows = (j >= lengths[:, None]) & valid
    m = torch.where(rows[..., None], window(t)[:, None, :], torch.ones(1))
    for block in plain.blocks:
        h = block(m * h, valid if padded else None) + (1 - m) * h
    return torch.stack([h[i, lengths[i] : lengths[i] + n] for i in range(b)])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    tasks=st.lists(st.integers(0, T - 1), min_size=3, max_size=3),
)
def test_a_joined_stream_routes_each_samples_image_tokens_only(lengths, tasks):
    model = Joined()
    plain = copy.deepcopy(model)
    dtr.wrap(model)
    image, text = torch.randn(3, 4, C), torch.randn(3, 5, C)
    t, lengths = torch.tensor(tasks), torch.tensor(lengths)
    padded = bool((lengths != 5).any())
    with torch.no_grad():
        got = model(image, text, t, lengths if padded else None)
        want = joined_reference(plain, image, text, t, lengths, padded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_joined_stream_at_ratio_one_is_the_unrouted_model_and_text_rows_are_the_blocks_own():
    model, image, text, t = Joined(), torch.randn(2, 4, C), torch.randn(2, 5, C), torch.tensor([900, 3])
    with torch.no_grad():
        plain = model(image, text, t)
        dtr.wrap(model, sharing_ratio=1.0)
        assert torch.equal(model(image, text, t), plain)
        dtr.unwrap(model)
        routing = dtr.wrap(model)
        seen, inside = [], []
        model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
        model.blocks[0].norm.register_forward_pre_hook(lambda mod, args: inside.append(args[0]))
        routed = model(image, text, t)
    assert not torch.allclose(routed, plain, atol=1e-3)
    ((x, out),) = seen  # the block's hook: the stream as the model passed it, and as it passes it on
    (inner,) = inside  # what the block's own layers receive: text rows untouched, image rows masked
    h = torch.cat([text, image], 1) + model.t_embed(t)[:, None]
    m = torch.cat([torch.ones(2, 5, C), window(t)[:, None, :].expand(2, 4, C)], 1)
    assert torch.equal(x, h) and torch.equal(inner[:, :5], h[:, :5])
    torch.testing.assert_close(inner[:, 5:], window(t)[:, None, :] * h[:, 5:])
    with torch.no_grad():
        torch.testing.assert_close(out, Block.forward(model.blocks[0], m * h) + (1 - m) * h)
    assert "joined [text; image] (image tokens routed, valid tokens 'mask')" in routing.summary()
    assert "image tokens of joined streams: counted from argument 'image'" in routing.summary()


def test_joined_streams_are_refused_where_they_cannot_be_routed():
    model = Joined()
    dtr.adapters._adapters.remove(joined_spec)
    try:  # no adapter: the image token count cannot be declared through wrap's arguments
        with pytest.raises(ValueError, match="'blocks.0' is declared joined .* set RoutingSpec.image_tokens"):
            dtr.wrap(model, blocks=r"blocks\.\d", block_io=BlockIO("x", joined=True), timestep_arg="timestep")
    finally:
        dtr.register_adapter(joined_spec)
    with pytest.raises(ValueError, match="needs placement='residual'"):
        dtr.wrap(model, placement="gate")
    assert dtr.routing_of(model) is None
    dtr.wrap(model)
    with pytest.raises(ValueError, match=r"per-token timesteps \(2, 9\) cannot route 'blocks.0'"):
        model(torch.randn(2, 4, C), torch.randn(2, 5, C), torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match="counts the image tokens of a joined stream from argument 'image', which is "
        r"of shape \(2,\); it must be \(batch, tokens, ...\)",
    ):
        model(torch.randn(2), torch.randn(2, 5, C), torch.tensor([1, 2]))


def test_block_io_and_image_tokens_check_their_fields():
    with pytest.raises(ValueError, match="valid marks the valid tokens of a joined stream: it needs joined=True"):
        BlockIO("x", valid="mask")
    with pytest.raises(TypeError, match="BlockIO.joined must be True or False"):
        BlockIO("x", joined=1)
    with pytest.raises(TypeError, match="BlockIO.source must be the name of a child module"):
        BlockIO("x", source="")
    assert ImageTokens("x").count(torch.zeros(2, 7, 3)) == 7
    assert ImageTokens("x", (2, 2)).count(torch.zeros(2, 4, 8, 6)) == 12
    assert ImageTokens("x", (1, 2, 2)).count(torch.zeros(2, 4, 3, 8, 6)) == 36
    with pytest.raises(
        ValueError,
        match=r"argument 'x', which is of shape \(2, 4, 8\); it must be \(batch, channels, "
        r"2 grid axes\)",
    ):
        ImageTokens("x", (2, 2)).count(torch.zeros(2, 4, 8))
    assert BlockIO("x", joined=True, valid="m", source="s").to_dict() == dict(
        input="x", output=None, channel_axis=None, joined=True, valid="m", source="s"
    )


# ---- a stream that starts at a child module: h + F(m * h)


def skip_reference(model, x, t, ratio=0.8):
    """Routed UViT written out: blocks 0 and 1 as block(m * x) + (1 - m) * x, block 2 as h + F(m * h)."""
    m = window(t, ratio=ratio)[:, None, :]
    x = x + model.t_embed(t)[:, None]
    b0, b1, b2 = model.blocks
    first = b0(m * x) + (1 - m) * x
    second = b1(m * first) + (1 - m) * first
    h = b2.merge(torch.cat([second, first], -1))
    return m * h + b2.mlp(torch.tanh(m * h)) + (1 - m) * h


def _grads(model, fn):
    model.zero_grad()
    out = fn()
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_a_stream_from_a_child_routes_the_residual_the_block_has():
    x, t = torch.randn(3, 5, C), torch.tensor([999, 400, 0])
    model = UViT()
    plain = _grads(model, lambda: model(x, t))
    dtr.wrap(model, sharing_ratio=1.0)
    one = _grads(model, lambda: model(x, t))
    assert torch.equal(one[0], plain[0])
    # blocks.0's output feeds blocks.1 and the long skip: its three gradient terms are summed in another order
    # once blocks.1 is routed (the block's two terms first), so gradients agree to that sum's rounding
    for a, b in zip(one[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    dtr.unwrap(model)
    reference = copy.deepcopy(model)
    routing = dtr.wrap(model)
    assert [r.name for r in routing.routed] == ["blocks.0", "blocks.1", "blocks.2"]
    got, want = _grads(model, lambda: model(x, t)), _grads(reference, lambda: skip_reference(reference, x, t))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)
    # the child called on its own (outside its block's routed call) is the plain module
    z = torch.randn(2, 2 * C)
    assert torch.equal(model.blocks[2].merge(z), reference.blocks[2].merge(z))
    assert "stream from 'merge' where present" in routing.summary()


def test_a_stream_from_a_child_under_checkpointing_copies_wrappers_and_no_grad():
    x, t = torch.randn(2, 5, C), torch.tensor([700, 50])
    model = UViT()
    reference = copy.deepcopy(model)
    dtr.wrap(model)
    want = _grads(reference, lambda: skip_reference(reference, x, t))

    class Checkpointed(nn.Module):  # a wrapper put around the routed block after wrap, as checkpoint_wrapper does
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)

    ema = copy.deepcopy(model)
    model.blocks[2] = Checkpointed(model.blocks[2])
    got = _grads(model, lambda: model(x, t))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(ema(x, t), want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x, t), want[0], rtol=1e-5, atol=1e-6)
