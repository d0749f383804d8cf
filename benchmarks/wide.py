"""Wide layers: time and peak memory of one training step, fbfast against the per-step loop.

    python -m benchmarks.wide [--quick] [--json benchmarks/results/wide.json]

For each width (O = H, Du = 0, T = 4 steps) and batch, a child process that runs nothing else
builds one network, warms both up, then times training steps (zero grads, rollout, mean square,
backward) of the per-step loop and of `fbfast.rollout` taken in turn, and measures each one's
peak memory over one step two ways: the peak RSS (reset to the current RSS just before, after a
warm-up step has allocated the gradients; it counts the tile path's own buffers, but a step
that fits in memory the process already holds shows ~0), and the peak of torch's allocator
(exact tensor bytes, benchmarks/memory.py). The goal it checks: at every width, fbfast's training step takes
no more time than the loop's and at most 1.5x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

WIDTHS = (128, 256, 512, 1024, 2048, 4096)
BATCHES = (64, 512)
STEPS = 4
MIB = 2.0 ** 20


def _child(width: int, batch: int, reps: int) -> dict:
    import statistics

    import torch

    import fbfast

    from .memory import _allocator_peak

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    torch.manual_seed(0)
    net = fbfast.FeedbackMLP(width, width, width)
    x0 = torch.randn(batch, width) * 0.1

    def loop():
        x, ys = x0, []
        for _ in range(STEPS):
            x = net(x)
            ys.append(x)
        return torch.stack(ys)

    def fused():
        return net.rollout(x0, steps=STEPS)

    def step(fn):
        net.zero_grad(set_to_none=False)
        fn().square().mean().backward()

    out = {}
    for name, fn in (("loop", loop), ("fbfast", fused)):
        step(fn)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
        step(fn)
        out[f"{name}_peak_mib"] = (status("VmHWM") - base) / MIB
        out[f"{name}_alloc_mib"] = _allocator_peak(lambda: step(fn)) / MIB
    times = {"loop": [], "fbfast": []}
    for _ in range(reps):
        for name, fn in (("loop", loop), ("fbfast", fused)):
            start = time.perf_counter()
            step(fn)
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        out[f"{name}_ms"] = statistics.median(ts) * 1e3
    # The training rule of csrc/cpu/rollout_cpu.cpp (choose_path) at these shapes.
    work = width * 2 * width
    out["path"] = "tile" if work <= 32768 or (work <= 262144 and batch >= 256 and STEPS >= 16) else "blas"
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 256..1024 and B = 64 only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    widths = (256, 512, 1024) if args.quick else WIDTHS
    batches = (64,) if args.quick else BATCHES
    import torch
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
          f"Training step, T = {STEPS}, Du = 0, O = H = width, float32; median of {args.reps} in turn.")
    print("| width | B | path | loop ms | fbfast ms | time vs loop | loop MiB | fbfast MiB | RSS vs loop | "
          "loop alloc MiB | fbfast alloc MiB | alloc vs loop |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in batches:
        for width in widths:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.wide", "--child", str(width), str(batch),
                                   str(args.reps)], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                print(f"| {width} | {batch} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(width=width, batch=batch)
            rows.append(r)
            print(f"| {width} | {batch} | {r['path']} | {r['loop_ms']:.1f} | {r['fbfast_ms']:.1f} | "
                  f"{r['fbfast_ms'] / r['loop_ms']:.2f}x | {r['loop_peak_mib']:.1f} | {r['fbfast_peak_mib']:.1f} | "
                  f"{r['fbfast_peak_mib'] / max(r['loop_peak_mib'], 1e-9):.2f}x | {r['loop_alloc_mib']:.1f} | "
                  f"{r['fbfast_alloc_mib']:.1f} | {r['fbfast_alloc_mib'] / max(r['loop_alloc_mib'], 1e-9):.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                           threads=torch.get_num_threads(), steps=STEPS, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
