// Transparent huge pages for large fresh buffers: why, in csrc/cpu/huge_pages.h.
#include "huge_pages.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace fbfast::cpu {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.defined() || !t.device().is_cpu() || !t.has_storage()) return;
  const int64_t bytes = static_cast<int64_t>(t.storage().nbytes());
  if (bytes < kHugePageMinBytes) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  // A failure (no huge pages in this kernel, or memory that is not an ordinary mapping) leaves the
  // buffer as it was: the advice only changes how its pages are faulted in.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace fbfast::cpu
