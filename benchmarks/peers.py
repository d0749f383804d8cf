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

Two configurations beyond the ``Case`` shapes run the same peers (nn.RNN cannot express them):
``narx``, benchmarks/narx.py's tapped delay line (lags 1..5, exogenous inputs, two tanh layers),
its loop `benchmarks.narx.narx_loop`; and ``mbrl``, benchmarks/mbrl.py's ensemble (7 members,
4 SiLU layers of 200, a residual state and a reward head not fed back), its loop
`benchmarks.mbrl.mbrl_loop` (one ``baddbmm`` per layer). JAX runs their step under ``lax.scan``
with the lags as a carried window and the members as a batched ``einsum``.

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
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import fbfast

from . import mbrl, narx
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


def _jax_mlp(act_name: str):
    """(jax, jnp, act) where JAX is installed and has the activation, else None."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    acts = {"relu": jax.nn.relu, "silu": jax.nn.silu, "tanh": jnp.tanh,
            "gelu": lambda z: jax.nn.gelu(z, approximate=False)}
    return (jax, jnp, acts[act_name]) if act_name in acts else None


def _jax_modes(jax, rollout, params, x0, u, target):
    """fwd and train callables of a JAX rollout(params, x0, u): jax.jit of it, and of the value and
    gradient of the loss of `benchmarks.loops.step_loss`."""
    import jax.numpy as jnp

    def loss(params, x0, u, target):
        y = rollout(params, x0, u)
        return jnp.sum((y - target) ** 2) / (y[0].size if y.shape[0] else 1)  # benchmarks.loops.step_loss
    fwd = jax.jit(rollout)
    train = jax.jit(jax.value_and_grad(loss))
    return {"fwd": lambda: fwd(params, x0, u).block_until_ready(),
            "train": lambda: jax.block_until_ready(train(params, x0, u, target))}


def _jax_methods(case: Case, inputs) -> Optional[Dict[str, Callable[[], object]]]:
    """jax.jit of a lax.scan over the steps; None where JAX is not installed."""
    j = _jax_mlp(case.activation)
    if j is None or case.delay != 1 or case.truncate:
        return None
    jax, jnp, act = j
    layers = [(jnp.asarray(fc.weight.detach().numpy()), jnp.asarray(fc.bias.detach().numpy()))
              for fc in inputs.fb_net.layers]
    u = jnp.asarray(inputs.u.numpy()) if inputs.u is not None else jnp.zeros((case.T, case.B, 0), jnp.float32)

    def rollout(params, x0, u):
        def step(x, ut):
            h = jnp.concatenate([ut, x], -1)
            for l, (w, b) in enumerate(params):
                h = h @ w.T + b
                if l + 1 < len(params):
                    h = act(h)
            return h, h
        return jax.lax.scan(step, x0, u)[1]
    return _jax_modes(jax, rollout, layers, jnp.asarray(inputs.x0.numpy()), u, jnp.asarray(inputs.target.numpy()))


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


@dataclass
class Row:
    """What the table times for one configuration: {method: {mode: callable}}, torch.mm's GEMMs
    of one step (``mm``), the forward's FLOPs and one step's (for the % of torch.mm)."""

    name: str
    label: str
    methods: Dict[str, Dict[str, Callable[[], object]]]
    mm: Callable[[], object]
    forward_flops: int
    step_flops: int

    def flops(self, mode: str) -> int:
        return self.forward_flops if mode == "fwd" else 3 * self.forward_flops  # as benchmarks/cases.py


def case_row(case: Case, with_compile: bool) -> Row:
    inputs = make_inputs(case)
    return Row(case.name, case.label, methods_of(case, inputs, with_compile), mm_step(case, inputs),
               case.forward_flops(), 2 * case.B * case.step_macs())


def _torch_methods(loop: Callable[[], torch.Tensor], fused: Callable[[], torch.Tensor],
                   params: Sequence[torch.Tensor], target: torch.Tensor, with_compile: bool):
    """loop, fbfast and (with_compile) torch.compile of the loop, each forward and training step."""
    methods = {"loop": loop, "fbfast": fused}
    if with_compile:
        methods["compile"] = torch.compile(loop)
    return {name: {"fwd": _no_grad(fn), "train": training_step(fn, params, target)} for name, fn in methods.items()}


def narx_row(with_compile: bool) -> Row:
    """benchmarks/narx.py's tapped-delay-line model: lags 1..5, Du = 10, two tanh layers of 64."""
    B, DU, O, H, T, lags = narx.B, narx.DU, narx.O, narx.H, narx.T, narx.LAGS
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(DU + len(lags) * O, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, O))
    params = [t for m in net if isinstance(m, nn.Linear) for t in (m.weight, m.bias)]
    x0, u, target = torch.randn(max(lags), B, O), torch.randn(T, B, DU), torch.randn(T, B, O)
    methods = _torch_methods(lambda: narx.narx_loop(net, x0, u),
                             lambda: fbfast.rollout(x0, *params, u=u, delay=lags, activation="tanh"),
                             params, target, with_compile)
    j = _jax_mlp("tanh")
    if j is not None:
        jax, jnp, act = j
        layers = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
                  for m in net if isinstance(m, nn.Linear)]

        def rollout(params, x0, u):
            def step(past, ut):  # past: (D, B, O), oldest first, as x0
                h = jnp.concatenate([ut] + [past[-d] for d in lags], -1)
                for l, (w, b) in enumerate(params):
                    h = h @ w.T + b
                    if l + 1 < len(params):
                        h = act(h)
                return jnp.concatenate([past[1:], h[None]], 0), h
            return jax.lax.scan(step, x0, u)[1]
        methods["jax"] = _jax_modes(jax, rollout, layers, jnp.asarray(x0.numpy()), jnp.asarray(u.numpy()),
                                    jnp.asarray(target.numpy()))
    linears = [m for m in net if isinstance(m, nn.Linear)]
    macs = sum(m.in_features * m.out_features for m in linears)
    gen = torch.Generator().manual_seed(1)
    acts = [(torch.randn(B, m.in_features, generator=gen), m.weight.detach()) for m in linears]

    def mm():
        for a, w in acts:
            torch.mm(a, w.t())
    label = f"narx (B={B}, Du={DU}, O={O}, lags 1-{max(lags)}, 2x{H} tanh, T={T})"
    return Row("narx", label, methods, mm, 2 * B * T * macs, 2 * B * macs)


def mbrl_row(with_compile: bool) -> Row:
    """benchmarks/mbrl.py's ensemble dynamics model at its full size."""
    shape = mbrl.FULL
    p = mbrl.make_inputs(shape)
    F = shape.F
    target = torch.randn(shape.T, shape.E, shape.B, shape.O, generator=torch.Generator().manual_seed(2))
    methods = _torch_methods(lambda: mbrl.mbrl_loop(p.x0, p.u, p.weights, p.biases, F),
                             lambda: fbfast.rollout(p.x0, *p.params, u=p.u, activation="silu", residual=True,
                                                    feedback=F),
                             list(p.params), target, with_compile)
    j = _jax_mlp("silu")
    if j is not None:
        jax, jnp, act = j
        layers = [(jnp.asarray(w.detach().numpy()), jnp.asarray(b.detach().numpy()))
                  for w, b in zip(p.weights, p.biases)]
        E = shape.E

        def rollout(params, x0, u):
            def step(s, ut):  # s: (E, B, F); ut: (B, Du), shared by the members
                h = jnp.concatenate([jnp.broadcast_to(ut, (E,) + ut.shape), s], -1)
                for l, (w, b) in enumerate(params):
                    h = jnp.einsum("ebi,eoi->ebo", h, w) + b[:, None]
                    if l + 1 < len(params):
                        h = act(h)
                y = jnp.concatenate([h[..., :F] + s, h[..., F:]], -1)
                return y[..., :F], y
            return jax.lax.scan(step, jnp.broadcast_to(x0[-1], (E,) + x0.shape[1:]), u)[1]
        methods["jax"] = _jax_modes(jax, rollout, layers, jnp.asarray(p.x0.detach().numpy()),
                                    jnp.asarray(p.u.detach().numpy()), jnp.asarray(target.numpy()))
    w = shape.widths()
    macs = shape.E * sum(a * b for a, b in zip(w[:-1], w[1:]))
    gen = torch.Generator().manual_seed(1)
    acts = [(torch.randn(shape.E, shape.B, wl.shape[2], generator=gen), wl.detach().transpose(1, 2))
            for wl in p.weights]

    def mm():
        for a, wt in acts:
            torch.bmm(a, wt)
    label = (f"mbrl (E={shape.E}, B={shape.B}, Du={shape.Du}, F={F}, O={shape.O}, "
             f"{shape.hidden}x{shape.H} silu, T={shape.T})")
    return Row("mbrl", label, methods, mm, shape.B * shape.T * 2 * macs, 2 * shape.B * macs)


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
    wanted = lambda name: not args.cases or name in args.cases  # noqa: E731
    builders = [(c.name, lambda c=c: case_row(c, not args.no_compile)) for c in PEER_CASES]
    builders += [("narx", lambda: narx_row(not args.no_compile)), ("mbrl", lambda: mbrl_row(not args.no_compile))]
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
    for name, build in builders:
        if not wanted(name):
            continue
        torch._dynamo.reset()
        row = build()
        for mode in MODES:
            fns = {m: row.methods[m][mode] for m in row.methods}
            fns["mm"] = row.mm
            for fn in fns.values():  # compiles and JIT warm-ups outside the timings
                fn()
            t = measure_group(fns, target_s=args.target, runs=args.runs)
            base = t["loop"]["median_s"]
            # torch.mm's speed on one step's GEMMs of this case, timed in the same interleaved runs.
            mm_rate = row.step_flops / t["mm"]["median_s"]
            share = row.flops(mode) / t["fbfast"]["median_s"] / mm_rate * 100
            cells = [f"{base / t[m]['median_s']:.2f}x" if m in t else "—" for m in names]
            print(f"| {row.label} | {mode} | {base * 1e3:.3g} ms | " + " | ".join(cells) + f" | {share:.0f}% |",
                  flush=True)
            results.append({"case": row.name, "shape": row.label, "mode": mode,
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
