"""GPU benchmark of the fused CUDA rollout, written for one lent GPU and < 4 minutes.

    python -m benchmarks.gpu_bench --out OUT [--budget 240] [--cases narx small ...]

Backends, all float32 with bitwise identical weights (benchmarks.cases.make_inputs):

* ``eager``      the seed's loop (benchmarks.loops.seed_loop): the network called once per step;
* ``compile``    the same loop with ``torch.compile(net)`` (default mode), the compiled step
                 called T times;
* ``compile-ro`` the same with ``mode="reduce-overhead"`` (each step a CUDA graph replay);
* ``rnn``        ``nn.RNN(nonlinearity="relu")`` (cuDNN) through the identity
                 ``W_ih = W1[:, :Du]``, ``W_hh = W1[:, Du:] W2``, ``b = W1[:, Du:] b2 + b1``, with
                 ``h_0 = relu(W1 [u_0; x0] + b1)`` as the first step and ``Y = W2 H + b2`` as one
                 GEMM over all steps (version 1's network only: one ReLU hidden layer, delay 1; a
                 zero input column when Du = 0);
* ``fbfast``     ``fbfast.rollout(..., backend="cuda")``;
* ``fbfast-graphs`` the same with ``cuda_graphs="auto"`` (opt-in): the general path replayed
                 from a recorded CUDA graph (csrc/cuda/graphed_call.h), for the cases whose
                 weights do not fit in shared memory (VARIANT_CASES);
* ``fbfast-fp32`` the same with ``cuda_tensor_cores="off"``: the fused kernels' fp32 FMA GEMMs
                 instead of their default 3xTF32 tensor cores, for the cases whose plans use
                 tensor cores (VARIANT_CASES).

The cases are version 1's network at growing widths, then deeper networks with the smooth
activations of model-based RL (SiLU, GELU), which no cuDNN RNN computes.

Modes: ``fwd`` (the rollout under no_grad) and ``train`` (zero grads, rollout, sum over steps
of the per-step MSE, backward). Each (case, backend, mode) gets a warm-up, then ``--runs``
measurements of about ``--target`` seconds between CUDA events; the median time per call is
reported. A compiled backend's first call (the compile) is reported separately. Every entry
has a time limit, and the whole run an overall budget: entries past it are reported as skipped,
in the order below, so the report is always written. ``torch.mm`` GFLOP/s is measured on the
two GEMMs of one step of the largest case.

The whole-rollout ``torch.compile`` (fbfast's "compile" backend) unrolls T steps; at T = 1000
its compile alone takes minutes, so it is not part of this run.

Importing this module touches no GPU; everything CUDA happens in ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fbfast

from .cases import Case, make_inputs
from .loops import forward_step, seed_loop, step_loss, training_step

GPU_CASES = (
    Case("narx", 1, 8, 2, 5, 1000),
    Case("small", 64, 0, 32, 64, 1000),
    # 256 KB of fp32 weights, above any GPU's shared memory per block: the general path, whose
    # per-step launches the CUDA graph replaces.
    Case("wide", 32, 0, 32, 1024, 1000),
    Case("medium", 4096, 0, 64, 256, 100),
    Case("large", 16384, 0, 256, 512, 20),
    Case("silu3", 256, 4, 16, 64, 200, layers=2, activation="silu"),
    Case("gelu4", 1024, 0, 32, 64, 100, layers=3, activation="gelu"),
)
CASES_BY_NAME = {c.name: c for c in GPU_CASES}
# The fbfast variants (kernel options against the defaults) and the cases where they differ.
VARIANTS = {"fbfast-graphs": dict(cuda_graphs="auto"), "fbfast-fp32": dict(cuda_tensor_cores="off")}
VARIANT_CASES = {"fbfast-graphs": ("wide",), "fbfast-fp32": ("medium",)}
BACKENDS = ("fbfast", "fbfast-graphs", "fbfast-fp32", "eager", "compile-ro", "rnn", "compile")
MODES = ("fwd", "train")

# Targets of the CUDA backend on an H100 (benchmarks/README.md), checked in the report.
T1000 = ("narx", "small")
TARGET_VS_EAGER, TARGET_VS_RO, TARGET_VS_RNN, TARGET_MM_FRACTION = 50.0, 5.0, 2.0, 0.8


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing

def first_call_s(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(fn: Callable[[], object], *, target_s: float, runs: int, warmup: int, deadline: float) -> Dict:
    """Median seconds per call over ``runs`` CUDA-event timed measurements of ~``target_s``.

    Events on the current stream time the host-bound loops correctly too: the end event is
    reached only after the last call has been issued and run. Fewer runs (at least one) when
    ``deadline`` (perf_counter seconds) passes.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    once = first_call_s(fn)
    number = max(1, min(1000, int(target_s / max(once, 1e-7))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: List[float] = []
    for _ in range(runs):
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / number)
        if time.perf_counter() > deadline:
            break
    return {"median_s": statistics.median(times), "runs_s": times, "number": number}


# ---------------------------------------------------------------------------------------------
# Backends

def rnn_applies(case: Case) -> bool:
    """Whether `RnnBaseline` computes this case's rollout: one ReLU hidden layer, delay 1."""
    return case.layers == 1 and case.activation == "relu" and case.delay == 1


class RnnBaseline(torch.nn.Module):
    """The rollout (delay 1) as a cuDNN ReLU RNN over h, with the same weights."""

    def __init__(self, inputs):
        super().__init__()
        case = inputs.case
        fc1, fc2 = inputs.fb_net.fc1, inputs.fb_net.fc2
        w1, b1 = fc1.weight.detach(), fc1.bias.detach()
        w2, b2 = fc2.weight.detach(), fc2.bias.detach()
        self.du = case.Du
        dev = w1.device
        self.rnn = torch.nn.RNN(max(case.Du, 1), case.H, nonlinearity="relu", device=dev)
        self.first = torch.nn.Linear(case.Du + case.O, case.H, device=dev)
        self.out = torch.nn.Linear(case.H, case.O, device=dev)
        w1u, w1x = w1[:, : case.Du], w1[:, case.Du:]
        with torch.no_grad():
            if case.Du:
                self.rnn.weight_ih_l0.copy_(w1u)
            else:
                self.rnn.weight_ih_l0.zero_()
            self.rnn.weight_hh_l0.copy_(w1x @ w2)
            self.rnn.bias_ih_l0.copy_(w1x @ b2 + b1)
            self.rnn.bias_hh_l0.zero_()
            self.first.weight.copy_(w1)
            self.first.bias.copy_(b1)
            self.out.weight.copy_(w2)
            self.out.bias.copy_(b2)
        self.steps = case.T
        self.zero_input = torch.zeros(max(case.T - 1, 0), case.B, 1, device=dev)

    def forward(self, x0: torch.Tensor, u: Optional[torch.Tensor]) -> torch.Tensor:
        x = x0[0] if x0.dim() == 3 else x0
        h0 = F.relu(self.first(x if u is None else torch.cat([u[0], x], -1))).unsqueeze(0)
        if self.steps == 1:
            return self.out(h0)
        rest, _ = self.rnn(u[1:] if u is not None else self.zero_input, h0.contiguous())
        return self.out(torch.cat([h0, rest]))


def rollout_callable(backend: str, inputs, cache: Dict) -> Callable[[], torch.Tensor]:
    x0, u, steps = inputs.x0, inputs.u, inputs.steps
    if backend == "fbfast" or backend in VARIANTS:  # run_backend sets a variant's options
        params = [t for fc in inputs.fb_net.layers for t in (fc.weight, fc.bias)]
        return lambda: fbfast.rollout(x0, *params, steps=steps, u=u, delay=1, activation=inputs.activation,
                                      backend="cuda")
    if backend == "eager":
        net = inputs.seed_net
        return lambda: seed_loop(net, x0, u, steps)
    if backend in ("compile", "compile-ro"):
        mode = "reduce-overhead" if backend == "compile-ro" else "default"
        net = torch.compile(inputs.seed_net, mode=mode)
        if backend == "compile":
            return lambda: seed_loop(net, x0, u, steps)

        def graphed():
            torch.compiler.cudagraph_mark_step_begin()
            return seed_loop(net, x0, u, steps)
        return graphed
    if backend == "rnn":
        model = cache.setdefault("rnn", RnnBaseline(inputs))
        return lambda: model(x0, u)
    raise ValueError(backend)


def params_of(backend: str, inputs, cache: Dict):
    if backend == "fbfast" or backend in VARIANTS:
        return list(inputs.fb_net.parameters())
    if backend == "rnn":
        return list(cache["rnn"].parameters())
    return list(inputs.seed_net.parameters())


def mm_gflops(case: Case, inputs, deadline: float) -> Dict:
    """torch.mm throughput on the GEMMs of one step: (B, in_l) x (in_l, out_l) for every layer."""
    weights = [fc.weight.detach() for fc in inputs.fb_net.layers]
    ins = [torch.randn(case.B, w.shape[1], device="cuda") for w in weights]

    def step():
        for a, w in zip(ins, weights):
            torch.mm(a, w.t())
    res = measure(step, target_s=0.2, runs=5, warmup=3, deadline=deadline)
    res["gflops"] = 2 * case.B * case.step_macs() / res["median_s"] / 1e9
    return res


def check_against_eager(inputs) -> Dict:
    """fbfast vs the eager loop outside any timing: max relative error of Y and of the grads."""
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    fb = rollout_callable("fbfast", inputs, {})
    ea = rollout_callable("eager", inputs, {})
    with torch.no_grad():
        y_err = rel(fb(), ea())
    grads = {}
    for name, fn in (("fbfast", fb), ("eager", ea)):
        params = params_of(name, inputs, {})
        for p in params:
            p.grad = None
        step_loss(fn(), inputs.target).backward()
        grads[name] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    return {"y": y_err, "grad": max(rel(a, b) for a, b in zip(grads["fbfast"], grads["eager"]))}


# ---------------------------------------------------------------------------------------------
# Run

# The cheap backends of every case first, then the compiled baselines case by case: when the
# budget runs out, what is missing is the costliest, least important part.
PHASES = (("fbfast", *VARIANTS, "eager", "rnn"), ("compile-ro",), ("compile",))


def prepare_case(case: Case, args, deadline: float) -> Dict:
    """Inputs, the correctness check and (largest case) torch.mm throughput of one case."""
    inputs = make_inputs(case, device="cuda")
    out: Dict = {"case": case.name, "shape": case.shape, "times": {m: {} for m in MODES},
                 "first_call_s": {}, "errors": {}}
    out["check"] = check_against_eager(inputs)
    log(f"  {case.name}: fbfast vs eager, max rel. error Y {out['check']['y']:.2e}, "
        f"grads {out['check']['grad']:.2e}")
    if case.name == args.mm_case:
        out["mm"] = mm_gflops(case, inputs, deadline)
        log(f"  {case.name}: torch.mm {out['mm']['gflops']:.4g} GFLOP/s")
    return {"inputs": inputs, "cache": {}, "result": out}


def run_backend(case: Case, state: Dict, backend: str, args, deadline: float) -> None:
    """Both modes of one backend on one case, within the entry and the overall budget."""
    inputs, cache, out = state["inputs"], state["cache"], state["result"]
    if backend.startswith("compile"):
        torch._dynamo.reset()
    entry_deadline = min(deadline, time.perf_counter() + args.entry_budget)
    for mode in MODES:
        skip = None
        if time.perf_counter() > deadline:
            skip = "overall time budget spent"
        elif backend == "rnn" and not rnn_applies(case):
            skip = "not applicable: nn.RNN computes one ReLU hidden layer with delay 1"
        elif backend in VARIANTS and case.name not in VARIANT_CASES[backend]:
            skip = "not applicable: the option changes nothing here"
        elif backend.startswith("compile") and deadline - time.perf_counter() < args.compile_reserve:
            skip = f"less than {args.compile_reserve:.0f} s left for a compile"
        elif time.perf_counter() > entry_deadline:
            skip = f"entry budget of {args.entry_budget:.0f} s spent"
        if skip:
            out["times"][mode][backend] = {"skipped": skip}
            log(f"  {case.name:7s} {mode:5s} {backend:10s} skipped ({skip})")
            continue
        options = fbfast.kernel_options(**VARIANTS[backend]) if backend in VARIANTS else contextlib.nullcontext()
        try:
            with options:
                fn = rollout_callable(backend, inputs, cache)
                step = (forward_step(fn) if mode == "fwd"
                        else training_step(fn, params_of(backend, inputs, cache), inputs.target))
                first = first_call_s(step)
                if backend.startswith("compile"):
                    out["first_call_s"].setdefault(backend, {})[mode] = first
                warmup = 3 if backend == "compile-ro" else 1
                res = measure(step, target_s=args.target, runs=args.runs, warmup=warmup, deadline=entry_deadline)
                out["times"][mode][backend] = res
                log(f"  {case.name:7s} {mode:5s} {backend:10s} {fmt_time(res['median_s']):>10s}  "
                    f"({len(res['runs_s'])} x {res['number']}; first call {fmt_time(first)})")
        except Exception as exc:  # a baseline that fails must not cost the report
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            out["times"][mode][backend] = {"skipped": msg}
            out["errors"][f"{mode}/{backend}"] = traceback.format_exc(limit=3)
            log(f"  {case.name:7s} {mode:5s} {backend:10s} FAILED {msg}")
    torch.cuda.empty_cache()


def median_of(r: Dict, mode: str, backend: str) -> Optional[float]:
    return r["times"].get(mode, {}).get(backend, {}).get("median_s")


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def ratio(fast: Optional[float], slow: Optional[float]) -> Optional[float]:
    return None if fast is None or slow is None else slow / fast


def fmt_ratio(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.1f}x"


def targets(results: List[Dict]) -> List[Dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    rows = []
    by = {r["case"]: r for r in results}
    for name in T1000:
        r = by.get(name)
        for mode in MODES:
            if r is None:
                continue
            fb = median_of(r, mode, "fbfast")
            rows.append({"target": f"{name} {mode}: >= {TARGET_VS_EAGER:g}x eager",
                         "value": ratio(fb, median_of(r, mode, "eager")), "need": TARGET_VS_EAGER})
            rows.append({"target": f"{name} {mode}: >= {TARGET_VS_RO:g}x compile(reduce-overhead)",
                         "value": ratio(fb, median_of(r, mode, "compile-ro")), "need": TARGET_VS_RO})
    for r in results:
        case = CASES_BY_NAME[r["case"]]
        if case.H > 256 or not rnn_applies(case):
            continue
        for mode in MODES:
            rows.append({"target": f"{r['case']} {mode}: >= {TARGET_VS_RNN:g}x nn.RNN (cuDNN)",
                         "value": ratio(median_of(r, mode, "fbfast"), median_of(r, mode, "rnn")),
                         "need": TARGET_VS_RNN})
    for r in results:
        if "mm" not in r:
            continue
        case = CASES_BY_NAME[r["case"]]
        for mode in MODES:
            fb = median_of(r, mode, "fbfast")
            flops = case.forward_flops() if mode == "fwd" else case.train_flops()
            frac = None if fb is None else flops / fb / 1e9 / r["mm"]["gflops"]
            rows.append({"target": f"{r['case']} {mode}: >= {TARGET_MM_FRACTION:.0%} of torch.mm GFLOP/s",
                         "value": frac, "need": TARGET_MM_FRACTION})
    for row in rows:
        row["met"] = None if row["value"] is None else row["value"] >= row["need"]
    return rows


def markdown(info: Dict, results: List[Dict], args, elapsed: float) -> str:
    lines = ["# fbfast GPU benchmark", "",
             f"{info['device']} (sm_{info['capability']}, {info['sms']} SMs), torch {info['torch']}, "
             f"CUDA {info['cuda']}, cuDNN {info['cudnn']}, fbfast {info['fbfast']}, {info['date']}. "
             f"cuDNN TF32: {info['cudnn_allow_tf32']}, matmul TF32: {info['matmul_allow_tf32']} (torch defaults).",
             "",
             f"Median time per call over up to {args.runs} CUDA-event timed measurements of "
             f"~{args.target:g} s, after warm-up. float32. fwd: rollout under no_grad. train: zero "
             "grads + rollout + sum over steps of per-step MSE + backward. eager: the seed's "
             "per-step loop; compile / compile-ro: that loop with torch.compile(net) in default / "
             "reduce-overhead mode; rnn: nn.RNN(relu) via cuDNN with the equivalent weights (one ReLU "
             "hidden layer only).", "",
             "| case (B, Du, O, H, T) | mode | " + " | ".join(BACKENDS)
             + " | vs eager | vs compile-ro | vs rnn | fbfast GFLOP/s |",
             "|---|---|" + "---:|" * (len(BACKENDS) + 4)]
    for r in results:
        case = CASES_BY_NAME[r["case"]]
        for mode in MODES:
            fb = median_of(r, mode, "fbfast")
            flops = case.forward_flops() if mode == "fwd" else case.train_flops()
            cells = [f"{case.name} {case.shape}", mode]
            cells += [fmt_time(median_of(r, mode, b)) for b in BACKENDS]
            cells += [fmt_ratio(ratio(fb, median_of(r, mode, b))) for b in ("eager", "compile-ro", "rnn")]
            cells.append("—" if fb is None else f"{flops / fb / 1e9:.3g}")
            lines.append("| " + " | ".join(cells) + " |")
    for variant, what in (("fbfast-graphs", "CUDA-graph replay of the general path vs step by step"),
                          ("fbfast-fp32", "3xTF32 tensor cores vs fp32 FMAs")):
        pairs = (("fbfast-graphs", "fbfast") if variant == "fbfast-graphs" else ("fbfast", "fbfast-fp32"))
        got = [f"{r['case']} {m} {fmt_ratio(ratio(median_of(r, m, pairs[0]), median_of(r, m, pairs[1])))}"
               for r in results if r["case"] in VARIANT_CASES[variant] for m in MODES]
        if got:
            lines += ["", f"{what} (speed-up): " + ", ".join(got) + "."]
    skipped = [f"{r['case']} {m} {b}: {e['skipped']}" for r in results for m, row in r["times"].items()
               for b, e in row.items() if "skipped" in e]
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {s}" for s in skipped]
    lines += ["", "First call of the compiled baselines (compile included):", "",
              "| case | backend | fwd | train |", "|---|---|---:|---:|"]
    for r in results:
        for b, first in r["first_call_s"].items():
            lines.append(f"| {r['case']} | {b} | {fmt_time(first.get('fwd'))} | {fmt_time(first.get('train'))} |")
    mm = [r for r in results if "mm" in r]
    if mm:
        lines += ["", f"torch.mm on one step's two GEMMs at {mm[0]['case']} {mm[0]['shape']}: "
                  f"{mm[0]['mm']['gflops']:.4g} GFLOP/s (fbfast GFLOP/s counts 2·B·T·Σ_l in_l·out_l "
                  "for fwd and 3x that for train)."]
    lines += ["", "Correctness (outside timing), fbfast vs eager, max relative error: "
              + "; ".join(f"{r['case']} Y {r['check']['y']:.1e}, grads {r['check']['grad']:.1e}" for r in results)
              + "."]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for row in targets(results):
        v = row["value"]
        shown = "—" if v is None else (f"{v:.0%}" if "torch.mm" in row["target"] else f"{v:.1f}x")
        lines.append(f"| {row['target']} | {shown} | {'—' if row['met'] is None else ('yes' if row['met'] else 'NO')} |")
    lines += ["", f"({elapsed:.0f} s; command: python -m benchmarks.gpu_bench {' '.join(args.argv)})"]
    return "\n".join(lines) + "\n"


def machine_info() -> Dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": props.name,
        "capability": f"{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()),
        "fbfast": fbfast.__version__,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out", help="folder for gpu_report.md and gpu_report.json")
    p.add_argument("--cases", nargs="+", choices=list(CASES_BY_NAME), help="cases (default: all)")
    p.add_argument("--budget", type=float, default=240, help="overall seconds; later entries are skipped")
    p.add_argument("--entry-budget", type=float, default=45, help="seconds per (case, backend), both modes")
    p.add_argument("--compile-reserve", type=float, default=30,
                   help="skip a compiled baseline when less than this many seconds are left")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--target", type=float, default=0.1, help="seconds per measurement")
    args = p.parse_args(argv)
    args.argv = argv
    if not torch.cuda.is_available():
        log("gpu_bench: no CUDA device")
        return 2
    if not fbfast.backends()["cuda"].available:
        log(f"gpu_bench: the fbfast 'cuda' backend is missing: {fbfast.backends()['cuda'].reason}")
        return 2
    names = args.cases or list(CASES_BY_NAME)
    cases = [CASES_BY_NAME[n] for n in names]
    args.mm_case = max(cases, key=lambda c: c.B * c.H * (c.Du + 2 * c.O)).name
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    info = machine_info()
    log(f"gpu_bench: {info['device']}, torch {info['torch']}, CUDA {info['cuda']}; "
        f"budget {args.budget:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    states: Dict[str, Dict] = {}
    for case in cases:
        log(f"case {case.label}")
        try:
            states[case.name] = prepare_case(case, args, deadline)
        except Exception as exc:
            log(f"  {case.name}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
    report = ""
    for phase in PHASES:
        for case in cases:
            if case.name not in states:
                continue
            log(f"{case.label}: {', '.join(phase)}")
            for backend in phase:
                run_backend(case, states[case.name], backend, args, deadline)
            # Rewritten as it goes, so that a run cut short still leaves a report.
            results = [states[c.name]["result"] for c in cases if c.name in states]
            report = write_report(info, results, args, time.perf_counter() - t0)
    log(report)
    return 0


def write_report(info: Dict, results: List[Dict], args, elapsed: float) -> str:
    report = markdown(info, results, args, elapsed)
    with open(os.path.join(args.out, "gpu_report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "gpu_report.json"), "w") as f:
        json.dump({"machine": info, "runs": args.runs, "target_s": args.target, "elapsed_s": elapsed,
                   "results": results, "targets": targets(results)}, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    sys.exit(main())
