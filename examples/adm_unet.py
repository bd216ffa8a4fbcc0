"""A compact ADM-style U-Net (Dhariwal & Nichol, 2021), the paper's U-Net baseline, written for this project.

It keeps guided-diffusion's module layout, which is what ``dtr``'s ADM adapter recognises:
``input_blocks`` / ``middle_block`` / ``output_blocks`` of timestep-aware sequences, ``ResBlock`` with
``in_layers``, ``emb_layers`` and ``out_layers`` = (GroupNorm, SiLU, Dropout, zero-initialised conv), and
``AttentionBlock`` = (norm, qkv, attention, zero-initialised proj_out).  DTR gates ``out_layers[0]`` and
``AttentionBlock.norm``:

    model = ADMUNet(image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2), num_classes=10)
    dtr.wrap(model, sharing_ratio=0.8)
    eps = model(x, t, y)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: each residual branch starts as the identity (ADM's output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """Marker for blocks whose forward is ``forward(x, emb)``: they also take the timestep (and class) embedding."""


class TimestepSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that passes the embedding to the blocks that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """x + out_layers(in_layers(x) (+) emb); with scale-shift norm, GroupNorm(h) * (1 + scale) + shift."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        groups: int = 32,
        use_scale_shift_norm: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: x + proj_out(attention(qkv(norm(x)))), over the H * W positions."""

    def __init__(self, channels: int, num_heads: int = 4, groups: int = 32):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x.reshape(b, c, -1)))  # (B, 3C, L)
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, -1).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, C / heads)
        h = self.proj_out(h.transpose(-1, -2).reshape(b, c, -1))
        return x + h.reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ADMUNet(nn.Module):
    """ADM U-Net: ``num_res_blocks`` ResBlocks per resolution, attention at the downsampling rates in
    ``attention_ds`` (1 = full resolution), optional class conditioning, optional gradient checkpointing.

    ``forward(x, timesteps, y=None)``: timesteps (B,) in [0, T) (fractional values are fine).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        model_channels: int = 64,
        out_channels: int | None = None,
        num_res_blocks: int = 2,
        attention_ds: tuple = (2, 4),
        channel_mult: tuple = (1, 2, 2),
        dropout: float = 0.0,
        num_classes: int | None = None,
        num_heads: int = 4,
        groups: int = 32,
        use_scale_shift_norm: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.out_channels = out_channels or in_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.use_checkpoint = use_checkpoint
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None

        def res(c_in, c_out):
            return ResBlock(c_in, emb_dim, c_out, dropout, groups, use_scale_shift_norm)

        ch, ds = model_channels, 1
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads, groups))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), AttentionBlock(ch, num_heads, groups), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads, groups))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )

    def run(self, block: TimestepSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Run one block, recomputed in backward when ``use_checkpoint`` (non-reentrant: routing-safe)."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this ADMUNet is class-conditional: pass y (B,) class labels")
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = self.run(block, h, emb)
            hs.append(h)
        h = self.run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self.run(block, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
