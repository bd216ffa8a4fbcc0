"""What routing costs: time of unwrapped vs ``dtr.wrap`` vs a paper-code-style router, and bytes added.

    python benchmarks/overhead.py                      # DiT-S/2, forward+backward, eager
    python benchmarks/overhead.py --model DiT-B/2 --mode sample --compile

The variants run interleaved (one of each per round, order rotated) so that drift of the machine
hits all of them alike; we report the median and min-max over rounds of each variant's time
divided by the unwrapped model's time in the same round.
"""

import argparse
import copy
import io
import json
import os
import statistics
import sys
import time

import torch

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
#                                   Timing                                      #
#################################################################################


def make_step(model, mode, x, t, y, compile=False):
    """One training step (forward + backward) or one sampling call, compiled or eager, as a closure."""
    if mode == "train":
        model.train()
        fwd = torch.compile(model) if compile else model

        def step():
            model.zero_grad(set_to_none=True)
            fwd(x, t, y).square().mean().backward()

    else:  # one sampling call with classifier-free guidance, as sample.py makes it
        model.eval()
        # compile the bound method itself: forward_with_cfg on a compiled module would run eagerly
        fwd = torch.compile(model.forward_with_cfg) if compile else model.forward_with_cfg
        y_cfg = torch.cat([y, torch.full_like(y, model.num_classes)])
        x_cfg, t_cfg = torch.cat([x, x]), torch.cat([t, t])

        def step():
            with torch.no_grad():
                fwd(x_cfg, t_cfg, y_cfg, 1.5)

    return step


def time_interleaved(steps, rounds, warmup):
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def ratios(times, base="unwrapped"):
    out = {}
    for n, ts in times.items():
        r = [a / b for a, b in zip(ts, times[base])]
        out[n] = dict(median=statistics.median(r), min=min(r), max=max(r), median_s=statistics.median(ts))
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
        routing._window_starts(base.pos_embed.shape[-1], torch.device("cpu"))
        b, r, n = state_bytes(base), state_bytes(routed), state_bytes(naive)
        row = dict(model=name, params=sum(q.numel() for q in base.parameters()),
                   routed_added_params=r[0] - b[0], routed_added_state_dict=r[2] - b[2],
                   routed_added_buffers=r[1] - b[1], routed_router_bytes=routing.state_bytes(),
                   naive_added_buffers=n[1] - b[1], naive_added_state_dict=n[2] - b[2])
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


def time_variants(args):
    """Interleaved timing of the unwrapped model, dtr.wrap and the paper-style router; prints the ratios."""
    base = DiT_models[args.model](input_size=args.input_size, num_classes=1000)
    variants = {"unwrapped": base, "dtr.wrap": copy.deepcopy(base), "paper-style": naive_route(copy.deepcopy(base))}
    dtr.wrap(variants["dtr.wrap"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g)
    t = torch.randint(0, T, (args.batch,), generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    steps = {n: make_step(m, args.mode, x, t, y, args.compile) for n, m in variants.items()}
    result = dict(mode=args.mode, batch=args.batch, compile=args.compile, threads=args.threads, rounds=args.rounds,
                  ratios=ratios(time_interleaved(steps, args.rounds, args.warmup)))
    print(f"{args.model}, {args.mode}, batch {args.batch}, {'compiled' if args.compile else 'eager'}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds")
    print("| variant | median s/step | ratio to unwrapped: median | min | max |")
    print("|---|---|---|---|---|")
    for n, r in result["ratios"].items():
        print(f"| {n} | {r['median_s']:.4f} | {r['median']:.4f} | {r['min']:.4f} | {r['max']:.4f} |")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2", choices=list(DiT_models))
    p.add_argument("--mode", default="train", choices=["train", "sample"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32, help="latent size (32 = 256x256 images)")
    p.add_argument("--rounds", type=int, default=15, help="0: skip the timing (bytes table only)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (wrap first)")
    p.add_argument("--memory", default="all", choices=["all", "none", "model"], help="bytes table for every DiT size")
    p.add_argument("--checkpoint-file", action="store_true", help="also measure saved checkpoint sizes (slow)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.rounds < 0 or args.threads < 1 or args.batch < 1:
        p.error("--rounds must be >= 0, --threads and --batch >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    result = dict(model=args.model, torch=torch.__version__)
    if args.rounds > 0:
        result.update(time_variants(args))

    if args.memory != "none":
        names = list(DiT_models) if args.memory == "all" else [args.model]
        result["memory"] = memory_table(names, args.checkpoint_file)
        print("\n| model | params | dtr.wrap: params added | state_dict bytes added | buffers added | router state |"
              + (" checkpoint file bytes added |" if args.checkpoint_file else "")
              + " paper-style: buffers added |" + (" checkpoint file added |" if args.checkpoint_file else ""))
        print("|---|---|---|---|---|---|---|" + ("---|---|" if args.checkpoint_file else ""))
        for row in result["memory"]:
            line = (f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['routed_added_params']} | "
                    f"{row['routed_added_state_dict']} | {row['routed_added_buffers']} | "
                    f"{row['routed_router_bytes'] / 1024:.1f} KiB |")
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
