"""The one prepared GPU run (``bash benchmarks/gpu.sh``): the evidence for how DTR behaves on a GPU, most
important first, inside one deadline, keeping what it measured when time runs out.

    python benchmarks/gpu_suite.py                    # on a GPU: about 7-8 minutes on an H100
    python benchmarks/gpu_suite.py --smoke            # on the CPU, tiny sizes: the suite's own test

Each part is a subprocess given the time left (at most its own cap). After every part the results so far
are written to ``<out>/gpu.json`` and ``<out>/gpu.md`` (and the part's output to ``<out>/gpu.log``), so a run cut
short by the device's limit still leaves its table. Parts that did not fit are listed as not run.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERHEAD = os.path.join(ROOT, "benchmarks", "overhead.py")
TRAIN = os.path.join(ROOT, "examples", "dit", "train.py")
sys.path.insert(0, os.path.dirname(TRAIN))  # the recipe's modules import each other by plain name


def overhead(model, mode, compile, batch, rounds, smoke, variants=None):
    """An overhead.py part: verified, interleaved, ratios to the unwrapped model; its JSON is the part's result."""
    args = [
        "--model",
        model,
        "--mode",
        mode,
        "--compile",
        compile,
        "--batch",
        str(batch),
        "--rounds",
        str(rounds),
        "--warmup",
        "1" if smoke else "3",
        "--threads",
        "2",
    ]
    if not smoke:
        args += ["--device", "cuda", "--dtype", "bf16"]
    if variants:
        args += ["--variants", *variants]
    return dict(kind="overhead", argv=[sys.executable, OVERHEAD, *args])


def parts(smoke):
    """(name, cap in s, what to run), most important first. Smoke: the same parts at CPU sizes."""
    xl, large, b = ("DiT-S/8", "DiT-S/8", 2) if smoke else ("DiT-XL/2", "DiT-L/2", 32)
    r = 1 if smoke else 15
    recipe = ["data=digits", "general.num_workers=0", "logs.log_every=50"]
    recipe += (
        [
            "models.name=DiT-T/2",
            "models.depth=2",
            "models.hidden_size=32",
            "general.device=cpu",
            "general.global_batch_size=8",
        ]
        if smoke
        else ["general.device=cuda", "general.global_batch_size=64"]
    )
    steps = 4 if smoke else 200
    chosen = [
        (f"{xl} eager train step", 120, overhead(xl, "train", "eager", b, r, smoke)),
        (f"{xl} eager CFG sampling call", 90, overhead(xl, "sample", "eager", b, r, smoke)),
        (
            "pytest -m cuda",
            120,
            dict(
                kind="pytest",
                argv=[sys.executable, "-m", "pytest", "-q", "-m", "cuda", os.path.join(ROOT, "tests", "test_cuda.py")]
                + (["--co"] if smoke else []),
            ),
        ),
        (f"{xl} regional compile train step", 150, overhead(xl, "train", "regional", b, r, smoke)),
        (f"{large} eager train step", 90, overhead(large, "train", "eager", b, r, smoke)),
        ("1-process torchrun train -> resume, bit-identical", 120, dict(kind="resume", recipe=recipe, steps=steps)),
        (f"{xl} full compile train step", 240, overhead(xl, "train", "full", b, r, smoke, ["unwrapped", "dtr.wrap"])),
    ]
    if smoke:  # tiny sizes: what costs is starting Python and torch, which a busy machine makes slow
        chosen = [(name, 180, spec) for name, _, spec in chosen]
    return chosen


#################################################################################
#                                 Running parts                                 #
#################################################################################


def run(argv, timeout, log, cwd=None):
    """Run argv with a deadline; its output goes to the log. Returns the exit code (124 on timeout)."""
    log.write(f"\n$ {' '.join(argv)}\n")
    log.flush()
    try:
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd).returncode
    except subprocess.TimeoutExpired:
        log.write(f"[timed out after {timeout:.0f} s]\n")
        return 124


def run_overhead(spec, timeout, log):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        rc = run(spec["argv"] + ["--json", out], timeout, log)
        if rc != 0:
            return rc, None
        with open(out) as f:
            return rc, json.load(f)


def run_resume(spec, timeout, log):
    """train.py under torchrun (NCCL on a GPU, gloo on the CPU): 2n steps in one go, then its step-n checkpoint
    continued to 2n in a new folder (general.fork=true with the same seed restores every random stream, as a
    resume does), and the two step-2n checkpoints compared. Two runs, not three: the first half is the same run."""
    deadline = time.time() + timeout
    n = spec["steps"] // 2
    with tempfile.TemporaryDirectory() as tmp:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", TRAIN]
        keys = spec["recipe"] + [f"logs.ckpt_every={n}", f"general.iterations={2 * n}"]
        rc = run(torchrun + keys + ["logs.results_dir=straight"], deadline - time.time(), log, cwd=tmp)
        if rc != 0:
            return rc, None
        straight = _checkpoints(os.path.join(tmp, "straight"))
        fork = ["logs.results_dir=resumed", f"general.resume={straight[n]}", "general.fork=true"]
        rc = run(torchrun + keys + fork, deadline - time.time(), log, cwd=tmp)
        if rc != 0:
            return rc, None
        from runs import load_checkpoint  # verified against its digest, as a resume reads it

        a, _ = load_checkpoint(straight[2 * n])
        b, _ = load_checkpoint(_checkpoints(os.path.join(tmp, "resumed"))[2 * n])
        differ = [f"{k}.{name}" for k in ("model", "ema") for name in a[k] if not torch.equal(a[k][name], b[k][name])]
    return (0 if not differ else 1), dict(steps=2 * n, resumed_at=n, bit_identical=not differ, differing=differ[:10])


def _checkpoints(results_dir):
    """{step: path} of the one run under a results folder, as the recipe itself reads a checkpoints folder."""
    from runs import checkpoints_in  # imported here: only this part needs the recipe (omegaconf, ...)

    (folder,) = glob.glob(os.path.join(results_dir, "**", "checkpoints"), recursive=True)
    return checkpoints_in(folder)


# 5 is pytest's "no tests collected": what `-m cuda` gives without a GPU (the smoke run only collects them)
STATUS = {0: "ok", 124: "timed out", 3: "refused: verification failed", 5: "no tests collected"}
RUNNERS = {
    "overhead": run_overhead,
    "resume": run_resume,
    "pytest": lambda spec, timeout, log: (run(spec["argv"], timeout, log), None),
}


#################################################################################
#                                    Report                                     #
#################################################################################


def markdown(report):
    lines = [
        f"# GPU suite: {report['device']}, torch {report['torch']}, {report['date']}",
        "",
        f"Deadline {report['deadline_s']} s; {report['elapsed_s']:.0f} s used.",
        "",
        "| part | status | s | result |",
        "|---|---|---|---|",
    ]
    for p in report["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.0f} | {_summary(p.get('result'))} |")
    return "\n".join(lines) + "\n"


def _summary(result):
    if not result:
        return ""
    if "ratios" in result:
        cells = []
        for n, r in result["ratios"].items():
            mem = result["peak_memory_mib"].get(n)
            cells.append(
                f"{n} {r['median_s'] * 1e3:.1f} ms ({r['median']:.3f})"
                + (f", {mem:.0f} MiB" if mem is not None else "")
                + (f", first call {result['first_call_s'][n]:.0f} s" if result["compile"] != "eager" else "")
            )
        return "; ".join(cells)
    return ", ".join(f"{k}={v}" for k, v in result.items())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the suite itself")
    p.add_argument("--deadline", type=float, default=465, help="seconds for all parts (the device allows 8 minutes)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    p.add_argument("--parts", type=int, nargs="+", help="run only these parts (0-based, in the order above)")
    args = p.parse_args()
    if args.deadline <= 0:
        p.error(f"--deadline must be > 0 seconds, got {args.deadline}")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --smoke for the CPU check")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    report = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        deadline_s=args.deadline,
        parts=[],
    )
    chosen = parts(args.smoke)
    if args.parts:
        if not all(0 <= i < len(chosen) for i in args.parts):
            p.error(f"--parts must be indices in 0..{len(chosen) - 1}, got {args.parts}")
        chosen = [chosen[i] for i in args.parts]
    with open(os.path.join(args.out, "gpu.log"), "w") as log:
        for name, cap, spec in chosen:
            left = args.deadline - (time.time() - start)
            entry = dict(name=name)
            if left < 10:
                entry["status"] = "not run (deadline)"
            else:
                t0 = time.time()
                rc, result = RUNNERS[spec["kind"]](spec, min(cap, left), log)
                entry.update(status=STATUS.get(rc, f"failed ({rc})"), seconds=time.time() - t0, result=result)
            report["parts"].append(entry)
            report["elapsed_s"] = time.time() - start
            _write(args.out, report)
            print(f"{name}: {entry['status']}", flush=True)
    print(markdown(report))
    fine = {"ok", "no tests collected"} if args.smoke else {"ok"}
    return 0 if all(p["status"] in fine for p in report["parts"]) else 1


def _write(out, report):
    """Replace gpu.json and gpu.md atomically: a run killed mid-write leaves the previous complete pair."""
    for name, text in (("gpu.json", json.dumps(report, indent=2)), ("gpu.md", markdown(report))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


if __name__ == "__main__":
    sys.exit(main())
