// rank_scale: argument validation shared by every backend.
// G' = beta G + (alpha - beta) U (U^T G), G (*, m, n), U (*, m, r) or (m, r) shared.
#pragma once

#include "common/checks.h"

namespace lsef {
namespace rank_scale {

struct Args {
  Tensor G;      // contiguous (*, m, n)
  Tensor U;      // contiguous (*, m, r) or (m, r)
  Tensor alpha;  // contiguous, one value or one per matrix
  Tensor beta;
  int64_t batch, m, n, r;
  bool shared_U;  // one U for every matrix of the batch
};

inline void check_coefficient(const char* op, const char* name, const Tensor& c, const Tensor& G) {
  check_same_dtype(op, name, c, "G", G);
  check_same_device(op, name, c, "G", G);
  const std::vector<int64_t> batch_shape = leading(G, 2);
  LSEF_CHECK_VALUE(c.numel() == 1 || same_sizes(c.sizes(), batch_shape), op, ": ", name,
                   " must be a scalar or have G's batch shape ", Dims{batch_shape}, ", got shape ",
                   shape(c));
}

inline Args prepare(const char* op, const Tensor& G, const Tensor& U, const Tensor& alpha,
                    const Tensor& beta) {
  check_floating(op, "G", G);
  check_min_dim(op, "G", G, 2, "(*, m, n)");
  check_same_dtype(op, "U", U, "G", G);
  check_same_device(op, "U", U, "G", G);
  check_min_dim(op, "U", U, 2, "(*, m, r)");
  const int64_t m = G.size(-2);
  LSEF_CHECK_VALUE(U.size(-2) == m, op, ": U must have G.size(-2) = ", m,
                   " rows (U is (*, m, r)), got shape ", shape(U));
  LSEF_CHECK_VALUE(U.size(-1) <= m, op, ": U has ", U.size(-1), " columns but only ", m,
                   " rows; orthonormal columns need r <= m");
  const bool shared_U = U.dim() == 2;
  LSEF_CHECK_VALUE(shared_U || leading(U, 2) == leading(G, 2), op, ": U must have G's batch shape ",
                   Dims{leading(G, 2)}, " or be 2-D (one U for all), got shape ", shape(U));
  check_coefficient(op, "alpha", alpha, G);
  check_coefficient(op, "beta", beta, G);
  Args a;
  a.G = as_contiguous(G);
  a.U = as_contiguous(U);
  a.alpha = as_contiguous(alpha);
  a.beta = as_contiguous(beta);
  a.m = m;
  a.n = G.size(-1);
  a.r = U.size(-1);
  a.batch = 1;
  for (int64_t d = 0; d < G.dim() - 2; ++d) a.batch *= G.size(d);
  a.shared_U = shared_U;
  return a;
}

}  // namespace rank_scale
}  // namespace lsef
