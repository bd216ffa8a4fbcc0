"""torch.compile (CPU): a compiled routed model computes what eager computes, whatever was compiled
before it in the process, after unwrap and rewrap, compiled whole or block by block, with no graph break."""

import subprocess
import sys
import threading

import pytest
import torch
import torch._dynamo
from helpers import INDEX_T, diffusers_dit, dit_call, inputs, tiny_dit, unet2d, unet2d_call, unet_cond, unet_cond_call
from torch._dynamo.utils import counters

import dtr

TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])

pytestmark = pytest.mark.slow

# Which graph runs is TorchDynamo's decision (guards), and what is traced AOTAutograd's, the same for every backend:
# the tests compile with aot_eager (TorchDynamo + AOTAutograd, seconds). Inductor only lowers the plain aten ops
# routing adds (mul, addcmul, lerp); its cold C++ builds cost a minute a model on 2 cores, so inductor runs in
# benchmarks/gpu_suite.py (full and regional compile, each verified against eager before it is timed).
BACKEND = "aot_eager"
OUT_TOL = dict(rtol=1e-4, atol=2e-5)  # compiled graphs may reorder float ops
GRAD_TOL = dict(rtol=1e-3, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from an empty compile cache and builds the order it tests itself."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model_pair(depth=2):
    """Two DiTs of one class with the same weights: one stays unrouted."""
    base, routed = (
        tiny_dit(depth=depth, hidden_size=16, num_heads=2),
        tiny_dit(depth=depth, hidden_size=16, num_heads=2),
    )
    for m in (base, routed):
        m.class_dropout_prob = 0.0
    return base, routed


def out(fn, *args):
    with torch.no_grad():
        return fn(*args)


def grads(model, fn, x, t, y):
    model.zero_grad()
    fn(x, t, y).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], **GRAD_TOL, msg=n)


def graphs():
    return counters["stats"]["unique_graphs"]


# -- every order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("routed_first", [False, True])
def test_unrouted_and_routed_compiled_in_either_order(routed_first):
    base, routed = model_pair()
    dtr.wrap(routed, sharing_ratio=0.5)
    x, t, y = inputs(batch=4)
    order = [routed, base] if routed_first else [base, routed]
    compiled = {id(m): torch.compile(m, backend=BACKEND) for m in order}
    before = graphs()
    got = {id(m): out(compiled[id(m)], x, t, y) for m in order}
    assert graphs() - before == 2  # two graphs: neither model ran the other's
    for m in order:
        torch.testing.assert_close(got[id(m)], out(m, x, t, y), **OUT_TOL)
    assert not torch.allclose(got[id(base)], got[id(routed)], atol=1e-2)
    for m in order:  # training: forward and backward graphs
        m.train()
        assert_grads_close(grads(m, compiled[id(m)], x, t, y), grads(m, m, x, t, y))


def test_unwrap_then_rewrap_with_another_ratio_after_compile():
    _, model = model_pair()
    x, t, y = inputs(batch=4)
    plain = out(model, x, t, y)
    routing = dtr.wrap(model, sharing_ratio=0.5)
    compiled = torch.compile(model, backend=BACKEND)
    half = out(compiled, x, t, y)
    torch.testing.assert_close(half, out(model, x, t, y), **OUT_TOL)
    routing.remove()
    torch.testing.assert_close(out(compiled, x, t, y), plain, **OUT_TOL)  # unwrap reaches the compiled model
    model.train()
    assert_grads_close(grads(model, compiled, x, t, y), grads(model, model, x, t, y))
    model.eval()
    dtr.wrap(model, sharing_ratio=0.8)
    eighty = out(compiled, x, t, y)
    torch.testing.assert_close(eighty, out(model, x, t, y), **OUT_TOL)
    assert not torch.allclose(eighty, half, atol=1e-2) and not torch.allclose(eighty, plain, atol=1e-2)
    assert dtr.routing_of(compiled) is dtr.routing_of(model)
    dtr.unwrap(compiled)  # unwrap looks through the compiled module too
    torch.testing.assert_close(out(compiled, x, t, y), plain, **OUT_TOL)


def test_compiled_graph_follows_each_calls_timesteps_and_random_routing():
    _, model = model_pair()
    dtr.wrap(model, sharing_ratio=0.5, method="random", seed=3)
    compiled = torch.compile(model, backend=BACKEND)
    x, t, y = inputs(batch=4)
    t2 = torch.tensor([5, 6, 7, 8])
    a, b = out(compiled, x, t, y), out(compiled, x, t2, y)
    torch.testing.assert_close(a, out(model, x, t, y), **OUT_TOL)
    torch.testing.assert_close(b, out(model, x, t2, y), **OUT_TOL)
    assert not torch.allclose(a, b, atol=1e-2)


def test_wrapping_a_compiled_module_is_refused():
    with pytest.raises(TypeError, match="wrap the original model first, then compile"):
        dtr.wrap(torch.compile(tiny_dit(depth=1)))


# -- regional compilation ------------------------------------------------------------------------


def test_each_block_compiled_once_for_all_blocks_after_unrouted_blocks_were_compiled():
    """Blocks compiled one by one (as diffusers' compile_repeated_blocks does): routing included in the
    block's graph, one graph for every block, also after the same block class was compiled unrouted."""
    base, routed = model_pair(depth=3)
    dtr.wrap(routed, sharing_ratio=0.5)
    x, t, y = inputs(batch=4)
    want_base, want = out(base, x, t, y), out(routed, x, t, y)
    for m in (base, routed):
        for block in m.blocks:
            block.compile(backend=BACKEND)
    torch.testing.assert_close(out(base, x, t, y), want_base, **OUT_TOL)
    before = graphs()
    torch.testing.assert_close(out(routed, x, t, y), want, **OUT_TOL)
    # torch 2.14 guards each block's instance forward by its type: one graph for all; torch 2.8 by identity: one each
    assert graphs() - before == (1 if TORCH >= (2, 14) else len(routed.blocks))
    t2 = torch.tensor([999, 998, 0, 1])
    torch.testing.assert_close(out(routed, x, t2, y), _eager(routed, x, t2, y), **OUT_TOL)
    routed.train()
    compiled_grads = grads(routed, routed, x, t, y)
    for block in routed.blocks:
        block._compiled_call_impl = None  # back to eager
    assert_grads_close(compiled_grads, grads(routed, routed, x, t, y))


@pytest.mark.parametrize("checkpointing_first", [False, True])
def test_blocks_compiled_on_their_own_inside_eager_checkpointing(checkpointing_first):
    """Regional compile with the checkpoint outside the compiled block (a training set-up: diffusers'
    compile_repeated_blocks + enable_gradient_checkpointing): the recomputed block routes by the call it was
    recorded in, in either order; unwrap and wrap again keep working on the compiled blocks."""
    base, model = model_pair()
    routing = dtr.wrap(model, sharing_ratio=0.5)
    model.train()
    x, t, y = inputs(batch=4)
    want = grads(model, model, x, t, y)  # eager, no checkpointing

    def checkpointing():
        model.gradient_checkpointing = True

    def compile_blocks():
        for block in model.blocks:
            block.compile(backend=BACKEND)

    for step in (checkpointing, compile_blocks) if checkpointing_first else (compile_blocks, checkpointing):
        step()
    assert_grads_close(grads(model, model, x, t, y), want)
    routing.remove()
    base.train()
    assert_grads_close(grads(model, model, x, t, y), grads(base, base, x, t, y))
    dtr.wrap(model, sharing_ratio=0.5)  # the blocks' compiled calls were compiled routed: accepted
    assert_grads_close(grads(model, model, x, t, y), want)


def test_diffusers_compile_repeated_blocks_with_gradient_checkpointing():
    model = diffusers_dit().train()
    dtr.wrap(model, sharing_ratio=0.5)

    def loss_grads():
        model.zero_grad()
        dit_call(model, INDEX_T).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = loss_grads()
    model.enable_gradient_checkpointing()
    if hasattr(model, "compile_repeated_blocks"):  # diffusers >= 0.34
        model._repeated_blocks = ["BasicTransformerBlock"]  # DiT declares none; the routed blocks
        model.compile_repeated_blocks(backend=BACKEND)
    else:
        for block in model.transformer_blocks:
            block.compile(backend=BACKEND)
    assert all(b._compiled_call_impl is not None for b in model.transformer_blocks)
    assert_grads_close(loss_grads(), want)


def _eager(model, x, t, y):
    saved = [b._compiled_call_impl for b in model.blocks]
    for b in model.blocks:
        b._compiled_call_impl = None
    try:
        return out(model, x, t, y)
    finally:
        for b, c in zip(model.blocks, saved):
            b._compiled_call_impl = c


# -- graph breaks, checkpointing, threads --------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train", "cfg"])
def test_no_graph_break(mode):
    _, model = model_pair()
    dtr.wrap(model)
    x, t, y = inputs(batch=4)
    getattr(model, "train" if mode == "train" else "eval")()
    if mode == "cfg":
        fn, args = model.forward_with_cfg, (x, t, torch.tensor([1, 2, 10, 10]), 1.5)
    else:
        fn, args = model, (x, t, y)
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


FAMILIES = {
    "UNet2DModel": (unet2d, unet2d_call),
    "UNet2DConditionModel": (unet_cond, unet_cond_call),
    "DiTTransformer2DModel": (diffusers_dit, dit_call),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_diffusers_models_trace_into_one_graph_and_compile_to_eager(family):
    """diffusers marks some block classes allow_in_graph: routing must still trace through them, in one graph."""
    make, call = FAMILIES[family]
    model = make()
    dtr.wrap(model, sharing_ratio=0.5)
    explanation = torch._dynamo.explain(lambda t: call(model, t))(INDEX_T)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    if family == "DiTTransformer2DModel":  # the residual placement around allow_in_graph blocks, compiled
        with torch.no_grad():
            compiled = torch.compile(model, backend="aot_eager")
            torch.testing.assert_close(call(compiled, INDEX_T), call(model, INDEX_T), rtol=1e-5, atol=1e-5)


def test_compiled_gradient_checkpointing_matches_eager():
    _, model = model_pair()
    dtr.wrap(model, sharing_ratio=0.5)
    model.train()
    x, t, y = inputs(batch=4)
    want = grads(model, model, x, t, y)
    model.gradient_checkpointing = True
    assert_grads_close(grads(model, torch.compile(model, backend=BACKEND), x, t, y), want)


@pytest.mark.parametrize("routed", [False, True])
def test_checkpointing_traces_into_as_many_graphs_as_unrouted_and_fullgraph_compiles(routed):
    """The recipe's general.compile=true general.grad_checkpoint=true: routing adds no graph and no break."""
    base, model = model_pair()
    for m in (base, model):
        m.train()
        m.gradient_checkpointing = True
    if routed:
        dtr.wrap(model, sharing_ratio=0.5, alpha=1.5)
    x, t, y = inputs(batch=4)
    unrouted = torch._dynamo.explain(lambda: base(x, t, y).sum())()
    explanation = torch._dynamo.explain(lambda: model(x, t, y).sum())()
    assert (explanation.graph_count, explanation.graph_break_count) == (unrouted.graph_count, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    assert_grads_close(grads(model, compiled, x, t, y), grads(model, model, x, t, y))


def test_compiled_routing_uses_the_routings_own_alpha_and_num_tasks():
    """The compiled path builds window starts itself: with the routing's alpha and T, not the defaults."""
    _, model = model_pair()
    x, _, y = inputs(batch=4)
    t = torch.tensor([3, 40, 20, 49])
    dtr.wrap(model, sharing_ratio=0.5, alpha=1.0, num_tasks=50)
    eager = out(model, x, t, y)
    torch.testing.assert_close(out(torch.compile(model, backend=BACKEND), x, t, y), eager, **OUT_TOL)
    dtr.unwrap(model)
    dtr.wrap(model, sharing_ratio=0.5)  # alpha 4, T 1000: another function of the same timesteps
    assert not torch.allclose(out(model, x, t, y), eager, atol=1e-3)


def test_compiled_model_called_from_two_threads():
    _, model = model_pair()
    dtr.wrap(model, sharing_ratio=0.5)
    compiled = torch.compile(model, backend=BACKEND)
    x, _, y = inputs(batch=4)
    steps = [torch.tensor([0, 0, 0, 0]), torch.tensor([999, 999, 999, 999])]
    want = [out(model, x, s, y) for s in steps]
    out(compiled, x, steps[0], y)  # compile before the threads start
    wrong = [0, 0]

    def worker(i):
        for _ in range(50):
            wrong[i] += not torch.allclose(out(compiled, x, steps[i], y), want[i], **OUT_TOL)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    assert wrong == [0, 0]


def test_our_assume_constant_result_marks_functions_as_torch_does():
    """_compat sets torch's marker itself so that `import dtr` does not import TorchDynamo: the two must agree."""
    code = (
        "import sys, dtr; assert 'torch._dynamo' not in sys.modules, 'import dtr imported TorchDynamo'\n"
        "import torch.compiler\n"
        "from dtr._compat import assume_constant_result\n"
        "def ours(): pass\n"
        "def theirs(): pass\n"
        "assume_constant_result(ours)  # TorchDynamo not imported: our branch\n"
        "torch.compiler.assume_constant_result(theirs)  # imports TorchDynamo\n"
        "assert vars(theirs) and vars(ours) == vars(theirs), (vars(ours), vars(theirs))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
