"""pytest-benchmark grid: backends {seed-loop, eager, compile, cpp} x cases x {fwd, train}.

    python -m pytest benchmarks/ --benchmark-only
    python -m pytest benchmarks/ --benchmark-only -k "medium and train"   # a slice
    python -m pytest benchmarks/ --benchmark-only --benchmark-json out.json

Results are grouped per (case, mode), so pytest-benchmark's table compares backends side by
side. "fwd" runs under ``torch.no_grad()`` for every backend; "train" is zero grads + rollout +
sum of per-step MSE + backward (no optimizer step). The first call (for "compile", the
compile itself) happens before timing. No test here asserts anything about speed; this file
lives outside tests/ and is not collected by the default ``pytest`` run.
"""

from __future__ import annotations

import pytest
import torch

import fbfast

from .cases import CASES, COMPILE_SKIP, make_inputs
from .loops import BACKENDS, forward_step, rollout_fn, training_step

_INPUTS = {}


def inputs_for(case):
    if case not in _INPUTS:
        _INPUTS.clear()  # one case at a time: the large case's inputs are ~100 MB
        _INPUTS[case] = make_inputs(case)
    return _INPUTS[case]


@pytest.mark.parametrize("mode", ["fwd", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rollout(benchmark, case, backend, mode):
    if backend == "cpp" and not fbfast.backends()["cpp"].available:
        pytest.skip(f"cpp backend unavailable: {fbfast.backends()['cpp'].reason}")
    if backend == "compile" and case.name in COMPILE_SKIP:
        pytest.skip(COMPILE_SKIP[case.name])
    inputs = inputs_for(case)
    fn = rollout_fn(backend, inputs)
    step = forward_step(fn) if mode == "fwd" else training_step(fn, inputs.params(backend), inputs.target)
    if backend == "compile":
        torch._dynamo.reset()  # compile this case from scratch, with static shapes
    step()
    flops = case.forward_flops() if mode == "fwd" else case.train_flops()
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(case=case.name, shape=case.shape, mode=mode, backend=backend, flops=flops,
                                torch_threads=torch.get_num_threads())
    benchmark(step)
