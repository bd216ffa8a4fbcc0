"""What the library's tests share: a small DiT of their own (the recipe's lives in examples/dit), tiny diffusers
models, the routing formulas written out on plain tensors, and hand-built routed references.

Everything here is independent of dtr's router: references call the unrouted classes' own ``forward`` and mask
with rows of ``dtr.task_masks`` (whose values tests/test_masks.py checks against the paper's formula).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import dtr

T = 1000
INDEX_T = torch.tensor([0, 999, 500, 37])


def diffusers_0_42():
    """A pytest mark for tests of diffusers features and layouts declared against diffusers 0.42 (hook registries,
    modular pipelines, Flux's two-stream single blocks): the lowest CI, on diffusers 0.33, skips them."""
    import diffusers
    import pytest

    version = tuple(int(v) for v in diffusers.__version__.split(".")[:2])
    return pytest.mark.skipif(version < (0, 42), reason=f"declared against diffusers 0.42 ({diffusers.__version__})")


#################################################################################
#                         A small DiT (facebookresearch/DiT's layout)           #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t, then an MLP."""

    def __init__(self, width: int, features: int = 32):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.reshape(-1)[:, None].float() * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], -1).to(dtype))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g1 * attn(mod(norm(x))), then x + g2 * mlp(mod(norm(x)))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attn(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)  # forward AD works here
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiT(nn.Module):
    """Class-conditional DiT: patchify, blocks conditioned on t + y, final layer, unpatchify (learned sigma)."""

    def __init__(
        self,
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=3,
        num_heads=4,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=10,
    ):
        super().__init__()
        self.patch_size, self.in_channels, self.out_channels = patch_size, in_channels, 2 * in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.gradient_checkpointing = False
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        tokens = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, hidden_size) * 0.1, requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # the last row: the null class (CFG)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def embed(self, x, t, y):
        """Tokens (B, N, C) and conditioning (B, C); in training, labels drop to the null class at random."""
        if self.training and self.class_dropout_prob > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.class_dropout_prob, self.num_classes, y)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        return h, self.t_embedder(t, h.dtype) + self.y_embedder(y)

    def unpatchify(self, h):
        b, n, _ = h.shape
        s, p = int(n**0.5), self.patch_size
        h = h.reshape(b, s, s, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.out_channels, s * p, s * p)

    def run_block(self, block, h, c):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, c, use_reentrant=False)
        return block(h, c)

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = self.run_block(block, h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """facebookresearch/DiT's guidance: both halves in one batch, through ``self.forward`` (not ``self(...)``)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def perturbed(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Random non-zero weights everywhere, so that zero-initialised layers do not hide routing; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_dit(seed: int = 0, depth: int = 3, **kw) -> DiT:
    torch.manual_seed(seed)
    return perturbed(DiT(depth=depth, **kw), seed)


def steady_dit(seed: int = 0, depth: int = 2) -> DiT:
    """tiny_dit with the label dropout off, so a train-mode call is a function of its inputs (gradients compare)."""
    model = tiny_dit(seed, depth=depth)
    model.class_dropout_prob = 0.0
    return model


def inputs(batch: int = 6, seed: int = 1, t: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([0, 999, 500, 37, 250, 998][:batch]) if t is None else t
    return x, t, torch.randint(0, 10, (batch,), generator=g)


def dtr_masks(model: DiT, ratio: float = 0.8, alpha: float = 4.0, method: str = "dtr", seed: int = 0, num_tasks=T):
    """The (T, C) table of each block: one table for dtr, one draw per block for random routing."""
    width = model.pos_embed.shape[-1]
    return [dtr.task_masks(num_tasks, width, ratio, alpha, method, seed, block=i) for i in range(len(model.blocks))]


def reference_forward(model: DiT, x, t, y, masks_per_block, tasks=None):
    """The DiT forward written out with block(m*x) + (1-m)*x, each sample using the mask row of its own task."""
    h, c = DiT.embed(model, x, t, y)
    tasks = t if tasks is None else tasks
    for i, block in enumerate(model.blocks):
        m = masks_per_block[i][tasks].to(h.dtype)[:, None, :]  # (B, 1, C)
        h = DiTBlock.forward(block, m * h, c) + (1 - m) * h  # the unrouted class's forward
    return model.unpatchify(FinalLayer.forward(model.final_layer, h, c))


def grads(model: nn.Module, loss_fn) -> dict:
    """Parameter gradients of ``loss_fn()`` (zeroed first)."""
    model.zero_grad()
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n, **tol)


def join_group(rank: int, world: int, rendezvous: str) -> None:
    """Join a gloo process group met through a file (a free TCP port picked by one test could be taken by another
    running beside it under pytest-xdist before its workers bind it)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def untouched(model: nn.Module) -> bool:
    """No trace of routing: no behaviour, no forward of dtr's (nor anything of dtr's) in an instance dict, no hook."""
    return all(
        not (m._forward_hooks or m._forward_pre_hooks)
        and not any(k.startswith("_dtr") for k in m.__dict__)
        and not any(type(v).__module__.startswith("dtr.") for v in m.__dict__.values())
        for m in model.modules()
    )


#################################################################################
#                 Blocks that own their weight (parametrize tests)              #
#################################################################################


class Symmetric(nn.Module):
    """A parametrization: the symmetric part of a square weight."""

    def forward(self, w):
        return (w + w.T) / 2


class OwnWeight(nn.Module):
    """A residual block owning its weight directly, so parametrize swaps the block's own class."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16) * 0.3)

    def forward(self, x):
        return x + torch.tanh(x @ self.weight.T)


class Stack(nn.Module):
    """Two OwnWeight blocks on (B, N, 16) tokens; the timestep is ``t``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([OwnWeight(), OwnWeight()])

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x)
        return x


#################################################################################
#                  Hand-built routed references of any model                    #
#################################################################################


class Swap(nn.Module):
    """Stands in for a module: same attributes (the model may read them), routed forward."""

    def __init__(self, inner, rows):
        super().__init__()
        self.inner, self.rows = inner, rows

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class Gated(Swap):
    """m * module(...): the ADM placement, mask rows (B, C) on channel axis 1."""

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out * self.rows.view(*self.rows.shape, *([1] * (out.ndim - 2))).to(out.dtype)


class Residual(Swap):
    """module(m * x) + (1 - m) * x: the transformer placement, mask rows (B, C) on the last axis."""

    def forward(self, x, *args, **kwargs):
        m = self.rows.to(x.dtype)[:, None, :]
        return self.inner(m * x, *args, **kwargs) + (1 - m) * x


def width_of(module: nn.Module, placement: str) -> int:
    if placement == "gate":
        return module.num_channels
    return next(m.normalized_shape[0] for m in module.modules() if isinstance(m, nn.LayerNorm))


def reference(model, names, placement, tasks, ratio=0.8, alpha=4.0):
    """A copy of the (unwrapped) model with each routed module replaced by its hand-written routed version."""
    ref = copy.deepcopy(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        inner = getattr(parent, attr)
        rows = dtr.task_masks(T, width_of(inner, placement), ratio, alpha)[tasks]
        setattr(parent, attr, (Gated if placement == "gate" else Residual)(inner, rows))
    return ref


#################################################################################
#                         Tiny diffusers models and calls                       #
#################################################################################


def unet2d(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return perturbed(
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=8,
        ),
        seed,
        0.1,
    )


def unet_cond(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturbed(
        UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=4,
            cross_attention_dim=12,
            attention_head_dim=4,
        ),
        seed,
        0.1,
    )


def diffusers_dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return perturbed(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        seed,
        0.1,
    )


def unet2d_call(model, t=INDEX_T, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(batch, 1, 8, 8, generator=g), t).sample


def unet_cond_call(model, t, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 3, 12, generator=g)
    return model(x, t, encoder_hidden_states=ctx).sample


def dit_call(model, t=INDEX_T, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model(x, timestep=t, class_labels=y).sample


def gate_names_unet(model):
    """Written out independently of the adapter: ResnetBlock2D.norm2, Attention.group_norm, Transformer2DModel.norm."""
    names = []
    for n, m in model.named_modules():
        kind = type(m).__name__
        if kind == "ResnetBlock2D":
            names.append(f"{n}.norm2")
        elif kind == "Attention" and m.group_norm is not None:
            names.append(f"{n}.group_norm")
        elif kind == "Transformer2DModel":
            names.append(f"{n}.norm")
    return names
