"""Tests of the recipe's DiT (examples/dit/models.py): layout, numerics, guidance, checkpointing.

Reference values are written out here from facebookresearch/DiT's models.py (and the
timm blocks it imports), and recomputed with independent numpy / hand-written torch code.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import Attention, DiT, DiT_models, LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed

# ----------------------------------------------------------------------------------------
# helpers


def tiny_dit(**kwargs):
    """A DiT small enough for exact CPU checks: 8x8 input, patch 2 (16 tokens), width 32."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return DiT(**cfg)


def perturb_(model, scale=0.05, seed=0):
    """Adds noise to every parameter, so zero-initialised layers stop hiding the computation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def inputs(n=4, c=4, size=8, num_classes=10, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g, dtype=dtype)
    t = torch.tensor([0.0, 3.5, 17.0, 42.25, 9.0, 1.0, 30.0, 5.5][:n], dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


def np_timestep_embedding(t, dim, max_period=10000):
    """Closed form: [cos(t * max_period^(-k/half)), sin(...)], k < half; zero-padded if dim is odd."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
    args = np.asarray(t, dtype=np.float64)[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros((len(t), 1))], axis=1)
    return emb


def np_pos_embed(dim, grid):
    """Element by element: channel d < dim/2 encodes the column, d >= dim/2 the row; each half is
    [sin(pos * w_f) for f < dim/4, cos(pos * w_f) for f < dim/4] with w_f = 10000^(-f / (dim/4))."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for i in range(grid):  # row
        for j in range(grid):  # column
            for d in range(dim):
                pos = j if d < dim // 2 else i
                r = d % (dim // 2)
                f = r % quarter
                fn = np.sin if r < quarter else np.cos
                out[i * grid + j, d] = fn(pos / 10000 ** (f / quarter))
    return out


def patchify_loops(x, p):
    """(N, C, H, W) -> (N, T, C*p*p): patches in row-major order, each flattened as (C, p, p)."""
    n, c, h, w = x.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            rows.append(x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(n, -1))
    return torch.stack(rows, dim=1)


def unpatchify_loops(tokens, p, c):
    """(N, T, p*p*c), each token laid out (p, p, c) -> (N, c, H, W); inverse of DiT's final linear."""
    n, num, _ = tokens.shape
    g = int(round(num**0.5))
    out = torch.zeros(n, c, g * p, g * p, dtype=tokens.dtype)
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for b in range(p):
                    for ch in range(c):
                        out[:, ch, i * p + a, j * p + b] = tokens[:, i * g + j, (a * p + b) * c + ch]
    return out


def layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def silu(x):
    return x * torch.sigmoid(x)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def attention_by_hand(x, w_qkv, b_qkv, w_proj, b_proj, heads):
    """softmax(Q K^T / sqrt(d)) V per head, with qkv's output laid out as (3, heads, head_dim)."""
    n, t, d = x.shape
    dh = d // heads
    qkv = x @ w_qkv.T + b_qkv
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    q, k, v = (z.reshape(n, t, heads, dh).transpose(1, 2) for z in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, t, d)
    return out @ w_proj.T + b_proj


def reference_forward(model, x, t, y):
    """DiT's forward (eval mode) written out from the state_dict, independent of the module code."""
    sd = model.state_dict()
    p, c_out, heads = model.patch_size, model.out_channels, model.num_heads
    d = sd["pos_embed"].shape[-1]

    w = sd["x_embedder.proj.weight"]
    h = patchify_loops(x, p) @ w.reshape(d, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]

    t_freq = torch.from_numpy(np_timestep_embedding(t.double().numpy(), 256)).to(x.dtype)
    temb = silu(t_freq @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"])
    temb = temb @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    for i in range(len(model.blocks)):
        pre = f"blocks.{i}."
        mod = silu(c) @ sd[pre + "adaLN_modulation.1.weight"].T + sd[pre + "adaLN_modulation.1.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, k * d : (k + 1) * d, None].transpose(1, 2) for k in range(6))
        a = attention_by_hand(
            layer_norm(h) * (1 + sc1) + sh1,
            sd[pre + "attn.qkv.weight"],
            sd[pre + "attn.qkv.bias"],
            sd[pre + "attn.proj.weight"],
            sd[pre + "attn.proj.bias"],
            heads,
        )
        h = h + g1 * a
        z = layer_norm(h) * (1 + sc2) + sh2
        z = gelu_tanh(z @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        h = h + g2 * (z @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"])

    mod = silu(c) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    shift, scale = mod[:, None, :d], mod[:, None, d:]
    h = layer_norm(h) * (1 + scale) + shift
    h = h @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]
    return unpatchify_loops(h, p, c_out)


# ----------------------------------------------------------------------------------------
# layout: names, shapes, counts, configs


def expected_state_dict_shapes(depth=28, d=1152, p=2, in_ch=4, input_size=32, num_classes=1000):
    """facebookresearch/DiT's state_dict (timm PatchEmbed/Attention/Mlp, affine-free LayerNorms)."""
    out_ch = 2 * in_ch
    tokens = (input_size // p) ** 2
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, in_ch, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.linear.weight": (p * p * out_ch, d),
        "final_layer.linear.bias": (p * p * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        shapes.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * d, d),
                f"blocks.{i}.attn.qkv.bias": (3 * d,),
                f"blocks.{i}.attn.proj.weight": (d, d),
                f"blocks.{i}.attn.proj.bias": (d,),
                f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
                f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
                f"blocks.{i}.mlp.fc2.bias": (d,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
            }
        )
    return shapes


def test_dit_xl2_state_dict_matches_reference_layout_and_parameter_count():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_state_dict_shapes()
    assert len(expected) == 292
    assert got == expected
    assert list(model.buffers()) == []
    # DiT's train.py logs "DiT Parameters: 675,129,632" for XL/2 (pos_embed included); the paper's 675M.
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 675_129_632
    assert trainable == 675_129_632 - 256 * 1152 == 674_834_720
    assert not model.pos_embed.requires_grad


def test_default_constructor_is_dit_xl2():
    with torch.device("meta"):
        a, b = DiT(), DiT_models["DiT-XL/2"]()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_configs(name):
    widths = {"T": (64, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    size, patch = name[4:].split("/")
    hidden, depth, heads = widths[size]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    assert len(model.blocks) == depth
    assert model.pos_embed.shape == (1, (32 // int(patch)) ** 2, hidden)
    assert model.num_heads == heads and model.blocks[0].attn.num_heads == heads
    assert model.blocks[0].attn.head_dim == hidden // heads
    assert model.patch_size == int(patch) and model.x_embedder.proj.kernel_size == (int(patch), int(patch))
    assert model.final_layer.linear.out_features == int(patch) ** 2 * 8
    assert model.blocks[0].mlp.fc1.out_features == 4 * hidden


def test_names_are_dits_twelve_and_the_toy_size():
    paper = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert set(DiT_models) == paper | {"DiT-T/1", "DiT-T/2", "DiT-T/4"}
    assert DiT_models["DiT-T/2"].keywords == dict(depth=4, hidden_size=64, num_heads=4, patch_size=2)


def test_label_table_rows():
    assert tiny_dit(class_dropout_prob=0.1).y_embedder.embedding_table.num_embeddings == 11
    assert tiny_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10
    # one class (unconditional): no null class, as in the DTR paper's code
    assert tiny_dit(num_classes=1).y_embedder.embedding_table.num_embeddings == 1


def test_out_channels():
    assert tiny_dit().out_channels == 8
    model = tiny_dit(learn_sigma=False)
    x, t, y = inputs(n=2)
    assert model(x, t, y).shape == (2, 4, 8, 8)


# ----------------------------------------------------------------------------------------
# numerics of the pieces


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 0.5, 17.3, 250.0, 999.0])
    got = TimestepEmbedder.timestep_embedding(t, 256).double().numpy()
    want = np_timestep_embedding(t.numpy(), 256)
    assert got.shape == (6, 256)
    # float32 arguments: error grows with t like t * eps32
    tol = 2e-6 * np.maximum(1.0, t.numpy())[:, None]
    assert np.all(np.abs(got - want) <= tol)
    assert np.allclose(got[0], np.r_[np.ones(128), np.zeros(128)])  # t = 0: cos = 1, sin = 0
    odd = TimestepEmbedder.timestep_embedding(t[:3], 7).double().numpy()
    assert np.allclose(odd, np_timestep_embedding(t[:3].numpy(), 7), atol=1e-6)
    assert np.all(odd[:, -1] == 0)


def test_timestep_embedder_accepts_integer_timesteps():
    emb = TimestepEmbedder(16)
    a = emb(torch.tensor([3, 999]))
    b = emb(torch.tensor([3.0, 999.0]))
    assert torch.equal(a, b)


def test_pos_embed_against_independent_construction():
    for dim, grid in ((16, 4), (32, 3)):
        assert np.allclose(get_2d_sincos_pos_embed(dim, grid), np_pos_embed(dim, grid), atol=1e-12)
    model = tiny_dit()
    want = torch.from_numpy(np_pos_embed(32, 4)).float()
    torch.testing.assert_close(model.pos_embed[0].detach(), want, rtol=0, atol=1e-7)


def test_patch_embed_is_patchify_matmul():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=8, patch_size=2, in_chans=3, embed_dim=5).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = patchify_loops(x, 2) @ pe.proj.weight.reshape(5, -1).T + pe.proj.bias
    torch.testing.assert_close(pe(x), want)
    assert pe.num_patches == 16 and pe.patch_size == (2, 2)
    with pytest.raises(ValueError, match="spatial size"):
        pe(torch.randn(1, 3, 6, 6, dtype=torch.float64))


def test_attention_is_softmax_qk_v():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).double()
    with torch.no_grad():
        for prm in attn.parameters():
            prm.normal_(0, 0.3)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    want = attention_by_hand(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, heads=4)
    torch.testing.assert_close(attn(x), want)


def test_einops_layouts_are_dits_reshapes_bit_for_bit():
    """The head split and unpatchify (einops) move exactly the values DiT's reshape/permute chains move."""
    torch.manual_seed(0)
    attn = Attention(48, num_heads=6)
    x = torch.randn(2, 9, 48)
    n, t, d = x.shape
    qkv = attn.qkv(x).reshape(n, t, 3, 6, 8).permute(2, 0, 3, 1, 4)  # timm's Attention, as in DiT
    want = attn.proj(F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(n, t, d))
    assert torch.equal(attn(x), want)
    model = tiny_dit(patch_size=2)  # 4x4 tokens of (2, 2, 8) values
    tokens = torch.randn(3, 16, 2 * 2 * 8)
    assert torch.equal(model.unpatchify(tokens), unpatchify_loops(tokens, 2, 8))


def test_label_dropout():
    emb = LabelEmbedder(10, 8, dropout_prob=1.0)
    labels = torch.tensor([1, 2, 3])
    torch.testing.assert_close(emb(labels, train=True), emb.embedding_table.weight[[10, 10, 10]])
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[labels])
    forced = emb(labels, train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(forced, emb.embedding_table.weight[[1, 10, 3]])


# ----------------------------------------------------------------------------------------
# initialisation and the full forward


def test_fresh_model_outputs_exactly_zero_and_init_matches_dit():
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    x, t, y = inputs(n=3, size=16)
    out = model(x, t, y)
    assert out.shape == (3, 8, 16, 16)
    assert torch.count_nonzero(out) == 0

    zero = ["final_layer.linear", "final_layer.adaLN_modulation.1"] + [
        f"blocks.{i}.adaLN_modulation.1" for i in range(3)
    ]
    for name in zero:
        mod = model.get_submodule(name)
        assert torch.count_nonzero(mod.weight) == 0 and torch.count_nonzero(mod.bias) == 0
    xavier = [f"blocks.{i}.{n}" for i in range(3) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    for name in xavier:
        lin = model.get_submodule(name)
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= bound and lin.weight.std() > 0.5 * bound / math.sqrt(3)
        assert torch.count_nonzero(lin.bias) == 0
    # patch embedding: xavier over the flattened (C * p * p) fan-in
    w = model.x_embedder.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (64 + 4 * 2 * 2))
    for prm in (
        model.y_embedder.embedding_table.weight,
        model.t_embedder.mlp[0].weight,
        model.t_embedder.mlp[2].weight,
    ):
        assert abs(prm.std().item() - 0.02) < 0.003
    assert torch.count_nonzero(model.t_embedder.mlp[0].bias) == 0


def test_forward_equals_hand_written_reference():
    model = perturb_(tiny_dit(depth=3)).double().eval()
    x, t, y = inputs(n=4, dtype=torch.float64)
    y[0] = 10  # the null class
    out = model(x, t, y)
    want = reference_forward(model, x, t, y)
    assert out.abs().max() > 0.1  # a real signal, not the zero-init output
    # DiT computes the sinusoidal timestep features in float32 even in a float64 model: ~1e-8 here.
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)


def test_float32_forward_close_to_reference():
    model = perturb_(tiny_dit()).eval()
    x, t, y = inputs(n=2)
    with torch.no_grad():
        out = model(x, t, y)
        want = reference_forward(model.double(), x.double(), t.double(), y)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_half_precision_model_runs_without_autocast():
    model = perturb_(tiny_dit()).to(torch.bfloat16).eval()
    x, t, y = inputs(n=2)
    with torch.no_grad():
        assert model(x.to(torch.bfloat16), t, y).dtype == torch.bfloat16


def test_load_state_dict_strict_from_second_instance():
    src = perturb_(tiny_dit(), seed=3).eval()
    dst = tiny_dit().eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(dst(x, t, y), src(x, t, y))
    assert not dst.pos_embed.requires_grad


# ----------------------------------------------------------------------------------------
# classifier-free guidance


def cfg_inputs(model, n_half=2):
    x, t, y = inputs(n=n_half)
    x = torch.cat([x, torch.randn_like(x)])  # the second half differs: forward_with_cfg must ignore it
    t = torch.cat([t, t])
    y = torch.cat([y, torch.full_like(y, model.num_classes)])
    return x, t, y


def test_cfg_scale_one_is_the_conditional_output():
    model = perturb_(tiny_dit()).eval()
    x, t, y = cfg_inputs(model)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
    torch.testing.assert_close(out[:2], raw[:2], rtol=1e-6, atol=1e-6)  # cond half, all channels
    torch.testing.assert_close(out[2:, :4], raw[:2, :4], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2:, 4:], raw[2:, 4:], rtol=0, atol=0)  # unguided: model output


@pytest.mark.parametrize("guide_channels, guided", [(None, 4), (3, 3), (8, 8)])
def test_cfg_formula(guide_channels, guided):
    model = perturb_(tiny_dit()).eval()
    x, t, y = cfg_inputs(model)
    s = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=s, guide_channels=guide_channels)
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = raw[:2], raw[2:]
    mixed = uncond[:, :guided] + s * (cond[:, :guided] - uncond[:, :guided])
    assert (cond[:, :guided] - uncond[:, :guided]).abs().max() > 1e-3  # guidance actually matters
    torch.testing.assert_close(out[:2, :guided], mixed)
    torch.testing.assert_close(out[2:, :guided], mixed)
    torch.testing.assert_close(out[:, guided:], raw[:, guided:], rtol=0, atol=0)


def test_cfg_bad_arguments():
    model = tiny_dit().eval()
    x, t, y = cfg_inputs(model)
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x, t, y, 1.5, guide_channels=9)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 1.5)


def test_modules_are_called_as_modules():
    """Routing needs the model's modules called as modules: the root (also by forward_with_cfg), t_embedder (the
    timestep as its first positional argument) and every block. Forward hooks, the test's probes, see each call."""
    model = perturb_(tiny_dit()).eval()
    x, t, y = cfg_inputs(model)
    seen = {"root": 0, "t": [], "blocks": 0}
    model.register_forward_hook(lambda m, a, o: seen.__setitem__("root", seen["root"] + 1))
    model.t_embedder.register_forward_pre_hook(lambda m, a: seen["t"].append(a[0]))
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, o: seen.__setitem__("blocks", seen["blocks"] + 1))
    with torch.no_grad():
        model.forward_with_cfg(x, t, y, cfg_scale=2.0)
    assert seen["root"] == 1 and seen["blocks"] == 2
    assert len(seen["t"]) == 1 and torch.equal(seen["t"][0], t)


# ----------------------------------------------------------------------------------------
# gradient checkpointing


def loss_and_grads(model, x, t, y):
    torch.manual_seed(7)  # the same label dropout in both runs
    model.zero_grad()
    out = model(x, t, y)
    (out**2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_same_output_and_gradients():
    model = perturb_(tiny_dit(depth=3)).train()
    x, t, y = inputs()
    calls = []
    # A pre-hook: non-reentrant checkpointing stops the recomputation early, so plain
    # post-hooks (not always_call ones) do not fire during backward.
    model.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))

    out_a, grads_a = loss_and_grads(model, x, t, y)
    assert len(calls) == 1
    model.gradient_checkpointing = True
    calls.clear()
    out_b, grads_b = loss_and_grads(model, x, t, y)
    assert len(calls) == 2  # the block ran again, as a module, during backward

    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_flag_and_eval():
    model = perturb_(tiny_dit(gradient_checkpointing=True)).eval()
    assert model.gradient_checkpointing
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    x, t, y = inputs(n=2)
    model(x, t, y).sum().backward()
    assert len(calls) == 1  # not checkpointed in eval mode
