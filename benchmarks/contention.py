"""fbfast against the per-step loop while another process keeps a core busy.

    python -m benchmarks.contention [--reps 21] [--json benchmarks/results/contention.json]

On a machine shared with other work, a parallel kernel that waits for all of its threads stalls
whenever the OS has descheduled one of them: the call then lasts a time slice (milliseconds)
instead of microseconds. Each case is timed twice, alone and with a busy process beside the
measurement (one `while True: pass` per `--busy`), the seed-style loop and fbfast taken in
turn, with the default thread count. fbfast must never lose to the serial loop because of the
load (csrc/cpu/parallel.h says how the kernels avoid waiting on a thread that has not started).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

import fbfast

from .loops import RecurrentNetwork, seed_loop

# (name, B, Du, O, H, T, train)
CASES = (
    ("small fwd", 32, 0, 32, 64, 100, False),
    ("small train", 32, 0, 32, 64, 100, True),
    ("pendulum train", 256, 1, 2, 64, 100, True),
    ("medium train", 256, 0, 64, 256, 100, True),
)


def _callables(B, Du, O, H, T, train):
    torch.manual_seed(0)
    net = RecurrentNetwork(Du + O, H, O)
    view = fbfast.from_module(net)
    x0 = torch.randn(B, O) * 0.1
    u = torch.randn(T, B, Du) if Du else None

    def run(rollout):
        if train:
            net.zero_grad(set_to_none=False)
            rollout().square().mean().backward()
        else:
            with torch.no_grad():
                rollout()

    return (lambda: run(lambda: seed_loop(net, x0, u, T)),
            lambda: run(lambda: view.rollout(x0, steps=T, u=u)))


def _measure(case, reps):
    _, B, Du, O, H, T, train = case
    loop, fused = _callables(B, Du, O, H, T, train)
    for fn in (loop, fused):
        fn()
    times = {"loop": [], "fbfast": []}
    for _ in range(reps):
        for name, fn in (("loop", loop), ("fbfast", fused)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: dict(median_ms=statistics.median(ts) * 1e3,
                       p90_ms=sorted(ts)[int(0.9 * (len(ts) - 1))] * 1e3) for name, ts in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the measurement")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"median (p90) of {args.reps} calls, loop and fbfast in turn; loaded = {args.busy} busy process(es).")
    print("| case (B, Du, O, H, T) | load | seed loop | fbfast | fbfast vs loop |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for case in CASES:
        for load in ("alone", "loaded"):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy if load == "loaded" else 0)]
            try:
                time.sleep(0.2 if busy else 0)
                r = _measure(case, args.reps)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
            name, B, Du, O, H, T, _ = case
            speedup = r["loop"]["median_ms"] / r["fbfast"]["median_ms"]
            rows.append(dict(case=name, shape=[B, Du, O, H, T], load=load, speedup=speedup, **r))
            print(f"| {name} ({B}, {Du}, {O}, {H}, {T}) | {load} | {r['loop']['median_ms']:.2f} ms "
                  f"({r['loop']['p90_ms']:.2f}) | {r['fbfast']['median_ms']:.2f} ms ({r['fbfast']['p90_ms']:.2f}) | "
                  f"{speedup:.1f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                           threads=torch.get_num_threads(), busy=args.busy, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
