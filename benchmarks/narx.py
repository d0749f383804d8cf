"""A NARX model (a tapped delay line of past outputs): fbfast against the loop a user writes.

    python -m benchmarks.narx [--json benchmarks/results/narx.json]

The system-identification setting of deepSI and SysIdentPy: y_t = f(u_t, y_{t-1}, ..., y_{t-na})
with na = 5 output lags, B = 64 sequences, Du = 10 exogenous inputs, O = F = 2 outputs, two hidden
tanh layers of 64, T = 50 steps. The loop keeps the past outputs in a Python list and feeds
torch.cat([u_t, y_{t-1}, ..., y_{t-5}]) to an nn.Sequential each step; fbfast runs
`fbfast.rollout(..., delay=(1, 2, 3, 4, 5), activation="tanh")`. Both use the same float32 weights;
the timing method is benchmarks/report.py's (interleaved runs, median), and the results are
checked against each other outside the timing.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import torch
from torch import nn

import fbfast

from .report import fmt_time, machine_info, measure_group, rel_err, timing_parser

B, DU, O, H, T = 64, 10, 2, 64, 50
LAGS = (1, 2, 3, 4, 5)


def narx_loop(net: nn.Sequential, x0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x0: (na, B, O), oldest first; the loop as the NARX toolboxes write it."""
    past = list(x0.unbind(0))  # past[-d] is y_{t-d}
    ys = []
    for t in range(u.shape[0]):
        inp = torch.cat([u[t]] + [past[-d] for d in LAGS], -1)
        y = net(inp)
        ys.append(y)
        past.append(y)
    return torch.stack(ys)


def main(argv: Optional[List[str]] = None) -> int:
    args = timing_parser("python -m benchmarks.narx", __doc__).parse_args(argv)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(DU + len(LAGS) * O, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, O))
    params = [t for m in net if isinstance(m, nn.Linear) for t in (m.weight, m.bias)]
    x0 = torch.randn(max(LAGS), B, O)
    u = torch.randn(T, B, DU)
    target = torch.randn(T, B, O)
    fused = lambda: fbfast.rollout(x0, *params, u=u, delay=LAGS, activation="tanh")  # noqa: E731
    loop = lambda: narx_loop(net, x0, u)  # noqa: E731
    with torch.no_grad():
        y_err = rel_err(fused(), loop())

    def train(fn):
        def step():
            for q in params:
                q.grad = None
            torch.nn.functional.mse_loss(fn(), target).backward()
        return step

    results = {}
    with torch.no_grad():
        results["fwd"] = measure_group({"loop": loop, "fbfast": fused}, target_s=args.target, runs=args.runs)
    results["train"] = measure_group({"loop": train(loop), "fbfast": train(fused)}, target_s=args.target,
                                     runs=args.runs)
    info = machine_info()
    print("## NARX (tapped delay line) rollout")
    print()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
          f"({info['torch_threads']} threads, {info['cpu_capability']}), {info['date']}.")
    print()
    print(f"B = {B}, Du = {DU}, O = F = {O}, lags {LAGS}, 2 hidden tanh layers of {H}, T = {T}, float32; "
          f"median of {args.runs} interleaved measurements of ~{args.target:g} s. train: zero grads + "
          "rollout + MSE + backward.")
    print()
    print("| mode | loop | fbfast | speedup |")
    print("|---|---:|---:|---:|")
    for mode, r in results.items():
        a, b = r["loop"]["median_s"], r["fbfast"]["median_s"]
        print(f"| {mode} | {fmt_time(a)} | {fmt_time(b)} | {a / b:.1f}x |")
    print()
    print(f"Check (outside timing): max relative difference of Y, fbfast vs loop: {y_err:.2g}.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results, "y_rel_err": y_err}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
