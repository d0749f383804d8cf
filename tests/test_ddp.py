"""DistributedDataParallel over the compiled backend: 2 processes (gloo, CPU) train a FeedbackMLP
and end with the parameters of single-process training on the concatenated batch.

Why they must agree: DDP all-reduces gradients as their *mean* over processes. Each process
takes an equal half of the batch and a loss that is the mean over its half, so the mean of the
two gradients is the gradient of the mean over the full batch: the single-process loss. The
remaining difference is summation order (two half sums and an all-reduce instead of one sum),
so the tolerance is round-off: float64 ``atol = rtol = 1e-12`` (seen: 4e-17), float32
``rtol = 1e-5, atol = 1e-6`` (seen: 3e-8) after ``STEPS`` SGD steps with momentum.

DDP calls the wrapped module's ``forward``, so it wraps `RolloutModule`, a module whose forward
is the fused rollout of a `fbfast.FeedbackMLP`; the gradients reach the parameters through
fbfast's registered autograd, where DDP's hooks all-reduce them. On GPUs the code path is the
same with NCCL in place of gloo and the "cuda" kernel; run this file under torchrun to try it::

    torchrun --nproc_per_node=2 tests/test_ddp.py   # NCCL + backend "auto" on GPUs, else gloo + "cpp"
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fbfast

STEPS = 6
WORLD_SIZE = 2
HALF_BATCH = 8
# name: (dtype, delay, truncate, (rtol, atol))
CONFIGS = {
    "float64": (torch.float64, 1, None, (1e-12, 1e-12)),
    "float64-delay2-truncate3": (torch.float64, 2, 3, (1e-12, 1e-12)),
    "float32": (torch.float32, 1, None, (1e-5, 1e-6)),
}
DU, O, H, T = 3, 4, 16, 12


class RolloutModule(nn.Module):
    """What DDP wraps: ``forward(x0, u)`` is the fused rollout of ``net``."""

    def __init__(self, net: fbfast.FeedbackMLP, delay: int = 1, truncate: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        self.net, self.delay, self.truncate, self.backend = net, delay, truncate, backend

    def forward(self, x0, u):
        return self.net.rollout(x0, u=u, delay=self.delay, truncate=self.truncate, backend=self.backend)


def make_data(dtype, delay: int, batch: int, device="cpu"):
    """``STEPS`` full batches ``(x0, u, target)``, the same in every process."""
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(STEPS):
        x0 = torch.randn(delay, batch, O, generator=gen, dtype=torch.float64)
        u = torch.randn(T, batch, DU, generator=gen, dtype=torch.float64)
        target = torch.randn(T, batch, O, generator=gen, dtype=torch.float64)
        data.append(tuple(t.to(device=device, dtype=dtype) for t in (x0, u, target)))
    return data


def make_model(dtype, device="cpu") -> fbfast.FeedbackMLP:
    torch.manual_seed(0)
    return fbfast.FeedbackMLP(DU + O, H, O, dtype=dtype, device=device)


def train(model: nn.Module, data, rows: Optional[slice]) -> List[float]:
    """SGD with momentum; ``rows`` selects this process's share of every batch (None: all)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x0, u, target in data:
        if rows is not None:
            x0, u, target = x0[:, rows], u[:, rows], target[:, rows]
        loss = F.mse_loss(model(x0, u), target)  # the mean over this process's rows
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_ddp(rank: int, world_size: int, backend: str, device="cpu") -> Dict[str, List[torch.Tensor]]:
    """Every config trained under DDP on this rank's half of each batch; the final parameters."""
    out = {}
    for name, (dtype, delay, truncate, _) in CONFIGS.items():
        net = make_model(dtype, device)
        ddp = DistributedDataParallel(RolloutModule(net, delay, truncate, backend))
        rows = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
        train(ddp, make_data(dtype, delay, world_size * HALF_BATCH, device), rows)
        out[name] = [p.detach().cpu().clone() for p in net.parameters()]
    return out


def train_single(name: str, backend: str, batch: int, rows: Optional[slice] = None, device="cpu"):
    dtype, delay, truncate, _ = CONFIGS[name]
    net = make_model(dtype, device)
    train(RolloutModule(net, delay, truncate, backend), make_data(dtype, delay, batch, device), rows)
    return [p.detach().cpu().clone() for p in net.parameters()]


def _worker(rank: int, world_size: int, port: int, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)  # two processes on a 2-core machine
    torch.save(train_ddp(rank, world_size, "cpp"), os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without tearing gloo down: in torch 2.13 a worker's teardown after
    # destroy_process_group() sometimes aborts ("terminate called without an active exception",
    # about 1 run in 8 here), after the results are saved. Both ranks passed the barrier, so
    # nothing is left to exchange.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPP = fbfast.backends()["cpp"]
pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(not CPP.available, reason=CPP.reason),
]


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory() as outdir:
        context = mp.start_processes(_worker, args=(WORLD_SIZE, _free_port(), outdir),
                                     nprocs=WORLD_SIZE, join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("DDP workers did not finish within 120 s")
        yield [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_equals_single_process_on_the_concatenated_batch(ddp_results, name):
    rtol, atol = CONFIGS[name][3]
    single = train_single(name, "cpp", WORLD_SIZE * HALF_BATCH)
    for ddp, ref in zip(ddp_results[0][name], single):
        torch.testing.assert_close(ddp, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_processes_hold_identical_parameters(ddp_results, name):
    for a, b in zip(ddp_results[0][name], ddp_results[1][name]):
        assert torch.equal(a, b)


def test_training_on_one_half_alone_differs(ddp_results):
    """The comparison can fail: without the gradient all-reduce (one process, its half only)
    the parameters are far from the full-batch ones."""
    half = train_single("float64", "cpp", WORLD_SIZE * HALF_BATCH, rows=slice(0, HALF_BATCH))
    assert max((a - b).abs().max().item() for a, b in zip(ddp_results[0]["float64"], half)) > 1e-4


def main() -> int:
    """Under torchrun: NCCL and backend "auto" (the "cuda" kernel where it is built) on GPUs,
    else gloo and "cpp"; rank 0 prints its distance from single-process training."""
    if "RANK" not in os.environ:
        print("run me under torchrun: torchrun --nproc_per_node=2 tests/test_ddp.py", file=sys.stderr)
        return 2
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        # "auto": the "cuda" kernel where it is built and supports the dtype, else "eager".
        dist_backend, kernel, device = "nccl", "auto", f"cuda:{local_rank}"
    else:
        dist_backend, kernel, device = "gloo", "cpp", "cpu"
    dist.init_process_group(dist_backend)
    try:
        results = train_ddp(rank, world_size, kernel, device)
        if rank == 0:
            for name, params in results.items():
                single = train_single(name, kernel, world_size * HALF_BATCH, device=device)
                err = max((a - b).abs().max().item() for a, b in zip(params, single))
                used = fbfast.dispatch.resolve(kernel, torch.empty(1, 1, 1, device=device, dtype=CONFIGS[name][0]))
                print(f"{name}: {world_size} processes ({dist_backend}, fbfast backend {used!r}) vs one "
                      f"process on the concatenated batch: max |parameter difference| {err:.1e}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
