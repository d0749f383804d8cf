// Large CPU buffers on transparent huge pages.
//
// A rollout writes its whole result Y, and in training every hidden activation it keeps, once per
// call: at (B=4096, H=512, T=20) 250 MB of fresh memory. The C library serves allocations that
// large with new mappings and unmaps them when they are freed, so every call touches every one of
// their 4 KiB pages for the first time: a page fault and a page cleared by the kernel per 4 KiB,
// ~19 ms per 80 MB on this project's machines, and the faults of two threads writing one GEMM's
// output contend. Asking for transparent huge pages on the buffer before
// it is first written (madvise(MADV_HUGEPAGE), as PyTorch's own CPU allocator does under
// THP_MEM_ALLOC_ENABLE=1) takes one fault per 2 MiB instead. Where the kernel has no huge pages
// (or not on Linux) the advice is a no-op and the buffer is an ordinary one. At that shape the
// forward ran 1.34x and the training step 1.09x faster (medians of interleaved runs; the page
// faults of a training step fell from 102k to 42k, benchmarks/memory.py's page-fault column).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fbfast::cpu {

// Buffers below this size come from the C library's heap, whose pages stay mapped and warm
// between calls, and span too few 2 MiB pages to gain.
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;

// Advises huge pages for the 2 MiB-aligned part of t's memory when t is a CPU tensor of at least
// kHugePageMinBytes; call it on a buffer just allocated, before writing it. Never fails.
void advise_huge_pages(const at::Tensor& t);

}  // namespace fbfast::cpu
