"""Per-call routing state: threads, DataParallel-style replicas, re-entrant and interrupted calls, and the
fused residual backward, each checked against the routing formula written out by hand."""

import copy
import sys
import threading
import weakref

import pytest
import torch
from helpers import dtr_masks, inputs, reference_forward, tiny_dit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtr

T = 1000


def routed_dit(ratio=0.5, depth=2):
    model = tiny_dit(depth=depth)
    dtr.wrap(model, sharing_ratio=ratio)
    return model


def reference(model, x, t, y, ratio=0.5):
    with torch.no_grad():
        return reference_forward(model, x, t, y, dtr_masks(model, ratio))


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond, so calls from several threads interleave inside each other."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def count_overlap(model):
    """Hooks on the model (outside routing) that record the most calls in flight at once."""
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def enter(m, a):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])

    def leave(m, a, o):
        with lock:
            state["now"] -= 1

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)
    return state


# -- threads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_sharing_one_model_each_get_their_own_timesteps(threads, fast_switching):
    model = routed_dit()
    overlap = count_overlap(model)
    x, _, y = inputs(batch=3)
    steps = [
        torch.tensor([0, 0, 0]),
        torch.tensor([999, 999, 999]),
        torch.tensor([500, 1, 998]),
        torch.tensor([37, 250, 640]),
    ]
    want = [reference(model, x, t, y) for t in steps[:threads]]
    wrong, errors = [0] * threads, []

    def worker(i):
        try:
            for _ in range(200):
                with torch.no_grad():
                    out = model(x, steps[i], y)
                wrong[i] += not torch.allclose(out, want[i], rtol=0, atol=1e-5)
        except Exception as e:  # noqa: BLE001 - any error is a failure of the test
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    assert errors == [] and wrong == [0] * threads
    assert overlap["max"] >= 2  # the calls really ran inside each other


def replicate_on_cpu(model):
    """What torch.nn.parallel.replicate does (it needs CUDA): shallow copies of every module that share the
    original's __dict__ entries (routing included), wired to each other, with the same parameter tensors."""
    copies = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for m, r in copies.items():
        r._parameters = dict(m._parameters)
        r._buffers = dict(m._buffers)
        r._modules = {k: copies[c] for k, c in m._modules.items()}
    return copies[model]


def test_data_parallel_replicas_route_by_their_own_slices(fast_switching):
    """nn.DataParallel's replicas share the original's __dict__ (routing included) and run in threads;
    on CPU we make them as DataParallel does (replicate + parallel_apply need CUDA: see test_cuda.py)."""
    model = routed_dit()
    x, _, y = inputs(batch=4)
    t = torch.tensor([0, 999, 998, 1])
    slices = [slice(0, 2), slice(2, 4)]
    want = [reference(model, x[sl], t[sl], y[sl]) for sl in slices]
    replicas = [replicate_on_cpu(model) for _ in range(2)]
    outs, wrong = [None, None], [0, 0]

    def worker(i):
        sl = slices[i]
        for _ in range(100):
            with torch.no_grad():
                outs[i] = replicas[i](x[sl], t[sl], y[sl])
            wrong[i] += not torch.allclose(outs[i], want[i], rtol=0, atol=1e-5)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    assert wrong == [0, 0]
    assert not torch.allclose(want[0], reference(model, x[:2], t[2:], y[:2]), atol=1e-2)  # the slices' tasks matter


# -- re-entrant calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_the_same_model_called_inside_its_own_block_hook(hook):
    model = routed_dit()
    x, t, y = inputs(batch=3, t=torch.tensor([0, 999, 500]))
    t_inner = torch.tensor([998, 3, 640])
    want_outer, want_inner = reference(model, x, t, y), reference(model, x, t_inner, y)
    inner = []

    def call_inside(*_):
        if not inner:  # once, not recursively
            inner.append(None)
            inner[0] = model(x, t_inner, y)

    block = model.blocks[0]
    handle = block.register_forward_pre_hook(call_inside) if hook == "pre" else block.register_forward_hook(call_inside)
    with torch.no_grad():
        out = model(x, t, y)
    handle.remove()
    torch.testing.assert_close(inner[0], want_inner, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, want_outer, rtol=0, atol=1e-5)


def test_another_routed_model_called_inside_a_hook():
    model, other = routed_dit(ratio=0.5), tiny_dit(seed=3, depth=2)
    dtr.wrap(other, sharing_ratio=0.8)
    x, t, y = inputs(batch=3, t=torch.tensor([0, 999, 500]))
    t_other = torch.tensor([999, 999, 0])
    got = {}

    def call_other(*_):
        got["other"] = other(x, t_other, y)

    model.blocks[1].register_forward_hook(call_other)
    with torch.no_grad():
        out = model(x, t, y)
        want_other = reference_forward(other, x, t_other, y, dtr_masks(other, 0.8))
    torch.testing.assert_close(got["other"], want_other, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, reference(model, x, t, y), rtol=0, atol=1e-5)


# -- interrupted calls --------------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_an_interrupted_call_leaves_no_state_behind(error):
    model = routed_dit()
    routing = dtr.routing_of(model)
    x, t, y = inputs(batch=3, t=torch.tensor([0, 999, 500]))

    def interrupt(*_):
        raise error("stop")

    handle = model.blocks[1].register_forward_pre_hook(interrupt)
    with pytest.raises(error), torch.no_grad():
        model(x, t, y)
    handle.remove()
    assert routing.current_tasks() is None
    with pytest.raises(RuntimeError, match="ran without a timestep"), torch.no_grad():
        model.blocks[0](torch.randn(3, 16, 16), torch.randn(3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference(model, x, t, y), rtol=0, atol=1e-5)


def test_a_copy_made_during_a_call_carries_no_call():
    model = routed_dit()
    x, t, y = inputs(batch=3, t=torch.tensor([0, 999, 500]))
    copies = []
    model.blocks[0].register_forward_hook(lambda *_: copies.append(copy.deepcopy(model)))
    with torch.no_grad():
        model(x, t, y)
    ema = copies[0]
    assert dtr.routing_of(ema).current_tasks() is None
    with pytest.raises(RuntimeError, match="ran without a timestep"), torch.no_grad():
        ema.blocks[1](torch.randn(3, 16, 16), torch.randn(3, 16))


# -- the fused residual backward ----------------------------------------------------------------


def grads(model, fn):
    model.zero_grad()
    x = fn()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, x


def test_gradients_equal_those_of_the_formula_written_out():
    model = tiny_dit(depth=3).train()
    model.class_dropout_prob = 0.0
    x, t, y = inputs()
    dtr.wrap(model, sharing_ratio=0.5, alpha=1.5)
    masks = dtr_masks(model, 0.5, 1.5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, _ = grads(model, lambda: model(xa, t, y).square().mean().backward())
    want, _ = grads(model, lambda: reference_forward(model, xb, t, y, masks).square().mean().backward())
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-8)


class Residual(nn.Module):
    """A residual-shaped block whose branch can ignore its input or be scaled away."""

    def __init__(self, uses_input=True, width=8):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.uses_input = uses_input

    def forward(self, x):
        return self.lin(x) if self.uses_input else self.lin.bias.expand_as(x) * 1.0


class Stack(nn.Module):
    def __init__(self, uses_input=(True, True)):
        super().__init__()
        self.blocks = nn.ModuleList([Residual(u) for u in uses_input])

    def forward(self, x, t):
        for b in self.blocks:
            x = b(x)
        return x


def stack_reference(model, x, t, ratio):
    m = dtr.task_masks(T, 8, ratio)[t].to(x.dtype)[:, None, :]
    for b in model.blocks:
        x = Residual.forward(b, m * x) + (1 - m) * x
    return x


@settings(max_examples=25, deadline=None)
@given(
    uses=st.tuples(st.booleans(), st.booleans()),
    ratio=st.sampled_from([0.25, 0.5, 0.875, 1.0]),
    t=st.lists(st.integers(0, T - 1), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_fused_backward_matches_autograd_of_the_formula_in_float64(uses, ratio, t, seed):
    """Every gradient path: branch using its input or not (the masked-input gradient absent), any mask."""
    torch.manual_seed(seed)
    model = Stack(uses).double()
    t = torch.tensor(t)
    x = torch.randn(len(t), 3, 8, dtype=torch.float64)
    plain = copy.deepcopy(model)
    dtr.wrap(model, sharing_ratio=ratio, blocks=r"blocks\.\d+")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn_like(x)
    (model(xa, t) * w).sum().backward()
    (stack_reference(plain, xb, t, ratio) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), n
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_gradcheck_of_the_routed_block():
    torch.manual_seed(0)
    model = Stack().double()
    dtr.wrap(model, sharing_ratio=0.5, blocks=r"blocks\.\d+")
    t = torch.tensor([0, 999, 400])
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x, t), (x,))
    assert torch.autograd.gradgradcheck(lambda x: model(x, t).square(), (x,))


def test_block_output_in_another_dtype_under_autocast():
    """A branch that returns bf16 for an fp32 input: the residual add is fp32, gradients reach both dtypes."""
    torch.manual_seed(0)
    model = Stack()
    plain = copy.deepcopy(model)
    dtr.wrap(model, sharing_ratio=0.5, blocks=r"blocks\.\d+")
    t = torch.tensor([0, 999])
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
        ref = stack_reference(plain, x, t, 0.5)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3)


def test_no_grad_call_builds_no_graph_and_matches_the_grad_mode_output():
    model = routed_dit(ratio=0.5, depth=2)
    x, t, y = inputs()
    with torch.no_grad():
        fast = model(x, t, y)
    assert fast.grad_fn is None
    slow = model(x, t, y)
    assert slow.grad_fn is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, t, y), fast, rtol=0, atol=0)


class ViewBlock(nn.Module):
    """Returns a view of a buffer it keeps: the add-back must not write into the buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("store", torch.zeros(2, 3, 8))

    def forward(self, x):
        self.store.copy_(x * 2)
        return self.store[:]


class OneBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def forward(self, x, t):
        return self.blocks[0](x)


def test_no_grad_add_back_never_writes_into_a_view_the_block_returns():
    model = OneBlock(ViewBlock())
    dtr.wrap(model, sharing_ratio=0.5, blocks=["blocks.0"])
    x, t = torch.randn(2, 3, 8), torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    m = dtr.task_masks(T, 8, 0.5)[t].float()[:, None, :]
    torch.testing.assert_close(out, 2 * m * x + (1 - m) * x, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.blocks[0].store, 2 * m * x, rtol=0, atol=0)


class Rebinding(nn.Module):
    """A DiT-like block that rebinds its input (x = x + F(x)) and records whether the input is still alive."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.input_alive_after_rebind = None

    def forward(self, x, scale):
        ref = weakref.ref(x)
        x = x + scale * self.lin(x)
        self.input_alive_after_rebind = ref() is not None
        return x


class RebindingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Rebinding(), Rebinding()])

    def forward(self, x, t):
        for b in self.blocks:
            x = b(x, 0.5)
        return x


def test_no_grad_masked_input_is_freed_as_soon_as_the_block_drops_it():
    """Under no_grad routing keeps no reference to the masked copy m * x: no peak memory beyond the model's."""
    torch.manual_seed(0)
    model = RebindingModel()
    plain = copy.deepcopy(model)
    dtr.wrap(model, sharing_ratio=0.5, blocks=r"blocks\.\d+")
    x, t = torch.randn(2, 3, 8), torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
    # CPython < 3.11 keeps a call's arguments on the caller's stack until it returns: nothing can free them early
    alive = sys.version_info < (3, 11)
    assert [b.input_alive_after_rebind for b in model.blocks] == [alive, alive]
    m = dtr.task_masks(T, 8, 0.5)[t].float()[:, None, :]
    h = x
    for b in plain.blocks:
        h = Rebinding.forward(b, m * h, 0.5) + (1 - m) * h
    torch.testing.assert_close(out, h, rtol=0, atol=1e-6)


# -- the per-call mask cache and the window starts -------------------------------------------------


class TwoDtypes(nn.Module):
    """The stream enters in float64, is cast to float32 between the two routed blocks of one width."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8).double(), nn.Linear(8, 8)])

    def forward(self, x, t):
        return self.blocks[1](self.blocks[0](x).float())


def test_masks_of_one_call_are_kept_per_dtype():
    """Block 1 must get a float32 mask: a float64 one reused from block 0 would make its input float64."""
    torch.manual_seed(0)
    model = TwoDtypes()
    dtr.wrap(model, sharing_ratio=0.5, blocks=r"blocks\.\d")
    x, t = torch.randn(2, 3, 8, dtype=torch.float64), torch.tensor([0, 999])
    m = dtr.task_masks(T, 8, 0.5)[t][:, None, :]
    h = nn.Linear.forward(model.blocks[0], m.double() * x) + (1 - m.double()) * x
    h = h.float()
    want = nn.Linear.forward(model.blocks[1], m.float() * h) + (1 - m.float()) * h
    with torch.no_grad():
        out = model(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_window_starts_are_kept_per_device():
    """The same routing on the CPU, then on the meta device (a second device any machine has): starts per device."""
    model = routed_dit()
    x, t, y = inputs(batch=3)
    with torch.no_grad():
        model(x, t, y)
        model.to("meta")
        out = model(x.to("meta"), t.to("meta"), y.to("meta"))
    assert out.device.type == "meta" and out.shape == (3, 8, 8, 8)
    assert {d.type for (_, d) in dtr.routing_of(model).runtime._starts} == {"cpu", "meta"}


class CapturedTwice(nn.Module):
    """The module the timestep enters is called twice in one forward (e.g. for t and for a second time r)."""

    def __init__(self):
        super().__init__()
        self.time = nn.Embedding(T, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8)])

    def forward(self, x, t, r):
        return self.blocks[0](x + self.time(t)[:, None] + self.time(r)[:, None])


def test_a_timestep_module_called_twice_in_one_call_is_refused():
    model = CapturedTwice()
    dtr.wrap(model, blocks=["blocks.0"], timestep_module="time", timestep_arg=0)
    with pytest.raises(RuntimeError, match="timestep_module 'time' was called twice in one call"), torch.no_grad():
        model(torch.randn(2, 3, 8), torch.tensor([0, 999]), torch.tensor([5, 6]))
