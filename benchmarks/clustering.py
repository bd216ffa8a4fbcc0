"""Time ANT's SNR-based interval clustering (dtr.weighting.snr_intervals) on the DDPM linear schedule.

Usage: python benchmarks/clustering.py [--timesteps 1000] [--repeats 7]

Prints markdown: the median / best wall time for k in {5, 8, 16}, then the intervals found for k = 8.
For reference, the ANT paper code's clustering (Python loops, O(k T^3)) takes about 11 s for k = 5.
"""

import argparse
import platform
import time

import numpy as np
import torch

from dtr.weighting import snr_from_alphas_cumprod, snr_intervals, uniform_intervals


def linear_snr(num_timesteps):
    """SNR of the DDPM linear schedule (betas 1e-4 .. 0.02, rescaled like ADM for T != 1000)."""
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return snr_from_alphas_cumprod(np.cumprod(1.0 - betas))


def time_call(fn, repeats):
    """Wall times (s) of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    snr = linear_snr(args.timesteps)
    print(
        f"snr_intervals, linear schedule, T = {args.timesteps}, {args.repeats} repeats "
        f"({platform.processor() or platform.machine()}, numpy {np.__version__}, "
        f"torch threads {torch.get_num_threads()})\n"
    )
    print("| k | median (ms) | best (ms) |")
    print("|---|---|---|")
    for k in (5, 8, 16):
        times = time_call(lambda k=k: snr_intervals(snr, k), args.repeats)
        print(f"| {k} | {1e3 * np.median(times):.1f} | {1e3 * min(times):.1f} |")

    k = 8
    found = snr_intervals(snr, k)
    uniform = uniform_intervals(args.timesteps, k)
    print(f"\nIntervals for k = {k} (half-open [start, end); uniform split shown for comparison)\n")
    print("| i | SNR-clustered | size | SNR range | uniform |")
    print("|---|---|---|---|---|")
    for i, ((s, e), (us, ue)) in enumerate(zip(found, uniform)):
        print(f"| {i} | [{s}, {e}) | {e - s} | {snr[e - 1]:.3g} .. {snr[s]:.3g} | [{us}, {ue}) |")


if __name__ == "__main__":
    main()
