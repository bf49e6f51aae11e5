// Helpers for the CPU kernels: compile-time dispatch on runtime flags, a fixed block grid, and
// torch's thread pool.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common/stable.h"

namespace lsef {

// Calls fn(std::true_type{}) or fn(std::false_type{}) so a runtime flag selects a template.
template <typename Fn>
decltype(auto) dispatch_bool(bool flag, Fn&& fn) {
  if (flag) return fn(std::true_type{});
  return fn(std::false_type{});
}

// Work is split into blocks whose size depends on the shape only, never on the thread count,
// so reductions combine the same partial sums in the same order on every machine.
constexpr int64_t kCpuBlockElems = int64_t{1} << 15;

// at::parallel_for through the stable ABI: torch's own pool and thread count
// (torch.set_num_threads). A range of one task runs inline, without the call into libtorch.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end <= begin) return;
  if (end - begin <= grain) return f(begin, end);
  torch::stable::parallel_for(begin, end, grain, f);
}

// A fresh contiguous output of `sizes` (default: like's) in like's dtype and device. Large
// outputs are new pages from the OS, and faulting them in 4 KiB at a time costs more than the
// memory-bound kernels that fill them; asking for transparent huge pages first (what PyTorch does
// under THP_MEM_ALLOC_ENABLE=1) cuts that cost several-fold. Only advice: where THP is off,
// nothing changes.
inline Tensor empty_output(const Tensor& like) {
  Tensor out = empty_as(like, like.sizes());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto nbytes = static_cast<uintptr_t>(out.numel()) * out.element_size();
  if (out.is_cpu() && nbytes >= 4 * kHugePage) {
    const auto p = reinterpret_cast<uintptr_t>(out.mutable_data_ptr());
    const uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (p + nbytes) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace lsef
