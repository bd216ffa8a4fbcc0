"""What routing costs: time of unwrapped vs ``dtr.wrap`` vs a paper-code-style router, and bytes added.

    python benchmarks/overhead.py                      # DiT-S/2, forward+backward, eager
    python benchmarks/overhead.py --model DiT-B/2 --mode sample --compile

The variants run interleaved (one of each per round, order rotated) so that drift of the machine
hits all of them alike; we report the median and min-max over rounds of each variant's time
divided by the unwrapped model's time in the same round.
"""

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch
import torch._dynamo
import torch._inductor.config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "dit"))
import dtr  # noqa: E402
from models import DiT_models  # noqa: E402

T = 1000


#################################################################################
#                   The paper code's way, for comparison                        #
#################################################################################


def naive_route(model, sharing_ratio=0.8, alpha=4.0):
    """Route like the official code: a (T, C) float buffer in every block, the task set on every block per forward."""
    masks = dtr.task_masks(T, model.pos_embed.shape[-1], sharing_ratio, alpha).float()
    for block in model.blocks:
        block.register_buffer("task_masks", masks.clone())

    def set_task(module, args):
        for block in module.blocks:
            block.active_t = args[1]

    def pre(block, args):
        m = block.task_masks[block.active_t][:, None, :]
        block.saved = (args[0], m)
        return (m * args[0], *args[1:])

    def post(block, args, out):
        x, m = block.saved
        return out + (1 - m) * x

    model.register_forward_pre_hook(set_task)
    for block in model.blocks:
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    return model


#################################################################################
#                      Steps, verified before they are timed                    #
#################################################################################


class VerificationError(RuntimeError):
    """A variant does not compute what its name claims: nothing is timed or reported."""


def make_step(model, mode, x, t, y, compile="eager", dtype=torch.float32):
    """One training step (forward + backward + AdamW) or one CFG sampling call, as a closure returning its output.

    compile: "eager"; "full" (torch.compile of the module, or of the bound forward_with_cfg for sampling);
    "regional" (each DiT block compiled in place, as diffusers' compile_repeated_blocks does).
    """
    # (torch < 2.2 refuses an fp32 autocast even when disabled: no context at all for fp32)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(x.device.type, dtype=dtype)
    if compile != "eager":
        # The paper-style router is hook-based, and TorchDynamo does not guard on hooks by default: without
        # this, its compiled step reuses the unwrapped model's graph (verify() catches that). Eager RNG in
        # compiled graphs, so that DiT's random label dropout matches the eager reference.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._inductor.config.fallback_random = True
    if compile == "regional":
        for block in model.blocks:
            block.compile()
    if mode == "train":
        model.train()
        fwd = torch.compile(model) if compile == "full" else model
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)  # lr 0: every round sees the same weights

        def step():
            with autocast:
                out = fwd(x, t, y)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out

    else:  # one sampling call with classifier-free guidance, as sample.py makes it
        model.eval()
        # compile the bound method itself: forward_with_cfg on a compiled module would run eagerly
        fwd = torch.compile(model.forward_with_cfg) if compile == "full" else model.forward_with_cfg
        batch = cfg_batch(model, x, t, y)

        def step():
            with torch.no_grad(), autocast:
                return fwd(*batch, 1.5)

    return step


def cfg_batch(model, x, t, y):
    """The doubled batch of a classifier-free-guidance call, as sample.py makes it: each sample, then unconditioned."""
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.num_classes)])


def tolerance(dtype):
    """How far a compiled step may drift from eager: fp32 reassociation, or one bf16 rounding step per block."""
    return dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)


def reference_outputs(models, mode, x, t, y, dtype):
    """Each variant's output, eager, before anything is compiled: what its timed step must reproduce."""
    out = {}
    for n, m in models.items():
        torch.manual_seed(0)  # train mode drops class labels at random (DiT's classifier-free dropout)
        out[n] = make_step(copy.deepcopy(m), mode, x, t, y, "eager", dtype)().detach().float()
    return out


def verify(outputs, references, dtype, routed=("dtr.wrap", "paper-style")):
    """Refuse to time a variant whose step does not compute its own eager output, or a router that routes nothing.

    Compiled graphs of one process could in principle be reused across models (TorchDynamo guards, not
    we, decide): comparing every variant's first compiled output with its eager reference catches that.
    """
    tol = tolerance(dtype)
    for name, out in outputs.items():
        ref = references[name]
        if not torch.allclose(out.detach().float(), ref, **tol):
            raise VerificationError(
                f"{name}: timed step differs from its eager reference by "
                f"{(out.detach().float() - ref).abs().max().item():.3g} (tolerance {tol})"
            )
    for name in routed:
        if name in references and torch.allclose(references[name], references["unwrapped"], **tol):
            raise VerificationError(f"{name}: computes what the unwrapped model computes: it is not routed")
    both = {"dtr.wrap", "paper-style"} <= references.keys()  # the two routers must do the same work to compare
    if both and not torch.allclose(references["dtr.wrap"], references["paper-style"], **tol):
        raise VerificationError("dtr.wrap and the paper-style router compute different outputs")


def first_calls(steps, sync):
    """Run each step once (compiling it, where compiled): its output and its compile-and-run time in s."""
    outputs, seconds = {}, {}
    for n, step in steps.items():
        sync()
        torch.manual_seed(0)  # the same label dropout as the reference
        t0 = time.perf_counter()
        outputs[n] = step()
        sync()
        seconds[n] = time.perf_counter() - t0
    return outputs, seconds


def time_interleaved(steps, rounds, warmup, sync=lambda: None):
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync()
            t0 = time.perf_counter()
            steps[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return times


def peak_memory(steps, device):
    """Peak CUDA memory of one more call of each step (None on the CPU, which has no allocator counter)."""
    if device.type != "cuda":
        return dict.fromkeys(steps)
    out = {}
    for n, step in steps.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out[n] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ratios(times, base="unwrapped"):
    out = {}
    for n, ts in times.items():
        r = [a / b for a, b in zip(ts, times[base])]
        out[n] = dict(median=statistics.median(r), min=min(r), max=max(r), median_s=statistics.median(ts))
    return out


#################################################################################
#                 Accounting: the passes routing adds per block                 #
#################################################################################


class OpLog(TorchDispatchMode):
    """Every aten op that moves data: (name, shapes, bytes read + written). Views and aliases move none."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        aliased = {a.untyped_storage().data_ptr() for a in ins}
        if outs and all(o.untyped_storage().data_ptr() in aliased for o in outs):
            return out  # a view: no data moved
        moved = sum(a.numel() * a.element_size() for a in ins + outs)
        self.ops.append(
            (
                func.overloadpacket.__name__,
                tuple(tuple(a.shape) for a in ins + outs),
                moved,
                max(a.numel() for a in ins + outs) if ins + outs else 0,
            )
        )
        return out


def logged_step(model, mode, x, t, y):
    """The aten ops of one forward and of its backward (train) or of one CFG sampling call (sample)."""
    fwd, bwd = OpLog(), OpLog()
    if mode == "train":
        model.train()
        with fwd:
            loss = model(x, t, y).square().mean()
        with bwd:
            loss.backward()
        return {"forward": fwd.ops, "backward": bwd.ops}
    model.eval()
    batch = cfg_batch(model, x, t, y)
    with fwd, torch.no_grad():
        model.forward_with_cfg(*batch, 1.5)
    return {"sampling call": fwd.ops}


def added_ops(routed, plain):
    """The ops (with shapes) a routed step runs beyond the unwrapped step's, as a multiset."""
    key = lambda op: op[:2]  # noqa: E731
    extra = Counter(map(key, routed)) - Counter(map(key, plain))
    info = {key(op): op for op in routed}
    return [info[k] for k, n in extra.items() for _ in range(n)]


def profile(args):
    """Ops and bytes per element of the residual stream that each router adds per block, forward and backward.

    The paper-style router runs exactly the op sequence of dtr's hook-based router before Router v2
    (forward: x * m, then out + (1 - m) * x; backward: the gradients of both products and their sum),
    so its row is also the "before" of dtr.wrap.
    """
    models, (x, t, y) = build_variants(args, torch.device("cpu"))
    depth, width = len(models["unwrapped"].blocks), models["unwrapped"].pos_embed.shape[-1]
    logs = {n: logged_step(m, args.mode, x, t, y) for n, m in models.items()}
    tokens = models["unwrapped"].x_embedder.num_patches
    stream = x.shape[0] * (2 if args.mode == "sample" else 1) * tokens * width  # B*N*C (CFG doubles B)
    out = {}
    for name in ("dtr.wrap", "paper-style"):
        out[name] = {}
        for phase, ops in logs[name].items():
            extra = added_ops(ops, logs["unwrapped"][phase])
            big = [op for op in extra if op[3] == stream]  # passes over the residual stream
            counts = Counter(op[0] for op in big)
            assert all(n % depth == 0 for n in counts.values()), f"{name}: added ops differ between blocks: {counts}"
            out[name][phase] = dict(
                ops_per_block={k: n // depth for k, n in sorted(counts.items())},
                bytes_per_element_per_block=sum(op[2] for op in big) / depth / stream,
                small_ops=len(extra) - len(big),
            )
    print(f"{args.model}, {args.mode}: what routing adds per block, over the (B, N, C) residual stream (fp32)")
    print("| router | phase | ops per block | bytes per element per block | other (mask-sized) ops per call |")
    print("|---|---|---|---|---|")
    for name, phases in out.items():
        for phase, r in phases.items():
            ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in r["ops_per_block"].items())
            print(f"| {name} | {phase} | {ops} | {r['bytes_per_element_per_block']:.0f} | {r['small_ops']} |")
    return out


#################################################################################
#                                   Memory                                      #
#################################################################################


def state_bytes(model):
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    sd = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return params, buffers, sd


class _ByteCounter(io.RawIOBase):
    """A write-only file that only counts: torch.save's size without holding a copy of an XL checkpoint."""

    def __init__(self):
        self.n = 0

    def writable(self):
        return True

    def write(self, b):
        self.n += len(b)
        return len(b)


def checkpoint_file_bytes(model):
    counter = _ByteCounter()
    torch.save(model.state_dict(), counter)
    return counter.n


def memory_table(names, with_file):
    rows = []
    for name in names:
        with torch.device("meta"):
            base = DiT_models[name](input_size=32, num_classes=1000)
        routed, naive = copy.deepcopy(base), naive_route(copy.deepcopy(base))
        routing = dtr.wrap(routed)
        # The router's only state: window starts per width, made on first use (int32, T entries).
        routing.runtime._window_starts(base.pos_embed.shape[-1], torch.device("cpu"), None)
        b, r, n = state_bytes(base), state_bytes(routed), state_bytes(naive)
        row = dict(
            model=name,
            params=sum(q.numel() for q in base.parameters()),
            routed_added_params=r[0] - b[0],
            routed_added_state_dict=r[2] - b[2],
            routed_added_buffers=r[1] - b[1],
            routed_router_bytes=routing.state_bytes(),
            naive_added_buffers=n[1] - b[1],
            naive_added_state_dict=n[2] - b[2],
        )
        if with_file:  # real tensors: torch.save of the state_dict, as train.py's checkpoints hold it
            plain = DiT_models[name](input_size=32, num_classes=1000)
            plain_f = checkpoint_file_bytes(plain)
            row["naive_added_checkpoint_file"] = checkpoint_file_bytes(naive_route(copy.deepcopy(plain))) - plain_f
            dtr.wrap(plain)
            row["routed_added_checkpoint_file"] = checkpoint_file_bytes(plain) - plain_f
            del plain
        rows.append(row)
    return rows


#################################################################################
#                                     Main                                      #
#################################################################################


VARIANTS = ("unwrapped", "dtr.wrap", "paper-style")


def build_variants(args, device):
    """The three models on ``device``, same weights: unwrapped, ``dtr.wrap(model, 0.8)`` and the paper-style router."""
    torch.manual_seed(0)
    base = DiT_models[args.model](input_size=args.input_size, num_classes=1000).to(device)
    with torch.no_grad():  # DiT zero-initialises adaLN and the final layer: a fresh DiT outputs 0 routed or not
        for p in base.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    models = {
        "unwrapped": base,
        "dtr.wrap": dtr.wrap(copy.deepcopy(base)).model,
        "paper-style": naive_route(copy.deepcopy(base)),
    }
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g, device=device)
    t = torch.randint(0, T, (args.batch,), generator=g, device=device)
    y = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
    return models, (x, t, y)


def time_variants(args):
    """Verify, then time interleaved, the chosen variants; prints and returns ratios, compile times, peak memory."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models, (x, t, y) = build_variants(args, device)
    references = reference_outputs(models, args.mode, x, t, y, dtype)
    steps = {n: make_step(models[n], args.mode, x, t, y, args.compile, dtype) for n in args.variants}
    if args.inject_mismatch:  # for the test that verification refuses: the routed variant runs the unrouted model
        steps["dtr.wrap"] = make_step(dtr.unwrap(models["dtr.wrap"]), args.mode, x, t, y, args.compile, dtype)
    outputs, first = first_calls(steps, sync)
    verify(outputs, references, dtype)
    result = dict(
        model=args.model,
        mode=args.mode,
        batch=args.batch,
        compile=args.compile,
        dtype=args.dtype,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        threads=args.threads,
        rounds=args.rounds,
        verified=True,
        first_call_s=first,
        peak_memory_mib=peak_memory(steps, device),
    )
    if args.rounds > 0:
        result["ratios"] = ratios(time_interleaved(steps, args.rounds, args.warmup, sync), base=args.variants[0])
    print(
        f"{args.model}, {args.mode}, batch {args.batch}, {args.compile}, {args.dtype}, {result['device']}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds; every variant verified against its eager output"
    )
    print(f"| variant | median s/step | ratio to {args.variants[0]}: median | min | max | first call s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in args.variants:
        r = result.get("ratios", {}).get(
            n, dict(median_s=float("nan"), median=float("nan"), min=float("nan"), max=float("nan"))
        )
        mem = result["peak_memory_mib"][n]
        print(
            f"| {n} | {r['median_s']:.4f} | {r['median']:.4f} | {r['min']:.4f} | {r['max']:.4f} | "
            f"{first[n]:.2f} | {'-' if mem is None else f'{mem:.0f}'} |"
        )
    return result


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compile_times(args):
    """Compile time of each variant in a fresh process with inductor's caches off, and the ratios to unwrapped.

    In one process the second model compiled reuses kernels the first one built, which flatters it.
    """
    seconds = {}
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--model",
                args.model,
                "--mode",
                args.mode,
                "--batch",
                str(args.batch),
                "--input-size",
                str(args.input_size),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--compile",
                args.compile,
                "--variants",
                variant,
                "--rounds",
                "0",
                "--json",
                out,
            ]
            env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            with open(out) as f:
                seconds[variant] = json.load(f)["first_call_s"][variant]
    result = {n: dict(first_call_s=s, ratio=s / seconds["unwrapped"]) for n, s in seconds.items()}
    print(f"{args.model}, {args.mode}, {args.compile} compile, one fresh process per variant, caches off")
    print("| variant | compile + first call s | ratio to unwrapped |\n|---|---|---|")
    for n, r in result.items():
        print(f"| {n} | {r['first_call_s']:.1f} | {r['ratio']:.3f} |")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2", choices=list(DiT_models))
    p.add_argument("--mode", default="train", choices=["train", "sample"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32, help="latent size (32 = 256x256 images)")
    p.add_argument("--rounds", type=int, default=15, help="0: verify and report first calls only")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16: autocast, as the GPU runs use")
    p.add_argument(
        "--compile",
        default="eager",
        choices=["eager", "full", "regional"],
        help="full: torch.compile of the model; regional: each block compiled in place",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="which to time (the first is the baseline of the ratios); one per process for compile times",
    )
    p.add_argument(
        "--compile-times",
        action="store_true",
        help="compile time of each variant in its own process (with --compile full or regional)",
    )
    p.add_argument("--profile", action="store_true", help="ops and bytes routing adds per block (no timing)")
    p.add_argument("--inject-mismatch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory", default="none", choices=["all", "none", "model"], help="bytes table for every DiT size")
    p.add_argument("--checkpoint-file", action="store_true", help="also measure saved checkpoint sizes (slow)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.rounds < 0 or args.threads < 1 or args.batch < 1 or args.warmup < 0:
        p.error("--rounds and --warmup must be >= 0, --threads and --batch >= 1")
    torch.set_num_threads(args.threads)

    result = dict(model=args.model, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    try:
        if args.profile:
            result["profile"] = profile(args)
        elif args.compile_times:
            if args.compile == "eager":
                p.error("--compile-times needs --compile full or --compile regional")
            result["compile_times"] = compile_times(args)
        elif args.rounds > 0 or args.memory == "none":
            result.update(time_variants(args))
    except VerificationError as e:
        print(f"overhead.py: refusing to report: {e}", file=sys.stderr)
        sys.exit(3)

    if args.memory != "none":
        names = list(DiT_models) if args.memory == "all" else [args.model]
        result["memory"] = memory_table(names, args.checkpoint_file)
        print(
            "\n| model | params | dtr.wrap: params added | state_dict bytes added | buffers added | router state |"
            + (" checkpoint file bytes added |" if args.checkpoint_file else "")
            + " paper-style: buffers added |"
            + (" checkpoint file added |" if args.checkpoint_file else "")
        )
        print("|---|---|---|---|---|---|---|" + ("---|---|" if args.checkpoint_file else ""))
        for row in result["memory"]:
            line = (
                f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['routed_added_params']} | "
                f"{row['routed_added_state_dict']} | {row['routed_added_buffers']} | "
                f"{row['routed_router_bytes'] / 1024:.1f} KiB |"
            )
            if args.checkpoint_file:
                line += f" {row['routed_added_checkpoint_file']} |"
            line += f" {row['naive_added_buffers'] / 2**20:.1f} MiB |"
            if args.checkpoint_file:
                line += f" {row['naive_added_checkpoint_file'] / 2**20:.1f} MiB |"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
