"""Defects found by probing fbfast as a user would, each pinned by a test that failed before its
fix: process settings changed by other threads, memory at extreme shapes (narrow or wide layers,
huge delays), allocation failures, symbolic `steps` under torch.compile and torch.export, and
running `python -m fbfast` from the source tree. Memory is measured in child processes (peak
RSS), so that one test's allocations cannot hide another's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fbfast
from testing import CPP, assert_close, grads, make_problem

pytestmark = pytest.mark.skipif(not CPP, reason="the C++ kernel is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


# A child-process prelude: peak RSS in bytes (VmHWM), which /proc/self/clear_refs resets.
_PEAK = """
import json, os, resource
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
"""

def _child(code: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (tests/ on the path) and return the finished process;
    the peak-RSS helpers of _PEAK are defined there."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", _PEAK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def _child_json(code: str, **kw) -> dict:
    proc = _child(code, **kw)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_peak_reset = pytest.mark.skipif(
    not (os.path.exists("/proc/self/status") and os.access("/proc/self/clear_refs", os.W_OK)),
    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")


# -------------------------------------------------------------------------------------------
# Process settings changed while other threads call the kernels


def test_environment_and_settings_change_while_threads_call_the_kernel():
    # Three threads roll out while the main thread rewrites the environment (which reallocates
    # it), switches the thread count and the kernel options. Before, every call read
    # FBFAST_CPU_PATH/ISA with getenv without the GIL, and this crashed within seconds.
    proc = _child("""
        import os, threading, time, torch, fbfast
        torch.manual_seed(0)
        net = fbfast.FeedbackMLP(5, 16, 3)
        x0, u = torch.randn(8, 3), torch.randn(20, 8, 2)
        with torch.no_grad():
            ref = net.rollout(x0, u=u, backend="eager")
        stop, errors, calls = threading.Event(), [], [0]

        def work():
            while not stop.is_set():
                y = net.rollout(x0, u=u)
                y.sum().backward()
                if not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
                    errors.append("wrong result")
                calls[0] += 1

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        deadline, i = time.time() + 3.0, 0
        while time.time() < deadline:
            i += 1
            os.environ[f"FBFAST_PROBE_{i % 500}"] = "x" * (i % 97)
            os.environ["FBFAST_CPU_PATH"] = "blas" if i % 2 else "tile"
            os.environ["FBFAST_CPU_ISA"] = "base" if i % 3 else "avx2"
            if i % 50 == 0:
                torch.set_num_threads(1 + i % 2)
                fbfast.set_kernel_options(cpu_path=("tile", "blas", "auto")[i % 3])
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        print("calls", calls[0], "environment writes", i)
    """, timeout=120)
    assert proc.returncode == 0, f"crashed or failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "calls" in proc.stdout


def test_kernel_options_are_validated_and_restored():
    before = fbfast.get_kernel_options()
    with pytest.raises(RuntimeError, match=r"cpu_path must be 'auto', 'rule', 'tile' or 'blas', got 'fast'"):
        fbfast.set_kernel_options(cpu_path="fast")
    with pytest.raises(RuntimeError, match=r"cpu_isa must be"):
        fbfast.set_kernel_options(cpu_isa="sse9")
    with fbfast.kernel_options(cpu_path="blas"):
        assert fbfast.get_kernel_options()["cpu_path"] == "blas"
    assert fbfast.get_kernel_options() == before


def test_cuda_options_without_the_cuda_kernel():
    # CUDA graph replay of the general path is a CUDA-kernel setting: a build without the CUDA
    # kernel refuses it by name, and reports no graphs.
    if fbfast.ops.has_kernel("CUDA"):
        with pytest.raises(RuntimeError, match=r"cuda_graphs must be 'auto', 'always' or 'off', got 'on'"):
            fbfast.set_kernel_options(cuda_graphs="on")
        with fbfast.kernel_options(cuda_graphs="off"):
            assert fbfast.get_kernel_options()["cuda_graphs"] == "off"
        return
    with pytest.raises(RuntimeError, match="has no CUDA kernel"):
        fbfast.set_kernel_options(cuda_graphs="off")
    assert "cuda_graphs" not in fbfast.get_kernel_options()
    assert fbfast.cuda_graph_stats() == dict(recorded=0, replayed=0, failed=0, held=0)


def test_environment_is_read_once_at_load():
    out = _child_json("""
        import os, json
        os.environ["FBFAST_CPU_PATH"] = "blas"
        import fbfast
        at_load = fbfast.get_kernel_options()["cpu_path"]
        os.environ["FBFAST_CPU_PATH"] = "tile"
        print(json.dumps(dict(at_load=at_load, later=fbfast.get_kernel_options()["cpu_path"])))
    """)
    assert out == {"at_load": "blas", "later": "blas"}


# -------------------------------------------------------------------------------------------
# Memory at extreme shapes


@needs_peak_reset
def test_narrow_layers_are_not_padded_per_row():
    # O = 1 and Du = 1 on the tile path, H = 10^6: packing each row of (H, 1) matrices to 16 floats
    # cost 16x the weights. Now the packed copies take about their own size.
    H = 10**6
    out = _child_json(f"""
        import torch, fbfast
        torch.set_num_threads(1)
        fbfast.set_kernel_options(cpu_path="tile")
        H = {H}
        w1 = torch.randn(H, 2) * 1e-3
        w2 = torch.randn(1, H) * 1e-3
        b1, b2 = torch.zeros(H), torch.zeros(1)
        x0, u = torch.randn(1, 1), torch.randn(2, 1, 1)
        ps = [t.requires_grad_() for t in (w1, b1, w2, b2)]
        fbfast.rollout(x0, w1, b1, w2, b2, u=u).sum().backward()   # warm-up: gradients allocated
        reset_peak(); base = rss()
        fbfast.rollout(x0, w1, b1, w2, b2, u=u).sum().backward()
        print(json.dumps(dict(peak=peak() - base, weights=4 * (w1.numel() + w2.numel() + b1.numel()))))
    """)
    # The backward packs five copies (W1 both ways, W2 both ways, b1): 16-float rows took 17x.
    assert out["peak"] <= 6 * out["weights"] + 16 * MiB, out


@needs_peak_reset
def test_long_delay_ring_is_sized_by_what_it_holds():
    # T = 2e6, delay = 1e6, O = 1: the backward keeps a ring of `delay` feedback adjoints, one
    # float each; padded to 16 floats per slot it took 72 MiB.
    T, delay = 2 * 10**6, 10**6
    out = _child_json(f"""
        import torch, fbfast
        torch.set_num_threads(1)
        T, delay = {T}, {delay}
        net = fbfast.FeedbackMLP(1, 4, 1)
        x0 = torch.zeros(delay, 1, 1)
        net.rollout(x0, steps=8, delay=delay).sum().backward()
        reset_peak(); base = rss()
        y = net.rollout(x0, steps=T, delay=delay)
        y.sum().backward()
        print(json.dumps(dict(peak=peak() - base, y=y.numel() * 4, x0=x0.numel() * 4)))
    """)
    # Y, its gradient and x0's gradient (4 bytes per step or slot each), plus the ring.
    assert out["peak"] <= 2 * out["y"] + out["x0"] + 4 * delay + 8 * MiB, out


def test_expanded_x0_with_a_huge_delay_is_read_not_copied():
    # Only x0[:min(delay, steps)] is read. An expanded x0 with delay = 2**40 once tried to
    # allocate 48 TiB; the reference runs it, so must the kernel.
    torch.manual_seed(0)
    net = fbfast.FeedbackMLP(3, 8, 3)
    x0 = torch.randn(1, 4, 3).expand(2**40, 4, 3)
    y = net.rollout(x0, steps=3, delay=2**40)
    y_ref = net.rollout(x0, steps=3, delay=2**40, backend="eager")
    assert_close(y, y_ref, torch.float32)
    (g,) = torch.autograd.grad(y.sum(), [net.fc1.weight])
    (g_ref,) = torch.autograd.grad(y_ref.sum(), [net.fc1.weight])
    assert_close(g, g_ref, torch.float32, "grad")


@pytest.mark.parametrize("lags", [(1, 2**40), (2**40, 2, 1)], ids=["1,2**40", "2**40,2,1"])
def test_expanded_x0_with_a_huge_lag_among_others_is_read_not_copied(lags):
    # A tapped delay line reads, per lag d, x0's rows D - d .. D - d + min(d, steps) - 1:
    # csrc/gemm_path.cpp read_x0 copies those, not the D rows between them.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, generator=g).expand(2**40, 4, 3)
    w1, w2 = torch.randn(8, 3 * len(lags), generator=g) * 0.3, torch.randn(3, 8, generator=g) * 0.3
    w1.requires_grad_()
    y = fbfast.rollout(x0, w1, None, w2, None, steps=3, delay=lags, backend="cpp")
    y_ref = fbfast.rollout(x0, w1, None, w2, None, steps=3, delay=lags, backend="eager")
    assert_close(y, y_ref, torch.float32)
    (gr,) = torch.autograd.grad(y.sum(), [w1])
    (gr_ref,) = torch.autograd.grad(y_ref.sum(), [w1])
    assert_close(gr, gr_ref, torch.float32, "grad")


@needs_peak_reset
def test_long_delay_with_few_steps_costs_what_it_reads():
    # delay = 1e7, steps = 4: 1.2 GiB went into a contiguous copy of an x0 of which 4 slots
    # are read, for a 512-byte Y.
    out = _child_json("""
        import torch, fbfast
        net = fbfast.FeedbackMLP(8, 16, 8)
        x0 = torch.randn(1, 4, 8).expand(10**7, 4, 8)
        with torch.no_grad():
            net.rollout(x0, steps=4, delay=10**7)
            reset_peak(); base = rss()
            y = net.rollout(x0, steps=4, delay=10**7)
        print(json.dumps(dict(peak=peak() - base)))
    """)
    assert out["peak"] <= 8 * MiB, out


@needs_peak_reset
@pytest.mark.parametrize("O,H,B", [(4096, 4096, 64), (1024, 1024, 512)])
def test_wide_layers_training_memory_is_within_the_loops(O, H, B):
    # The tile path at O = H = 4096 kept up to 8 copies of the weight gradients plus 5 packed
    # copies (+1443 MiB against the per-step loop's +211 MiB at B = 512). Now wide layers take
    # the BLAS path and every workspace is bounded; the bound here is the 1.5x.
    T = 4
    out = _child_json(f"""
        import torch, fbfast
        from torch import nn
        O, H, B, T = {O}, {H}, {B}, {T}
        torch.manual_seed(0)
        net = fbfast.FeedbackMLP(O, H, O)
        x0 = torch.randn(B, O) * 0.1

        def loop():
            x, ys = x0, []
            for _ in range(T):
                x = net(x)
                ys.append(x)
            return torch.stack(ys)

        def step(fn):
            net.zero_grad(set_to_none=False)
            fn().square().mean().backward()

        results = {{}}
        for name, fn in (("loop", loop), ("fbfast", lambda: net.rollout(x0, steps=T))):
            step(fn)  # gradients and allocator caches warm
            reset_peak(); base = rss()
            step(fn)
            results[name] = peak() - base
        print(json.dumps(results))
    """, timeout=600)
    assert out["fbfast"] <= 1.5 * out["loop"] + 4 * MiB, out


def test_failed_allocation_names_the_sizes():
    # Under an address-space limit the kernel's allocations fail; the error must name what was
    # being allocated and the sizes (before: a bare "std::bad_alloc" or the allocator's words).
    proc = _child("""
        import resource, torch, fbfast
        torch.set_num_threads(1)
        H = 3 * 10**7
        w1, w2 = torch.full((H, 1), 1e-3), torch.full((1, H), 1e-3)
        x0 = torch.zeros(1, 2, 1)
        fbfast.set_kernel_options(cpu_path="tile")
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
        messages = []
        for call in (lambda: torch.ops.fbfast.rollout_forward(x0, None, [w1, w2], [None, None], 2, 1, 0, "relu", 0.0),
                     lambda: torch.ops.fbfast.rollout_forward(x0, None, [w1[:4], w2[:, :4]], [None, None],
                                                               2**27, 1, 0, "relu", 0.0)):
            try:
                call()
                messages.append("no error")
            except RuntimeError as exc:
                messages.append(str(exc).splitlines()[0])
        print("\\n".join(messages))
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    packed, result = proc.stdout.strip().splitlines()[-2:]
    assert "out of memory" in packed and "packed weights" in packed and "widths 1 -> 30000000 -> 1" in packed, packed
    assert "available now" in packed and "cpu_path='blas'" in packed, packed
    assert "could not allocate" in result and "the result Y" in result and "134217728, 2, 1" in result, result


# -------------------------------------------------------------------------------------------
# torch.compile and torch.export with a symbolic number of steps


def test_compile_does_not_recompile_for_every_steps():
    torch._dynamo.reset()
    net = fbfast.FeedbackMLP(5, 8, 3)
    x0 = torch.randn(4, 3)

    def f(x0, u):
        return net.rollout(x0, u=u).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for T in range(2, 14):  # 12 values: more than the recompile limit of 8
        u = torch.randn(T, 4, 2)
        assert torch.allclose(compiled(x0, u), f(x0, u), rtol=1e-4, atol=1e-4)
    # The first T compiles a static graph, the second a dynamic one that serves every later T.
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_export_with_a_dynamic_number_of_steps():
    net = fbfast.FeedbackMLP(5, 8, 3)

    class Rollout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x0, u):
            return self.net.rollout(x0, u=u)

    x0 = torch.randn(4, 3)
    T = torch.export.Dim("T", min=2)
    program = torch.export.export(Rollout(), (x0, torch.randn(7, 4, 2)), dynamic_shapes=({}, {0: T}))
    for steps in (3, 11):
        u = torch.randn(steps, 4, 2)
        with torch.no_grad():
            assert_close(program.module()(x0, u), net.rollout(x0, u=u), torch.float32)


def test_huge_steps_under_compile_is_refused_by_name():
    # The Python size check is skipped while tracing; the operator's own checks must name steps.
    torch._dynamo.reset()
    net = fbfast.FeedbackMLP(3, 8, 3)
    x0 = torch.randn(4, 3)
    compiled = torch.compile(lambda x0: net.rollout(x0, steps=2**40), fullgraph=True)
    with pytest.raises(Exception, match=r"steps=1099511627776"):
        compiled(x0)


def test_backward_of_a_compiled_dynamic_rollout_matches():
    torch._dynamo.reset()
    p = make_problem(5, 2, 3, 8, 6, delay=2, truncate=3, dtype=torch.float32)

    def f(x0, u, w1, b1, w2, b2):
        return fbfast.rollout(x0, w1, b1, w2, b2, u=u, delay=2, truncate=3)

    compiled = torch.compile(f, fullgraph=True)
    for T in (6, 9, 13):
        q = make_problem(5, 2, 3, 8, T, delay=2, truncate=3, dtype=torch.float32, seed=T)
        gy = torch.randn(T, 5, 3)
        y = compiled(q.x0, q.u, q.w1, q.b1, q.w2, q.b2)
        assert_close(y, q.reference(), torch.float32)
        for a, b in zip(grads(y, q.inputs(), gy), grads(q.reference(), q.inputs(), gy)):
            assert_close(a, b, torch.float32, "grad")
    del p


# -------------------------------------------------------------------------------------------
# Running from the source tree


def test_python_m_fbfast_in_the_source_tree_says_so(tmp_path):
    # A non-editable install elsewhere, and `python -m fbfast` run from the checkout: Python
    # imports the unbuilt sources in ./fbfast. It used to tell the user to run the install they
    # had just run.
    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "fbfast"), src / "fbfast",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (src / "csrc").mkdir()
    (src / "setup.py").write_text("# the checkout's setup.py\n")
    shutil.copytree(os.path.join(ROOT, "fbfast"), site / "fbfast", ignore=shutil.ignore_patterns("__pycache__"))
    # -S: no site-packages processing, so an editable install of this checkout (a .pth finder)
    # cannot preempt the import; torch comes from its site-packages on PYTHONPATH.
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), torch_site]))
    env.pop("FBFAST_BACKEND", None)
    proc = subprocess.run([sys.executable, "-S", "-m", "fbfast", "--no-bench"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "you are in the source tree" in text and str(site / "fbfast") in text, text
    assert "run from another directory" in text, text
