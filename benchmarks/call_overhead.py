"""Python work routing adds per block call: Python and C function calls counted with ``sys.setprofile``.

    python benchmarks/call_overhead.py [--depth 12]

A GPU step of a small model is bound by Python, not by kernels, so the calls the router makes per routed block
are its eager cost there. The count is exact (no timing): one step of a tiny DiT, unwrapped then routed, under
``no_grad`` and with a backward. The routed step is checked to differ from the unwrapped one before counting.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "dit"))
import dtr  # noqa: E402
from models import DiT  # noqa: E402


def count_calls(step) -> tuple[int, int]:
    """(Python calls, C calls) of one ``step()``, after a warm-up call."""
    step()
    counts = [0, 0]

    def profile(frame, event, arg):
        if event == "call":
            counts[0] += 1
        elif event == "c_call":
            counts[1] += 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return counts[0], counts[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12, help="DiT blocks (all routed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, t, y = torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.tensor([1])
    for grad in (False, True):
        model = DiT(input_size=4, patch_size=2, hidden_size=8, depth=args.depth, num_heads=1, num_classes=10)
        for p in model.parameters():  # the zero-initialised adaLN gates would make routing invisible
            torch.nn.init.normal_(p, std=0.2)
        model.eval()

        def step(model=model, grad=grad):
            if grad:
                model(x, t, y).sum().backward()
                return None
            with torch.no_grad():
                return model(x, t, y)

        with torch.no_grad():
            unrouted = model(x, t, y)
        before = count_calls(step)
        dtr.wrap(model)
        with torch.no_grad():
            if torch.equal(model(x, t, y), unrouted):
                sys.exit("call_overhead.py: the routed model computes what the unwrapped one does")
        after = count_calls(step)
        per_block = [(b - a) / args.depth for a, b in zip(before, after, strict=True)]
        print(
            f"dtr {dtr.__version__}, torch {torch.__version__}, {'backward' if grad else 'no_grad'}: "
            f"+{per_block[0]:.1f} Python calls, +{per_block[1]:.1f} C calls per routed block"
        )


if __name__ == "__main__":
    main()
