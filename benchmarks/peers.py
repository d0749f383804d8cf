"""fbfast beside its peers: speedups over the seed-style per-step loop, side by side in one run.

    python -m benchmarks.peers                      # every case (a few minutes, compiles included)
    python -m benchmarks.peers --cases seed small   # some of them
    python -m benchmarks.peers --json benchmarks/results/peers.json

The peers, each timed as a forward under ``torch.no_grad()`` ("fwd") and as a training step
("train": zero the grads, rollout, the loss of `benchmarks.loops.step_loss`, backward):

| name       | what runs                                                                              |
| ---------- | -------------------------------------------------------------------------------------- |
| loop       | the seed-style per-step loop (`benchmarks.loops.seed_loop`), the baseline              |
| fbfast     | ``fbfast.rollout`` (backend "auto": the fused C++ operator)                            |
| compile    | ``torch.compile`` of that loop (unrolled over T; not run for T > 200, whose compile    |
|            | takes minutes)                                                                         |
| rnn        | ``nn.RNN(nonlinearity="relu")`` through the identity, two-layer ReLU cases only        |
| jax        | ``jax.jit`` of a ``lax.scan`` of the same step, where JAX is installed                 |

"Through the identity": a two-layer ReLU feedback network's hidden state follows
``h_t = relu(W1u u_t + (W1y W2) h_{t-1} + W1y b2 + b1)`` and ``y_t = W2 h_t + b2``, an Elman RNN
with ``W_hh = W1y W2`` and a linear read-out, which is how a user would reach for ``nn.RNN``
(ATen's fused RNN on the CPU, cuDNN's on a GPU). It is timed from ``h_{-1} = 0``; its training
step differentiates ``W_ih, W_hh`` and the read-out, not ``W1`` and ``W2`` themselves. JAX runs its
whole training step (forward, loss, gradient) in one compiled function, outside any autograd
engine.

Every method gets the same seeded inputs; the timings of a (case, mode) are interleaved
(`benchmarks.report.measure_group`), and the median is reported. The machine's CPU, the BLAS
speed (``torch.mm`` GFLOP/s of a 4096 x 256 x 512 product) and the load average are printed
with the table, and fbfast's GFLOP/s as a share of ``torch.mm``'s on one step's GEMMs of the case
(``(B, in_l) x (in_l, out_l)`` per layer), timed in the same interleaved runs: the ratios depend
on the machine (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import fbfast

from .cases import Case, make_inputs
from .loops import rollout_fn, seed_loop, step_loss, training_step
from .report import cpu_model, measure_group, mm_step, timing_parser

# The shapes of the performance issue's table (B, Du, O, H, T), then the deeper networks.
PEER_CASES = (
    Case("seed", 1, 8, 2, 5, 5),
    Case("small", 32, 0, 32, 64, 100),
    Case("medium", 256, 0, 64, 256, 100),
    Case("large", 4096, 0, 256, 512, 20),
    Case("long", 32, 0, 32, 64, 1000),
    Case("silu", 32, 0, 32, 64, 100, activation="silu"),
    Case("gelu3", 128, 4, 16, 128, 50, layers=3, activation="gelu"),
)
COMPILE_MAX_STEPS = 200
MODES = ("fwd", "train")


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return fn()
    return step


def _rnn_methods(case: Case, inputs) -> Optional[Dict[str, Callable[[], object]]]:
    """nn.RNN through the identity (module docstring), for two-layer ReLU networks."""
    if case.layers != 1 or case.activation != "relu" or case.delay != 1 or case.truncate:
        return None
    fc1, fc2 = inputs.fb_net.fc1, inputs.fb_net.fc2
    Du = case.Du
    rnn = nn.RNN(max(Du, 1), case.H, nonlinearity="relu")
    readout = nn.Linear(case.H, case.O)
    with torch.no_grad():
        w1u, w1y = fc1.weight[:, :Du], fc1.weight[:, Du:]
        rnn.weight_ih_l0.copy_(w1u if Du else torch.zeros(case.H, 1))
        rnn.weight_hh_l0.copy_(w1y @ fc2.weight)
        rnn.bias_ih_l0.copy_(fc1.bias)
        rnn.bias_hh_l0.copy_(w1y @ fc2.bias)
        readout.load_state_dict(fc2.state_dict())
    u = inputs.u if inputs.u is not None else torch.zeros(case.T, case.B, 1)
    params = list(rnn.parameters()) + list(readout.parameters())

    def run():
        h, _ = rnn(u)
        return readout(h)
    return {"fwd": _no_grad(run), "train": training_step(run, params, inputs.target)}


def _jax_methods(case: Case, inputs) -> Optional[Dict[str, Callable[[], object]]]:
    """jax.jit of a lax.scan over the steps; None where JAX is not installed."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    acts = {"relu": jax.nn.relu, "silu": jax.nn.silu, "tanh": jnp.tanh,
            "gelu": lambda z: jax.nn.gelu(z, approximate=False)}
    if case.activation not in acts or case.delay != 1 or case.truncate:
        return None
    act = acts[case.activation]
    layers = [(jnp.asarray(fc.weight.detach().numpy()), jnp.asarray(fc.bias.detach().numpy()))
              for fc in inputs.fb_net.layers]
    x0 = jnp.asarray(inputs.x0.numpy())
    u = jnp.asarray(inputs.u.numpy()) if inputs.u is not None else jnp.zeros((case.T, case.B, 0), jnp.float32)
    target = jnp.asarray(inputs.target.numpy())

    def rollout(params, x0, u):
        def step(x, ut):
            h = jnp.concatenate([ut, x], -1)
            for l, (w, b) in enumerate(params):
                h = h @ w.T + b
                if l + 1 < len(params):
                    h = act(h)
            return h, h
        return jax.lax.scan(step, x0, u)[1]

    def loss(params, x0, u, target):
        y = rollout(params, x0, u)
        return jnp.sum((y - target) ** 2) / (y.shape[1] * y.shape[2])

    fwd = jax.jit(rollout)
    train = jax.jit(jax.value_and_grad(loss))
    return {"fwd": lambda: fwd(layers, x0, u).block_until_ready(),
            "train": lambda: jax.block_until_ready(train(layers, x0, u, target))}


def _compiled_loop(inputs) -> Callable[[], torch.Tensor]:
    net, x0, u, steps = inputs.seed_net, inputs.x0, inputs.u, inputs.steps
    fn = torch.compile(lambda: seed_loop(net, x0, u, steps, inputs.delay, inputs.truncate))
    return fn


def methods_of(case: Case, inputs, with_compile: bool) -> Dict[str, Dict[str, Callable[[], object]]]:
    """{method: {mode: callable}} for one case."""
    fb_params = list(inputs.fb_net.parameters())
    loop_params = list(inputs.seed_net.parameters())
    out = {
        "loop": {"fwd": _no_grad(rollout_fn("seed-loop", inputs)),
                 "train": training_step(rollout_fn("seed-loop", inputs), loop_params, inputs.target)},
        "fbfast": {"fwd": _no_grad(rollout_fn("auto", inputs)),
                   "train": training_step(rollout_fn("auto", inputs), fb_params, inputs.target)},
    }
    if with_compile and case.T <= COMPILE_MAX_STEPS:
        fn = _compiled_loop(inputs)
        out["compile"] = {"fwd": _no_grad(fn), "train": training_step(fn, loop_params, inputs.target)}
    rnn = _rnn_methods(case, inputs)
    if rnn is not None:
        out["rnn"] = rnn
    jax_methods = _jax_methods(case, inputs)
    if jax_methods is not None:
        out["jax"] = jax_methods
    return out


def mm_gflops() -> float:
    a, b = torch.randn(4096, 256), torch.randn(256, 512)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 256 * 512 / best / 1e9


def main(argv: Optional[List[str]] = None) -> int:
    p = timing_parser("python -m benchmarks.peers", __doc__)
    p.add_argument("--cases", nargs="*", help="case names (default: all)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = p.parse_args(argv)
    cases = [c for c in PEER_CASES if not args.cases or c.name in args.cases]
    info = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "mm_gflops": round(mm_gflops(), 1)}
    try:
        import jax
        info["jax"] = jax.__version__
    except ImportError:
        info["jax"] = "not installed"
    print(f"# fbfast vs peers: speedup over the per-step loop (median of interleaved runs)\n")
    print("; ".join(f"{k}: {v}" for k, v in info.items()) + "\n", flush=True)
    names = ("fbfast", "compile", "rnn", "jax")
    print("| case (B, Du, O, H, T) | mode | loop | " + " | ".join(names) + " | fbfast % of mm |")
    print("|---|---|---:|" + "---:|" * (len(names) + 1), flush=True)
    results = []
    for case in cases:
        inputs = make_inputs(case)
        torch._dynamo.reset()
        per_method = methods_of(case, inputs, not args.no_compile)
        for mode in MODES:
            fns = {m: per_method[m][mode] for m in per_method}
            fns["mm"] = mm_step(case, inputs)
            for fn in fns.values():  # compiles and JIT warm-ups outside the timings
                fn()
            t = measure_group(fns, target_s=args.target, runs=args.runs)
            base = t["loop"]["median_s"]
            flops = case.forward_flops() if mode == "fwd" else case.train_flops()
            # torch.mm's speed on one step's GEMMs of this case, timed in the same interleaved runs.
            mm_rate = 2 * case.B * case.step_macs() / t["mm"]["median_s"]
            share = flops / t["fbfast"]["median_s"] / mm_rate * 100
            cells = [f"{base / t[m]['median_s']:.2f}x" if m in t else "—" for m in names]
            print(f"| {case.label} | {mode} | {base * 1e3:.3g} ms | " + " | ".join(cells) + f" | {share:.0f}% |",
                  flush=True)
            results.append({"case": case.name, "shape": case.shape, "mode": mode,
                            "median_s": {m: v["median_s"] for m, v in t.items()}, "fbfast_share_of_mm": share})
    calibration = fbfast.cpu_path_calibration()
    if calibration:
        print("\nThe CPU paths fbfast's 'auto' measured and took (fbfast.cpu_path_calibration()):\n")
        for line in calibration:
            print(f"- {line}")
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results, "cpu_path_calibration": calibration}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
