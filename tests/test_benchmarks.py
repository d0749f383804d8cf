"""Smoke tests of the benchmark scripts in benchmarks/: they run and print their tables.

Only that they run: timing never appears in an assertion (tests/README.md); the numbers are
produced and read by the full runs that benchmarks/README.md lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mbrl_quick_runs_and_prints_its_tables(tmp_path):
    out = tmp_path / "mbrl.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.mbrl", "--quick", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "## Model-based-RL ensemble rollout (--quick)" in text
    assert "| mode | method | time | vs loop | GFLOP/s |" in text
    for row in ("| fwd | loop |", "| fwd | fbfast |", "| train | loop |", "| train | fbfast |"):
        assert row in text
    assert "| method | peak RSS delta (MiB) | allocator peak (MiB) |" in text
    assert "failed:" not in text  # both memory children ran
    assert "| target | goal | measured | met |" in text
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"fwd", "train"}
    assert set(data["results"]["train"]) == {"loop", "fbfast"}
    assert (tmp_path / "mbrl.md").read_text().startswith("## Model-based-RL ensemble rollout")


def test_peers_runs_and_prints_its_table(tmp_path):
    """benchmarks/peers.py on the seed shape: the loop, fbfast and nn.RNN rows (JAX where installed)."""
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--cases", "seed", "--no-compile", "--runs", "1",
                           "--target", "0.01", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| case (B, Du, O, H, T) | mode | loop | fbfast | compile | rnn | jax | fbfast % of mm |" in done.stdout
    data = json.loads(out.read_text())
    assert [(r["case"], r["mode"]) for r in data["results"]] == [("seed", "fwd"), ("seed", "train")]
    assert {"loop", "fbfast", "rnn", "mm"} <= set(data["results"][0]["median_s"])


def test_peers_runs_the_narx_and_mbrl_configurations(tmp_path):
    """benchmarks/peers.py's two configurations beyond the shapes: loop and fbfast rows (no nn.RNN)."""
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--cases", "narx", "mbrl", "--no-compile",
                           "--runs", "1", "--target", "0.01", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert [(r["case"], r["mode"]) for r in data["results"]] == [("narx", "fwd"), ("narx", "train"),
                                                                   ("mbrl", "fwd"), ("mbrl", "train")]
    for r in data["results"]:
        assert {"loop", "fbfast", "mm"} <= set(r["median_s"]) and "rnn" not in r["median_s"]
    assert "| narx (B=64, Du=10, O=2, lags 1-5, 2x64 tanh, T=50) | fwd |" in done.stdout


def test_paths_runs_and_reports_what_auto_measured(tmp_path):
    """benchmarks/paths.py on a shape above the calibration threshold: auto measured its classes."""
    out = tmp_path / "paths.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.paths", "--cases", "gelu3", "--runs", "1", "--target",
                           "0.01", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["results"]] == ["fwd", "train"]
    import fbfast
    if fbfast.get_kernel_options().get("cpu_isa") in ("avx2", "avx512"):  # the portable build keeps its rule
        assert "widths 20-128-128-128-16, Du 4, E 1, B <= 128, T <= 64, gelu, float32" in done.stdout
        assert all(r["calibrated"] for r in data["results"])
    assert {"loop", "auto", "rule", "tile", "blas", "mm"} == set(data["results"][0]["median_s"])


def test_gpu_bench_report_renders_every_backend_and_variant():
    # The GPU benchmark runs only on a lent GPU (scripts/gpu_check.sh): its report must not be
    # the first thing to break there. Made-up times, every backend of every case.
    import argparse

    from benchmarks import gpu_bench

    results = [{"case": c.name, "shape": c.shape, "first_call_s": {}, "errors": {},
                "check": {"y": 1e-7, "grad": 1e-6},
                "times": {m: {b: {"median_s": 1e-3 * (i + 1)} for i, b in enumerate(gpu_bench.BACKENDS)}
                          for m in gpu_bench.MODES}} for c in gpu_bench.GPU_CASES]
    info = dict(device="GPU", capability="9.0", sms=132, torch="2.11", cuda="13.0", cudnn=1, fbfast="0.1",
                date="today", cudnn_allow_tf32=True, matmul_allow_tf32=False)
    text = gpu_bench.markdown(info, results, argparse.Namespace(runs=5, target=0.05, argv=[]), 1.0)
    assert "| fbfast | fbfast-graphs | fbfast-fp32 | eager |" in text
    assert "CUDA-graph replay of the general path vs step by step (speed-up): wide fwd 0.5x" in text
    assert "3xTF32 tensor cores vs fp32 FMAs (speed-up): medium fwd 3.0x" in text
    assert all(set(gpu_bench.VARIANT_CASES[v]) <= set(gpu_bench.CASES_BY_NAME) for v in gpu_bench.VARIANTS)
