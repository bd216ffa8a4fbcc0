"""Single-GPU throughput with and without DTR: training images/s (bf16, compiled) and sampling images/s.

    python benchmarks/gpu_throughput.py --models DiT-L/2 DiT-XL/2          # on a GPU (see gpu.sh)
    python benchmarks/gpu_throughput.py --device cpu --models DiT-S/8 --batch 2 --steps 2 --no-compile   # smoke test

Training: one step = forward + backward + AdamW step on a batch of 256x256-image latents (32x32x4),
as train.py does it. Sampling: one forward_with_cfg call on a batch, reported as images/s for a
250-step DDPM chain (batch / (250 * seconds per call)). Unwrapped and wrapped models alternate,
so drift of the GPU clock hits both alike.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "dit"))
import dtr  # noqa: E402
from models import DiT_models  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model, opt, x, t, y, dtype, device, compile):
    fwd = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = fwd(x, t, y).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sample_step_fn(model, x, t, y, dtype, device, compile):
    # compile the bound method itself: forward_with_cfg on a compiled module would run eagerly
    fwd = torch.compile(model.forward_with_cfg) if compile else model.forward_with_cfg
    y_cfg = torch.cat([y, torch.full_like(y, model.num_classes)])
    x_cfg, t_cfg = torch.cat([x, x]), torch.cat([t, t])

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            fwd(x_cfg, t_cfg, y_cfg, 1.5)

    return step


def timed(steps, rounds, warmup, device):
    for _ in range(warmup):
        for s in steps.values():
            s()
    sync(device)
    out = {n: [] for n in steps}
    for _ in range(rounds):
        for n, s in steps.items():
            sync(device)
            t0 = time.perf_counter()
            s()
            sync(device)
            out[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["DiT-L/2", "DiT-XL/2"])
    p.add_argument("--batch", type=int, default=64, help="training batch (sampling uses the same number of images)")
    p.add_argument("--steps", type=int, default=20, help="timed rounds")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-sampling", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, batch {args.batch}, "
          f"{'eager' if args.no_compile else 'compiled'}, {dtype}", flush=True)
    rows = []
    for model_name in args.models:
        torch.manual_seed(0)
        base = DiT_models[model_name](input_size=32, num_classes=1000).to(device)
        routed = copy.deepcopy(base)
        dtr.wrap(routed)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, 4, 32, 32, device=device, generator=g)
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
        y = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
        models = {"baseline": base, "DTR": routed}
        compile = not args.no_compile
        for m in models.values():
            m.train()
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0) for n, m in models.items()}
        train = timed({n: train_step_fn(m, opts[n], x, t, y, dtype, device, compile) for n, m in models.items()},
                      args.steps, args.warmup, device)
        row = dict(model=model_name, train={n: args.batch / s for n, s in train.items()})
        del opts
        if not args.no_sampling:
            for m in models.values():
                m.eval()
            half = args.batch // 2
            sample = timed({n: sample_step_fn(m, x[:half], t[:half], y[:half], dtype, device, compile)
                            for n, m in models.items()},
                           args.steps, args.warmup, device)
            row["sample"] = {n: half / (250 * s) for n, s in sample.items()}
        rows.append(row)
        print(f"{model_name}: train img/s {row['train']}" + (f", sample img/s {row['sample']}" if "sample" in row else ""),
              flush=True)
        del base, routed, models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | train img/s baseline | train img/s DTR | DTR/baseline | sample img/s baseline | sample img/s DTR | DTR/baseline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tr = r["train"]
        line = f"| {r['model']} | {tr['baseline']:.4g} | {tr['DTR']:.4g} | {tr['DTR'] / tr['baseline']:.3f} |"
        if "sample" in r:
            s = r["sample"]
            line += f" {s['baseline']:.4g} | {s['DTR']:.4g} | {s['DTR'] / s['baseline']:.3f} |"
        print(line)


if __name__ == "__main__":
    main()
