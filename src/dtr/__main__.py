"""Command line: python -m dtr masks --channels 1024 --out masks.png draws the task masks."""

import argparse
import os
import sys

from .masks import METHODS
from .viz import plot_masks


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
    args = p.parse_args(argv)
    folder = os.path.dirname(args.out)
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        masks = plot_masks(
            args.out, args.channels, args.sharing_ratio, args.alpha, args.num_tasks, args.method, args.seed
        )
    except (ValueError, TypeError, OSError) as e:  # bad numbers (named by dtr.validation) or an unwritable path
        print(f"python -m dtr masks: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)  # argparse's code for bad arguments
    print(
        f"wrote {args.out}: {masks.shape[0]} tasks x {masks.shape[1]} channels, {int(masks[0].sum())} active per task"
    )


if __name__ == "__main__":
    main()
