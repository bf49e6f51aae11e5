// Helpers for the CPU kernels: compile-time dispatch on runtime flags, and a fixed block grid.
#pragma once

#include <cstdint>
#include <type_traits>

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

}  // namespace lsef
