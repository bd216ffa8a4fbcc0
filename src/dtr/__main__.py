"""Command line: ``python -m dtr masks --channels 1024 --out masks.png`` draws the task masks."""

import argparse

from .viz import plot_masks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dtr", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("masks", help="render the (T, C) task masks as a PNG")
    m.add_argument("--channels", type=int, default=1152, help="channel width C (DiT-XL: 1152, DiT-L: 1024)")
    m.add_argument("--sharing-ratio", type=float, default=0.8)
    m.add_argument("--alpha", type=float, default=4.0)
    m.add_argument("--num-tasks", type=int, default=1000)
    m.add_argument("--method", choices=["dtr", "random"], default="dtr")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", default="dtr_masks.png")
    args = p.parse_args(argv)
    masks = plot_masks(args.out, args.channels, args.sharing_ratio, args.alpha, args.num_tasks, args.method, args.seed)
    print(f"wrote {args.out}: {masks.shape[0]} tasks x {masks.shape[1]} channels, {int(masks[0].sum())} active per task")


if __name__ == "__main__":
    main()
