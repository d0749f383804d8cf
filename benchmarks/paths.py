"""Does "auto" take the faster CPU path on this machine? The calibration against both pinned paths.

    python -m benchmarks.paths                      # the cases where the two paths are close
    python -m benchmarks.paths --json benchmarks/results/paths.json

For each case and mode (forward under ``torch.no_grad()``, training step as in
`benchmarks.loops.training_step`), times side by side, interleaved: the seed-style per-step loop,
fbfast with ``cpu_path="auto"`` (calibrated per shape class on first use, csrc/cpu/rollout_cpu.cpp),
``"rule"`` (the static rule, tuned on an AMD EPYC), and the two pinned paths ``"tile"`` and
``"blas"``. Prints what "auto" chose (`fbfast.cpu_path_calibration()`), the medians, and fbfast's
GFLOP/s as a share of ``torch.mm``'s on one step's GEMMs of the case (``(B, in_l) x (in_l,
out_l)`` for every layer), timed in the same interleaved runs. The options are
switched between calls with `fbfast.set_kernel_options`; "auto" measured its classes before the
timings (its first call is timed separately, with the calibration it includes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, List, Optional

import torch

import fbfast

from .cases import Case, make_inputs
from .loops import forward_step, rollout_fn, training_step
from .peers import mm_gflops
from .report import cpu_model, measure_group, mm_step, timing_parser

CASES = (
    Case("medium", 256, 0, 64, 256, 100),
    Case("large", 4096, 0, 256, 512, 20),
    Case("gelu3", 128, 4, 16, 128, 50, layers=3, activation="gelu"),
    Case("wide", 1024, 8, 128, 384, 30, activation="silu"),
)
PATHS = ("auto", "rule", "tile", "blas")


def _pinned(fn: Callable[[], object], path: str) -> Callable[[], object]:
    def run():
        previous = fbfast.set_kernel_options(cpu_path=path)
        try:
            return fn()
        finally:
            fbfast.set_kernel_options(**previous)
    return run


def main(argv: Optional[List[str]] = None) -> int:
    p = timing_parser("python -m benchmarks.paths", __doc__)
    p.add_argument("--cases", nargs="*", help="case names (default: all)")
    p.set_defaults(runs=5, target=0.5)
    args = p.parse_args(argv)
    gflops = mm_gflops()  # for the header; the shares use the interleaved GEMMs of each case
    print(f"# CPU path: calibrated 'auto' against the rule and both pinned paths\n")
    print(f"cpu: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}; torch.mm {gflops:.0f} GFLOP/s\n", flush=True)
    print("| case (B, Du, O, H, T) | mode | first auto call | loop | auto | rule | tile | blas | auto took | "
          "auto % of mm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|", flush=True)
    results = []
    for case in [c for c in CASES if not args.cases or c.name in args.cases]:
        inputs = make_inputs(case)
        params = list(inputs.fb_net.parameters())
        for mode in ("fwd", "train"):
            def make(backend):
                fn = rollout_fn(backend, inputs)
                if mode == "fwd":
                    return forward_step(fn)
                return training_step(fn, inputs.params(backend), inputs.target)
            fns = {"loop": make("seed-loop"), "mm": mm_step(case, inputs)}
            for path in PATHS:
                fns[path] = _pinned(make("cpp"), path)
            before = set(fbfast.cpu_path_calibration())
            t0 = time.perf_counter()
            fns["auto"]()
            first = time.perf_counter() - t0
            new = [s for s in fbfast.cpu_path_calibration() if s not in before]
            # The class this call measured (none: below the calibration threshold, the rule decides).
            took = ", ".join(s.rsplit("-> ", 1)[1] for s in new) or "rule"
            t = measure_group(fns, target_s=args.target, runs=args.runs)
            flops = case.forward_flops() if mode == "fwd" else case.train_flops()
            # The same run's torch.mm speed on one step's GEMMs at this shape, interleaved.
            mm_rate = 2 * case.B * case.step_macs() / t["mm"]["median_s"]
            share = flops / t["auto"]["median_s"] / mm_rate * 100

            def ms(name):
                return f"{t[name]['median_s'] * 1e3:.3g}"
            print(f"| {case.label} | {mode} | {first * 1e3:.0f} ms | {ms('loop')} | {ms('auto')} | {ms('rule')} | "
                  f"{ms('tile')} | {ms('blas')} | {took} | {share:.0f}% |", flush=True)
            results.append({"case": case.name, "shape": case.shape, "mode": mode, "first_auto_s": first,
                            "calibrated": new, "median_s": {k: v["median_s"] for k, v in t.items()}})
    print("\nAll times in ms (medians). What auto measured:\n")
    for line in fbfast.cpu_path_calibration():
        print(f"- {line}")
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "mm_gflops": gflops, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
