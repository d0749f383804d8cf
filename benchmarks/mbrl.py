"""A model-based-RL ensemble (a PETS / MBPO dynamics model): fbfast against the loop a user writes.

    python -m benchmarks.mbrl [--repeats N] [--quick] [--compile] [--json PATH]

The setting of mbrl-lib's ensemble dynamics models: E = 7 members, each an MLP of 4 hidden SiLU
layers of 200, roll out B = 256 imagined trajectories for T = 20 steps from one start state
shared by every member (x0 (1, B, 17)) under one shared action sequence (u (T, B, 6)). Each member
predicts O = 18 outputs: a state delta for the F = 17 state features (residual: the previous
state is added back and the sum fed back) and a reward (the 18th output, not fed back).

The loop ("loop") is written as mbrl-lib's ensemble layers run it: per step the action is
expanded to the E members and concatenated with the state, then one ``torch.baddbmm`` per layer.
fbfast ("fbfast") is ``fbfast.rollout(x0, w1, b1, ..., w5, b5, u=u, activation="silu",
residual=True, feedback=17)`` with 3-D weights (E, out, in) and biases (E, out), backend "auto";
the report names the backend "auto" ran (fbfast/dispatch.py: `resolve`). "compile" (--compile)
is ``backend="compile"``, torch.compile of the reference, as benchmarks/report.py times it; it
is left out by default because it compiles for tens of seconds here.

Timing is benchmarks/report.py's (interleaved runs, median). torch.mm GFLOP/s is measured in the
same run on a GEMM the size of one ensemble layer, (E·B, H) x (H, H), and on a large one,
(4096, 256) x (256, 512); each method's GFLOP/s counts 2·E·B·T·sum_l in_l·out_l for the forward
and 3x that for a training step. Peak memory of one training step is measured as
benchmarks/memory.py does (peak RSS delta and torch's allocator peak), each method in a fresh
process. Every method gets the same float32 weights, and the loop is checked against
`fbfast.rollout_reference` before anything is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fbfast
from fbfast.testing import Problem, assert_close, make_problem

from .memory import MIB, _allocator_peak, _peak_rss_kib, _reset_peak_rss
from .report import (CHECK_GRAD_RTOL, CHECK_RTOL, NOISY_SPREAD, first_call, fmt_gflops, fmt_time, is_noisy,
                     machine_info, measure_group, rel_err)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "mbrl.json")


@dataclasses.dataclass(frozen=True)
class Shape:
    """E members, batch B, Du action features, F fed-back state features, O outputs, ``hidden``
    SiLU layers of width H, T steps."""

    E: int
    B: int
    Du: int
    F: int
    O: int
    H: int
    hidden: int
    T: int

    def widths(self) -> List[int]:
        return [self.Du + self.F] + [self.H] * self.hidden + [self.O]

    def forward_flops(self) -> int:
        w = self.widths()
        return 2 * self.E * self.B * self.T * sum(a * b for a, b in zip(w[:-1], w[1:]))

    def train_flops(self) -> int:
        # As benchmarks/cases.py counts a training step: the forward, and two GEMMs per GEMM backward.
        return 3 * self.forward_flops()

    @property
    def label(self) -> str:
        return (f"E = {self.E}, B = {self.B}, Du = {self.Du}, F = {self.F}, O = {self.O}, "
                f"{self.hidden} hidden SiLU layers of {self.H}, T = {self.T}")


FULL = Shape(E=7, B=256, Du=6, F=17, O=18, H=200, hidden=4, T=20)
# --quick keeps the structure (shared x0 and u, a head not fed back, 4 hidden layers) at a size
# that runs in a fraction of a second, for the smoke test of tests/test_benchmarks.py.
QUICK = Shape(E=3, B=8, Du=2, F=3, O=4, H=16, hidden=4, T=5)
BIG_MM = (4096, 256, 512)
QUICK_BIG_MM = (256, 64, 128)

TARGET_SPEEDUP = 1.3
TARGET_MM_FRACTION = 0.6
TARGET_MEMORY = 0.5


def make_inputs(shape: Shape, dtype: torch.dtype = torch.float32, shared: bool = True, seed: int = 0) -> Problem:
    """Seeded inputs; gradients are wanted on the weights and biases only (x0 and u are data)."""
    p = make_problem(B=shape.B, Du=shape.Du, O=shape.O, H=shape.H, T=shape.T, layers=shape.hidden + 1,
                     activation="silu", feedback=shape.F, residual=True, ensemble=shape.E, shared_x0=shared,
                     shared_u=shared, dtype=dtype, requires_grad=False, seed=seed)
    for t in p.params:
        t.requires_grad_(True)
    return p


def mbrl_loop(x0: torch.Tensor, u: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
              feedback: int) -> torch.Tensor:
    """The per-step loop of an ensemble delta model with a reward head; Y is (T, E, B, O).

    x0 is (1, B, F) shared or (1, E, B, F) per member, u (T, B, Du) shared or (T, E, B, Du).
    The residual is added out of place (a torch.cat rather than ``y[..., :F] += s``), so that the
    loop never writes into a tensor that a later step or autograd may hold; the reward head,
    ``y[..., F:]``, passes through unchanged and is not fed back."""
    E = weights[0].shape[0]
    s = x0[-1]
    if s.dim() == 2:
        s = s.expand(E, *s.shape)
    last = len(weights) - 1
    ys = []
    for t in range(u.shape[0]):
        u_t = u[t]
        if u_t.dim() == 2:
            u_t = u_t.expand(E, *u_t.shape)
        h = torch.cat([u_t, s], -1)
        for l, (w, b) in enumerate(zip(weights, biases)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if l < last:
                h = torch.nn.functional.silu(h)
        y = torch.cat([h[..., :feedback] + s, h[..., feedback:]], -1)
        s = y[..., :feedback]
        ys.append(y)
    return torch.stack(ys)


def methods(p: Problem, shape: Shape, with_compile: bool) -> Dict[str, Callable[[], torch.Tensor]]:
    def fused(backend):
        return lambda: fbfast.rollout(p.x0, *p.params, u=p.u, activation="silu", residual=True,
                                      feedback=shape.F, backend=backend)

    out = {"loop": lambda: mbrl_loop(p.x0, p.u, p.weights, p.biases, shape.F), "fbfast": fused("auto")}
    if with_compile:
        out["compile"] = fused("compile")
    return out


def train_step(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> Callable[[], None]:
    """Zero the grads (set to None, as benchmarks/narx.py does), rollout, loss on Y, backward."""
    def step():
        for q in params:
            q.grad = None
        fn().square().mean().backward()
    return step


def check_loop(shape: Shape) -> None:
    """The loop computes the rollout fbfast defines (fbfast/reference.py), in float64, shared and
    per-member x0/u, so that the timings compare one computation."""
    small = dataclasses.replace(shape, B=min(shape.B, 5), T=min(shape.T, 4), H=min(shape.H, 7))
    for shared in (True, False):
        p = make_inputs(small, dtype=torch.float64, shared=shared)
        with torch.no_grad():
            ref = fbfast.rollout_reference(p.x0, *p.params, u=p.u, activation="silu", residual=True,
                                           feedback=small.F)
            assert_close(mbrl_loop(p.x0, p.u, p.weights, p.biases, small.F), ref, torch.float64,
                         msg=f"benchmarks/mbrl.py: the loop differs from fbfast.rollout_reference (shared={shared})")


def check_fbfast(p: Problem, fns: Dict[str, Callable[[], torch.Tensor]]) -> Dict[str, float]:
    """fbfast against the loop at the timed size and dtype, outside the timing."""
    with torch.no_grad():
        y_err = rel_err(fns["fbfast"](), fns["loop"]())
    grads = {}
    for name in ("loop", "fbfast"):
        train_step(fns[name], p.params)()
        grads[name] = [q.grad for q in p.params]
    for q in p.params:
        q.grad = None
    # None where a backend left a gradient unset (benchmarks/report.py's check_cpp does the same).
    grad_err = (None if any(g is None for g in grads["fbfast"])
                else max(rel_err(g, r) for g, r in zip(grads["fbfast"], grads["loop"])))
    return {"y": y_err, "grad": grad_err}


def fbfast_backend(p: Problem, shape: Shape) -> str:
    """The backend "auto" runs for this ensemble (fbfast/dispatch.py decides; it routed ensembles
    to the reference, "eager", before the fused kernels took 3-D weights)."""
    try:
        from fbfast import dispatch
        return dispatch.resolve("auto", p.x0)
    except Exception as exc:  # an internal helper: its signature may change
        return f"unknown ({type(exc).__name__})"


def mm_fns(shape: Shape, big) -> Dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(shape.E * shape.B, shape.H, generator=gen)
    w = torch.randn(shape.H, shape.H, generator=gen)
    m, k, n = big
    a2 = torch.randn(m, k, generator=gen)
    w2 = torch.randn(k, n, generator=gen)
    return {"layer": lambda: torch.mm(a, w), "large": lambda: torch.mm(a2, w2)}


def child_memory(method: str, quick: bool) -> Dict:
    """Runs in a fresh process (benchmarks/memory.py's method): a warm-up step at a tiny batch
    pays for code pages, thread pools and BLAS buffers; the peak RSS is reset to the current RSS;
    then one training step at full size, and a second one under the allocator profiler."""
    shape = QUICK if quick else FULL
    tiny = make_inputs(dataclasses.replace(shape, B=4, T=2))
    train_step(methods(tiny, shape, False)[method], tiny.params)()
    p = make_inputs(shape)
    step = train_step(methods(p, shape, False)[method], p.params)
    del tiny
    gc.collect()
    reset = _reset_peak_rss()
    before = _peak_rss_kib()
    step()
    after = _peak_rss_kib()
    return {"method": method, "peak_rss_delta_mib": (after - before) / 1024, "peak_rss_reset": reset,
            "allocator_peak_mib": _allocator_peak(step) / MIB}


def run_child_memory(method: str, quick: bool) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.mbrl", "--child-memory", method] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"method": method, "error": " ".join(proc.stderr.strip().splitlines()[-1:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def fmt_x(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}x"


def fmt_pct(r: Optional[float]) -> str:
    if r is None:
        return "—"
    return f"{100 * r:.0f}%" if r >= 0.1 else f"{100 * r:.2g}%"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mbrl", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", "--runs", dest="runs", type=int,
                   help="measurements per timing; the median is reported (default 7, quick 3)")
    p.add_argument("--target", type=float, help="seconds per measurement (default 0.3, quick 0.02)")
    p.add_argument("--quick", action="store_true", help="a tiny size that runs in seconds (the smoke test)")
    p.add_argument("--compile", action="store_true", help="also time backend='compile' (compiles for tens of s)")
    p.add_argument("--json", metavar="PATH", help=f"write the results as JSON here and markdown beside it "
                   f"(default {os.path.relpath(RESULTS, ROOT)}; --quick writes nothing unless given)")
    p.add_argument("--child-memory", metavar="METHOD", choices=["loop", "fbfast"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.quick)))
        return 0
    args.runs = args.runs or (3 if args.quick else 7)
    args.target = args.target or (0.02 if args.quick else 0.3)
    patience = 2.0 if args.quick else 5.0
    json_path = args.json or (None if args.quick else RESULTS)
    shape = QUICK if args.quick else FULL
    big = QUICK_BIG_MM if args.quick else BIG_MM

    t_start = time.perf_counter()
    info = machine_info()
    check_loop(shape)
    prob = make_inputs(shape)
    fns = methods(prob, shape, args.compile)
    ran = fbfast_backend(prob, shape)
    check = check_fbfast(prob, fns)

    mm = measure_group(mm_fns(shape, big), target_s=args.target, runs=args.runs, patience=patience)
    mm_flops = {"layer": 2 * shape.E * shape.B * shape.H * shape.H, "large": 2 * big[0] * big[1] * big[2]}
    for name, m in mm.items():
        m["gflops"] = mm_flops[name] / m["median_s"] / 1e9

    results: Dict[str, Dict] = {}
    compile_first: Dict[str, float] = {}
    cache = tempfile.mkdtemp(prefix="fbfast-bench-inductor-")
    if args.compile:
        # As benchmarks/report.py: a fresh inductor cache, so a rerun does not report a cache hit.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        torch._dynamo.reset()
    try:
        with torch.no_grad():
            if args.compile:
                compile_first["fwd"] = first_call(fns["compile"])
            results["fwd"] = measure_group(fns, target_s=args.target, runs=args.runs, patience=patience)
        steps = {name: train_step(fn, prob.params) for name, fn in fns.items()}
        if args.compile:
            compile_first["train"] = first_call(steps["compile"])
        results["train"] = measure_group(steps, target_s=args.target, runs=args.runs, patience=patience)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    memory = {m: run_child_memory(m, args.quick) for m in ("loop", "fbfast")}
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    elapsed = time.perf_counter() - t_start

    flops = {"fwd": shape.forward_flops(), "train": shape.train_flops()}
    gflops = {mode: {name: flops[mode] / m["median_s"] / 1e9 for name, m in r.items()} for mode, r in results.items()}
    out: List[str] = []
    w = out.append
    w("## Model-based-RL ensemble rollout" + (" (--quick)" if args.quick else ""))
    w("")
    w(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
      f"({info['torch_threads']} threads, {info['cpu_capability']}), fbfast {info['fbfast']} "
      f"(cpp: {info['cpp_backend']}), {info['date']}; load average {info['load_average']} at start, "
      f"{info['load_average_end']} at end.")
    w("")
    w(f"{shape.label}; residual (delta) model, the first F of the O outputs fed back; x0 (1, B, F) and "
      f"u (T, B, Du) shared by the members; float32, identical weights. fbfast: backend \"auto\", which ran "
      f"\"{ran}\". Median of {args.runs} interleaved measurements of ~{args.target:g} s. fwd: under "
      "torch.no_grad(). train: zero grads + rollout + mean of Y² + backward (no optimizer step). "
      f"GFLOP/s: 2·E·B·T·sum_l in_l·out_l = {flops['fwd'] / 1e9:.3g} GFLOP for fwd, 3x that for train.")
    w("")
    w(f"torch.mm in the same run: (E·B, H) x (H, H) = ({shape.E * shape.B}, {shape.H}) x ({shape.H}, {shape.H}): "
      f"{fmt_gflops(mm['layer']['gflops'])} GFLOP/s; ({big[0]}, {big[1]}) x ({big[1]}, {big[2]}): "
      f"{fmt_gflops(mm['large']['gflops'])} GFLOP/s.")
    w("")
    w("| mode | method | time | vs loop | GFLOP/s | % of torch.mm (E·B, H)x(H, H) | % of torch.mm large |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        for name, m in r.items():
            g = gflops[mode][name]
            w(f"| {mode} | {name} | {fmt_time(m['median_s'])}{' †' if is_noisy(m) else ''} "
              f"| {fmt_x(ratio(r['loop']['median_s'], m['median_s']))} | {fmt_gflops(g)} "
              f"| {fmt_pct(g / mm['layer']['gflops'])} | {fmt_pct(g / mm['large']['gflops'])} |")
    if compile_first:
        w("")
        w(f"torch.compile first call (compile included): fwd {fmt_time(compile_first['fwd'])}, "
          f"train {fmt_time(compile_first['train'])}.")
    w("")
    w("Peak memory of one training step, each method in a fresh process (benchmarks/memory.py's method):")
    w("")
    w("| method | peak RSS delta (MiB) | allocator peak (MiB) | RSS vs loop | allocator vs loop |")
    w("|---|---:|---:|---:|---:|")
    base = memory["loop"]
    for name, r in memory.items():
        if "error" in r:
            w(f"| {name} | failed: {r['error']} | | | |")
            continue
        w(f"| {name} | {r['peak_rss_delta_mib']:.1f} | {r['allocator_peak_mib']:.1f} "
          f"| {fmt_x(ratio(r['peak_rss_delta_mib'], base.get('peak_rss_delta_mib')))} "
          f"| {fmt_x(ratio(r['allocator_peak_mib'], base.get('allocator_peak_mib')))} |")

    targets = []
    for mode in ("fwd", "train"):
        sp = ratio(results[mode]["loop"]["median_s"], results[mode]["fbfast"]["median_s"])
        targets.append((f"{mode}: fbfast vs loop", f">= {TARGET_SPEEDUP:g}x", fmt_x(sp),
                        None if sp is None else sp >= TARGET_SPEEDUP))
    for mode in ("fwd", "train"):
        frac = gflops[mode]["fbfast"] / mm["layer"]["gflops"]
        targets.append((f"{mode}: fbfast GFLOP/s vs torch.mm (E·B, H)x(H, H)", f">= {100 * TARGET_MM_FRACTION:.0f}%",
                        fmt_pct(frac), frac >= TARGET_MM_FRACTION))
    for key, label in (("allocator_peak_mib", "allocator peak"), ("peak_rss_delta_mib", "peak RSS delta")):
        mem = ratio(memory["fbfast"].get(key), base.get(key))
        # None (shown "—") where a child failed or the loop's step fitted in memory the process
        # already held (an RSS delta of 0: benchmarks/wide.py's note).
        targets.append((f"train: fbfast {label} vs loop", f"<= {TARGET_MEMORY:g}x", fmt_x(mem),
                        None if mem is None else mem <= TARGET_MEMORY))
    w("")
    w("Targets" + (" (they concern the full size; --quick only shows the table)" if args.quick else "") + ":")
    w("")
    w("| target | goal | measured | met |")
    w("|---|---|---:|---|")
    for name, goal, got, met in targets:
        w(f"| {name} | {goal} | {got} | {'—' if met is None else 'yes' if met else 'no'} |")

    busy = max(float(info["load_average"].split()[0]), float(info["load_average_end"].split()[0]))
    if busy > (os.cpu_count() or 1):
        w("")
        w(f"WARNING: load average {busy:.1f} exceeds the {os.cpu_count()} cores: other processes competed for "
          "the CPUs; rerun on an idle machine before quoting these numbers.")
    if any(is_noisy(m) for m in list(mm.values()) + [m for r in results.values() for m in r.values()]):
        w("")
        w(f"†: the slowest of its runs took more than {NOISY_SPREAD:g}x the fastest (load from other processes "
          "during the measurement); the median may be inflated.")
    grad_txt = ("weight and bias gradients UNSET by fbfast (its train time has no backward)"
                if check["grad"] is None else
                f"weight and bias gradients {check['grad']:.2g} (tolerance {CHECK_GRAD_RTOL:g})")
    ok = check["y"] <= CHECK_RTOL and check["grad"] is not None and check["grad"] <= CHECK_GRAD_RTOL
    w("")
    w(f"Check (outside timing): fbfast vs loop, max relative difference: Y {check['y']:.2g} (tolerance "
      f"{CHECK_RTOL:g}), {grad_txt}" + ("." if ok else ": WARNING, beyond tolerance."))
    w("")
    w(f"({elapsed:.0f} s)")
    text = "\n".join(out)
    print(text)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"machine": info, "shape": dataclasses.asdict(shape), "quick": args.quick, "runs": args.runs,
                       "target_s": args.target, "fbfast_ran": ran, "check": check, "mm": mm,
                       "mm_shapes": {"layer": [shape.E * shape.B, shape.H, shape.H], "large": list(big)},
                       "flops": flops, "results": results, "gflops": gflops, "compile_first_call_s": compile_first,
                       "memory": memory, "elapsed_s": elapsed,
                       "targets": [dict(target=n, goal=g, measured=m, met=ok_) for n, g, m, ok_ in targets]},
                      f, indent=1)
        with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
