"""Training-step speedup over the seed's loop as the rollout grows longer and the batch larger.

    python -m benchmarks.sweep --out benchmarks/results    # sweep.json + sweep.png (~1.5-2.5 min on 2 cores)
    python -m benchmarks.sweep --no-compile                # without torch.compile (~30 s)

Two sweeps of one training step (zero grads, rollout, loss = sum over steps of the per-step
MSE, backward; no optimizer step), float32, every backend on the same seeded inputs and
bitwise identical weights (`benchmarks.cases.make_inputs`):

* steps: ``T`` in 10, 30, 100, 300 at ``B = 64``;
* batch: ``B`` in 1, 16, 64, 256, 1024 at ``T = 100``;

both with ``Du = 0``, ``O = 16``, ``H = 64`` (the size of a small learned simulator), delay 1,
full BPTT. Backends: the seed's per-step loop (`benchmarks.loops.seed_loop`), and fbfast's
"eager" (the reference), "compile" (``torch.compile`` of the reference) and "cpp".

Method: each point is warmed up, then the number of calls per measurement is chosen so that one
measurement takes about ``--target`` seconds; the reported time is the median of ``--runs``
measurements, with the garbage collector off; the backends of a point are measured in
alternation, round by round, so that load from other processes hits them alike.

"compile" unrolls the loop, so its compile time grows with ``T``. Inductor's one-time start-up
is paid first, on a tiny rollout; then each point's first call (compile included) is timed and
reported, and a point is left out when its compile is predicted (an affine fit in ``T`` of
the compiles measured so far) to take longer than ``--compile-limit`` seconds, or to take the
sweep's compiles past ``--compile-total``. Within the batch sweep dynamo is not
reset, as in a training script whose batch size changes: a new ``B`` may recompile (``B = 1``
is specialised, the next size makes the batch dimension dynamic) or reuse a graph, and the
first-call time says which. Inductor's on-disk caches point at a fresh temporary folder, so a
rerun does not report a cache hit as a compile.

Writes ``sweep.json`` (every measurement, the machine and its load) and ``sweep.png`` (speedup
over the seed loop vs steps and vs batch, one line per backend, compile times written at the
compile points), and prints the table as markdown.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

import fbfast

from .cases import Case, make_inputs
from .loops import BACKENDS, rollout_fn, training_step

DU, O, H = 0, 16, 64
STEPS_SWEEP = (10, 30, 100, 300)
STEPS_SWEEP_BATCH = 64
BATCH_SWEEP = (1, 16, 64, 256, 1024)
BATCH_SWEEP_STEPS = 100


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "fbfast": fbfast.__version__,
        "python": platform.python_version(),
        "load_average_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def calibrate(fn: Callable[[], object], target_s: float) -> int:
    """Calls per measurement so that one measurement takes about ``target_s`` (after a warm-up)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(target_s / max(time.perf_counter() - t0, 1e-9)))


def measure_interleaved(steps: Dict[str, Callable[[], object]], *, target_s: float, runs: int) -> Dict[str, float]:
    """Median seconds per call of each function; the measurements of all functions alternate,
    round by round, so that load from other processes falls on every backend alike."""
    numbers = {name: calibrate(fn, target_s) for name, fn in steps.items()}
    times: Dict[str, List[float]] = {name: [] for name in steps}
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(numbers[name]):
                    fn()
                times[name].append((time.perf_counter() - t0) / numbers[name])
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


class CompileBudget:
    """Whether the next compile fits: its duration predicted from those measured so far, an
    affine function of the steps (a fixed part plus the unrolled graph), and a total budget."""

    def __init__(self, limit_s: float, total_s: float):
        self.limit_s, self.total_s = limit_s, total_s
        self.measured: List[tuple] = []  # (steps, seconds) of real compiles
        self.spent_s = 0.0

    def predict(self, steps: int) -> Optional[float]:
        if not self.measured:
            return None
        (t1, s1), same = self.measured[-1], [m for m in self.measured if m[0] == steps]
        if same:
            return same[-1][1]
        earlier = [m for m in self.measured if m[0] != t1]
        if not earlier:
            return s1 * steps / t1
        t0, s0 = earlier[-1]
        slope = max((s1 - s0) / (t1 - t0), 0.0)
        return max(s1 + slope * (steps - t1), 0.0)

    def skip_reason(self, steps: int) -> Optional[str]:
        predicted = self.predict(steps)
        if predicted is None:
            return None
        if predicted > self.limit_s:
            return f"compile predicted at {predicted:.0f} s (> {self.limit_s:g} s)"
        if self.spent_s + predicted > self.total_s:
            return (f"compile predicted at {predicted:.0f} s would pass the sweep's compile budget "
                    f"({self.spent_s:.0f} of {self.total_s:g} s spent)")
        return None

    def record(self, steps: int, seconds: float) -> None:
        self.measured.append((steps, seconds))
        self.spent_s += seconds


def run_point(sweep: str, case: Case, backends: List[str], budget: CompileBudget, args, log) -> Dict:
    inputs = make_inputs(case)
    point: Dict = {"sweep": sweep, "B": case.B, "Du": case.Du, "O": case.O, "H": case.H, "T": case.T,
                   "times": {}, "skipped": {}, "compile_first_call_s": None}
    steps = {}
    for backend in backends:
        if backend == "cpp" and not fbfast.backends()["cpp"].available:
            point["skipped"][backend] = "cpp backend not built"
            continue
        if backend == "compile":
            why = budget.skip_reason(case.T)
            if why:
                point["skipped"][backend] = why
                log(f"  {sweep:5s} B={case.B:<5d} T={case.T:<4d} compile   skipped: {why}")
                continue
        step = steps[backend] = training_step(rollout_fn(backend, inputs), inputs.params(backend), inputs.target)
        if backend == "compile":
            t0 = time.perf_counter()
            step()
            first = point["compile_first_call_s"] = time.perf_counter() - t0
            log(f"  {sweep:5s} B={case.B:<5d} T={case.T:<4d} compile   first call {first:.1f} s")
            # A first call that reused a graph costs about a steady call; only real compiles count.
            if first > 1.0:
                budget.record(case.T, first)
    point["times"] = measure_interleaved(steps, target_s=args.target, runs=args.runs)
    log(f"  {sweep:5s} B={case.B:<5d} T={case.T:<4d} "
        + "  ".join(f"{b} {fmt_time(t)}" for b, t in point["times"].items()))
    return point


def compile_startup() -> float:
    """Inductor's one-time start-up, paid on a tiny rollout so that no point is charged for it."""
    inputs = make_inputs(Case("startup", 2, DU, O, 4, 2))
    t0 = time.perf_counter()
    training_step(rollout_fn("compile", inputs), inputs.params("compile"), inputs.target)()
    return time.perf_counter() - t0


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def speedup(point: Dict, backend: str) -> Optional[float]:
    base, t = point["times"].get("seed-loop"), point["times"].get(backend)
    return None if base is None or t is None else base / t


def markdown_table(points: List[Dict], backends: List[str]) -> str:
    others = [b for b in backends if b != "seed-loop"]
    head = (["sweep", "B", "T"] + [f"{b}" for b in backends] + [f"{b} speedup" for b in others]
            + ["compile first call"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for p in points:
        cells = [p["sweep"], str(p["B"]), str(p["T"])]
        cells += [fmt_time(p["times"].get(b)) if b in p["times"] else "skipped" for b in backends]
        cells += ["—" if speedup(p, b) is None else f"{speedup(p, b):.1f}x" for b in others]
        first = p["compile_first_call_s"]
        cells.append(("—" if first is None else f"{first:.1f} s" + (" (graph reused)" if first <= 1.0 else ""))
                     if "compile" not in p["skipped"] else "skipped")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: List[Dict], backends: List[str], info: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    others = [b for b in backends if b != "seed-loop"]
    for ax, sweep, key, fixed in ((axes[0], "steps", "T", f"B={STEPS_SWEEP_BATCH}"),
                                  (axes[1], "batch", "B", f"T={BATCH_SWEEP_STEPS}")):
        pts = [p for p in points if p["sweep"] == sweep]
        for backend in others:
            xs = [p[key] for p in pts if speedup(p, backend) is not None]
            ys = [speedup(p, backend) for p in pts if speedup(p, backend) is not None]
            if not xs:
                continue
            ax.plot(xs, ys, "o-", label=backend)
            if backend == "compile":
                for p in pts:
                    s = speedup(p, backend)
                    if s is not None and p["compile_first_call_s"] is not None:
                        first = p["compile_first_call_s"]
                        ax.annotate(f"first call\n{first:.1f} s" + (" (reused)" if first <= 1.0 else ""), (p[key], s),
                                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        skipped = [p[key] for p in pts if "compile" in p["skipped"]]
        if skipped:
            ax.text(0.02, 0.02, f"compile skipped at {key} = {', '.join(map(str, skipped))}: predicted "
                    "compile time over the limit or the sweep's budget", transform=ax.transAxes, fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel=f"{key} ({'rollout steps' if key == 'T' else 'batch size'})",
               ylabel="speedup over the seed loop (training step)",
               title=f"vs {'steps' if key == 'T' else 'batch'} ({fixed}, Du={DU}, O={O}, H={H})")
        ax.set_xticks([p[key] for p in pts], [str(p[key]) for p in pts])
        ax.minorticks_off()
        ys = [s for p in pts for b in others for s in [speedup(p, b)] if s is not None]
        if ys:
            ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200) if min(ys) / 2 <= t <= max(ys) * 2]
            ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.legend(fontsize=8)
    startup = (f"; compile first calls exclude inductor's one-time start-up ({info['compile_startup_s']} s)"
               if "compile_startup_s" in info else "")
    fig.suptitle(f"fbfast training step, float32: {info['cpu']}, {info['logical_cores']} cores, "
                 f"torch {info['torch']} ({info['torch_threads']} threads), load {info['load_average_start']}"
                 + startup, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder of sweep.json and sweep.png")
    p.add_argument("--runs", type=int, default=5, help="measurements per point; the median is reported")
    p.add_argument("--target", type=float, default=0.1, help="seconds per measurement")
    p.add_argument("--compile-limit", type=float, default=30.0,
                   help="leave out compile points predicted to compile longer than this (seconds)")
    p.add_argument("--compile-total", type=float, default=90.0,
                   help="and those that would take the sweep's compiles past this total (seconds)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile backend")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print each timing as it is measured")
    args = p.parse_args(argv)
    backends = [b for b in BACKENDS if not (args.no_compile and b == "compile")]

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    t_start = time.perf_counter()
    budget = CompileBudget(args.compile_limit, args.compile_total)
    cache = tempfile.mkdtemp(prefix="fbfast-sweep-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    points = []
    try:
        torch._dynamo.reset()
        if "compile" in backends:
            info["compile_startup_s"] = f"{compile_startup():.1f}"
            log(f"  inductor start-up (a tiny compile, not charged to any point): {info['compile_startup_s']} s")
        for T in STEPS_SWEEP:
            points.append(run_point("steps", Case(f"T{T}", STEPS_SWEEP_BATCH, DU, O, H, T), backends, budget, args, log))
        for B in BATCH_SWEEP:
            if B == STEPS_SWEEP_BATCH and BATCH_SWEEP_STEPS in STEPS_SWEEP:
                shared = next(q for q in points if q["T"] == BATCH_SWEEP_STEPS)
                points.append(dict(shared, sweep="batch"))  # the same point: measured once
                continue
            points.append(run_point("batch", Case(f"B{B}", B, DU, O, H, BATCH_SWEEP_STEPS), backends, budget, args, log))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    elapsed = time.perf_counter() - t_start

    print("## fbfast sweep: training-step time and speedup over the seed loop")
    print()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
          f"({info['torch_threads']} threads, {info['cpu_capability']}), fbfast {info['fbfast']}, "
          f"Python {info['python']}, {info['date']}; load average {info['load_average_start']} at start, "
          f"{info['load_average_end']} at end.")
    print()
    print(f"One training step (zero grads, rollout, sum over steps of per-step MSE, backward), float32, "
          f"Du={DU}, O={O}, H={H}, delay 1, full BPTT; median of {args.runs} measurements of "
          f"~{args.target:g} s. Speedup = seed-loop time / backend time.")
    print()
    print(markdown_table(points, backends))
    skipped = {(q["sweep"], q["B"], q["T"]): q["skipped"]["compile"] for q in points if "compile" in q["skipped"]}
    for (sweep, B, T), why in skipped.items():
        print(f"\ncompile at {sweep} B={B} T={T}: {why}")
    print(f"\n({elapsed:.0f} s)")

    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "sweep.json"), os.path.join(args.out, "sweep.png")
    with open(json_path, "w") as f:
        json.dump({"machine": info, "runs": args.runs, "target_s": args.target,
                   "compile_limit_s": args.compile_limit, "backends": backends, "elapsed_s": elapsed,
                   "points": points}, f, indent=1)
    plot(points, backends, info, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
