// rsvd / lowrank: argument validation shared by every backend (docs/DESIGN.md §6, §7).
#pragma once

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

inline Shape check(const char* op, const Tensor& A, int64_t k, int64_t oversample, int64_t n_iter) {
  check_floating(op, "A", A);
  check_min_dim(op, "A", A, 2, "(*, m, n)");
  const int64_t m = A.size(-2), n = A.size(-1), mn = std::min(m, n);
  LSEF_CHECK_VALUE(mn >= 1, op, ": A must have matrices of m, n >= 1 (A is (*, m, n)), got shape ",
                   shape(A));
  LSEF_CHECK_VALUE(1 <= k && k <= mn, op, ": k must be in [1, min(m, n)] = [1, ", mn,
                   "] for A of shape ", shape(A), ", got ", k);
  LSEF_CHECK_VALUE(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  LSEF_CHECK_VALUE(n_iter >= 0, op, ": n_iter must be >= 0, got ", n_iter);
  // l = min(k + oversample, mn), without overflowing for a huge oversample.
  Shape s{1, m, n, k, oversample >= mn - k ? mn : k + oversample};
  for (int64_t d = 0; d < A.dim() - 2; ++d) s.batch *= A.size(d);
  return s;
}

// The uninitialised outputs U (*, m, k), S (*, k), V (*, n, k), with A's batch shape and options.
inline std::tuple<Tensor, Tensor, Tensor> empty_outputs(const Tensor& A, const Shape& sh) {
  const std::vector<int64_t> batch = leading(A, 2);
  auto with = [&](std::initializer_list<int64_t> tail) {
    auto s = batch;
    s.insert(s.end(), tail);
    return empty_as(A, s);
  };
  return {with({sh.m, sh.k}), with({sh.k}), with({sh.n, sh.k})};
}

}  // namespace rsvd
}  // namespace lsef
