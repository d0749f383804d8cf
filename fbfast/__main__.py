"""``python -m fbfast``: what runs here, a self-check of the compiled backends, a quick benchmark.

For someone who has just run ``pip install``: it prints the versions and ``fbfast.backends()``,
checks every available compiled backend (``"cpp"``, ``"cuda"``) against the pure-PyTorch
reference on a few small rollouts (outputs and the gradients of all six inputs, in each dtype
the backend supports), and times a training step (rollout + loss + backward) of the
hand-written per-step loop against ``fbfast.rollout`` at two small shapes.

Exit status: 0 when every check passes, 1 when one fails or the compiled extension is present
but does not load. A build without compiled kernels is reported, not a failure: fbfast then
runs on its pure-PyTorch backends.

    python -m fbfast              # backends, self-check, benchmark (~10 s on 2 cores)
    python -m fbfast --no-bench   # backends and self-check only (~2 s)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fbfast
import fbfast.testing
from fbfast import ops

# (B, Du, O, H, T, delay, truncate): in-step, delayed, truncated, no u, and one case wide
# enough for the CPU kernel's BLAS path (H * (Du + 2 O) > 32768) rather than its tile path.
CHECK_CASES = (
    (8, 3, 4, 16, 12, 1, None),
    (6, 2, 3, 9, 10, 2, None),
    (5, 0, 3, 8, 11, 1, 3),
    (4, 2, 2, 5, 9, 3, 2),
    (3, 0, 64, 520, 4, 1, None),
)
# (rtol, atol) against the float64 reference: the test-suite's table.
TOLERANCES = fbfast.testing.TOLERANCES
KERNEL_DEVICE = {"cpp": "cpu", "cuda": "cuda"}
KERNEL_CHECK_DTYPES = {"cpp": (torch.float32, torch.float64), "cuda": (torch.float32,)}
# (B, Du, O, H, T): the seed's own network (Linear(10, 5) -> ReLU -> Linear(5, 2), 5 steps)
# and a small learned simulator.
BENCH_SHAPES = ((1, 8, 2, 5, 5), (64, 4, 16, 64, 100))


def header() -> List[str]:
    lines = [f"fbfast {fbfast.__version__} (torch {torch.__version__}, Python {platform.python_version()}, "
             f"{platform.machine()}, {torch.get_num_threads()} CPU threads, "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()})"]
    if os.environ.get("FBFAST_BACKEND"):
        lines.append(f"FBFAST_BACKEND={os.environ['FBFAST_BACKEND']} replaces backend='auto'")
    lines.append("backends:")
    lines += [f"  {status}" for status in fbfast.backends().values()]
    return lines


def _max_err(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float):
    """Largest |got - ref| and whether every element is within ``atol + rtol * |ref|``."""
    diff = (got.double() - ref).abs()
    ok = bool((diff <= atol + rtol * ref.abs()).all()) and bool(torch.isfinite(got).all())
    return (diff.max().item() if diff.numel() else 0.0), ok


def check_case(backend: str, dtype: torch.dtype, case, seed: int = 0):
    """One rollout of ``backend`` against the float64 reference: (max errors, passed)."""
    B, Du, O, H, T, delay, truncate = case
    device = KERNEL_DEVICE.get(backend, "cpu")
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    # Weights scaled ~1/sqrt(fan_in) so that activations stay O(1) over the rollout.
    masters = [rnd(delay, B, O), rnd(T, B, Du) if Du else None,
               rnd(H, Du + O, scale=0.9 / (Du + O) ** 0.5), rnd(H, scale=0.1),
               rnd(O, H, scale=0.9 / H ** 0.5), rnd(O, scale=0.1)]
    grad_y = rnd(T, B, O)

    def run(name, dt):
        x0, u, w1, b1, w2, b2 = (None if m is None else m.to(device=device, dtype=dt).requires_grad_()
                                 for m in masters)
        if name == "reference":
            y = fbfast.rollout_reference(x0, w1, b1, w2, b2, T, u, delay, truncate)
        else:
            y = fbfast.rollout(x0, w1, b1, w2, b2, steps=T, u=u, delay=delay, truncate=truncate,
                               backend=name)
        inputs = [t for t in (x0, u, w1, b1, w2, b2) if t is not None]
        grads = torch.autograd.grad(y, inputs, grad_y.to(device=device, dtype=dt), allow_unused=True)
        return y, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]

    y_ref, g_ref = run("reference", torch.float64)
    y, g = run(backend, dtype)
    tol = TOLERANCES[dtype]
    y_err, y_ok = _max_err(y, y_ref, *tol["out"])
    g_errs = [_max_err(a, b, *tol["grad"]) for a, b in zip(g, g_ref)]
    g_err = max(e for e, _ in g_errs)
    return y_err, g_err, y_ok and all(ok for _, ok in g_errs)


def self_check(out: Callable[[str], None]) -> bool:
    status = fbfast.backends()
    kernels = [name for name in ("cuda", "cpp") if status[name].available]
    if ops.BUILT and not ops.LOADED:
        out(f"self-check: FAIL: the compiled extension is present but does not load: {ops.LOAD_ERROR}")
        return False
    if ops.SHADOWED:
        out(f"self-check: FAIL: {ops.LOAD_ERROR}")
        return False
    if not kernels:
        out("self-check: no compiled backend is available here (see above); fbfast runs on its "
            "pure-PyTorch backends 'eager' and 'compile'. Checking 'eager' against the reference.")
        kernels = ["eager"]
    out("self-check against the float64 pure-PyTorch reference (max abs error; outputs Y and the "
        "gradients of x0, u, W1, b1, W2, b2):")
    passed = True
    for backend in kernels:
        for dtype in KERNEL_CHECK_DTYPES.get(backend, (torch.float32, torch.float64)):
            rtol_y, _ = TOLERANCES[dtype]["out"]
            rtol_g, _ = TOLERANCES[dtype]["grad"]
            for case in CHECK_CASES:
                try:
                    y_err, g_err, ok = check_case(backend, dtype, case)
                except Exception as exc:  # a crash is a failed check, reported like one
                    out(f"  {backend:5s} {str(dtype)[6:]:8s} {_case_label(case):42s} FAIL: "
                        f"{type(exc).__name__}: {exc}")
                    passed = False
                    continue
                passed &= ok
                out(f"  {backend:5s} {str(dtype)[6:]:8s} {_case_label(case):42s} "
                    f"Y {y_err:8.1e}  grads {g_err:8.1e}  {'PASS' if ok else 'FAIL'}"
                    + ("" if ok else f" (tolerance rtol {rtol_y:g} / {rtol_g:g})"))
    return passed


def _case_label(case) -> str:
    B, Du, O, H, T, delay, truncate = case
    return (f"B={B} Du={Du} O={O} H={H} T={T}" + (f" delay={delay}" if delay != 1 else "")
            + (f" truncate={truncate}" if truncate else ""))


class _SeedNetwork(nn.Module):
    """The hand-written baseline: the seed's ``fc2(relu(fc1(x)))``, called once per step."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def _seed_loop(net, x0, u, steps):
    x, outputs = x0, []
    for t in range(steps):
        output = net(torch.cat([u[t], x], -1))
        outputs.append(output)
        x = output
    return torch.stack(outputs)


def _median_seconds(fn: Callable[[], object], device: str, runs: int = 5, target_s: float = 0.05) -> float:
    def timed(number):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / number

    fn()
    number = max(1, int(target_s / max(timed(1), 1e-7)))
    return statistics.median(timed(number) for _ in range(runs))


def benchmark(out: Callable[[str], None]) -> None:
    device = "cuda" if fbfast.backends()["cuda"].available else "cpu"
    out(f"\nbenchmark: one training step (zero grads, rollout, MSE over all steps, backward), "
        f"float32 on {device}, median of 5:")
    out(f"  {'(B, Du, O, H, T)':22s} {'per-step loop':>14s} {'fbfast.rollout':>15s} {'speedup':>8s}")
    for B, Du, O, H, T in BENCH_SHAPES:
        torch.manual_seed(0)
        net = _SeedNetwork(Du + O, H, O).to(device)
        fused = fbfast.from_module(net)
        x0, u, target = (torch.randn(*s, device=device) for s in ((B, O), (T, B, Du), (T, B, O)))

        def step(rollout):
            def run():
                net.zero_grad(set_to_none=True)
                F.mse_loss(rollout(), target).backward()
            return run

        loop = _median_seconds(step(lambda: _seed_loop(net, x0, u, T)), device)
        fast = _median_seconds(step(lambda: fused.rollout(x0, u=u)), device)
        out(f"  {str((B, Du, O, H, T)):22s} {_fmt(loop):>14s} {_fmt(fast):>15s} {loop / fast:7.1f}x")
    out("  (backend 'auto'; the full benchmark is `python -m benchmarks.report` in the source tree)")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fbfast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    args = parser.parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)

    for line in header():
        out(line)
    out("")
    passed = self_check(out)
    if passed and not args.no_bench:
        benchmark(out)
    out(f"\n{'PASS' if passed else 'FAIL'}: self-check {'passed' if passed else 'failed'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
