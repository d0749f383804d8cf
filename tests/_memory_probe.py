"""Memory measurements of tests/test_reliability.py, each run in a fresh interpreter.

``python tests/_memory_probe.py '<json config>'`` prints one JSON line. RSS is read from
/proc/self/status; the peak of one call is VmHWM after resetting it through /proc/self/clear_refs.

Modes:
* ``long``: one forward + backward of a ``steps``-step rollout with B = 1; reports the peak RSS
  growth of that call and the sizes of Y and u. ``hog`` additionally keeps a (steps, hidden)
  float32 buffer during the call, as an implementation that saved every step's hidden state
  would: the check of the instrument.
* ``leak``: ``calls`` small forward + backward calls; reports RSS and the number of live
  gc-tracked objects after ``warmup`` calls and at the end. ``leak_bytes`` > 0 keeps that many
  bytes per call alive, as a leak would: the check of the instrument.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _inputs(torch, B, T, Du, O, H, delay, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    return dict(x0=rnd(delay, B, O), u=rnd(T, B, Du), w1=rnd(H, Du + O, scale=0.9 / (Du + O) ** 0.5),
                b1=rnd(H, scale=0.1), w2=rnd(O, H, scale=0.9 / H ** 0.5), b2=rnd(O, scale=0.1))


def _fwd_bwd(torch, fbfast, ins, grad_y, delay, truncate, backend):
    y = fbfast.rollout(ins["x0"], ins["w1"], ins["b1"], ins["w2"], ins["b2"], u=ins["u"], delay=delay,
                       truncate=truncate, backend=backend)
    return y, torch.autograd.grad(y, list(ins.values()), grad_y)


def long_rollout(cfg, torch, fbfast):
    T, O, H, Du, delay = cfg["steps"], 4, cfg.get("hidden", 64), 3, 2
    backend = cfg.get("backend", "cpp")
    # Warm up with the same call at a few steps: the autograd engine and the thread pools
    # allocate tens of MB on first use, once per process.
    for _ in range(2):
        small = _inputs(torch, 1, 16, Du, O, H, delay)
        _fwd_bwd(torch, fbfast, small, torch.ones(16, 1, O), delay, None, backend)
    ins = _inputs(torch, 1, T, Du, O, H, delay, seed=1)
    grad_y = torch.randn(T, 1, O, generator=torch.Generator().manual_seed(2))
    gc.collect()
    before = _reset_peak()
    start = time.perf_counter()
    hog = torch.ones(T, H) if cfg.get("hog") else None
    y, grads = _fwd_bwd(torch, fbfast, ins, grad_y, delay, None, backend)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    del hog
    # The end of the rollout, continued from its own Y[t0-k:t0] by the reference (streaming,
    # docs/spec.md §1), must equal the kernel's Y[t0:]: the long run computed the right thing.
    t0 = T - 200
    with torch.no_grad():
        tail = fbfast.rollout_reference(y[t0 - delay:t0], ins["w1"], ins["b1"], ins["w2"], ins["b2"], 200,
                                        ins["u"][t0:], delay)
    tail_error = (tail - y[t0:]).abs().max().item()
    return dict(peak_growth_bytes=(peak - before) * 1024, y_bytes=y.numel() * y.element_size(),
                u_bytes=ins["u"].numel() * 4, seconds=seconds, tail_error=tail_error,
                finite=bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all()) for g in grads))


def leak(cfg, torch, fbfast):
    B, T, Du, O, H, delay, truncate = cfg["batch"], 8, 3, 2, 8, 2, 3
    ins = _inputs(torch, B, T, Du, O, H, delay)
    grad_y = torch.randn(T, B, O, generator=torch.Generator().manual_seed(3))
    kept = []
    leak_elems = cfg.get("leak_bytes", 0) // 4

    def call():
        y, grads = _fwd_bwd(torch, fbfast, ins, grad_y, delay, truncate, "cpp")
        if leak_elems:
            kept.append(torch.empty(leak_elems))

    for _ in range(cfg["warmup"]):
        call()
    gc.collect()
    rss0, objects0 = _status_kb("VmRSS"), len(gc.get_objects())
    start = time.perf_counter()
    for _ in range(cfg["calls"] - cfg["warmup"]):
        call()
    seconds = time.perf_counter() - start
    gc.collect()
    rss1, objects1 = _status_kb("VmRSS"), len(gc.get_objects())
    return dict(rss_growth_bytes=(rss1 - rss0) * 1024, object_growth=objects1 - objects0, seconds=seconds,
                calls_measured=cfg["calls"] - cfg["warmup"])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    for key, value in cfg.get("env", {}).items():
        os.environ[key] = value
    import torch

    import fbfast
    if "threads" in cfg:
        torch.set_num_threads(cfg["threads"])
    result = {"long": long_rollout, "leak": leak}[cfg["mode"]](cfg, torch, fbfast)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
