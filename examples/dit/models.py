"""DiT: Diffusion Transformers (Peebles & Xie, ICCV 2023), written for this project.

The module layout, parameter names, shapes and initialisation follow
facebookresearch/DiT's ``models.py``, so its released checkpoints (and checkpoints
trained by the DTR paper's code, which adds no parameters) load with
``strict=True``. The timm building blocks DiT imports (PatchEmbed, Attention, Mlp)
are written here with the same parameter names, so timm is not needed.

Two things matter for routing (``dtr.wrap``; how it routes: docs/concepts.md):

- every block is called as a module (``block(x, c)``), also under gradient
  checkpointing, and the timestep enters through ``self.t_embedder(t)``;
- ``forward_with_cfg`` runs the model through ``self(...)``, so the guided path
  is routed by its timesteps too.
"""

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    """adaLN modulation of tokens x (N, T, D) by per-sample shift and scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Transformer Building Blocks (timm-compatible names)           #
#################################################################################


class PatchEmbed(nn.Module):
    """
    Cuts an image into non-overlapping p x p patches and projects each to a token.
    A stride-p convolution named ``proj`` (as in timm), tokens in row-major patch order.
    """

    def __init__(self, img_size=32, patch_size=2, in_chans=4, embed_dim=1152, bias=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input of spatial size {tuple(x.shape[-2:])}, the model expects {self.img_size}")
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class Attention(nn.Module):
    """
    Multi-head self-attention with a fused qkv projection, as timm's Attention.
    The qkv output is laid out as (3, heads, head_dim), which checkpoints rely on.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "n t (qkv h d) -> qkv n h t d", qkv=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))


class Mlp(nn.Module):
    """
    Two-layer feed-forward network with the tanh approximation of GELU (as DiT).
    """

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """
    Embeds scalar (possibly fractional) timesteps into vector representations:
    a fixed sinusoidal embedding followed by a two-layer SiLU MLP.
    """

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """
        Sinusoidal embedding (N,) -> (N, dim): [cos(t * f_k), sin(t * f_k)] with
        f_k = max_period ** (-k / half), k = 0 .. half - 1; a zero column pads odd dim.
        Computed in float32, as DiT does, so trained weights see the same features.
        """
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Match the MLP's dtype so a model cast to half precision runs without autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """
    Embeds class labels into vectors. With dropout_prob > 0 the table has one
    extra row, the null class (index num_classes), used for classifier-free guidance.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replaces labels by the null class: at random while training, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """
    A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning:
    attention and MLP residual branches, each modulated and gated by c.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """
    The final layer of DiT: adaLN-modulated norm, then a linear map to patch pixels.
    """

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """
    Diffusion model with a Transformer backbone.

    gradient_checkpointing: when True (constructor flag or attribute) and training,
    each block's activations are recomputed in the backward pass.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        gradient_checkpointing=False,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # A single-class (unconditional) model has nothing to guide: no null class (as the DTR code).
        class_dropout_prob = 0.0 if num_classes == 1 else class_dropout_prob
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos embedding, kept as a frozen parameter so checkpoints carry it (as DiT's do).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation; zero adaLN and output layers make a fresh model output zero."""

        # Transformer linears: xavier uniform weights, zero biases.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Fixed sin-cos position embedding.
        grid_size = self.x_embedder.grid_size[0]
        pos_embed = torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)).float()
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0).to(self.pos_embed.device))

        # Patch embedding like an nn.Linear over the flattened patch (its bias keeps Conv2d's default, as in DiT).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # Label table and timestep MLP: normal(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero output layers.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """
        x: (N, T, p * p * C) tokens, each laid out (p, p, C) -> imgs: (N, C, H, W).
        """
        h, w = self.x_embedder.grid_size
        if x.shape[1] != h * w:
            raise ValueError(f"expected {h * w} tokens, got {x.shape[1]}")
        p = self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=p, q=p)

    def run_block(self, block, x, c):
        """One block, called as a module (so that routing sees it), checkpointed if asked while training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def forward(self, x, t, y):
        """
        Forward pass of DiT.
        x: (N, C, H, W) tensor of spatial inputs (images or latent representations of images)
        t: (N,) tensor of diffusion timesteps (may be fractional)
        y: (N,) tensor of class labels (num_classes is the null class)
        """
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = self.run_block(block, x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        x = self.unpatchify(x)  # (N, out_channels, H, W)
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        """
        Forward pass with classifier-free guidance, batched in one model call.

        The batch is [conditional half; unconditional half]: y's second half holds the
        null class. As in DiT, the first half of x is used for both halves (the sampler
        keeps the two halves equal anyway), the model runs once through ``self(...)``,
        and the first ``guide_channels`` output channels of both halves become
        uncond + cfg_scale * (cond - uncond). The other channels (the learned variance)
        are left as the model output them, per half.

        guide_channels: None guides all ``in_channels`` (the standard choice, and what
        the DTR paper's code does); 3 reproduces DiT's released sampling exactly.
        """
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {len(x)}")
        if guide_channels is None:
            guide_channels = self.in_channels
        if not 0 <= guide_channels <= self.out_channels:
            raise ValueError(f"guide_channels must be in [0, {self.out_channels}], got {guide_channels}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y)
        eps, rest = model_out[:, :guide_channels], model_out[:, guide_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim, pos):
    """
    pos: (M,) positions -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)],
    w_k = 10000 ** (-k / (embed_dim / 2)), k = 0 .. embed_dim / 2 - 1.
    """
    assert embed_dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """
    (grid_size ** 2, embed_dim) embedding of a square grid, tokens in row-major order.
    As in MAE/DiT, the first half of the channels encodes the column (x) coordinate and
    the second half the row (y) coordinate.
    """
    assert embed_dim % 2 == 0
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))
    return np.concatenate([emb_col, emb_row], axis=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################


def _size(depth, hidden_size, num_heads, patch_size):
    """DiT with one size fixed: DiT_models[name](input_size=..., num_classes=...); .keywords holds the size."""
    return functools.partial(DiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)


# facebookresearch/DiT's twelve sizes, and DiT-T (depth 4, width 64): a toy size for CPU runs.
DiT_models = {
    "DiT-XL/2": _size(28, 1152, 16, 2),
    "DiT-XL/4": _size(28, 1152, 16, 4),
    "DiT-XL/8": _size(28, 1152, 16, 8),
    "DiT-L/2": _size(24, 1024, 16, 2),
    "DiT-L/4": _size(24, 1024, 16, 4),
    "DiT-L/8": _size(24, 1024, 16, 8),
    "DiT-B/2": _size(12, 768, 12, 2),
    "DiT-B/4": _size(12, 768, 12, 4),
    "DiT-B/8": _size(12, 768, 12, 8),
    "DiT-S/2": _size(12, 384, 6, 2),
    "DiT-S/4": _size(12, 384, 6, 4),
    "DiT-S/8": _size(12, 384, 6, 8),
    "DiT-T/1": _size(4, 64, 4, 1),
    "DiT-T/2": _size(4, 64, 4, 2),
    "DiT-T/4": _size(4, 64, 4, 4),
}
