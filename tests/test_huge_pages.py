"""Large CPU buffers go on transparent huge pages (csrc/cpu/huge_pages.h).

The advice only changes how pages are faulted in, so the values are the reference's whatever the
kernel does with it; what is checked here is that the advice was given: the result's memory is
marked ``hg`` (MADV_HUGEPAGE) in the process's ``/proc/self/smaps``, and a small result's is not.
Skipped where the kernel has no transparent huge pages.
"""

from __future__ import annotations

import os

import pytest
import torch

import fbfast
from testing import CPP, CPP_REASON

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available() -> bool:
    try:
        with open(THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


pytestmark = [pytest.mark.skipif(not CPP, reason=CPP_REASON),
              pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages in this kernel")]


def _vm_flags(address: int) -> list:
    """The VmFlags of the mapping of /proc/self/smaps that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


def _rollout(B: int, O: int, H: int, T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, O, generator=g)
    w1, b1 = torch.randn(H, O, generator=g) * 0.05, torch.zeros(H)
    w2, b2 = torch.randn(O, H, generator=g) * 0.05, torch.zeros(O)
    with torch.no_grad():
        y = fbfast.rollout(x0, w1, b1, w2, b2, steps=T, backend="cpp")
    ref = fbfast.rollout(x0, w1, b1, w2, b2, steps=T, backend="eager")
    torch.testing.assert_close(y, ref)
    return y


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="no /proc/self/smaps")
def test_large_result_is_advised_huge_pages():
    y = _rollout(B=1024, O=64, H=96, T=40)  # 10 MiB, over csrc/cpu/huge_pages.h's 8 MiB
    assert y.numel() * y.element_size() >= 8 << 20
    # The 2 MiB-aligned interior of the buffer carries the advice.
    inner = (y.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert "hg" in _vm_flags(inner)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="no /proc/self/smaps")
def test_small_result_is_left_alone():
    y = _rollout(B=64, O=8, H=16, T=10)
    assert "hg" not in _vm_flags(y.data_ptr())
