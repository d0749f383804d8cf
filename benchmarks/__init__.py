"""Benchmarks of fbfast's rollout against the seed's per-step Python loop.

* `cases`   — the benchmark shapes and seeded inputs with identical weights for every backend;
* `loops`   — the baselines (the seed's `RecurrentNetwork` loop) and the forward / training
  step every backend is timed with;
* `report`  — ``python -m benchmarks.report [--quick]``: one markdown table of timings;
* `memory`  — ``python -m benchmarks.memory``: peak memory of one training step;
* `test_bench_rollout` — the same grid under pytest-benchmark
  (``python -m pytest benchmarks/ --benchmark-only``).
"""
