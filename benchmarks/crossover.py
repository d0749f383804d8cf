"""Where the CPU kernel should switch from the tile path to the BLAS path.

    python -m benchmarks.crossover [--batch 256] [--steps 50]
    python -m benchmarks.crossover --deep --batch 128     # 3 hidden layers of H, GELU

Times a training step (forward + backward of sum(Y^2)) and a forward of the "cpp" backend with
cpu_path pinned to "tile" and to "blas" (fbfast.set_kernel_options), over widths around the switch rules (csrc/cpu/rollout_cpu.cpp, choose_path): with AVX2/AVX-512 the
tile path takes a step's work per row, sum_l in_l * out_l, up to 262144 for a forward alone and
up to 32768 for training (beyond, with B >= 256 and T >= 16, or when no layer exceeds 16384);
the portable build up to 32768. Prints which path wins. --isa base measures the portable build's
rule; --deep networks of 3 hidden GELU layers of width H (Du = 4, O = 16) instead of one.
"""

from __future__ import annotations

import argparse
import time

import torch

import fbfast


def _median_time(fn, min_seconds=0.2, repeats=5):
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > min_seconds / repeats:
            break
        n *= 2
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return sorted(times)[repeats // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--isa", default="auto", help="pin the tile path's instruction set (auto, avx2, base)")
    ap.add_argument("--wide", action="store_true", help="also widths 512..1024 (minutes)")
    ap.add_argument("--deep", action="store_true", help="3 hidden GELU layers of H, Du = 4, O = 16")
    args = ap.parse_args(argv)
    fbfast.set_kernel_options(cpu_isa=args.isa)
    B, T = args.batch, args.steps
    widths = [(16, 32), (32, 64), (32, 128), (64, 128), (64, 256), (128, 256), (64, 512), (128, 512), (256, 512)]
    if args.wide:
        widths += [(384, 512), (512, 512), (256, 1024), (512, 1024), (1024, 1024)]
    if args.deep:
        widths = [(16, H) for H in (64, 96, 128, 192, 256, 384)]
    print(f"B={B} T={T} threads={torch.get_num_threads()} isa={fbfast.get_kernel_options()['cpu_isa']}  "
          "(times in ms; work = sum_l in_l * out_l)")
    print(f"{'O':>5} {'H':>5} {'work':>7} | {'fwd tile':>9} {'fwd blas':>9} | {'train tile':>10} {'train blas':>10} | winner")
    for O, H in widths:
        du = 4 if args.deep else 0
        layers = 3 if args.deep else 1
        net = fbfast.FeedbackMLP(du + O, H, O, hidden_layers=layers, activation="gelu" if args.deep else "relu")
        work = sum(fc.in_features * fc.out_features for fc in net.layers)
        x0 = torch.randn(B, O)
        u = torch.randn(T, B, du) if du else None
        row = {}
        for path in ("tile", "blas"):
            fbfast.set_kernel_options(cpu_path=path)

            def fwd():
                with torch.no_grad():
                    net.rollout(x0, steps=T, u=u, backend="cpp")

            def train():
                net.zero_grad(set_to_none=True)
                net.rollout(x0, steps=T, u=u, backend="cpp").square().sum().backward()

            row[path] = (_median_time(fwd) * 1e3, _median_time(train) * 1e3)
        fbfast.set_kernel_options(cpu_path="auto")
        winner = "tile" if row["tile"][1] <= row["blas"][1] else "blas"
        print(f"{O:5d} {H:5d} {work:7d} | {row['tile'][0]:9.2f} {row['blas'][0]:9.2f} | "
              f"{row['tile'][1]:10.2f} {row['blas'][1]:10.2f} | {winner}")


if __name__ == "__main__":
    main()
