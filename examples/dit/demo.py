"""
The digits demo: the whole recipe (train, sample, evaluate) on a laptop CPU in a few minutes.

    python examples/dit/demo.py                                   # DiT-T/2 + DTR on scikit-learn's digits
    python examples/dit/demo.py models.routing.sharing_ratio=1.0  # the same without routing (baseline)
    python examples/dit/demo.py general.path=flow eval.sampler=heun2 eval.num_sampling_steps=51  # SiT's flow

It runs train.py, sample.py, sample_ddp.py and evaluate.py with data=digits in one process (any
key=value of those scripts can be added), draws DTR's task masks, and prints where everything went:
the checkpoint under results/, the sample grid, the masks and the metrics under samples/.
"""

import os
import sys
import time

import torch

import config
import evaluate
import sample
import sample_ddp
import train
from dtr.viz import plot_masks as plot_task_masks


def plot_masks(cfg, path):
    """The (task x channel) picture of the routing masks of the demo's model."""
    _, hidden, _, _ = config.architecture(cfg)
    r = cfg.models.routing
    plot_task_masks(
        path,
        channels=hidden,
        sharing_ratio=r.sharing_ratio,
        alpha=r.alpha,
        num_tasks=r.taskcount,
        method=config.routing_method(cfg),
        seed=r.seed,
    )
    return path


def fit_threads():
    """Use only the cores other processes leave idle: oversubscribed OpenMP threads slow small models 10x or more."""
    try:
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        return
    if "OMP_NUM_THREADS" not in os.environ and idle < torch.get_num_threads():
        torch.set_num_threads(max(1, idle))
        print(f"== The machine is busy: using {torch.get_num_threads()} thread(s) (set OMP_NUM_THREADS to choose)")


def main(argv=()):
    start = time.time()
    fit_threads()
    cfg = config.load(["data=digits", *argv])
    print(
        f"== Training {cfg.models.name} on digits for {cfg.general.iterations} steps ({cfg.general.path}, "
        f"sharing_ratio={cfg.models.routing.sharing_ratio}, loss_weight_type={cfg.general.loss_weight_type})"
    )
    result = train.main(cfg)
    trained = time.time()

    # Sample and evaluate the checkpoint just written (not the derived version 000):
    cfg.eval.ckpt = result["checkpoint"]
    out_dir = os.path.join(cfg.eval.samples_dir, config.model_string(cfg))
    os.makedirs(out_dir, exist_ok=True)
    e = cfg.eval
    print(
        f"== Sampling a grid, then {e.num_fid_samples} samples ({e.sampler}, {e.num_sampling_steps} steps, "
        f"cfg {e.cfg_scale})"
    )
    cfg.eval.grid = os.path.join(out_dir, "grid.png")
    grid = sample.main(cfg, per_class=4)
    masks = plot_masks(cfg, os.path.join(out_dir, "masks.png")) if config.is_routed(cfg) else None
    npz = sample_ddp.main(cfg)
    sampled = time.time()
    print("== Evaluating")
    metrics = evaluate.main(cfg)
    done = time.time()

    times = f"train {trained - start:.0f} s, sample {sampled - trained:.0f} s, evaluate {done - sampled:.0f} s"
    print(f"\n== Digits demo done in {done - start:.0f} s ({times})")
    print(f"   checkpoint: {result['checkpoint']}")
    print(f"   sample grid (4 per class): {grid}")
    if masks is not None:
        print(f"   routing masks: {masks}")
    print(f"   samples: {npz}")
    print(evaluate.format_metrics(metrics))
    return metrics


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
