"""fbfast's fused rollout against the per-step loop for every activation and depth.

    python -m benchmarks.networks                 # 9 activations x 1..3 hidden layers (~3 min)
    python -m benchmarks.networks --quick         # relu, silu, gelu x 1..2 hidden layers (~30 s)
    python -m benchmarks.networks --shape 32 0 32 64 100 --json benchmarks/results/networks.json

One shape (B, Du, O, H, T), every network ``Linear(Du + O, H) -> act -> ... -> Linear(H, O)``
with 1..3 hidden layers of width H. The loop is the per-step module a user writes
(benchmarks/loops.py: fc1 .. fcL with the activation module between them, ``torch.cat`` of u
and the fed-back output); "cpp" is ``fbfast.rollout(..., activation=act)``. Both run the same
seeded float32 weights; the timing method is benchmarks/report.py's (interleaved runs,
median), and every row is checked against the loop outside the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import fbfast

from .cases import Case, make_inputs
from .loops import forward_step, rollout_fn, training_step
from .report import check_cpp, fmt_time, is_noisy, machine_info, measure_group

ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "mish")
QUICK_ACTIVATIONS = ("relu", "silu", "gelu")
DEFAULT_SHAPE = (64, 4, 16, 64, 50)


def run(case: Case, args) -> Dict:
    inputs = make_inputs(case)
    out = {"activation": case.activation, "layers": case.layers, "check": check_cpp(inputs), "times": {}}
    for mode in ("fwd", "train"):
        fns = {}
        for backend in ("seed-loop", "cpp"):
            fn = rollout_fn(backend, inputs)
            fns[backend] = forward_step(fn) if mode == "fwd" else training_step(fn, inputs.params(backend),
                                                                                inputs.target)
        out["times"][mode] = measure_group(fns, target_s=args.target, runs=args.runs, patience=args.patience)
    return out


def ratio(row: Dict, mode: str) -> Optional[float]:
    t = row["times"][mode]
    return t["seed-loop"]["median_s"] / t["cpp"]["median_s"]


def markdown(rows: List[Dict]) -> str:
    lines = ["| activation | hidden layers | fwd loop | fwd cpp | fwd speedup | train loop | train cpp | train speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["activation"], str(r["layers"])]
        for mode in ("fwd", "train"):
            t = r["times"][mode]
            mark = lambda m: " †" if is_noisy(m) else ""  # noqa: E731
            cells += [fmt_time(t["seed-loop"]["median_s"]) + mark(t["seed-loop"]),
                      fmt_time(t["cpp"]["median_s"]) + mark(t["cpp"]), f"{ratio(r, mode):.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.networks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="relu, silu and gelu, 1..2 hidden layers, fewer runs")
    p.add_argument("--shape", nargs=5, type=int, metavar=("B", "Du", "O", "H", "T"), default=DEFAULT_SHAPE)
    p.add_argument("--activations", nargs="+", choices=ACTIVATIONS)
    p.add_argument("--layers", nargs="+", type=int, help="hidden layer counts (default 1 2 3; quick 1 2)")
    p.add_argument("--runs", type=int, help="measurements per timing (default 5, quick 3)")
    p.add_argument("--target", type=float, help="seconds per measurement (default 0.2, quick 0.1)")
    p.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to PATH")
    args = p.parse_args(argv)
    if not fbfast.backends()["cpp"].available:
        print(f"the cpp backend is not available: {fbfast.backends()['cpp'].reason}", file=sys.stderr)
        return 1
    args.runs = args.runs or (3 if args.quick else 5)
    args.target = args.target or (0.1 if args.quick else 0.2)
    args.patience = 2.0 if args.quick else 5.0
    acts = args.activations or (QUICK_ACTIVATIONS if args.quick else ACTIVATIONS)
    depths = args.layers or ([1, 2] if args.quick else [1, 2, 3])
    B, Du, O, H, T = args.shape
    t0 = time.perf_counter()
    info = machine_info()
    rows = [run(Case(act, B, Du, O, H, T, layers=n, activation=act), args) for act in acts for n in depths]
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("## fbfast rollout per activation and depth" + (" (--quick)" if args.quick else ""))
    print()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
          f"({info['torch_threads']} threads, {info['cpu_capability']}), {info['date']}; load average "
          f"{info['load_average']} at start, {info['load_average_end']} at end.")
    print()
    print(f"(B, Du, O, H, T) = ({B}, {Du}, {O}, {H}, {T}), float32; each network has the given number of "
          f"hidden layers of width {H}. Median time per call over {args.runs} interleaved measurements of "
          f"~{args.target:g} s. fwd: under torch.no_grad(). train: zero grads + rollout + per-step MSE + "
          "backward. Speedup: loop time / cpp time.")
    print()
    print(markdown(rows))
    errs = [r["check"] for r in rows if r["check"]]
    if errs:
        print()
        print(f"Check (outside timing): cpp vs loop, max relative error Y {max(e['y'] for e in errs):.2g}, "
              f"parameter gradients {max(e['grad'] or 0 for e in errs):.2g}.")
    if any(is_noisy(m) for r in rows for t in r["times"].values() for m in t.values()):
        print()
        print("†: the slowest run took more than 2x the fastest (load from other processes).")
    elapsed = time.perf_counter() - t0
    print(f"\n({elapsed:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "shape": [B, Du, O, H, T], "runs": args.runs, "target_s": args.target,
                       "elapsed_s": elapsed, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
