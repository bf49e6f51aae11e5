// rsvd on the CPU: which path a call takes (docs/DESIGN.md §6, "Five CPU paths, chosen by a
// cost model"). Each path's time per matrix is modelled as a non-negative combination of its
// operation counts, with coefficients fitted to timings by benchmarks/rsvd_cost_model.py (which
// writes cost_model_coef.h); the call takes the path of least modelled time.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "rsvd/rsvd_args.h"

namespace lsef {
namespace rsvd {

// The CPU paths. kFused and kJacobi run a matrix start to finish in cache (Jacobi's exact SVD
// for kJacobi, the Gram-matrix range finder for kFused); kBlas, kLapack and kExact go through
// ATen for the batch (products for kBlas with its own QRs and Jacobi tail; LAPACK's QRs and
// SVD for kLapack; LAPACK's SVD of the matrix itself for kExact).
enum class Path : int64_t { kFused = 0, kJacobi = 1, kBlas = 2, kLapack = 3, kExact = 4 };
constexpr int kPaths = 5, kFeatures = 8;
constexpr int kModels = kPaths + 1;  // the paths, and the fused path once more for a lone matrix
constexpr int kFusedLone = kPaths;
constexpr std::array<const char*, kPaths> kPathNames{"fused", "jacobi", "blas", "lapack", "exact"};

}  // namespace rsvd
}  // namespace lsef

#include "rsvd/cost_model_coef.h"  // kCostCoef[dtype][model][feature], seconds per count

namespace lsef {
namespace rsvd {

// The operation counts (multiply-adds) that a path's time is modelled on, per matrix, for the
// wide orientation p x q (p <= q), l sketch columns (l = p on the exact paths), n_iter power
// iterations: a constant, the path's own counts (the products with the matrix, the small QRs,
// the small SVD), then four generic lower-order terms every path has in some measure (a pass
// over the matrix p q, p^2, the small factor l^2 (l^3 on the exact paths, whose l is p), p^3).
inline std::array<double, kFeatures> cost_features(Path path, double p, double q, double l,
                                                   double n_iter) {
  std::array<double, 3> own;
  switch (path) {
    case Path::kFused:  // Gram matrix, sketch, W^T Q; QRs of p x l, powers; QR of q x l; Jacobi
      own = {p * p * q / 2 + 2 * p * q * l,
             (2 * n_iter + 1) * p * l * l + n_iter * p * p * l + 2 * q * l * l, l * l * l};
      break;
    case Path::kJacobi:  // Householder of q x p and its application; Jacobi on p x p
    case Path::kExact:   // LAPACK's bidiagonalisation; the bidiagonal SVD and back-transforms
      own = {q * p * p, p * p * p, 0.0};
      break;
    case Path::kBlas:    // products through BLAS; QRs of q x l and p x l; QR + Jacobi of q x l
    case Path::kLapack:  // the same counts, run by LAPACK
    default:
      own = {(2 * n_iter + 2) * p * q * l, (n_iter + 1) * (p + q) * l * l + 2 * q * l * l,
             l * l * l};
      break;
  }
  const bool exact = path == Path::kJacobi || path == Path::kExact;
  return {1.0, own[0], own[1], own[2], p * q, p * p, exact ? l * l * l : l * l, p * p * p};
}

// Modelled seconds per matrix of `model` (a Path, or kFusedLone: the fused path for a lone
// matrix) for `sh` (l = min(m, n) on the exact paths).
inline double modelled_cost(int model, const Shape& sh, int64_t n_iter, bool f64) {
  const Path path = model == kFusedLone ? Path::kFused : static_cast<Path>(model);
  const double p = static_cast<double>(std::min(sh.m, sh.n));
  const double q = static_cast<double>(std::max(sh.m, sh.n));
  const bool exact = path == Path::kJacobi || path == Path::kExact;
  const auto f = cost_features(path, p, q, exact ? p : static_cast<double>(sh.l),
                               exact ? 0.0 : static_cast<double>(n_iter));
  const auto& c = kCostCoef[f64 ? 1 : 0][model];
  double t = 0;
  for (int i = 0; i < kFeatures; ++i) t += c[i] * f[i];
  return t;
}
inline double modelled_cost(Path path, const Shape& sh, int64_t n_iter, bool f64) {
  return modelled_cost(static_cast<int>(path), sh, n_iter, f64);
}

// The fused path's cost per matrix when each thread's share of the batch fills `group` of its 8
// lane slots (dense::Simd<float>::kWidth; float64's 4 lanes are modelled the same way): idle
// lanes cost as much as busy ones, so the cost runs from `full` (8 a group) to `lone` (1).
inline double fused_per_matrix(double full, double lone, int64_t group) {
  const double g = static_cast<double>(std::clamp<int64_t>(group, 1, 8));
  return full + (lone - full) * (8.0 / g - 1.0) / 7.0;
}

// The lanes each thread's share of a batch fills: the batch split over the threads in equal
// chunks (torch's parallel_for with grain 1), at most 8.
inline int64_t lane_group(int64_t batch, int64_t threads) {
  const int64_t t = std::max<int64_t>(threads, 1);
  return std::min<int64_t>(8, std::max<int64_t>(1, (batch + t - 1) / t));
}

// LSEF_RSVD_PATH (read at every call, for tests and measurements) forces a path by name;
// unset, empty or "auto": the cost model. On an exact shape (l = min(m, n)) "fused" and "blas"
// mean kJacobi, "lapack" means kExact (both exact SVDs).
inline Path forced_path(bool exact, bool& forced) {
  forced = false;
  const char* env = std::getenv("LSEF_RSVD_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return Path::kFused;
  for (int i = 0; i < kPaths; ++i) {
    if (std::strcmp(env, kPathNames[i]) == 0) {
      forced = true;
      const Path p = static_cast<Path>(i);
      if (!exact) return p;
      return p == Path::kLapack || p == Path::kExact ? Path::kExact : Path::kJacobi;
    }
  }
  LSEF_CHECK_VALUE(false, "rsvd: LSEF_RSVD_PATH must be auto, fused, jacobi, blas, lapack or ",
                   "exact, got '", env, "'");
  return Path::kFused;
}

// The path of least modelled cost, in two steps.
// 1. Exact or randomized, by the matrix alone: the cheaper exact SVD (jacobi or exact) against
//    the cheapest sketching path with the fused path at a full lane group, per matrix. Where
//    the full SVD costs less than the sketch, the call returns the exact truncated SVD, which
//    the randomized one approximates. This step never reads the batch or the threads, so a
//    matrix gets the same answer (up to rounding) alone and in any batch.
// 2. Which path computes that answer (jacobi or exact; fused, blas or lapack: the same
//    algorithm, so they differ by rounding only), by the cost of the call: per matrix, the
//    fused path's cost for the lanes each thread's share fills (lane_group), plus the path's
//    fixed cost of a call spread over the matrices a thread takes (kCallOverhead: a library
//    path's boxed calls cost far more than an in-cache path's, which decides small batches).
inline Path choose_path(const Shape& sh, int64_t n_iter, bool f64, int64_t threads) {
  bool forced = false;
  const Path env = forced_path(sh.exact(), forced);
  if (forced) return env;
  const int64_t batch = std::max<int64_t>(sh.batch, 1);
  const double per_thread = static_cast<double>(batch) /
                            static_cast<double>(std::min(batch, std::max<int64_t>(threads, 1)));
  auto cost = [&](Path p) { return modelled_cost(p, sh, n_iter, f64); };
  auto call = [&](Path p, double per_matrix) {
    return per_matrix + kCallOverhead[f64 ? 1 : 0][static_cast<int>(p)] / per_thread;
  };
  const double jacobi = cost(Path::kJacobi), exact = cost(Path::kExact);
  const double fused_full = cost(Path::kFused);
  const double blas = cost(Path::kBlas), lapack = cost(Path::kLapack);
  if (sh.exact() || std::min(jacobi, exact) < std::min({fused_full, blas, lapack})) {
    return call(Path::kExact, exact) < call(Path::kJacobi, jacobi) ? Path::kExact : Path::kJacobi;
  }
  const double fused = fused_per_matrix(fused_full, modelled_cost(kFusedLone, sh, n_iter, f64),
                                        lane_group(batch, threads));
  const double c_fused = call(Path::kFused, fused), c_blas = call(Path::kBlas, blas);
  const double c_lapack = call(Path::kLapack, lapack);
  if (c_fused <= c_blas && c_fused <= c_lapack) return Path::kFused;
  return c_blas <= c_lapack ? Path::kBlas : Path::kLapack;
}

}  // namespace rsvd
}  // namespace lsef
