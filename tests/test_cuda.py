"""On a GPU (marked `cuda`: deselected where there is none; benchmarks/gpu.sh runs them): dtr.wrap against the
routing formula in fp32 (TF32 off) and bf16, the asynchronous range check, copies for EMA, and concurrent calls from
threads on their own CUDA streams and from DataParallel-style replicas.  (The paper-style router's parity:
tests/recipe/test_benchmarks.py.)"""

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
from helpers import dtr_masks, inputs, reference_forward, tiny_dit

import dtr

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls, so that routing and its formula can only differ by reassociation."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def pair(depth=3):
    """The same perturbed DiT unrouted and routed by dtr.wrap, on the GPU."""
    base = tiny_dit(depth=depth)
    routed = dtr.wrap(copy.deepcopy(base), sharing_ratio=0.8).model.to(DEVICE)
    return base.to(DEVICE), routed


def on_device(*tensors):
    return [a.to(DEVICE) for a in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_forward_and_gradients_equal_the_formula_on_cuda(dtype, no_tf32):
    base, routed = pair()
    x, t, y = on_device(*inputs())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = routed(x, t, y)
        ref = reference_forward(base, x, t, y, [m.to(DEVICE) for m in dtr_masks(base)])
        torch.testing.assert_close(out.float(), ref.float(), **tol)
        assert not torch.allclose(out.float(), base(x, t, y).float(), rtol=1e-2, atol=1e-2)
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    grads = dict(routed.named_parameters())
    for name, p in base.named_parameters():
        g = grads[name].grad
        if p.grad is None:  # frozen (the fixed positional embedding)
            assert g is None, name
            continue
        scale = p.grad.abs().max().clamp_min(1e-12)
        assert ((g - p.grad).abs().max() / scale).item() < (1e-4 if dtype == torch.float32 else 5e-2), name


def test_out_of_range_timestep_raises_on_cuda():
    """The range check is asynchronous on CUDA (no host sync per call): it ends the CUDA context, so it runs in
    its own process, and the error must name the range."""
    code = (
        "import torch, dtr; from helpers import tiny_dit, inputs\n"
        "m = dtr.wrap(tiny_dit()).model.cuda(); x, t, y = inputs()\n"
        "m(x.cuda(), torch.full_like(t, 1000).cuda(), y.cuda()); torch.cuda.synchronize()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "timesteps outside [0, 1000)" in r.stderr or "device-side assert" in r.stderr, r.stderr[-2000:]


def test_deepcopy_for_ema_routes_like_the_original_on_cuda():
    _, routed = pair()
    ema = copy.deepcopy(routed)
    x, t, y = on_device(*inputs())
    with torch.no_grad():
        torch.testing.assert_close(ema(x, t, y), routed(x, t, y), rtol=0, atol=0)
        for p_ema, p in zip(ema.parameters(), routed.parameters()):
            p_ema.lerp_(p + 1, 0.5)
        assert not torch.allclose(ema(x, t, y), routed(x, t, y))  # its own weights, its own routing
    assert dtr.routing_of(ema) is not dtr.routing_of(routed)


def test_threads_on_their_own_streams_get_their_own_timesteps():
    _, routed = pair(depth=2)
    x, _, y = on_device(*inputs())
    steps = [torch.zeros(6, dtype=torch.long, device=DEVICE), torch.full((6,), 999, device=DEVICE)]
    with torch.no_grad():
        want = [routed(x, s, y).clone() for s in steps]
    wrong, errors = [0, 0], []

    def worker(i):
        stream = torch.cuda.Stream()
        try:
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(100):
                    out = routed(x, steps[i], y)
                    stream.synchronize()
                    wrong[i] += not torch.allclose(out, want[i], rtol=1e-5, atol=1e-5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and wrong == [0, 0]


def test_replicate_and_parallel_apply_route_each_replica_by_its_own_slice():
    """What nn.DataParallel does: replicas (on every GPU, or twice on the one there is) run in threads."""
    _, routed = pair(depth=2)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.device_count() > 1 else [0, 0]
    x, _, y = on_device(*inputs())
    t = torch.tensor([0, 999, 500, 37, 250, 998], device=DEVICE)
    with torch.no_grad():
        want = routed(x, t, y)
        replicas = torch.nn.parallel.replicate(routed, devices[:2])
        halves = [
            (x[:3].to(f"cuda:{d}"), t[:3].to(f"cuda:{d}"), y[:3].to(f"cuda:{d}"))
            if i == 0
            else (x[3:].to(f"cuda:{d}"), t[3:].to(f"cuda:{d}"), y[3:].to(f"cuda:{d}"))
            for i, d in enumerate(devices[:2])
        ]
        outs = torch.nn.parallel.parallel_apply(replicas, halves, devices=devices[:2])
    torch.testing.assert_close(torch.cat([o.to(DEVICE) for o in outs]), want, rtol=1e-5, atol=1e-5)
