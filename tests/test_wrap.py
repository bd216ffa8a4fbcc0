"""dtr.wrap on a small DiT: the routing formula, the sampling paths, copies and state, autocast, checkpointing,
DDP and bad input, each checked against the formula written out on plain tensors (tests/helpers.py)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DiT, FinalLayer, T, dtr_masks, grads, inputs, join_group, reference_forward, tiny_dit, untouched
from torch import nn

import dtr

# -- semantics --------------------------------------------------------------------------------


def test_sharing_ratio_one_is_exactly_unwrapped():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        dtr.wrap(model, sharing_ratio=1.0)
        out = model(x, t, y)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "ratio, alpha, num_tasks", [(0.8, 4.0, 1000), (0.5, 1.0, 1000), (0.3, 2.5, 1000), (0.5, 2.0, 50)]
)
def test_wrapped_equals_per_sample_reference(ratio, alpha, num_tasks):
    model = tiny_dit()
    x, t, y = inputs(t=torch.tensor([0, 49, 25, 3, 10, 48]) if num_tasks == 50 else None)
    with torch.no_grad():
        plain = model(x, t, y)
        routing = dtr.wrap(model, sharing_ratio=ratio, alpha=alpha, num_tasks=num_tasks)
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, dtr_masks(model, ratio, alpha, num_tasks=num_tasks))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-3)  # routing changed the function
    # each sample depends only on its own timestep: routing sample 1 alone gives the same result
    with torch.no_grad():
        alone = model(x[1:2], t[1:2], y[1:2])
    torch.testing.assert_close(alone, out[1:2], rtol=1e-4, atol=5e-5)
    assert [r.name for r in routing.routed] == ["blocks.0", "blocks.1", "blocks.2"]


def test_alpha_and_num_tasks_change_the_routing():
    """A dropped alpha or num_tasks (routing with the defaults) would give the same output: it does not."""
    x, t, y = inputs(t=torch.tensor([10, 40, 25, 3, 30, 48]))
    outs = {}
    for key, kw in {"default": {}, "alpha": dict(alpha=1.0), "tasks": dict(num_tasks=50)}.items():
        model = tiny_dit()
        dtr.wrap(model, sharing_ratio=0.5, **kw)
        with torch.no_grad():
            outs[key] = model(x, t, y)
    assert not torch.allclose(outs["default"], outs["alpha"], atol=1e-3)
    assert not torch.allclose(outs["default"], outs["tasks"], atol=1e-3)


def test_random_routing_uses_a_different_draw_per_block():
    model = tiny_dit()
    x, t, y = inputs()
    routing = dtr.wrap(model, sharing_ratio=0.8, method="random", seed=7)
    masks = [routing.masks(32, block=i) for i in range(3)]
    assert not torch.equal(masks[0], masks[1])
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, dtr_masks(model, method="random", seed=7))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_final_layer_not_routed_and_routing_summary():
    model = tiny_dit()
    routing = dtr.wrap(model)
    assert [r.name for r in routing.routed] == ["blocks.0", "blocks.1", "blocks.2"]
    assert type(model.final_layer) is FinalLayer and untouched(model.final_layer)
    text = routing.summary()
    assert "3 residual modules" in text and "width 32: 25 active channels" in text
    assert "timestep: argument 't' at position 1 of DiT.forward (index)" in text
    assert routing.config == dtr.RoutingConfig(0.8, 4.0, "dtr", 1000, 0, "linear")


def test_remove_and_unwrap_restore_exactly():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        routing = dtr.wrap(model)
        routing.remove()
        assert torch.equal(model(x, t, y), ref) and untouched(model) and dtr.routing_of(model) is None
        dtr.wrap(model)
        dtr.unwrap(model)
        assert torch.equal(model(x, t, y), ref) and untouched(model)
    with pytest.raises(ValueError, match="not routed"):
        dtr.unwrap(model)
    assert "(removed)" in routing.summary()


# -- sampling paths ----------------------------------------------------------------------------


class CallingDiT(DiT):
    """This project's recipe calls ``self(...)`` in forward_with_cfg; facebookresearch/DiT calls ``self.forward``."""

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


@pytest.mark.parametrize("cls", [DiT, CallingDiT])
def test_cfg_paths_route_by_the_right_timesteps(cls):
    model = tiny_dit()
    routed = cls(depth=3)
    routed.load_state_dict(model.state_dict())
    routed.eval()
    x, _, _ = inputs(batch=4)
    t, y = torch.tensor([3, 900, 3, 900]), torch.tensor([1, 2, 10, 10])
    dtr.wrap(routed)
    with torch.inference_mode():
        routed(x, torch.tensor([0, 0, 0, 0]), y)  # an earlier call with other timesteps
        out = routed.forward_with_cfg(x, t, y, 4.0)
    with torch.no_grad():
        ref = reference_forward(model, torch.cat([x[:2], x[:2]]), t, y, dtr_masks(model))
        cond, uncond = ref[:2, :4], ref[2:, :4]
        guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out[:2, :4], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 4:], ref[:, 4:], rtol=1e-5, atol=1e-6)


def test_a_direct_forward_call_and_a_module_call_each_open_one_call():
    model = tiny_dit()
    routing = dtr.wrap(model)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(routing.current_tasks()))
    x, t, y = inputs()
    with torch.no_grad():
        a, b = model(x, t, y), model.forward(x, t, y)
    assert torch.equal(a, b) and len(seen) == 2 and all(torch.equal(s, t) for s in seen)
    assert routing.current_tasks() is None


def test_block_outside_a_forward_never_uses_a_stale_timestep():
    model = tiny_dit()
    dtr.wrap(model)
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y)
        with pytest.raises(RuntimeError, match="ran without a timestep: it was called outside a call of the model"):
            model.blocks[0](torch.randn(6, 16, 32), torch.randn(6, 32))


# -- copies, checkpoints, state ---------------------------------------------------------------


def test_deepcopy_routes_by_its_own_inputs():
    model = tiny_dit()
    routing = dtr.wrap(model, sharing_ratio=0.5, alpha=2.0)
    ema = copy.deepcopy(model)
    assert dtr.routing_of(ema) is not routing and dtr.routing_of(ema).model is ema
    assert dtr.routing_of(ema).config == routing.config
    x, t, y = inputs()
    t2 = torch.tensor([999, 0, 10, 600, 601, 5])
    with torch.no_grad():
        a = model(x, t, y)
        b = ema(x, t2, y)  # interleaved: neither may see the other's timesteps
        a2 = model(x, t, y)
        ref_b = reference_forward(ema, x, t2, y, dtr_masks(ema, 0.5, 2.0))
    torch.testing.assert_close(b, ref_b, rtol=0, atol=1e-6)
    assert torch.equal(a, a2)
    routing.remove()  # removing the original's routing leaves the copy routed
    with torch.no_grad():
        torch.testing.assert_close(ema(x, t2, y), ref_b, rtol=0, atol=1e-6)
    assert not untouched(ema)


def test_a_block_copied_on_its_own_is_a_plain_block_and_copies_only_itself():
    """Routing belongs to the model's wrap: a block copied without its model computes as the plain block (its leftover
    routing no model owns), dtr.routing_of says it is not routed, and a model holding it can be wrapped."""
    model = tiny_dit()
    dtr.wrap(model)
    block = copy.deepcopy(model.blocks[1])
    assert type(block) is type(model.blocks[1]) and dtr.routing_of(block) is None
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(h, c), type(block).forward(model.blocks[1], h, c), rtol=0, atol=0)
    block_bytes = sum(p.numel() for p in block.parameters())
    assert block_bytes == sum(p.numel() for p in model.blocks[1].parameters())  # not the whole model
    copied_list = copy.deepcopy(model.blocks)
    other = tiny_dit(seed=3)
    other.blocks = copied_list
    dtr.wrap(other)  # the leftovers are replaced by this model's routing
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            other(x, t, y), reference_forward(other, x, t, y, dtr_masks(other)), rtol=0, atol=1e-6
        )
    dtr.unwrap(other)
    assert untouched(other)


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
    assert routing.state_bytes() == 1000 * 4  # one int32 window start per task, for the one width
    plain.load_state_dict(wrapped.state_dict(), strict=True)  # wrapped -> unwrapped
    fresh = tiny_dit(seed=9)
    dtr.wrap(fresh)
    fresh.load_state_dict(plain.state_dict(), strict=True)  # unwrapped -> wrapped
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), wrapped(x, t, y))


def test_whole_model_pickles_with_torch_save(tmp_path):
    model = tiny_dit()
    dtr.wrap(model, sharing_ratio=0.5, alpha=1.5, num_tasks=800)
    x, _, y = inputs()
    t = torch.tensor([0, 799, 400, 37, 250, 798])
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
        torch.testing.assert_close(
            loaded(x, t, y),
            reference_forward(model, x, t, y, dtr_masks(model, 0.5, 1.5, num_tasks=800)),
            rtol=0,
            atol=1e-6,
        )
    assert dtr.routing_of(loaded).config == dtr.RoutingConfig(0.5, 1.5, "dtr", 800, 0)


# -- dtypes, autocast, checkpointing (torch.compile: test_compile.py; every other system: test_composition.py) -------


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
    assert (out.float() - full).abs().mean() < 0.02  # bf16 is bf16: close to fp32 on average


def batches_loss(model, batches):
    return lambda: sum(model(*b).square().mean() for b in batches)


def test_gradient_checkpointing_matches_plain_backward():
    model = tiny_dit().train()
    model.class_dropout_prob = 0.0
    dtr.wrap(model)
    b1 = inputs(seed=1)
    b2 = inputs(seed=2, t=torch.tensor([999, 998, 1, 2, 3, 4]))
    ref = grads(model, batches_loss(model, [b1, b2]))
    model.gradient_checkpointing = True
    # two forwards before one backward: each recomputation must use its own forward's timesteps
    got = grads(model, batches_loss(model, [b1, b2]))
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


def _ddp_worker(rank, world, rendezvous, path):
    join_group(rank, world, rendezvous)
    torch.set_num_threads(1)
    model = tiny_dit().train()
    model.class_dropout_prob = 0.0
    dtr.wrap(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    x, t, y = inputs()
    sl = slice(rank * 3, rank * 3 + 3)
    ddp(x[sl], t[sl], y[sl]).square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, path)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_gradients(tmp_path):
    model = tiny_dit().train()
    model.class_dropout_prob = 0.0
    dtr.wrap(model)
    ref = grads(model, batches_loss(model, [inputs()]))
    path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), path), nprocs=2, join=True)
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
        (dict(sharing_ratio=True), TypeError, "sharing_ratio must be a real number"),
        (dict(alpha=0.0), ValueError, "alpha must be a finite number > 0"),
        (dict(alpha=-2.0), ValueError, "alpha must be a finite number > 0"),
        (dict(num_tasks=0), ValueError, "num_tasks must be an int >= 1"),
        (dict(num_tasks=True), TypeError, "num_tasks must be an int >= 1, got bool"),
        (dict(seed=False), TypeError, "seed must be an int or None, got bool"),
        (dict(method="soft"), ValueError, "method must be one of"),
        (dict(blocks=r"layers\.\d+"), ValueError, "matches no module"),
        (dict(blocks=["blocks.7"]), ValueError, "not found"),
        (dict(placement="middle"), ValueError, "placement must be one of 'residual', 'gate'"),
        (dict(timestep_kind="sigma"), ValueError, "timestep_kind must be one of"),
        (dict(timestep_module="t_embed"), ValueError, "timestep_module 't_embed' is not a module"),
        (dict(timestep_arg="s"), ValueError, r"timestep_arg 's' is not an argument of DiT.forward\(x, t, y\)"),
        (dict(timestep_arg=5), ValueError, r"timestep_arg 5 is not a position of DiT.forward\(x, t, y\)"),
        (dict(block_io={"Linear": dtr.BlockIO()}), ValueError, "block_io names classes that are not routed blocks"),
    ],
)
def test_bad_wrap_arguments(kwargs, err, match):
    model = tiny_dit(depth=1)
    with pytest.raises(err, match=match):
        dtr.wrap(model, **kwargs)
    assert untouched(model)


@pytest.mark.parametrize(
    "t, err, match",
    [
        (torch.tensor([0, 1, 2, 1000, 4, 5]), ValueError, r"timesteps must be in \[0, 1000\)"),
        (torch.tensor([0, 1, 2, -1, 4, 5]), ValueError, r"timesteps must be in \[0, 1000\)"),
        (torch.tensor([0.0, 1, 2, float("nan"), 4, 5]), ValueError, r"timesteps must be in \[0, 1000\]"),
        (torch.zeros(6, 1, 1, dtype=torch.long), ValueError, "shape"),
        ("five", TypeError, "timestep must be a tensor"),
    ],
)
def test_bad_timesteps_name_the_argument_read(t, err, match):
    model = tiny_dit(depth=1)
    dtr.wrap(model)
    x, _, y = inputs()
    with pytest.raises(err, match=match) as info, torch.no_grad():
        model(x, t, y)
    assert "dtr read the timestep from argument 't' at position 1 of DiT.forward" in str(info.value)


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
        m = dtr.task_masks(T, 16, 0.5)[t][:, None, :].float()
        h = x + model.emb(t)[:, None]
        for layer in model.layers:
            h = nn.Sequential.forward(layer, m * h) + (1 - m) * h  # the unrouted forward
        torch.testing.assert_close(out, model.head(h), rtol=0, atol=1e-6)
    routing.remove()
    dtr.wrap(model, blocks=["head"])
    with pytest.raises(ValueError, match="'head' maps \\(2, 5, 16\\) to \\(2, 5, 3\\)"), torch.no_grad():
        model(x, t)


class CondFirst(nn.Module):
    """forward(x, cond, t): the timestep is found by its name, never read from position 1."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x, cond, t):
        for layer in self.layers:
            x = layer(x + cond)
        return x


def test_a_custom_model_is_routed_by_the_argument_named_t():
    torch.manual_seed(0)
    model = CondFirst()
    x, cond, t = torch.randn(2, 3, 16), torch.randn(2, 1, 16), torch.tensor([0, 999])
    routing = dtr.wrap(model, blocks=r"layers\.\d", sharing_ratio=0.5)
    assert "argument 't' at position 2 of CondFirst.forward" in routing.summary()
    m = dtr.task_masks(T, 16, 0.5)[t][:, None, :].float()
    h = x
    for layer in model.layers:
        h = nn.Linear.forward(layer, m * (h + cond)) + (1 - m) * (h + cond)
    with torch.no_grad():
        torch.testing.assert_close(model(x, cond, t), h, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x, cond, t=t), h, rtol=0, atol=1e-6)


class NoTimestepName(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16)])

    def forward(self, x, cond, s):
        return self.layers[0](x)


def test_a_custom_model_without_a_timestep_name_is_refused_until_timestep_arg_is_given():
    model = NoTimestepName()
    with pytest.raises(ValueError, match=r"which argument of NoTimestepName.forward\(x, cond, s\).*timestep_arg="):
        dtr.wrap(model, blocks=["layers.0"])
    assert untouched(model)
    dtr.wrap(model, blocks=["layers.0"], timestep_arg="s")
    with torch.no_grad():
        a = model(torch.ones(2, 1, 16), None, torch.tensor([0, 999]))
    assert not torch.equal(a[0], a[1])


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
        assert torch.equal(model(x, torch.tensor(700, dtype=torch.int16)), model(x, t=700))
        assert torch.equal(
            model(x, torch.tensor([200, 7, 255], dtype=torch.uint8)), model(x, torch.tensor([200, 7, 255]))
        )
        assert not torch.equal(model(x, t=700), model(x, t=0))
        with pytest.raises(
            ValueError, match="timesteps have batch size 2 but routed module 'layers.0' received batch size 3"
        ):
            model(x, torch.tensor([1, 2]))


def test_per_token_timesteps_route_each_token_by_its_own_task():
    """(B, N) timesteps: token n of sample b is masked by the task of t[b, n]; equal tokens equal per-sample routing."""
    torch.manual_seed(0)
    model = Blocks()
    dtr.wrap(model, blocks=r"layers\.\d+", sharing_ratio=0.5)
    x = torch.randn(2, 4, 16)
    t = torch.tensor([[0, 999, 500, 3], [7, 7, 640, 999]])
    m = dtr.task_masks(T, 16, 0.5)[t].float()  # (B, N, C)
    h = x
    for layer in model.layers:
        h = nn.Linear.forward(layer, m * h) + (1 - m) * h
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), h, rtol=0, atol=1e-6)
        same = torch.tensor([[5, 5, 5, 5], [900, 900, 900, 900]])
        assert torch.equal(model(x, same), model(x, torch.tensor([5, 900])))
        with pytest.raises(ValueError, match="per-token timesteps of shape \\(2, 3\\)"):
            model(x, t[:, :3])


@pytest.mark.parametrize("method", ["dtr", "random"])
def test_wrap_from_config_reproduces_every_number_of_the_routing(method):
    """Routing.to_dict() carries sharing_ratio, alpha, method, num_tasks and seed: a copy routed from it routes the
    same, and each number matters (the same config with the default num_tasks routes differently)."""
    model = tiny_dit()
    routing = dtr.wrap(model, sharing_ratio=0.5, alpha=1.5, method=method, num_tasks=50, seed=3)
    x, _, y = inputs()
    t = torch.tensor([0, 49, 25, 3, 10, 48])
    copy_ = tiny_dit()
    again = dtr.wrap_from_config(copy_, routing.to_dict())
    assert again.config == dtr.RoutingConfig(0.5, 1.5, method, 50, 3)
    with torch.no_grad():
        want = model(x, t, y)
        torch.testing.assert_close(copy_(x, t, y), want, rtol=0, atol=0)
        dtr.unwrap(copy_)
        other = {"num_tasks": 1000} if method == "dtr" else {"seed": 4}  # R-TR draws by (seed, block, task), not T
        dtr.wrap_from_config(copy_, {"config": {**routing.config.to_dict(), **other}, "spec": routing.spec.to_dict()})
        assert not torch.allclose(copy_(x, t, y), want, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(channel_axis=True), TypeError),
        (dict(timestep_arg=True), TypeError),
        (dict(blocks=r"blocks\.0", block_io=lambda: dtr.BlockIO(input=True)), TypeError),
        (dict(blocks=r"blocks\.0", block_io=lambda: dtr.BlockIO(output=False)), TypeError),
    ],
)
def test_booleans_are_not_taken_for_integers(kwargs, err):
    model = tiny_dit(depth=1)
    with pytest.raises(err, match="bool|name or a position"):
        dtr.wrap(model, **{k: v() if callable(v) and not isinstance(v, type) else v for k, v in kwargs.items()})
    assert untouched(model)
