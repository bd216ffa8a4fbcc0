"""Command line: ``python -m dtr masks --channels 1024 --out masks.png`` draws the task masks;
``python -m dtr task-axes --out axes.png`` draws both timestep -> task maps for Flux's schedule."""

import argparse
import os
import sys

from .masks import METHODS
from .viz import plot_masks, plot_task_axes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dtr", description="Denoising Task Routing tools.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    m = sub.add_parser(
        "masks",
        help="render the (T, C) task masks as a PNG",
        description="Render the (T, C) table of task masks: tasks down, channels across, active dark.",
    )
    m.add_argument(
        "--channels", type=int, default=1152, help="channel width C (DiT-XL: 1152, DiT-L: 1024; default %(default)s)"
    )
    m.add_argument(
        "--sharing-ratio",
        type=float,
        default=0.8,
        help="fraction of channels each task uses, in (0, 1] (default %(default)s)",
    )
    m.add_argument("--alpha", type=float, default=4.0, help="how fast windows move with t; > 0 (default %(default)s)")
    m.add_argument("--num-tasks", type=int, default=1000, help="number of tasks T (default %(default)s)")
    m.add_argument("--method", choices=METHODS, default="dtr", help="dtr: sliding windows; random: the R-TR baseline")
    m.add_argument("--seed", type=int, default=0, help="seed of the random method (default %(default)s)")
    m.add_argument(
        "--out", default="dtr_masks.png", help="PNG to write; missing folders are created (default %(default)s)"
    )
    a = sub.add_parser(
        "task-axes",
        help="plot the linear and log-SNR timestep -> task maps for Flux's schedule",
        description="Plot dtr.wrap(task_axis=...)'s two maps of a flow noise level to a task, and the tasks "
        "FluxPipeline's shifted schedule visits with each.",
    )
    a.add_argument("--steps", type=int, default=28, help="sampling steps (default %(default)s)")
    a.add_argument("--mu", type=float, default=1.15, help="Flux's dynamic shift mu (default %(default)s: 1024px)")
    a.add_argument("--num-tasks", type=int, default=1000, help="number of tasks T (default %(default)s)")
    a.add_argument("--out", default="dtr_task_axes.png", help="PNG to write (default %(default)s)")
    args = p.parse_args(argv)
    folder = os.path.dirname(args.out)
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        if args.command == "task-axes":
            if args.steps < 1 or args.num_tasks < 1:
                raise ValueError(f"--steps and --num-tasks must be >= 1, got {args.steps} and {args.num_tasks}")
            tasks = plot_task_axes(args.out, args.steps, args.mu, args.num_tasks)
            print(f"wrote {args.out}: " + "; ".join(f"{k}: {v.tolist()}" for k, v in tasks.items()))
            return
        masks = plot_masks(
            args.out, args.channels, args.sharing_ratio, args.alpha, args.num_tasks, args.method, args.seed
        )
    except (ValueError, TypeError, OSError) as e:  # bad numbers (named by dtr.validation) or an unwritable path
        print(f"python -m dtr {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)  # argparse's code for bad arguments
    print(
        f"wrote {args.out}: {masks.shape[0]} tasks x {masks.shape[1]} channels, {int(masks[0].sum())} active per task"
    )


if __name__ == "__main__":
    main()
