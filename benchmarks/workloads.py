"""The real workloads of examples/: one training update of each, the per-step loop against fbfast.

    python -m benchmarks.workloads [--runs N] [--target S] [--json PATH]

* HalfCheetah dynamics (examples/halfcheetah_dynamics.py): one Adam update of the ensemble of 7
  delta models (4 hidden SiLU layers of 200, reward head) on a minibatch of 256 windows of 10
  steps per member, each member its own windows; data simulated here (a few thousand steps).
* Sunspots NARX (examples/sunspots_narx.py): one full-batch Adam update of the free-run training
  (lags 1-9, 2 x 32 tanh, windows of 20 years, truncate 10).

Each update is the example's own code: its loop or its fbfast rollout, the loss, backward and
the optimizer step, on copies of one model. The timing method is benchmarks/report.py's
(interleaved runs, median). The examples' own tables time whole epochs of a training run; this
times the update alone, round-robin, so that load from other processes falls on both alike.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from .report import fmt_time, machine_info, measure_group, timing_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _update(model, rollout: Callable, loss: Callable) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        value = loss(rollout(model))
        opt.zero_grad()
        value.backward()
        opt.step()
    return step


def halfcheetah() -> Dict[str, Callable[[], None]]:
    hc = _example("halfcheetah_dynamics")
    data = hc.Normaliser(raw := hc.collect(4, 300, seed=0))(raw)
    windows = hc.Windows(data, 10)
    idx = torch.randint(windows.count, (hc.MEMBERS, 256), generator=torch.Generator().manual_seed(0))
    x0, u, s, r = windows.gather(idx)
    base = hc.make_model(0)
    loss = lambda pred: hc.loss_of(pred, s, r)  # noqa: E731
    return {"loop": _update(copy.deepcopy(base), lambda m: hc.loop_rollout(m, x0, u), loss),
            "fbfast": _update(copy.deepcopy(base), lambda m: hc.fbfast_rollout(m, x0, u), loss)}


def sunspots() -> Dict[str, Callable[[], None]]:
    ss = _example("sunspots_narx")
    series, _ = ss.load_series(ss.FULL["test_years"])
    window, truncate = ss.FULL["window"], ss.FULL["truncate"]
    x0, target = ss.windows(series[:-ss.FULL["test_years"]], window)
    base = ss.make_model(0)
    loss = lambda pred: (pred - target).pow(2).mean()  # noqa: E731
    return {"loop": _update(copy.deepcopy(base), lambda m: ss.loop_rollout(m, x0, window, truncate), loss),
            "fbfast": _update(copy.deepcopy(base), lambda m: ss.fbfast_rollout(m, x0, window, truncate), loss)}


WORKLOADS = {
    "HalfCheetah ensemble (E=7, B=256, H=10, 4x200 SiLU)": halfcheetah,
    "sunspots NARX (241 windows of 20, lags 1-9, 2x32 tanh)": sunspots,
}


def main(argv: Optional[List[str]] = None) -> int:
    args = timing_parser("python -m benchmarks.workloads", __doc__).parse_args(argv)
    info = machine_info()
    rows = []
    for name, make in WORKLOADS.items():
        try:
            fns = make()
        except ImportError as exc:  # requirements-examples.txt not installed
            rows.append({"workload": name, "skipped": f"{exc} (pip install -r requirements-examples.txt)"})
            continue
        m = measure_group(fns, target_s=args.target, runs=args.runs)
        rows.append({"workload": name, "loop_s": m["loop"]["median_s"], "fbfast_s": m["fbfast"]["median_s"],
                     "runs": {k: v["runs_s"] for k, v in m.items()}})
    print("## Real workloads (examples/): one training update")
    print()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
          f"({info['torch_threads']} threads, {info['cpu_capability']}), {info['date']}. Median of {args.runs} "
          "interleaved measurements; an update is rollout + loss + backward + Adam step, float32.")
    print()
    print("| workload | loop | fbfast | speedup |")
    print("|---|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['workload']} | skipped: {r['skipped']} | | |")
        else:
            print(f"| {r['workload']} | {fmt_time(r['loop_s'])} | {fmt_time(r['fbfast_s'])} | "
                  f"{r['loop_s'] / r['fbfast_s']:.2f}x |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
