// rsvd / lowrank: argument validation shared by every backend (docs/DESIGN.md §6, §7).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>

#include "common/checks.h"

namespace lsef {
namespace rsvd {

struct Shape {
  int64_t batch, m, n, k, l;  // l = min(k + oversample, min(m, n)) sketch columns
  bool exact() const { return l == std::min(m, n); }
};

inline Shape check(const char* op, const at::Tensor& A, int64_t k, int64_t oversample,
                   int64_t n_iter) {
  check_floating(op, "A", A);
  check_min_dim(op, "A", A, 2, "(*, m, n)");
  const int64_t m = A.size(-2), n = A.size(-1), mn = std::min(m, n);
  TORCH_CHECK_VALUE(mn >= 1, op, ": A must have matrices of m, n >= 1 (A is (*, m, n)), got shape ",
                    A.sizes());
  TORCH_CHECK_VALUE(1 <= k && k <= mn, op, ": k must be in [1, min(m, n)] = [1, ", mn,
                    "] for A of shape ", A.sizes(), ", got ", k);
  TORCH_CHECK_VALUE(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(n_iter >= 0, op, ": n_iter must be >= 0, got ", n_iter);
  // l = min(k + oversample, mn), without overflowing for a huge oversample.
  Shape s{1, m, n, k, oversample >= mn - k ? mn : k + oversample};
  for (int64_t d = 0; d < A.dim() - 2; ++d) s.batch *= A.size(d);
  return s;
}

// The uninitialised outputs U (*, m, k), S (*, k), V (*, n, k), with A's batch shape and options.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& A,
                                                                    const Shape& sh) {
  const auto batch = A.sizes().slice(0, A.dim() - 2).vec();
  auto with = [&](std::initializer_list<int64_t> tail) {
    auto s = batch;
    s.insert(s.end(), tail);
    return at::empty(s, A.options());
  };
  return {with({sh.m, sh.k}), with({sh.k}), with({sh.n, sh.k})};
}

}  // namespace rsvd
}  // namespace lsef
