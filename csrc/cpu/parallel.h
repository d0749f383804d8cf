// When the CPU kernels run in parallel, and how.
//
// A parallel region (at::parallel_for, OpenMP) joins every thread it wakes. On a machine shared
// with other work, one of those threads may be descheduled, and the call then waits for it: up
// to a scheduler time slice, milliseconds, however little work the call has. So the kernels go
// parallel only when the work is large enough to pay for losing such a slice (kParallelMinFlops,
// about 4 ms of one core's work), and run on the calling thread otherwise: a small rollout is
// never slower than its serial self because another process is busy
// (python -m benchmarks.contention measures both cases). Inside a region, threads claim tasks
// one at a time, so a thread that starts late takes fewer tasks instead of delaying its share.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fbfast::cpu {

// Multiply-adds x 2 below which a call runs serially: ~4 ms at 50 GFLOP/s, a conservative
// single-core rate of the tile kernels on this project's machines.
constexpr double kParallelMinFlops = 2e8;

// The threads a call of `flops` floating-point operations uses: 1 below the threshold.
inline int threads_for(double flops) {
  return flops < kParallelMinFlops ? 1 : at::get_num_threads();
}

// Runs fn(i) for every i in [0, n) on `threads` threads (the caller among them). The result of
// each task must not depend on which thread runs it.
template <typename Fn>
void run_tasks(int64_t n, int threads, const Fn& fn) {
  if (n <= 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

}  // namespace fbfast::cpu
