"""Routing composed with every system users stack on the same modules, each in both orders (the system before
dtr.wrap, and after): the result equals the independent reference ``block(m * x) + (1 - m) * x`` (outputs and
gradients), where ``block`` is the block as that system leaves it; or dtr refuses, before anything changes.

The reference of each case is a second model with the same system applied and each block replaced by
``helpers.Residual`` (the formula on plain tensors, calling the block as a module).  docs/concepts.md has the
matrix these tests fill in.
"""

import copy
import gc
import pickle
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.utils.parametrize as parametrize
from helpers import (
    DiT,
    DiTBlock,
    Residual,
    Stack,
    Symmetric,
    T,
    dtr_masks,
    inputs,
    join_group,
    reference_forward,
    steady_dit,
    untouched,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import dtr
from dtr import mechanism

RATIO, ALPHA = 0.5, 2.0
TOL = dict(rtol=1e-5, atol=1e-6)


def wrap(model):
    return dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA)


def swapped(model, t):
    """The independent reference: every block replaced by the formula around the block as it is."""
    rows = dtr.task_masks(T, model.pos_embed.shape[-1], RATIO, ALPHA)[t]
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Residual(block, rows)
    return model


def outputs_and_grads(model, x, t, y):
    with torch.no_grad():
        out = model.eval()(x, t, y)
    model.train().zero_grad()
    model(x, t, y).square().mean().backward()
    grads = {
        n.replace(".inner", "").replace("._checkpoint_wrapped_module", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out, grads


def assert_same(routed, reference, tol=TOL, batch=None):
    x, t, y = batch or inputs(batch=4)
    out, grads = outputs_and_grads(routed, x, t, y)
    ref_out, ref_grads = outputs_and_grads(reference, x, t, y)
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n, **tol)
    return out


def in_order(order, model, system):
    """Apply ``system`` and dtr.wrap to ``model`` in the order named."""
    if order == "system first":
        system(model)
        wrap(model)
    else:
        wrap(model)
        system(model)
    return model


ORDERS = ["system first", "wrap first"]


def reference(order, system, where, t):
    """The reference with ``system`` where it sits relative to routing: a wrapper of the module's forward
    (``"instance"``: accelerate and diffusers hooks, a user's) is part of the block when applied before dtr.wrap and
    wraps the routed block when applied after; module hooks (``"outside"``) run around the module's forward, so they
    wrap the routed block in either order; class patches and parametrize (``"inside"``) are part of the block."""
    inside = where == "inside" or (where == "instance" and order == "system first")
    return swapped(system(steady_dit()), t) if inside else system(swapped(steady_dit(), t))


def check_system(order, system, tol=TOL, where="instance"):
    """Routed model with ``system`` == reference with ``system``; unwrapped, == the unrouted model with it."""
    t = inputs(batch=4)[1]
    routed = in_order(order, steady_dit(), system)
    assert_same(routed, reference(order, system, where, t), tol)
    dtr.unwrap(routed)
    plain = system(steady_dit())
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(routed.eval()(x, t, y), plain.eval()(x, t, y), rtol=0, atol=0)
        assert not torch.allclose(plain(x, t, y), swapped(system(steady_dit()), t).eval()(x, t, y), atol=1e-4)
    wrap(routed)  # and it can be routed again: the system is now part of the block
    with torch.no_grad():
        torch.testing.assert_close(
            routed.eval()(x, t, y), reference("system first", system, where, t).eval()(x, t, y), **tol
        )


# -- instance forwards: accelerate and diffusers hooks, a user's wrapper ----------------------------------------


def accelerate_hooks(model):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Scale(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] * 0.9, *args[1:]), kwargs

        def post_forward(self, module, output):
            return output * 1.1

    for block in model.blocks:
        add_hook_to_module(block, Scale())
    return model


def diffusers_hooks(model):
    from diffusers.hooks import HookRegistry, ModelHook

    class Shift(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs) - 0.05

    for block in model.blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Shift(), "shift")
    return model


def instance_wrapper(model):
    for block in model.blocks:
        inner = block.forward
        block.forward = lambda x, c, inner=inner: inner(x * 1.2, c)
    return model


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("system", [accelerate_hooks, diffusers_hooks, instance_wrapper])
def test_instance_forward_hooks(system, order):
    check_system(order, system)


def accelerate_offload(model):
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=torch.device("cpu"))
    return model


def layerwise_casting(model):
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(
        model, storage_dtype=torch.bfloat16, compute_dtype=torch.float32, skip_modules_pattern=("pos_embed",)
    )
    return model


def group_offloading(model):
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="leaf_level")
    return model


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("system", [accelerate_offload, layerwise_casting, group_offloading])
def test_offloading_and_casting_hooks(system, order):
    if system is accelerate_offload:  # its parameters live on the meta device between calls: outputs, not grads
        t = inputs(batch=4)[1]
        routed = in_order(order, steady_dit(), system)
        x, t, y = inputs(batch=4)
        with torch.no_grad():
            torch.testing.assert_close(routed.eval()(x, t, y), swapped(system(steady_dit()), t).eval()(x, t, y), **TOL)
        dtr.unwrap(routed)
        with torch.no_grad():
            assert torch.equal(routed(x, t, y), system(steady_dit()).eval()(x, t, y))
        return
    check_system(order, system)


@pytest.fixture
def accelerate_state():
    """accelerate keeps one AcceleratorState per process: leave none behind with bf16 for the next test's
    Accelerator() in this worker (accelerate refuses a second, different mixed precision)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("order", ORDERS)
def test_accelerator_prepare_with_mixed_precision_and_unwrap_after_it(order, accelerate_state):
    """accelerate's mixed precision replaces model.forward on the instance (autocast + outputs to fp32)."""
    from accelerate import Accelerator

    def prepare(model):
        return Accelerator(cpu=True, mixed_precision="bf16").prepare(model)

    t = inputs(batch=4)[1]
    routed = in_order(order, steady_dit(), prepare)
    reference = prepare(swapped(steady_dit(), t))
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        out = routed.eval()(x, t, y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference.eval()(x, t, y), rtol=0, atol=0)
        # facebookresearch/DiT's forward_with_cfg calls self.forward: still one routed call
        xx, tt, yy = torch.cat([x[:2], x[:2]]), torch.cat([t[:2], t[:2]]), torch.tensor([1, 2, 10, 10])
        cfg_reference = prepare(swapped(steady_dit(), tt)).eval()
        torch.testing.assert_close(
            routed.forward_with_cfg(xx, tt, yy, 1.5), cfg_reference.forward_with_cfg(xx, tt, yy, 1.5)
        )
        dtr.unwrap(routed)
        torch.testing.assert_close(routed(x, t, y), prepare(steady_dit()).eval()(x, t, y), rtol=0, atol=0)


# -- class patches, replacement, parametrize ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_a_class_patch_of_forward_runs_in_routed_blocks(order, monkeypatch):
    original = DiTBlock.forward
    calls = []

    def patched(self, x, c):
        calls.append(1)
        return original(self, x, c) * 0.8

    def patch(model):
        monkeypatch.setattr(DiTBlock, "forward", patched)
        return model

    t = inputs(batch=4)[1]
    routed = in_order(order, steady_dit(), patch)
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        out = routed.eval()(x, t, y)
        assert len(calls) == 2  # both routed blocks ran the patched forward
        torch.testing.assert_close(out, swapped(steady_dit(), t).eval()(x, t, y), **TOL)


def test_a_block_replaced_after_wrap_is_refused_at_the_next_call():
    model = steady_dit()
    routing = wrap(model)
    model.blocks[1] = DiTBlock(32, 4)
    x, t, y = inputs(batch=4)
    with pytest.raises(RuntimeError, match="routed module 'blocks.1' was replaced by a DiTBlock.*dtr.unwrap"):
        model(x, t, y)
    model.blocks = nn.ModuleList([DiTBlock(32, 4), DiTBlock(32, 4)])
    with pytest.raises(RuntimeError, match="routed module 'blocks.0' was replaced"):
        model(x, t, y)
    routing.remove()
    wrap(model)
    with torch.no_grad():
        model.eval()(x, t, y)


def stack_reference(model, x, t):
    m = dtr.task_masks(T, 16, RATIO, ALPHA)[t].float()[:, None, :]
    for block in model.blocks:
        x = block(m * x) + (1 - m) * x
    return x


@pytest.mark.parametrize("order", ORDERS)
def test_parametrize_in_either_order_and_unwrap_after_it(order):
    def symmetric(model):
        for block in model.blocks:
            parametrize.register_parametrization(block, "weight", Symmetric())
        return model

    model = Stack()
    if order == "system first":
        symmetric(model)
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d")
    else:
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d")
        symmetric(model)
    reference = symmetric(Stack())
    x, t = torch.randn(3, 5, 16), torch.tensor([0, 999, 500])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model(xa, t), stack_reference(reference, xb, t)
    torch.testing.assert_close(out, ref, **TOL)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n, **TOL)
    dtr.unwrap(model)  # finishes even where parametrize subclassed the routed class (that class stays, inert)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference(x, t), rtol=0, atol=0)
        for block in model.blocks:
            parametrize.remove_parametrizations(block, "weight")
        torch.testing.assert_close(model(x, t), reference(x, t), **TOL)
        dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d")
        plain = Stack()
        for a, b in zip(plain.blocks, model.blocks):
            a.weight.copy_(b.weight)
        torch.testing.assert_close(model(x, t), stack_reference(plain, x, t), **TOL)


# -- activation checkpointing in every form -------------------------------------------------------------------------


def checkpoint_each_block(model):
    model.gradient_checkpointing = True
    return model


class TwoBlocksPerCheckpoint(DiT):
    """One torch.utils.checkpoint around two blocks: the second block's input is made inside the region."""

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)

        def pair(h, c):
            return self.blocks[1](self.blocks[0](h, c), c)

        h = checkpoint(pair, h, c, use_reentrant=False) if self.training else pair(h, c)
        return self.unpatchify(self.final_layer(h, c))


def wrapper_checkpointing(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, DiTBlock))
    return model


def composable_checkpointing(model):
    from torch.distributed._composable import checkpoint as composable_checkpoint

    for block in model.blocks:
        composable_checkpoint(block)
    return model


def new_tensor_pre_hook(model):
    model.gradient_checkpointing = True
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: (args[0] * 1.0, *args[1:]))  # a new tensor, same values
    return model


def full_backward_hook(model):
    model.gradient_checkpointing = True
    for block in model.blocks:
        block.register_full_backward_hook(lambda m, gi, go: None)
    return model


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "system",
    [checkpoint_each_block, wrapper_checkpointing, composable_checkpointing, new_tensor_pre_hook, full_backward_hook],
)
def test_activation_checkpointing_forms(system, order):
    t = inputs(batch=4)[1]
    routed = in_order(order, steady_dit(), system)
    reference = swapped(steady_dit(), t)  # checkpointing recomputes: the gradients are those of the plain formula
    assert_same(routed, reference)


def test_one_checkpoint_around_two_blocks():
    model = TwoBlocksPerCheckpoint(depth=2)
    model.load_state_dict(steady_dit().state_dict())
    model.class_dropout_prob = 0.0
    wrap(model)
    x, t, y = inputs(batch=4)
    out, grads = outputs_and_grads(model, x, t, y)
    reference = swapped(steady_dit(), t)
    ref_out, ref_grads = outputs_and_grads(reference, x, t, y)
    torch.testing.assert_close(out, ref_out, **TOL)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n, **TOL)


def test_one_input_tensor_fed_to_two_calls_at_different_timesteps_before_one_backward():
    """Replay by region, not by tensor: the same x at t1 and t2, one backward, each recomputed as recorded."""
    model = checkpoint_each_block(steady_dit()).train()
    wrap(model)
    x, t1, y = inputs(batch=4)
    t2 = torch.tensor([999, 0, 998, 1])
    h = x.clone().requires_grad_()
    model.zero_grad()
    (model(h, t1, y).square().mean() + 3 * model(h, t2, y).square().mean()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref = steady_dit().train()
    hr = x.clone().requires_grad_()
    masks = dtr_masks(ref, RATIO, ALPHA)
    (
        reference_forward(ref, hr, t1, y, masks).square().mean()
        + 3 * reference_forward(ref, hr, t2, y, masks).square().mean()
    ).backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, msg=n, **TOL)
    torch.testing.assert_close(h.grad, hr.grad, **TOL)


def test_a_checkpointed_block_recomputed_while_another_call_is_in_progress():
    """A gradient taken inside a later forward (a penalty term) recomputes the earlier call's regions by their own
    tasks, not by the call in progress."""
    model = checkpoint_each_block(steady_dit()).train()
    routing = wrap(model)
    x, t1, y = inputs(batch=4)
    out = model(x, t1, y).square().mean()
    grads_inside = {}

    def take_grads(module, args):
        if not grads_inside:
            grads_inside["g"] = torch.autograd.grad(out, [model.blocks[0].qkv.weight], retain_graph=True)[0]
            grads_inside["tasks"] = routing.current_tasks().clone()

    handle = model.final_layer.register_forward_pre_hook(take_grads)  # inside the second call (not recomputed)
    model(x, torch.tensor([999, 999, 999, 999]), y)
    handle.remove()
    ref = steady_dit().train()
    want = torch.autograd.grad(
        reference_forward(ref, x, t1, y, dtr_masks(ref, RATIO, ALPHA)).square().mean(), [ref.blocks[0].qkv.weight]
    )[0]
    assert torch.equal(grads_inside["tasks"], torch.full((4,), 999))
    torch.testing.assert_close(grads_inside["g"], want, **TOL)


# -- torch.func and forward-mode AD ---------------------------------------------------------------------------------


def functional(model, routed):
    """(params, x) -> output of the model (routed) or of the formula (reference) at fixed t, y."""
    _, t, y = inputs(batch=3)
    masks = dtr_masks(model, RATIO, ALPHA)

    def f(params, x):
        if routed:
            return torch.func.functional_call(model, params, (x, t, y))
        with parametrize_free(model, params):
            return reference_forward(model, x, t, y, masks)

    return f


class parametrize_free:
    """Temporarily swap a model's parameters for ``params`` (for the reference, which calls forwards directly)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __enter__(self):
        self.saved = {}
        for name, value in self.params.items():
            *path, leaf = name.split(".")
            owner = self.model.get_submodule(".".join(path))
            self.saved[name] = (owner, leaf, owner._parameters[leaf])
            owner._parameters[leaf] = value

    def __exit__(self, *exc):
        for owner, leaf, value in self.saved.values():
            owner._parameters[leaf] = value


@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "jacrev", "jacfwd", "forward_ad", "vmap"])
def test_torch_func_transforms_and_forward_mode_ad(transform):
    model = steady_dit().double()
    wrap(model)
    plain = steady_dit().double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = inputs(batch=3)[0].double()
    v = torch.randn_like(x)
    f, g = functional(model, True), functional(plain, False)
    weight = "blocks.0.qkv.weight"
    if transform == "grad":
        got = torch.func.grad(lambda p: f(p, x).square().sum())(params)[weight]
        want = torch.func.grad(lambda p: g(p, x).square().sum())(params)[weight]
    elif transform == "vjp":
        got = torch.func.vjp(lambda x: f(params, x), x)[1](torch.ones(3, 8, 8, 8, dtype=torch.float64))[0]
        want = torch.func.vjp(lambda x: g(params, x), x)[1](torch.ones(3, 8, 8, 8, dtype=torch.float64))[0]
    elif transform == "jvp":
        got = torch.func.jvp(lambda x: f(params, x), (x,), (v,))[1]
        want = torch.func.jvp(lambda x: g(params, x), (x,), (v,))[1]
    elif transform in ("jacrev", "jacfwd"):
        jac = getattr(torch.func, transform)
        got = jac(lambda x: f(params, x)[:, :, :2, :2].sum())(x)
        want = jac(lambda x: g(params, x)[:, :, :2, :2].sum())(x)
    elif transform == "forward_ad":
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            got = fwad.unpack_dual(f(params, fwad.make_dual(x, v))).tangent
            want = fwad.unpack_dual(g(params, fwad.make_dual(x, v))).tangent
    else:  # vmap over a leading axis of inputs, each a batch of 3 (the unrouted model vmaps the same way)
        xs = torch.stack([x, 2 * x])
        got = torch.func.vmap(lambda x: f(params, x))(xs)
        want = torch.stack([g(params, x), g(params, 2 * x)])
        _, t, y = inputs(batch=3)
        unrouted = torch.func.vmap(lambda x: torch.func.functional_call(plain, params, (x, t, y)))(xs)
        torch.testing.assert_close(unrouted, torch.stack([plain(x, t, y), plain(2 * x, t, y)]))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert got.abs().sum() > 0


# -- FSDP2 (gloo on CPU, world size 1 and 2), DDP ---------------------------------------------------------------------


def _fsdp_worker(rank, world, rendezvous, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    join_group(rank, world, rendezvous)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    x, t, y = inputs(batch=4)
    sl = slice(rank * 4 // world, (rank + 1) * 4 // world)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def shard(model):
        for block in model.blocks:
            fully_shard(block if not isinstance(block, Residual) else block.inner, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def run(model):
        model.train().zero_grad()
        model.gradient_checkpointing = True
        out = model(x[sl], t[sl], y[sl])
        out.float().square().mean().backward()
        return out.detach().float(), {
            n.replace(".inner", ""): p.grad.full_tensor().clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }

    results = {}
    for order in ORDERS:
        model = steady_dit()
        if order == "system first":
            shard(model)
            wrap(model)
        else:
            wrap(model)
            shard(model)
        results[order] = run(model)
        dtr.unwrap(model)  # FSDP2 subclassed the routed class (or was subclassed): unwrap still finishes
        results[order + " unwrapped"] = run(model)
    results["reference"] = run(shard(swapped(steady_dit(), t[sl])))
    results["unrouted"] = run(shard(steady_dit()))
    if rank == 0:
        torch.save(results, path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_fsdp2_mixed_precision_and_checkpointing_in_either_order(world, tmp_path):
    """fully_shard on every block and the root, bf16 parameters, fp32 reductions, checkpointing: routed in
    either order equals the reference sharded the same way; unwrapped, it equals the unrouted sharded model."""
    path = str(tmp_path / "results.pt")
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "rendezvous"), path), nprocs=world, join=True)
    results = torch.load(path, weights_only=True)
    ref_out, ref_grads = results["reference"]
    plain_out, plain_grads = results["unrouted"]
    assert not torch.allclose(ref_out, plain_out, atol=1e-2)
    for order in ORDERS:
        out, grads = results[order]
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=0, msg=n)
        out, grads = results[order + " unwrapped"]
        torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
        for n in grads:
            torch.testing.assert_close(grads[n], plain_grads[n], rtol=0, atol=0, msg=n)


@pytest.mark.slow
def test_ddp_made_before_wrap(tmp_path):
    path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_then_wrap_worker, args=(2, str(tmp_path / "rendezvous"), path), nprocs=2, join=True)
    got = torch.load(path, weights_only=True)
    x, t, y = inputs(batch=4)
    _, want = outputs_and_grads(swapped(steady_dit(), t), x, t, y)
    assert got.keys() == want.keys()
    for n in want:  # mean over 2 samples averaged over 2 ranks == mean over the 4
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def _ddp_then_wrap_worker(rank, world, rendezvous, path):
    join_group(rank, world, rendezvous)
    torch.set_num_threads(1)
    model = steady_dit().train()
    ddp = nn.parallel.DistributedDataParallel(model)
    wrap(ddp)  # through the DDP wrapper, after it was made
    x, t, y = inputs(batch=4)
    ddp(x[rank * 2 : rank * 2 + 2], t[rank * 2 : rank * 2 + 2], y[rank * 2 : rank * 2 + 2]).square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, path)
    dist.barrier()
    dist.destroy_process_group()


# -- all or nothing ---------------------------------------------------------------------------------------------------


def test_a_wrap_that_fails_half_way_changes_nothing(monkeypatch):
    model = steady_dit(depth=3)
    real = mechanism._attach
    done = []

    def fail_on_third(module, behaviour):
        if len(done) == 2:
            raise RuntimeError("injected")
        done.append(module)
        real(module, behaviour)

    monkeypatch.setattr(mechanism, "_attach", fail_on_third)
    with pytest.raises(RuntimeError, match="injected"):
        wrap(model)
    assert untouched(model) and dtr.routing_of(model) is None
    monkeypatch.undo()
    wrap(model)


class Frozen(DiTBlock):
    """A block class that forbids new attributes (some libraries freeze their modules)."""

    def __setattr__(self, name, value):
        if "_dtr" in name or name == "__class__":
            raise AttributeError(f"{type(self).__name__} is frozen")
        super().__setattr__(name, value)


def test_blocks_that_forbid_new_attributes_are_routed_all_the_same():
    model = steady_dit()
    for i, block in enumerate(model.blocks):
        frozen = Frozen(32, 4)
        frozen.load_state_dict(block.state_dict())
        model.blocks[i] = frozen
    reference = copy.deepcopy(model)
    wrap(model)
    x, t, y = inputs(batch=4)
    assert_same(model, swapped(reference, t))
    dtr.unwrap(model)
    assert untouched(model)


def test_a_block_compiled_before_wrap_routes_and_runs_unrouted_again_after_unwrap():
    """``block.compile()`` compiles the block's ``_call_impl``, which reads its instance ``forward``: TorchDynamo
    guards that attribute, so the graph compiled unrouted is not reused once routing puts its forward there (0.3 had
    to refuse this order), nor the routed graph after unwrap."""
    model, plain = steady_dit(), steady_dit()
    x, t, y = inputs(batch=4)
    model.blocks[1].compile(backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y), plain.eval()(x, t, y), rtol=0, atol=0)
        wrap(model)
        torch.testing.assert_close(model(x, t, y), swapped(steady_dit(), t).eval()(x, t, y), **TOL)
        dtr.unwrap(model)
        torch.testing.assert_close(model(x, t, y), plain(x, t, y), rtol=0, atol=0)
    assert untouched(model)


def test_routed_classes_of_redefined_user_classes_are_not_kept_alive():
    """A notebook that redefines its model class and re-runs its cell must not accumulate classes."""
    refs = []
    for _ in range(20):

        class Cell(nn.Module):  # a new class object each time, as in a re-run cell
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([nn.Linear(4, 4)])

            def forward(self, x, t):
                return self.blocks[0](x)

        model = Cell()
        dtr.wrap(model, blocks=["blocks.0"])
        refs.append(weakref.ref(Cell))
        dtr.unwrap(model)
        del model, Cell
    gc.collect()
    assert sum(r() is not None for r in refs) <= 1


# -- tracers that cannot route, and old pickles -----------------------------------------------------------------------


def test_torch_fx_and_jit_trace_are_refused_with_what_to_use_instead():
    model = Stack()  # a model fx can trace (the DiT's timestep embedding is beyond fx in torch 2.8)
    dtr.wrap(model, sharing_ratio=RATIO, alpha=ALPHA, blocks=r"blocks\.\d")
    with pytest.raises(TypeError, match="torch.fx: use torch.compile or torch.export"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(TypeError, match="torch.jit.trace: use torch.compile or torch.export"):
        torch.jit.trace(model, (torch.randn(2, 3, 16), torch.tensor([0, 999])))


def test_torch_export_routes():
    model = steady_dit().eval()
    wrap(model)
    x, t, y = inputs(batch=4)
    exported = torch.export.export(model, (x, t, y))
    t2 = torch.tensor([999, 998, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, t2, y), model(x, t2, y), **TOL)


class Reduces:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_whole_model_pickles_of_older_versions_say_how_to_carry_the_model_over():
    from dtr import placements, routing

    v02 = pickle.dumps(Reduces(placements._new_routed, (nn.Linear, "residual")))
    with pytest.raises(RuntimeError, match="pickled whole by dtr 0.2.*save model.state_dict"):
        pickle.loads(v02)
    v01 = pickle.dumps(Reduces(getattr, (Reduces(object.__new__, (routing.Routing,)), "_residual_post")))
    with pytest.raises(RuntimeError, match="pickled whole by dtr 0.1.*save model.state_dict"):
        pickle.loads(v01)


# -- interrupts anywhere ----------------------------------------------------------------------------------------------


def test_an_interrupt_at_any_module_leaves_no_call_behind():
    model = steady_dit().eval()
    routing = wrap(model)
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        want = model(x, t, y)
    places = [(m, kind) for m in model.modules() if not isinstance(m, nn.ModuleList) for kind in ("pre", "post")]
    for module, kind in places:

        def stop(*_):
            raise KeyboardInterrupt

        handle = module.register_forward_pre_hook(stop) if kind == "pre" else module.register_forward_hook(stop)
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(x, t, y)
        handle.remove()
        assert routing.current_tasks() is None, (type(module).__name__, kind)
        with torch.no_grad():
            assert torch.equal(model(x, t, y), want)
    assert len(places) > 40
