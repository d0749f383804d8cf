"""Timings of fbfast's rollout against the seed's loop, as one markdown table.

    python -m benchmarks.report                  # every case (a few minutes, compiles included)
    python -m benchmarks.report --quick          # first three cases, fewer repeats (< 60 s)
    python -m benchmarks.report --cases small medium --json results.json

Method: each (case, mode, backend) is warmed up, then the number of calls per measurement is
chosen so that one measurement takes about `--target` seconds; the reported time per call is
the median over `--runs` measurements, taken in turn across the backends of a (case, mode). Forward ("fwd") runs under ``torch.no_grad()`` for
every backend; "train" is one training step: zero the grads, rollout, loss (sum over steps of
the per-step MSE against a fixed target), backward, no optimizer step. Every backend gets the
same seeded inputs and bitwise identical weights. The thread count is torch's default.

"compile" is ``torch.compile`` of the reference, unrolled over T steps; its first call (the
compile) is timed separately, after ``torch._dynamo.reset()`` so that every case compiles
from scratch with static shapes rather than reusing another case's graph, and with inductor's
on-disk caches pointed at a fresh temporary folder, so that a rerun does not report a cache
hit as a compile time. The first compile of the process also pays inductor's one-time start-up.

The machine's load average is printed with the results: on a shared machine, a busy core
stalls torch's two-thread GEMMs and the per-step loops suffer most.
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
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fbfast

from .cases import CASES, CASES_BY_NAME, COMPILE_SKIP, Case, make_inputs
from .loops import BACKENDS, forward_step, rollout_fn, training_step

MODES = ("fwd", "train")

# --quick compiles only the seed case: a T = 100 case takes 15-35 s to compile here, which
# would not fit its one-minute budget (cases.COMPILE_SKIP lists the cases left out of every run).
QUICK_COMPILE = ("seed",)

CHECK_RTOL = 1e-4
# Gradients sum T * B terms in a different order from autograd's; float32 round-off grows with it.
CHECK_GRAD_RTOL = 1e-3


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") or line.startswith("Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, str]:
    cpp = fbfast.backends()["cpp"]
    return {
        "cpu": cpu_model(),
        "logical_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "fbfast": fbfast.__version__,
        "cpp_backend": "available" if cpp.available else f"missing ({cpp.reason})",
        "python": platform.python_version(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def timing_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line of a workload benchmark timed with `measure_group`: --runs, --target, --json."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="measurements per timing; the median is reported")
    p.add_argument("--target", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


def calibrate(fn: Callable[[], object], target_s: float, warmup: int = 1) -> Tuple[int, float]:
    """Warm ``fn`` up; return the calls per measurement that take ~``target_s``, and one call's time."""
    for _ in range(warmup):
        fn()
    # The fastest of up to 3 calls: one call stalled by a busy core must not set the repeat
    # count to 1 and leave the median at the mercy of single calls.
    once, spent = float("inf"), 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        once, spent = min(once, dt), spent + dt
        if spent >= target_s:
            break
    return max(1, int(target_s / max(once, 1e-9))), once


def measure_group(fns: Dict[str, Callable[[], object]], *, target_s: float, runs: int,
                  patience: float = 5.0) -> Dict[str, Dict]:
    """Median seconds per call of each of ``fns`` over ``runs`` measurements of ~``target_s``.

    The measurements are interleaved (run 1 of every function, then run 2, ...), so that a
    stretch of load from other processes slows every backend alike rather than one of them, and
    each run starts one function later than the one before: a function leaves threads spinning
    or caches cold for the next one (right after JAX's call, fbfast's MBRL training step took
    10% longer), so no function always follows the same one.
    Stops after fewer runs (at least one) once the runs took ``patience`` x their planned time:
    on a machine whose cores are taken by other processes, every parallel op can wait a
    scheduler time slice, and the report must still end.
    """
    plan = {name: calibrate(fn, target_s) for name, fn in fns.items()}
    times: Dict[str, List[float]] = {name: [] for name in fns}
    budget = patience * runs * sum(max(target_s, number * once) for number, once in plan.values())
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        names = list(fns)
        for run in range(runs):
            shift = run % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                number = plan[name][0]
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                times[name].append((time.perf_counter() - t0) / number)
            if time.perf_counter() - start > budget:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": t, "number": plan[name][0]}
            for name, t in times.items()}


def measure(fn: Callable[[], object], *, target_s: float, runs: int, patience: float = 5.0) -> Dict:
    """`measure_group` of a single function."""
    return measure_group({"fn": fn}, target_s=target_s, runs=runs, patience=patience)["fn"]


def first_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mm_step(case: Case, inputs) -> Callable[[], object]:
    """The GEMMs of one step at the case's shape, one per layer: ``(B, in_l) x (in_l, out_l)``."""
    weights = [fc.weight.detach() for fc in inputs.fb_net.layers]
    gen = torch.Generator().manual_seed(1)
    acts = [torch.randn(case.B, w.shape[1], generator=gen) for w in weights]

    def step():
        for a, w in zip(acts, weights):
            torch.mm(a, w.t())
    return step


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_cpp(inputs) -> Optional[Dict]:
    """cpp against the seed loop, outside any timing: max relative error of Y and of the
    parameter gradients of one training step (None where cpp left a gradient unset)."""
    if not fbfast.backends()["cpp"].available:
        return None
    with torch.no_grad():
        y_err = rel_err(rollout_fn("cpp", inputs)(), rollout_fn("seed-loop", inputs)())
    grads = {}
    for backend in ("seed-loop", "cpp"):
        params = inputs.params(backend)
        training_step(rollout_fn(backend, inputs), params, inputs.target)()
        grads[backend] = [p.grad for p in params]
        for p in params:
            p.grad = None
    if any(g is None for g in grads["cpp"]):
        grad_err = None
    else:
        grad_err = max(rel_err(g, r) for g, r in zip(grads["cpp"], grads["seed-loop"]))
    return {"y": y_err, "grad": grad_err}


def run_case(case: Case, args, backends: List[str], log) -> Dict:
    inputs = make_inputs(case)
    out: Dict = {"case": case.name, "shape": case.shape, "times": {}, "compile_first_call_s": {}}
    check = out["cpp_check"] = check_cpp(inputs)
    if check is not None and not check["y"] <= CHECK_RTOL:
        print(f"WARNING: {case.label}: cpp Y differs from the seed loop's by {check['y']:.3g} "
              f"(max relative error, tolerance {CHECK_RTOL:g})", flush=True)
    if check is not None and check["grad"] is None:
        print(f"WARNING: {case.label}: a cpp training step left parameter gradients unset; "
              "its train timing does not include a backward pass", flush=True)
    elif check is not None and not check["grad"] <= CHECK_GRAD_RTOL:
        print(f"WARNING: {case.label}: cpp parameter gradients differ from the seed loop's by "
              f"{check['grad']:.3g} (max relative error, tolerance {CHECK_GRAD_RTOL:g})", flush=True)
    mm = measure(mm_step(case, inputs), target_s=args.target, runs=args.runs, patience=args.patience)
    out["mm"] = dict(mm, gflops=2 * case.B * case.step_macs() / mm["median_s"] / 1e9)
    torch._dynamo.reset()
    for mode in MODES:
        steps = {}
        for backend in backends:
            skip = skip_reason(case, backend, mode, args.quick, check)
            if skip:
                out["times"].setdefault(mode, {})[backend] = {"skipped": skip}
                continue
            fn = rollout_fn(backend, inputs)
            steps[backend] = (forward_step(fn) if mode == "fwd"
                              else training_step(fn, inputs.params(backend), inputs.target))
            if backend == "compile":
                out["compile_first_call_s"][mode] = first_call(steps[backend])
        for backend, res in measure_group(steps, target_s=args.target, runs=args.runs,
                                          patience=args.patience).items():
            out["times"].setdefault(mode, {})[backend] = res
            log(f"  {case.name:8s} {mode:5s} {backend:9s} {fmt_time(res['median_s']):>9s}  "
                f"({len(res['runs_s'])} x {res['number']} calls)")
    return out


def skip_reason(case: Case, backend: str, mode: str, quick: bool, check: Optional[Dict]) -> Optional[str]:
    if backend == "cpp" and not fbfast.backends()["cpp"].available:
        return "cpp backend not built"
    if backend == "cpp" and mode == "train" and check is not None and check["grad"] is None:
        return "cpp backward left gradients unset"
    if backend == "compile":
        if case.name in COMPILE_SKIP:
            return COMPILE_SKIP[case.name]
        if quick and case.name not in QUICK_COMPILE:
            return "compile skipped in --quick mode"
    return None


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_gflops(g: float) -> str:
    return f"{g:.1f}" if g >= 1 else f"{g:.2g}"


def fmt_ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if a is None or b is None else f"{b / a:.1f}x"


def median_of(result: Dict, mode: str, backend: str) -> Optional[float]:
    return result["times"].get(mode, {}).get(backend, {}).get("median_s")


# Runs whose slowest is this many times the fastest were disturbed (another process took a
# core for part of the measurement): their cells get a mark and a footnote.
NOISY_SPREAD = 2.0


def is_noisy(measurement: Dict) -> bool:
    runs = measurement.get("runs_s") or []
    return bool(runs) and max(runs) > NOISY_SPREAD * min(runs)


def fmt_cell(result: Dict, mode: str, backend: str) -> str:
    m = result["times"].get(mode, {}).get(backend, {})
    return fmt_time(m.get("median_s")) + (" †" if is_noisy(m) else "")


def markdown_table(results: List[Dict], backends: List[str]) -> str:
    head = (["case (B, Du, O, H, T)", "mode"] + backends
            + ["cpp vs seed-loop", "cpp vs compile", "torch.mm GFLOP/s (1 step)", "cpp GFLOP/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in results:
        case = CASES_BY_NAME[r["case"]]
        for mode in MODES:
            cells = [f"{case.name} {case.shape}", mode]
            cells += [fmt_cell(r, mode, b) for b in backends]
            cpp = median_of(r, mode, "cpp")
            cells.append(fmt_ratio(cpp, median_of(r, mode, "seed-loop")))
            cells.append(fmt_ratio(cpp, median_of(r, mode, "compile")))
            cells.append(fmt_gflops(r["mm"]["gflops"]) + (" †" if is_noisy(r["mm"]) else ""))
            flops = case.forward_flops() if mode == "fwd" else case.train_flops()
            cells.append("—" if cpp is None else fmt_gflops(flops / cpp / 1e9))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_table(results: List[Dict]) -> str:
    lines = ["| case (B, Du, O, H, T) | fwd first call | train first call | fwd steady | train steady |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        case = CASES_BY_NAME[r["case"]]
        first = r["compile_first_call_s"]
        if not first:
            why = r["times"]["fwd"].get("compile", {}).get("skipped", "not run")
            lines.append(f"| {case.name} {case.shape} | {why} | | | |")
            continue
        lines.append(f"| {case.name} {case.shape} | {fmt_time(first.get('fwd'))} | {fmt_time(first.get('train'))} "
                     f"| {fmt_time(median_of(r, 'fwd', 'compile'))} | {fmt_time(median_of(r, 'train', 'compile'))} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="first three cases, 3 runs of ~0.2 s, compile only where it is cheap (for `make demo`)")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="cases to run (default: all)")
    p.add_argument("--runs", type=int, help="measurements per timing; the median is reported (default 7, quick 3)")
    p.add_argument("--target", type=float, help="seconds per measurement (default 0.3, quick 0.2)")
    p.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to PATH")
    p.add_argument("-v", "--verbose", action="store_true", help="print each timing as it is measured")
    p.add_argument("--no-workloads", action="store_true",
                   help="leave out the feedback-structure, ensemble and real workloads (benchmarks/narx.py, "
                        "benchmarks/mbrl.py, benchmarks/workloads.py), which a full run appends")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 7)
    args.target = args.target or (0.2 if args.quick else 0.3)
    # --quick must end in about a minute even when other processes slow every call down.
    args.patience = 2.0 if args.quick else 5.0
    names = args.cases or [c.name for c in (CASES[:3] if args.quick else CASES)]
    cases = [CASES_BY_NAME[n] for n in names]
    backends = list(BACKENDS)

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    info = machine_info()
    cache = tempfile.mkdtemp(prefix="fbfast-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        results = [run_case(case, args, backends, log) for case in cases]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    print("## fbfast rollout benchmark" + (" (--quick)" if args.quick else ""))
    print()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
          f"({info['torch_threads']} threads, {info['cpu_capability']}), fbfast {info['fbfast']} "
          f"(cpp: {info['cpp_backend']}), Python {info['python']}, {info['date']}; "
          f"load average {info['load_average']} at start, {info['load_average_end']} at end.")
    print()
    print(f"Median time per call over {args.runs} measurements of ~{args.target:g} s each, taken in turn "
          "across the backends of a row. "
          "fwd: rollout under torch.no_grad() for every backend. train: zero grads + rollout + "
          "sum over steps of per-step MSE + backward (no optimizer step). float32, identical weights. "
          "Networks: one hidden layer of H with ReLU unless the case names more (3xgelu: three hidden "
          "layers of H with GELU). torch.mm GFLOP/s: the GEMMs of one step, one per layer, "
          "(B, in_l)x(in_l, out_l). cpp GFLOP/s: 2·B·T·sum_l in_l·out_l for fwd, 3x that for train "
          "(nominal dense flop counts).")
    print()
    print(markdown_table(results, backends))
    busy = max(float(info["load_average"].split()[0]), float(info["load_average_end"].split()[0]))
    short = [f"{r['case']} torch.mm" for r in results if len(r["mm"]["runs_s"]) < args.runs]
    short += [f"{r['case']} {mode} {b}" for r in results for mode, row in r["times"].items()
              for b, m in row.items() if "runs_s" in m and len(m["runs_s"]) < args.runs]
    if busy > (os.cpu_count() or 1):
        print()
        print(f"WARNING: load average {busy:.1f} exceeds the {os.cpu_count()} cores: other processes "
              "competed for the CPUs, and multi-threaded ops (GEMMs) stall when a core is taken; "
              "rerun on an idle machine before quoting these numbers.")
    if any(is_noisy(m) for r in results for m in [r["mm"]] + [m for row in r["times"].values() for m in row.values()]):
        print()
        print(f"†: the slowest of its runs took more than {NOISY_SPREAD:g}x the fastest (load from other "
              "processes during the measurement); the median may be inflated.")
    if short:
        print()
        print(f"Note: stopped early (fewer than {args.runs} runs, time budget) for: {', '.join(short)}.")
    print()
    print("torch.compile first call (compile included; steady = median time per call afterwards):")
    print()
    print(compile_table(results))
    checks = [r["cpp_check"] for r in results if r["cpp_check"] is not None]
    if checks:
        grad_errs = [c["grad"] for c in checks if c["grad"] is not None]
        grad_txt = (f"parameter gradients {max(grad_errs):.2g} (tolerance {CHECK_GRAD_RTOL:g})"
                    if grad_errs else "parameter gradients not checked (unset)")
        print()
        print(f"Check (outside timing): cpp vs seed-loop, max relative error over {len(checks)} case(s): "
              f"Y {max(c['y'] for c in checks):.2g} (tolerance {CHECK_RTOL:g}), {grad_txt}.")
    print(f"\n({elapsed:.0f} s)")
    # The feedback structures and ensembles, each against the loop its users write: a NARX model's
    # tapped delay line (torch.cat of past outputs) and a model-based-RL ensemble of delta models
    # (baddbmm per layer, as mbrl-lib). Their own modules time them; --quick and --cases leave
    # them out.
    if not (args.quick or args.cases or args.no_workloads):
        from . import mbrl, narx, workloads
        print()
        narx.main(["--runs", str(args.runs), "--target", str(args.target)])
        print()
        # Its results files stay those of `python -m benchmarks.mbrl` (the README quotes them).
        mbrl.main(["--runs", str(args.runs), "--target", str(args.target), "--json",
                   os.path.join(tempfile.mkdtemp(prefix="fbfast-report-"), "mbrl.json")])
        print()
        workloads.main(["--runs", str(args.runs), "--target", str(args.target)])

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "runs": args.runs, "target_s": args.target, "quick": args.quick,
                       "elapsed_s": elapsed, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
