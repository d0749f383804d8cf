// Parallel loops of the CPU kernels that never wait for a thread that has not started.
//
// at::parallel_for (OpenMP) splits the work between all threads up front and joins every one
// of them, so when another process holds a core, the call stalls until the descheduled thread
// gets a time slice (milliseconds; measured by benchmarks/contention.py). Here the calling
// thread and up to `threads - 1` helpers claim tasks one at a time from a shared counter; the
// caller waits only for tasks that a helper has already claimed, and a helper that starts late
// finds nothing left. The result of each task must not depend on which thread runs it.
#pragma once

#include <cstdint>
#include <functional>

namespace fbfast::cpu {

// Runs fn(i) for every i in [0, n), on the calling thread and up to threads - 1 helpers, and
// returns when all are done. An exception from fn is rethrown here (the first one).
void run_tasks(int64_t n, int threads, const std::function<void(int64_t)>& fn);

}  // namespace fbfast::cpu
