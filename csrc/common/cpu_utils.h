// Helpers for the CPU kernels: compile-time dispatch on runtime flags, and a fixed block grid.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lsef {

// Calls fn(std::true_type{}) or fn(std::false_type{}) so a runtime flag selects a template.
template <typename Fn>
decltype(auto) dispatch_bool(bool flag, Fn&& fn) {
  if (flag) return fn(std::true_type{});
  return fn(std::false_type{});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work is split into blocks whose size depends on the shape only, never on the thread count,
// so reductions combine the same partial sums in the same order on every machine.
constexpr int64_t kCpuBlockElems = int64_t{1} << 15;

// A fresh contiguous output like `like`. Large outputs are new pages from the OS, and faulting
// them in 4 KiB at a time costs more than the memory-bound kernels that fill them; asking for
// transparent huge pages first (what PyTorch does under THP_MEM_ALLOC_ENABLE=1) cuts that cost
// several-fold. Only advice: where THP is off, nothing changes.
inline at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (out.nbytes() >= 4 * kHugePage) {
    const auto p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (p + out.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace lsef
