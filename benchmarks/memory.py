"""Peak memory of one training step, per backend, each in a fresh process.

    python -m benchmarks.memory [--case medium] [--backends seed-loop eager cpp] [--json PATH]

A training step is the one `benchmarks.report` times (zero grads, rollout, sum of per-step MSE,
backward). Two numbers per backend, both measured in a child process that ran nothing else:

* peak RSS delta: ``ru_maxrss`` after the step minus ``ru_maxrss`` before it. Before the step,
  a warm-up step at a tiny batch has already paid for code pages, thread pools and BLAS
  buffers, and the process's peak RSS is reset to its current RSS (``5`` written to
  ``/proc/self/clear_refs``), so that an earlier peak (importing torch, building inputs) does
  not hide the step's. Page-granular, and includes malloc's slack.
* allocator peak: the highest net number of bytes allocated through torch's CPU allocator
  during a second, profiled step (``torch.profiler(profile_memory=True)``), relative to the
  start of the step. Exact tensor bytes: what autograd saves plus temporaries.

And the step's page faults (``ru_minflt`` delta of the first measured step): memory the step
touched for the first time. fbfast asks for huge pages on its large buffers
(csrc/cpu/huge_pages.h), one fault per 2 MiB where the C library's fresh mappings would take one
per 4 KiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
from typing import Dict, List, Optional

from .cases import CASES, CASES_BY_NAME

MIB = 2.0 ** 20


def _allocator_peak(step) -> int:
    """Peak net bytes allocated by torch's CPU allocator while ``step()`` runs."""
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes = []

    def walk(events):
        for e in events:
            if e.tag == _EventType.Allocation:
                sizes.append((e.start_time_ns, e.extra_fields.alloc_size))
            walk(e.children)
    walk(prof.profiler.kineto_results.experimental_event_tree())
    current = peak = 0
    for _, size in sorted(sizes):
        current += size
        peak = max(peak, current)
    return peak


def _reset_peak_rss() -> bool:
    """Set the process's peak RSS (``ru_maxrss``) to its current RSS; False where Linux's
    ``clear_refs`` is unavailable (the delta is then a lower bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    """The process's peak RSS in KiB: VmHWM, which clear_refs resets (_reset_peak_rss); getrusage's
    ru_maxrss also remembers peaks of threads that have exited, so it may not drop after a reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(backend: str, case_name: str) -> Dict:
    """Runs in the fresh process: warm up small, then measure one step at full size."""
    import gc
    import warnings

    import torch

    from .cases import make_inputs
    from .loops import rollout_fn, training_step

    case = CASES_BY_NAME[case_name]
    tiny = make_inputs(dataclasses.replace(case, B=4, T=2))
    training_step(rollout_fn(backend, tiny), tiny.params(backend), tiny.target)()
    inputs = make_inputs(case)
    step = training_step(rollout_fn(backend, inputs), inputs.params(backend), inputs.target)
    del tiny
    gc.collect()
    hwm_reset = _reset_peak_rss()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before, faults = usage.ru_maxrss, usage.ru_minflt  # KiB on Linux
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    after, faults = usage.ru_maxrss, usage.ru_minflt - faults
    grads_ok = all(p.grad is not None for p in inputs.params(backend))
    peak = _allocator_peak(step)
    return {"backend": backend, "case": case_name, "rss_before_mib": before / 1024,
            "peak_rss_delta_mib": (after - before) / 1024, "peak_rss_reset": hwm_reset,
            "allocator_peak_mib": peak / MIB, "page_faults": faults,
            "grads_ok": grads_ok, "warnings": sorted({str(w.message)[:200] for w in caught}),
            "torch_threads": torch.get_num_threads()}


def run_child(backend: str, case_name: str) -> Dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", backend, "--case", case_name],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backend": backend, "case": case_name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="medium", choices=[c.name for c in CASES])
    p.add_argument("--backends", nargs="+", default=["seed-loop", "eager", "cpp"],
                   choices=["seed-loop", "eager", "cpp", "compile"])
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON to PATH")
    p.add_argument("--child", metavar="BACKEND", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.case)))
        return 0

    import fbfast

    from .report import machine_info

    info = machine_info()
    case = CASES_BY_NAME[args.case]
    backends = [b for b in args.backends if b != "cpp" or fbfast.backends()["cpp"].available]
    rows = [run_child(b, args.case) for b in backends]
    base = next((r for r in rows if r["backend"] == "seed-loop" and "error" not in r), None)

    print(f"## fbfast peak memory of one training step: {case.name} {case.shape}, float32")
    print()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']}, "
          f"fbfast {info['fbfast']}, {info['date']}. Each backend in a fresh process.")
    print()
    print("| backend | peak RSS delta (MiB) | allocator peak (MiB) | RSS vs seed-loop | allocator vs seed-loop "
          "| page faults |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | failed: {' '.join(r['error'])} | | | | |")
            continue
        print(f"| {r['backend']} | {r['peak_rss_delta_mib']:.1f} | {r['allocator_peak_mib']:.1f} "
              f"| {fmt_ratio(r['peak_rss_delta_mib'], base and base['peak_rss_delta_mib'])} "
              f"| {fmt_ratio(r['allocator_peak_mib'], base and base['allocator_peak_mib'])} | {r['page_faults']} |")
    for r in rows:
        if "error" not in r and not r["peak_rss_reset"]:
            print(f"\nNote: {r['backend']}: could not reset the peak RSS (no /proc/self/clear_refs); "
                  "its RSS delta is a lower bound")
        if "error" not in r and not r["grads_ok"]:
            print(f"\nWARNING: {r['backend']}: the training step left parameters without gradients; "
                  "its numbers do not measure a backward pass")
        for w in r.get("warnings", []):
            print(f"\nwarning from {r['backend']}: {w}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "case": case.name, "shape": case.shape, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
