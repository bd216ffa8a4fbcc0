"""The paper's table at small scale: DiT on scikit-learn's digits, with and without DTR, per loss weighting.

    python benchmarks/convergence.py --quick                      # a few minutes: one pair, 2 seeds, short
    python benchmarks/convergence.py --arms constant:1.0 constant:0.8 --seeds 0 1 2 3 --steps 2000 4000 8000
    python benchmarks/convergence.py --report                     # tables and plot from every finished run

An arm is ``<loss_weight_type>:<sharing_ratio>[:random|:logsnr]`` (``constant:1.0`` is the baseline,
``uw:0.8`` ANT-UW + DTR, ``constant:0.8:random`` random routing, ``constant:0.8:logsnr`` DTR with
tasks by log-SNR, models.routing.task_axis=logsnr). ``--path flow`` trains every arm with the recipe's
flow path (SiT's linear interpolant, general.path=flow) and samples with ``--sampler`` (default heun2):

    python benchmarks/convergence.py --path flow --sampling-steps 51 --arms constant:1.0 constant:0.8 \
        min_snr_5:1.0 min_snr_5:0.8 uw:1.0 uw:0.8 constant:0.8:logsnr --seeds 0 1 2

Every run goes through the recipe's own train.py, sample_ddp.py and evaluate.py (data=digits). Arms
are paired by seed: the same seed gives the same initial weights, batches, timesteps, training noise,
sampling noise and sampled labels in every arm, so per-seed differences measure routing, not luck. Each finished run
is a JSON file under --out; runs already there are skipped, so the grid can run in parts.
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "examples", "dit"))

METRICS = ("fid", "class_accuracy", "precision", "recall")
# Pinned here, not taken from the digits preset, so that runs made in parts stay comparable.
PINNED = [
    "models.name=DiT-T/2",
    "optim.lr=0.002",
    "optim.ema_decay=0.995",
    "general.schedule_name=linear",
    "general.global_batch_size=64",
]
SETTING_KEYS = (
    ("general", "path"),
    ("eval", "sampler"),
    ("models", "name"),
    ("optim", "lr"),
    ("optim", "ema_decay"),
    ("general", "schedule_name"),
    ("general", "global_batch_size"),
    ("general", "iterations"),
    ("eval", "num_fid_samples"),
    ("eval", "num_sampling_steps"),
)
# Settings of runs made before the key existed (every run then was a DDPM one).
LEGACY_SETTINGS = {("general", "path"): "ddpm", ("eval", "sampler"): "ddpm"}
LOWER_IS_BETTER = {"fid"}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "heun2"}


def arm_overrides(arm):
    """``constant:0.8`` -> the recipe's keys for that arm."""
    parts = arm.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("random", "logsnr")):
        raise SystemExit(f"--arms: {arm!r} is not <loss_weight_type>:<sharing_ratio>[:random|:logsnr]")
    variant = parts[2] if len(parts) == 3 else None
    keys = [
        f"general.loss_weight_type={parts[0]}",
        f"models.routing.sharing_ratio={parts[1]}",
        f"models.routing.init_method={'random' if variant == 'random' else 'DTR'}",
    ]
    return keys + (["models.routing.task_axis=logsnr"] if variant == "logsnr" else [])


def run_name(arm, seed):
    return f"{arm.replace(':', '_')}_seed{seed}"


def run_one(arm, seed, steps, scales, num_samples, sampling_steps, extra, workdir, out_path, path="ddpm", sampler=None):
    """Train one arm for one seed, then sample and evaluate every checkpoint at every guidance scale."""
    import torch

    torch.set_num_threads(1)
    import config
    import evaluate
    import sample_ddp
    import train

    base = os.path.join(workdir, run_name(arm, seed))
    every = steps[0]
    if any(s % every for s in steps):
        raise SystemExit("--steps must be multiples of the first")
    cfg = config.load(
        [
            "data=digits",
            *PINNED,
            *arm_overrides(arm),
            f"general.path={path}",
            f"eval.sampler={sampler or DEFAULT_SAMPLER[path]}",
            f"general.global_seed={seed}",
            f"general.iterations={max(steps)}",
            f"logs.ckpt_every={every}",
            f"logs.log_every={every}",
            f"logs.results_dir={base}/train",
            f"eval.samples_dir={base}/samples",
            f"eval.num_fid_samples={num_samples}",
            f"eval.num_sampling_steps={sampling_steps}",
            *extra,
        ]
    )
    t0 = time.time()
    result = train.main(cfg)
    train_s = time.time() - t0
    ckpt_dir = os.path.dirname(result["checkpoint"])
    evals = []
    for step in steps:
        for scale in scales:
            cfg.eval.ckpt = os.path.join(ckpt_dir, f"{step:07d}.pt")
            cfg.eval.cfg_scale = scale
            cfg.eval.metrics_file = os.path.join(base, "metrics", f"{step}_{scale}.json")
            cfg.eval.sample_batch = None
            sample_ddp.main(cfg)
            m = evaluate.main(cfg)
            evals.append({"step": step, "cfg_scale": scale, **{k: m[k] for k in METRICS}})
    record = {"arm": arm, "seed": seed, "train_seconds": train_s, "config": config.to_container(cfg), "evals": evals}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, out_path)  # a finished run is all or nothing
    return out_path


#################################################################################
#                                   Report                                      #
#################################################################################


def load_runs(out):
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        runs[(r["arm"], r["seed"])] = r
    settings = {
        tuple(r["config"][g].get(k, LEGACY_SETTINGS.get((g, k))) for g, k in SETTING_KEYS) for r in runs.values()
    }
    if len(settings) > 1:
        raise SystemExit(f"{out} mixes runs made with different settings {SETTING_KEYS}: {sorted(settings)}")
    return runs


def metric(run, step, scale, name):
    return next(e[name] for e in run["evals"] if e["step"] == step and e["cfg_scale"] == scale)


def baseline_of(arm):
    """The arm DTR is compared with: the same loss weighting without routing."""
    return f"{arm.split(':')[0]}:1.0"


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def paired_t_interval(diffs, level=0.95):
    """The Student-t interval (lo, hi) of the mean paired difference; (nan, nan) for fewer than 2 seeds."""
    from scipy.stats import t as student_t

    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    m, sd = mean_sd(diffs)
    half = student_t.ppf(0.5 + level / 2, n - 1) * sd / n**0.5
    return m - half, m + half


def paired_t_excludes_zero(diffs, level=0.95):
    """Whether the paired t-interval of the mean difference excludes 0 (the seed spread allows a conclusion)."""
    lo, hi = paired_t_interval(diffs, level)
    return lo > 0 or hi < 0


def report(out):
    """Markdown tables (per arm, and paired differences against the same weighting's baseline) and a plot."""
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no finished runs in {out}")
    arms = sorted({a for a, _ in runs}, key=lambda a: (a.split(":")[0], a))
    first = next(iter(runs.values()))
    steps = sorted({e["step"] for e in first["evals"]})
    scales = sorted({e["cfg_scale"] for e in first["evals"]})
    lines = [
        f"Digits, DiT {first['config']['models']['name']}, {len(first['evals'])} evaluations per run; "
        f"mean ± sd over seeds.\n"
    ]
    lines.append("| arm | seeds | step | cfg | " + " | ".join(METRICS) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(METRICS))
    for arm in arms:
        seeds = sorted(s for a, s in runs if a == arm)
        for step in steps:
            for scale in scales:
                cells = []
                for name in METRICS:
                    m, sd = mean_sd([metric(runs[arm, s], step, scale, name) for s in seeds])
                    cells.append(f"{m:.3f} ± {sd:.3f}")
                lines.append(f"| {arm} | {len(seeds)} | {step} | {scale} | " + " | ".join(cells) + " |")
    lines.append(
        "\nPaired differences (arm − baseline of the same weighting, same seeds): mean ± sd, "
        "in how many seeds the arm is better, and the paired 95 % t-interval of the mean difference; "
        "* where it excludes 0.\n"
    )
    lines.append("| arm vs baseline | seeds | step | cfg | " + " | ".join(f"Δ{n}" for n in METRICS) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(METRICS))
    paired = {}
    for arm in arms:
        base = baseline_of(arm)
        if arm == base:
            continue
        seeds = sorted(s for a, s in runs if a == arm and (base, s) in runs)
        if not seeds:
            continue
        for step in steps:
            for scale in scales:
                cells = []
                for name in METRICS:
                    d = [
                        metric(runs[arm, s], step, scale, name) - metric(runs[base, s], step, scale, name)
                        for s in seeds
                    ]
                    better = sum((x < 0) if name in LOWER_IS_BETTER else (x > 0) for x in d)
                    m, sd = mean_sd(d)
                    sig = paired_t_excludes_zero(d)
                    lo, hi = paired_t_interval(d)
                    paired[arm, base, step, scale, name] = (m, sd, better, len(seeds), sig)
                    cells.append(
                        f"{m:+.3f} ± {sd:.3f} ({better}/{len(seeds)}) [{lo:+.3f}, {hi:+.3f}]" + (" *" if sig else "")
                    )
                lines.append(f"| {arm} vs {base} | {len(seeds)} | {step} | {scale} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    plot(runs, arms, paired, steps, scales, os.path.join(out, "convergence.png"))
    print(text)
    return paired


def plot(runs, arms, paired, steps, scales, path):
    """Per cfg scale: FID and class accuracy per arm (mean over seeds), and the paired FID differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weightings = sorted({a.split(":")[0] for a in arms})
    color = {w: f"C{i}" for i, w in enumerate(weightings)}

    def style(arm):  # colour: loss weighting; line: no routing / DTR / random routing / DTR by log-SNR
        lines = {"random": ":", "logsnr": "-."}
        return dict(
            color=color[arm.split(":")[0]],
            linestyle="-" if arm == baseline_of(arm) else lines.get(arm.split(":")[-1], "--"),
        )

    fig, axes = plt.subplots(len(scales), 3, figsize=(14, 3.2 * len(scales)), squeeze=False, dpi=110)
    for row, scale in enumerate(scales):
        ax_fid, ax_diff, ax_acc = axes[row]
        for arm in arms:
            seeds = sorted(s for a, s in runs if a == arm)
            for ax, name in ((ax_fid, "fid"), (ax_acc, "class_accuracy")):
                ys = [statistics.mean(metric(runs[arm, s], st, scale, name) for s in seeds) for st in steps]
                ax.plot(steps, ys, marker="o", markersize=3, label=f"{arm} ({len(seeds)} seeds)", **style(arm))
            if arm != baseline_of(arm) and (arm, baseline_of(arm), steps[0], scale, "fid") in paired:
                d = [paired[arm, baseline_of(arm), st, scale, "fid"] for st in steps]
                ax_diff.errorbar(
                    steps,
                    [m for m, *_ in d],
                    yerr=[0 if sd != sd else sd for _, sd, *_ in d],
                    capsize=3,
                    marker="o",
                    markersize=3,
                    label=f"{arm} − {baseline_of(arm)}",
                    **style(arm),
                )
        ax_fid.set(title=f"FID, cfg {scale} (mean over seeds)")
        ax_diff.axhline(0, color="k", linewidth=0.8)
        ax_diff.set(title=f"ΔFID vs no routing, paired, cfg {scale} (± sd; < 0 better)")
        ax_acc.set(title=f"class accuracy, cfg {scale}")
        for ax in axes[row]:
            ax.set_xlabel("training steps")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#################################################################################
#                                     Main                                      #
#################################################################################


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arms",
        nargs="+",
        default=[
            "constant:1.0",
            "constant:0.8",
            "min_snr_5:1.0",
            "min_snr_5:0.8",
            "uw:1.0",
            "uw:0.8",
            "constant:0.8:random",
        ],
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--steps", nargs="+", type=int, default=[2000, 4000, 8000])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.5, 2.0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--sampling-steps", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one core each")
    p.add_argument("--path", choices=["ddpm", "flow"], default="ddpm", help="general.path of every run")
    p.add_argument("--sampler", default=None, help="eval.sampler (default: ddpm for DDPM, heun2 for flow)")
    p.add_argument("--out", default=None, help="finished runs (default: benchmarks/results/convergence[_flow])")
    p.add_argument("--workdir", default=None, help="checkpoints and samples (default: runs/convergence[_flow])")
    p.add_argument("--quick", action="store_true", help="constant:1.0 vs constant:0.8, 2 seeds, 600 steps, cfg 1.5")
    p.add_argument("--report", action="store_true", help="only summarise the finished runs")
    p.add_argument("extra", nargs="*", help="more recipe overrides (key=value) for every run")
    args = p.parse_args()
    folder = "convergence" if args.path == "ddpm" else f"convergence_{args.path}"
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", folder)
    args.workdir = args.workdir or os.path.join(ROOT, "runs", folder)
    if args.quick:
        args.arms, args.seeds, args.steps, args.scales = ["constant:1.0", "constant:0.8"], [0, 1], [300, 600], [1.5]
        args.num_samples, args.sampling_steps = 500, 50
        args.out = os.path.join(args.workdir, "quick-results")
    if args.report:
        report(args.out)
        return
    for arm in args.arms:
        arm_overrides(arm)
    os.makedirs(args.out, exist_ok=True)
    import digits_classifier  # train the feature extractor once, before the workers need it

    digits_classifier.load_classifier()
    jobs = [
        (arm, seed)
        for seed in args.seeds
        for arm in args.arms
        if not os.path.exists(os.path.join(args.out, run_name(arm, seed) + ".json"))
    ]
    print(f"{len(jobs)} runs to do ({len(args.arms) * len(args.seeds) - len(jobs)} already in {args.out})", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(
                run_one,
                arm,
                seed,
                args.steps,
                args.scales,
                args.num_samples,
                args.sampling_steps,
                args.extra,
                args.workdir,
                os.path.join(args.out, run_name(arm, seed) + ".json"),
                args.path,
                args.sampler,
            )
            for arm, seed in jobs
        ]
        for f in futures:
            print("finished", f.result(), flush=True)
    report(args.out)


if __name__ == "__main__":
    main()
