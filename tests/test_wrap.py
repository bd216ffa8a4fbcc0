"""dtr.wrap on the reference DiT: exact routing semantics, hooks-only, and the properties users rely on."""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dtr
from models import DiT, DiTBlock, FinalLayer, TimestepEmbedder

T = 1000


def tiny_dit(seed=0, depth=3, **kw):
    """A small DiT with every weight perturbed, so no block is the identity (DiT's init zeroes adaLN)."""
    torch.manual_seed(seed)
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=4, num_classes=10)
    model = DiT(**{**cfg, **kw})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(batch=6, seed=1, t=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([0, 999, 500, 37, 250, 998][:batch]) if t is None else t
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


def reference_forward(model, x, t, y, masks_per_block):
    """DiT forward written out with block(m*x) + (1-m)*x, each sample using the mask row of its own t."""
    h = model.x_embedder(x) + model.pos_embed
    c = TimestepEmbedder.forward(model.t_embedder, t) + model.y_embedder(y, False)
    for i, block in enumerate(model.blocks):
        m = masks_per_block[i][t].to(h.dtype)[:, None, :]  # (B, 1, C)
        h = DiTBlock.forward(block, m * h, c) + (1 - m) * h  # the unrouted class's forward
    h = FinalLayer.forward(model.final_layer, h, c)
    return model.unpatchify(h)


def dtr_masks(model, ratio=0.8, alpha=4.0):
    m = dtr.task_masks(T, model.pos_embed.shape[-1], ratio, alpha)
    return [m] * len(model.blocks)


def no_hooks(model):
    """No trace of routing: no hook, no routed class, no routing attribute."""
    return all(not (m._forward_hooks or m._forward_pre_hooks) and "_dtr_unit" not in m.__dict__
               and not hasattr(type(m), "_dtr_base") for m in model.modules())


# -- semantics --------------------------------------------------------------------------------


def test_sharing_ratio_one_is_exactly_unwrapped():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        dtr.wrap(model, sharing_ratio=1.0)
        out = model(x, t, y)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("ratio, alpha", [(0.8, 4.0), (0.5, 1.0), (0.3, 2.5)])
def test_wrapped_equals_per_sample_reference(ratio, alpha):
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        plain = model(x, t, y)
        routing = dtr.wrap(model, sharing_ratio=ratio, alpha=alpha)
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, dtr_masks(model, ratio, alpha))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-3)  # routing changed the function
    # each sample depends only on its own timestep: routing sample 1 alone gives the same result
    with torch.no_grad():
        alone = model(x[1:2], t[1:2], y[1:2])
    torch.testing.assert_close(alone, out[1:2], rtol=1e-4, atol=5e-5)
    assert len(routing.routed) == 3 and all(r.name.startswith("blocks.") for r in routing.routed)


def test_random_routing_uses_a_different_draw_per_block():
    model = tiny_dit()
    x, t, y = inputs()
    routing = dtr.wrap(model, sharing_ratio=0.8, method="random", seed=7)
    masks = [routing.masks(32, block=i) for i in range(3)]
    assert not torch.equal(masks[0], masks[1])
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, masks)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_final_layer_not_routed_and_routing_summary():
    model = tiny_dit()
    routing = dtr.wrap(model)
    names = [r.name for r in routing.routed]
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    assert type(model.final_layer) is FinalLayer and "_dtr_unit" not in model.final_layer.__dict__
    text = routing.summary()
    assert "3 residual modules" in text and "width 32: 25 active channels" in text
    assert "timestep: argument (1, 't') of '<model>'" in text


def test_remove_and_unwrap_restore_exactly():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        routing = dtr.wrap(model)
        routing.remove()
        assert torch.equal(model(x, t, y), ref) and no_hooks(model) and dtr.routing_of(model) is None
        dtr.wrap(model)
        dtr.unwrap(model)
        assert torch.equal(model(x, t, y), ref) and no_hooks(model)
    with pytest.raises(ValueError, match="not routed"):
        dtr.unwrap(model)


# -- sampling paths ----------------------------------------------------------------------------


class OriginalDiT(DiT):
    """facebookresearch/DiT's forward_with_cfg calls self.forward, so hooks on the model never fire."""

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


@pytest.mark.parametrize("cls", [DiT, OriginalDiT])
def test_cfg_paths_route_by_the_right_timesteps(cls):
    model = tiny_dit()
    original = cls(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, num_classes=10)
    original.load_state_dict(model.state_dict())
    original.eval()
    x, t, y = inputs(batch=4, t=torch.tensor([3, 900, 3, 900]))
    y = torch.tensor([1, 2, 10, 10])
    dtr.wrap(original)
    with torch.inference_mode():
        original(x, torch.tensor([0, 0, 0, 0]), y)  # an earlier call with other timesteps
        out = original.forward_with_cfg(x, t, y, 4.0) if cls is OriginalDiT else original.forward_with_cfg(x, t, y, 4.0, 3)
    with torch.no_grad():
        half = torch.cat([x[:2], x[:2]])
        ref = reference_forward(model, half, t, y, dtr_masks(model))
        cond, uncond = ref[:2, :3], ref[2:, :3]
        guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out[:2, :3], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3:], ref[:, 3:], rtol=1e-5, atol=1e-6)


def test_block_outside_a_forward_never_uses_a_stale_timestep():
    model = tiny_dit()
    dtr.wrap(model)
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y)
        h = torch.randn(6, 16, 32)
        with pytest.raises(RuntimeError, match="ran without a timestep"):
            model.blocks[0](h, torch.randn(6, 32))


# -- copies, checkpoints, state ---------------------------------------------------------------


def test_deepcopy_routes_by_its_own_inputs():
    model = tiny_dit()
    routing = dtr.wrap(model)
    ema = copy.deepcopy(model)
    assert dtr.routing_of(ema) is not routing and dtr.routing_of(ema).model is ema
    x, t, y = inputs()
    t2 = torch.tensor([999, 0, 10, 600, 601, 5])
    with torch.no_grad():
        a = model(x, t, y)
        b = ema(x, t2, y)  # interleaved: neither may see the other's timesteps
        a2 = model(x, t, y)
        ref_b = reference_forward(ema, x, t2, y, dtr_masks(ema))
    torch.testing.assert_close(b, ref_b, rtol=0, atol=1e-6)
    assert torch.equal(a, a2)
    routing.remove()  # removing the original's hooks leaves the copy routed
    with torch.no_grad():
        torch.testing.assert_close(ema(x, t2, y), ref_b, rtol=0, atol=1e-6)
    assert not no_hooks(ema)


def test_state_dict_round_trip_and_no_added_state():
    plain = tiny_dit()
    keys = dict(plain.state_dict())
    wrapped = tiny_dit(seed=5)
    routing = dtr.wrap(wrapped)
    x, t, y = inputs()
    with torch.no_grad():
        wrapped(x, t, y)
    assert list(wrapped.state_dict()) == list(keys)
    assert sum(b.numel() for b in wrapped.buffers()) == sum(b.numel() for b in plain.buffers())
    assert routing.state_bytes() <= 16 * 1024
    plain.load_state_dict(wrapped.state_dict(), strict=True)  # wrapped -> unwrapped
    fresh = tiny_dit(seed=9)
    dtr.wrap(fresh)
    fresh.load_state_dict(plain.state_dict(), strict=True)  # unwrapped -> wrapped
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), wrapped(x, t, y))


def test_whole_model_pickles_with_torch_save():
    model = tiny_dit()
    dtr.wrap(model)
    x, t, y = inputs()
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        torch.save(model, os.path.join(d, "m.pt"))
        loaded = torch.load(os.path.join(d, "m.pt"), weights_only=False)
        assert torch.equal(loaded(x, t, y), model(x, t, y))


# -- autocast, checkpointing (torch.compile: test_compile.py) ----------------------------------------------------------


def test_autocast_bf16():
    model = tiny_dit()
    x, t, y = inputs()
    dtr.wrap(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, dtr_masks(model))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)
    with torch.no_grad():
        full = model(x, t, y)
    torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.1)


def grads(model, batches):
    model.zero_grad()
    loss = sum(model(*b).square().mean() for b in batches)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_matches_plain_backward():
    model = tiny_dit().train()
    model.y_embedder.dropout_prob = 0.0
    dtr.wrap(model)
    b1 = inputs(seed=1)
    b2 = inputs(seed=2, t=torch.tensor([999, 998, 1, 2, 3, 4]))
    ref = grads(model, [b1, b2])
    model.gradient_checkpointing = True
    # two forwards before one backward: each recomputation must use its own forward's timesteps
    got = grads(model, [b1, b2])
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_reentrant_checkpointing_fails_clearly():
    model = tiny_dit().train()
    dtr.wrap(model)
    x, t, y = inputs()
    model.run_block = lambda block, h, c: torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=True)
    out = model(x.requires_grad_(), t, y)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        out.sum().backward()


# -- DistributedDataParallel -------------------------------------------------------------------


def _ddp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_dit().train()
    model.y_embedder.dropout_prob = 0.0
    dtr.wrap(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    x, t, y = inputs()
    sl = slice(rank * 3, rank * 3 + 3)
    ddp(x[sl], t[sl], y[sl]).square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, path)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_gradients():
    model = tiny_dit().train()
    model.y_embedder.dropout_prob = 0.0
    dtr.wrap(model)
    ref = grads(model, [inputs()])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "grads.pt")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_worker, args=(2, port, path), nprocs=2, join=True)
        got = torch.load(path, weights_only=True)
    assert got.keys() == ref.keys()
    for n in ref:  # mean over 3 samples, averaged over 2 ranks == mean over the 6
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)  # summation order differs


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(sharing_ratio=0.0), ValueError, r"sharing_ratio must be in \(0, 1\]"),
        (dict(sharing_ratio=-0.2), ValueError, r"sharing_ratio must be in \(0, 1\]"),
        (dict(sharing_ratio=1.2), ValueError, r"sharing_ratio must be in \(0, 1\]"),
        (dict(sharing_ratio=float("nan")), ValueError, r"sharing_ratio must be in \(0, 1\]"),
        (dict(alpha=0.0), ValueError, "alpha must be a finite number > 0"),
        (dict(alpha=-2.0), ValueError, "alpha must be a finite number > 0"),
        (dict(num_tasks=0), ValueError, "num_tasks must be an int >= 1"),
        (dict(method="soft"), ValueError, "method must be one of"),
        (dict(blocks=r"layers\.\d+"), ValueError, "matches no module"),
        (dict(blocks=["blocks.7"]), ValueError, "not found"),
        (dict(placement="middle"), ValueError, "placement must be one of 'residual', 'gate'"),
        (dict(timestep_kind="sigma"), ValueError, "timestep_kind must be one of"),
        (dict(timestep_module="t_embed"), ValueError, "timestep_module 't_embed' is not a module"),
    ],
)
def test_bad_wrap_arguments(kwargs, err, match):
    model = tiny_dit(depth=1)
    with pytest.raises(err, match=match):
        dtr.wrap(model, **kwargs)
    assert no_hooks(model)


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.tensor([0, 1, 2, 1000, 4, 5]), r"timesteps must be in \[0, 1000\)"),
        (torch.tensor([0, 1, 2, -1, 4, 5]), r"timesteps must be in \[0, 1000\)"),
        (torch.tensor([0.0, 1, 2, float("nan"), 4, 5]), r"timesteps must be in \[0, 1000\]"),
        (torch.zeros(6, 1, dtype=torch.long), "shape"),
    ],
)
def test_bad_timesteps(t, match):
    model = tiny_dit(depth=1)
    dtr.wrap(model)
    x, _, y = inputs()
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(x, t, y)


def test_wrap_twice_and_wrap_unknown_models():
    model = tiny_dit(depth=1)
    dtr.wrap(model)
    with pytest.raises(ValueError, match="already routed by dtr"):
        dtr.wrap(model)
    with pytest.raises(ValueError, match="does not know where to route a Sequential: pass blocks="):
        dtr.wrap(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dtr.wrap(lambda x: x)


class Toy(nn.Module):
    """An architecture no adapter knows: residual MLP blocks, a shape-changing head, timestep as t=."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 16)
        self.layers = nn.ModuleList([nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x, t):
        h = x + self.emb(t.expand(x.shape[0]))[:, None]
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_custom_model_routed_in_one_line_and_shape_check():
    torch.manual_seed(0)
    model = Toy()
    x, t = torch.randn(2, 5, 16), torch.tensor([0, 999])
    with torch.no_grad():
        routing = dtr.wrap(model, blocks=r"layers\.\d+", sharing_ratio=0.5)
        out = model(x, t=t)
        m = dtr.task_masks(1000, 16, 0.5)[t][:, None, :].float()
        h = x + model.emb(t)[:, None]
        for layer in model.layers:
            h = nn.Sequential.forward(layer, m * h) + (1 - m) * h  # the unrouted forward
        torch.testing.assert_close(out, model.head(h), rtol=0, atol=1e-6)
    routing.remove()
    dtr.wrap(model, blocks=["head"])
    with pytest.raises(ValueError, match="'head' maps \\(2, 5, 16\\) to \\(2, 5, 3\\)"), torch.no_grad():
        model(x, t)


class Blocks(nn.Module):
    """Residual-shaped layers whose only use of t is routing: shapes are the router's to check."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x, t):
        for layer in self.layers:
            x = layer(x)
        return x


def test_custom_model_scalar_timestep_broadcasts_and_batch_mismatch():
    torch.manual_seed(0)
    model = Blocks()
    dtr.wrap(model, blocks=r"layers\.\d+")
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(700)), model(x, torch.full((3,), 700)))
        assert torch.equal(model(x, t=700), model(x, 700 * torch.ones(3, dtype=torch.long)))
        assert not torch.equal(model(x, t=700), model(x, t=0))
        with pytest.raises(ValueError, match="timesteps have batch size 2 but routed module 'layers.0' received batch size 3"):
            model(x, torch.tensor([1, 2]))


def test_model_to_another_dtype_routes_in_that_dtype():
    model = tiny_dit()
    dtr.wrap(model)
    model.to(torch.float64)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x.double(), t, y)
        ref = reference_forward(model, x.double(), t, y, dtr_masks(model))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert dtr.routing_of(torch.compile(model)) is dtr.routing_of(model)
